// Flash-style causal attention with grouped KV heads over independent windows (and, with
// CACHED, new queries against a KV cache), for head_dim <= 128, head_dim % 4 == 0.
// q, o: [tokens, n_heads * head_dim]; k, v: [rows, n_kv * head_dim]; everything read as vec4.
// One workgroup per (block of BQ queries of one window, head): the queries sit in workgroup
// memory; keys and values stream through it in tiles of BKEY rows loaded row by row (each
// row contiguous, so neighbouring invocations read neighbouring vec4s); each query row keeps
// a running max and sum (online softmax) and its output accumulators stay in registers.
// Key tiles start at the window's first key, so a query row's sums do not depend on which
// other queries share its block: a cached step reproduces the full pass's row bit for bit.
// Without CACHED, token t attends to its window's tokens up to itself; with CACHED, q holds
// new tokens at positions pos0.. and token t attends to cache rows 0 ..= pos0 + t.

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
const BQ: u32 = 16u;
const BKEY: u32 = 16u;
// rows of 32 vec4 (head_dim 128) plus one of padding: the 8 query rows a subgroup reads at
// once fall in different banks
const ROW: u32 = 33u;
// each invocation: query row lid / 4, output vec4s (lid % 4) + 4 i, i < 8
const PER: u32 = 8u;
// scores of masked keys (exp gives exactly 0 once the row has a real maximum)
const MASKED: f32 = -3.0e38;

var<workgroup> q_sh: array<vec4<f32>, 528>;  // BQ x ROW
var<workgroup> k_sh: array<vec4<f32>, 528>;  // BKEY x ROW
var<workgroup> v_sh: array<vec4<f32>, 528>;
var<workgroup> p_sh: array<f32, 256>;        // BQ x BKEY scores, then probabilities
var<workgroup> corr_sh: array<f32, 16>;      // per row: rescale of the accumulators
var<workgroup> l_sh: array<f32, 16>;         // per row: the final softmax denominator

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let blocks_per_window = (p.window + BQ - 1u) / BQ;
    let blocks = (p.tokens / p.window) * blocks_per_window;
    let g = wid.x + wid.y * nwg.x;
    if (g >= blocks * p.n_heads) { return; }
    let blk = g / p.n_heads;
    let h = g % p.n_heads;
    let kvh = h / (p.n_heads / p.n_kv);
    let win = blk / blocks_per_window;
    let q0 = win * p.window + (blk % blocks_per_window) * BQ;   // first query (token index)
    let nq = min(BQ, (win + 1u) * p.window - q0);               // queries in this block
    let hd4 = p.head_dim / 4u;
    let q_stride4 = p.n_heads * hd4;
    let kv_stride4 = p.n_kv * hd4;
    // key rows: from the window's first token (or cache row 0); query t's last key
    var key_lo = win * p.window;
    var shift = 0u;
    if (CACHED) { key_lo = 0u; shift = p.pos0; }
    let key_hi = q0 + nq - 1u + shift;                          // last key any query needs

    for (var e = lid; e < BQ * hd4; e += WG) {
        let r = e / hd4;
        let d = e % hd4;
        var x = vec4<f32>(0.0);
        if (r < nq) { x = q[p.q_off / 4u + (q0 + r) * q_stride4 + h * hd4 + d] * p.scale; }
        q_sh[r * ROW + d] = x;
    }

    let qi = lid / 4u;
    let c = lid % 4u;
    let my_last = q0 + qi + shift;                              // this row's last key
    var acc: array<vec4<f32>, 8>;
    for (var i = 0u; i < PER; i++) { acc[i] = vec4<f32>(0.0); }
    var m_run = MASKED;
    var l_run = 0.0;

    for (var kt0 = key_lo; kt0 <= key_hi; kt0 += BKEY) {
        for (var e = lid; e < BKEY * hd4; e += WG) {
            let r = e / hd4;
            let d = e % hd4;
            var kx = vec4<f32>(0.0);
            var vx = vec4<f32>(0.0);
            if (kt0 + r <= key_hi) {
                let row = (kt0 + r) * kv_stride4 + kvh * hd4 + d;
                kx = k[p.k_off / 4u + row];
                vx = v[p.v_off / 4u + row];
            }
            k_sh[r * ROW + d] = kx;
            v_sh[r * ROW + d] = vx;
        }
        workgroupBarrier();  // also publishes q_sh on the first tile
        for (var t = 0u; t < 4u; t++) {
            let j = c + 4u * t;
            var s = MASKED;
            if (qi < nq && kt0 + j <= my_last) {
                s = 0.0;
                for (var d = 0u; d < hd4; d++) { s += dot(q_sh[qi * ROW + d], k_sh[j * ROW + d]); }
            }
            p_sh[qi * BKEY + j] = s;
        }
        workgroupBarrier();
        if (lid < BQ) {
            var mx = MASKED;
            for (var j = 0u; j < BKEY; j++) { mx = max(mx, p_sh[lid * BKEY + j]); }
            let m_new = max(m_run, mx);
            var sum = 0.0;
            for (var j = 0u; j < BKEY; j++) {
                let s = p_sh[lid * BKEY + j];
                var e = 0.0;
                if (s > MASKED) { e = exp(s - m_new); }
                p_sh[lid * BKEY + j] = e;
                sum += e;
            }
            let corr = exp(m_run - m_new);
            l_run = l_run * corr + sum;
            m_run = m_new;
            corr_sh[lid] = corr;
        }
        workgroupBarrier();
        let corr = corr_sh[qi];
        for (var i = 0u; i < PER; i++) {
            let d = c + 4u * i;
            if (d < hd4) {
                var a = acc[i] * corr;
                for (var j = 0u; j < BKEY; j++) { a += p_sh[qi * BKEY + j] * v_sh[j * ROW + d]; }
                acc[i] = a;
            }
        }
        workgroupBarrier();  // the next tile overwrites k_sh, v_sh and p_sh
    }
    if (lid < BQ) { l_sh[lid] = l_run; }
    workgroupBarrier();
    if (qi < nq) {
        let l = l_sh[qi];
        for (var i = 0u; i < PER; i++) {
            let d = c + 4u * i;
            if (d < hd4) { o[p.o_off / 4u + (q0 + qi) * q_stride4 + h * hd4 + d] = acc[i] / l; }
        }
    }
}
