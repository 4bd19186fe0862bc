// Causal softmax attention with grouped KV heads over independent windows.
// q, o: [tokens, n_heads * head_dim]; k, v: [tokens, n_kv * head_dim], head_dim % 4 == 0,
// element offsets % 4 == 0 (everything is read as vec4). Token t attends to the tokens of
// its own window (t / window) up to itself. One workgroup per (token, head); keys go in
// blocks of KB with an online softmax, so any window length works. For P V, the 64
// invocations split into head_dim/4 lanes (one vec4 of the output each) times as many key
// groups as fit; the groups' partial sums are added at the end.
// With CACHED (generation with a KV cache), q holds new tokens at positions pos0.. and k, v
// a cache from position 0: token t attends to cache rows 0 ..= pos0 + t (window unused).

struct Params {
    tokens: u32, window: u32, n_heads: u32, n_kv: u32,
    head_dim: u32, scale: f32, q_off: u32, k_off: u32,
    v_off: u32, o_off: u32, pos0: u32, _p1: u32,
}

override CACHED: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> o: array<vec4<f32>>;

const WG: u32 = 64u;
const KB: u32 = 256u;

var<workgroup> q_sh: array<vec4<f32>, 64>;
var<workgroup> s_sh: array<f32, KB>;
var<workgroup> red: array<f32, WG>;
var<workgroup> part: array<vec4<f32>, WG>;

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
    let hd4 = p.head_dim / 4u;
    var w0 = 0u;
    var n_keys = p.pos0 + t + 1u;
    if (!CACHED) {
        w0 = (t / p.window) * p.window;
        n_keys = t - w0 + 1u;
    }
    let q_base = (p.q_off + t * p.n_heads * p.head_dim + h * p.head_dim) / 4u;
    for (var d = lid; d < hd4; d += WG) { q_sh[d] = q[q_base + d] * p.scale; }
    workgroupBarrier();

    let lanes = hd4;
    let groups = WG / lanes;
    let lane = lid % lanes;
    let grp = lid / lanes;
    let kv_stride4 = p.n_kv * hd4;
    let k_base = p.k_off / 4u + kvh * hd4;
    let v_base = p.v_off / 4u + kvh * hd4 + lane;

    var m_run = -3.0e38;
    var l_run = 0.0;
    var acc = vec4<f32>(0.0);
    for (var b0 = 0u; b0 < n_keys; b0 += KB) {
        let nb = min(KB, n_keys - b0);
        var local_max = -3.0e38;
        for (var j = lid; j < nb; j += WG) {
            let kb = k_base + (w0 + b0 + j) * kv_stride4;
            var s = 0.0;
            for (var d = 0u; d < hd4; d++) { s += dot(q_sh[d], k[kb + d]); }
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
        l_run = l_run * corr + reduce_sum(lid, local_sum);  // its barriers publish s_sh
        acc *= corr;
        if (grp < groups) {
            for (var j = grp; j < nb; j += groups) {
                acc += s_sh[j] * v[v_base + (w0 + b0 + j) * kv_stride4];
            }
        }
        m_run = m_new;
        workgroupBarrier();
    }
    part[lid] = acc;
    workgroupBarrier();
    if (grp == 0u) {
        var total = vec4<f32>(0.0);
        for (var gi = 0u; gi < groups; gi++) { total += part[gi * lanes + lane]; }
        o[(p.o_off + t * p.n_heads * p.head_dim + h * p.head_dim) / 4u + lane] = total / l_run;
    }
}
