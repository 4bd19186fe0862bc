// Per-row negative log-likelihood of a target class: nll[r] = logsumexp(logits[r, :]) - logits[r, target[r]].
// Targets are stored as f32 (exact for vocabularies below 2^24).

struct Params { rows: u32, cols: u32, l_off: u32, t_off: u32, o_off: u32, _p0: u32, _p1: u32, _p2: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<f32>;
@group(0) @binding(3) var<storage, read_write> nll: array<f32>;

var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.rows) { return; }
    let base = p.l_off + r * p.cols;
    var m = -3.0e38;
    for (var c = lid; c < p.cols; c += 256u) { m = max(m, logits[base + c]); }
    red[lid] = m;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
        workgroupBarrier();
    }
    let mx = red[0];
    workgroupBarrier();
    var z = 0.0;
    for (var c = lid; c < p.cols; c += 256u) { z += exp(logits[base + c] - mx); }
    red[lid] = z;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] += red[lid + s]; }
        workgroupBarrier();
    }
    if (lid == 0u) {
        // a target outside the vocabulary has no logit: NaN says so (modules are compiled
        // without clamps, so an unguarded read would take another row's value)
        let t = u32(targets[p.t_off + r]);
        var v = bitcast<f32>(0x7fc00000u);
        if (t < p.cols) { v = mx + log(red[0]) - logits[base + t]; }
        nll[p.o_off + r] = v;
    }
}
