// Causal softmax attention with grouped KV heads over independent windows.
// q, o: [tokens, n_heads * head_dim]; k, v: [tokens, n_kv * head_dim]. Token t attends to
// tokens of its own window (t / window) up to itself. One workgroup per (token, head),
// keys in blocks of KB with an online softmax, so any window length works.

struct Params {
    tokens: u32, window: u32, n_heads: u32, n_kv: u32,
    head_dim: u32, scale: f32, q_off: u32, k_off: u32,
    v_off: u32, o_off: u32, _p0: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;

const WG: u32 = 64u;
const KB: u32 = 256u;
const MAX_HD: u32 = 256u;

var<workgroup> q_sh: array<f32, MAX_HD>;
var<workgroup> s_sh: array<f32, KB>;
var<workgroup> red: array<f32, WG>;

fn reduce_max(lid: u32, x: f32) -> f32 {
    red[lid] = x;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(lid: u32, x: f32) -> f32 {
    red[lid] = x;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] = red[lid] + red[lid + s]; }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let g = wid.x + wid.y * nwg.x;
    if (g >= p.tokens * p.n_heads) { return; }
    let t = g / p.n_heads;
    let h = g % p.n_heads;
    let kvh = h / (p.n_heads / p.n_kv);
    let hd = p.head_dim;
    let w0 = (t / p.window) * p.window;
    let n_keys = t - w0 + 1u;
    let q_base = p.q_off + t * p.n_heads * hd + h * hd;
    for (var d = lid; d < hd; d += WG) { q_sh[d] = q[q_base + d] * p.scale; }
    workgroupBarrier();

    var m_run = -3.0e38;
    var l_run = 0.0;
    var acc: array<f32, 4>;  // dims lid, lid+64, lid+128, lid+192
    for (var j = 0u; j < 4u; j++) { acc[j] = 0.0; }
    let kv_stride = p.n_kv * hd;

    for (var b0 = 0u; b0 < n_keys; b0 += KB) {
        let nb = min(KB, n_keys - b0);
        var local_max = -3.0e38;
        for (var j = lid; j < nb; j += WG) {
            let kb = p.k_off + (w0 + b0 + j) * kv_stride + kvh * hd;
            var s = 0.0;
            for (var d = 0u; d < hd; d++) { s = fma(q_sh[d], k[kb + d], s); }
            s_sh[j] = s;
            local_max = max(local_max, s);
        }
        let m_new = max(m_run, reduce_max(lid, local_max));
        var local_sum = 0.0;
        for (var j = lid; j < nb; j += WG) {
            let e = exp(s_sh[j] - m_new);
            s_sh[j] = e;
            local_sum += e;
        }
        let corr = exp(m_run - m_new);
        l_run = l_run * corr + reduce_sum(lid, local_sum);  // the reduction's barriers publish s_sh
        for (var jj = 0u; jj < 4u; jj++) {
            let d = lid + jj * WG;
            if (d < hd) {
                var a = acc[jj] * corr;
                for (var j = 0u; j < nb; j++) {
                    a = fma(s_sh[j], v[p.v_off + (w0 + b0 + j) * kv_stride + kvh * hd + d], a);
                }
                acc[jj] = a;
            }
        }
        m_run = m_new;
        workgroupBarrier();
    }
    let o_base = p.o_off + t * p.n_heads * hd + h * hd;
    for (var jj = 0u; jj < 4u; jj++) {
        let d = lid + jj * WG;
        if (d < hd) { o[o_base + d] = acc[jj] / l_run; }
    }
}
