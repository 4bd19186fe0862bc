// Rotary position embedding, Hugging Face rotate-half convention, in place.
// x is [tokens, n_heads * head_dim]; token t sits at position pos0 + (t % window).
// table holds cos then sin: cos at [pos * half + i], sin at [n_pos * half + pos * half + i].

struct Params { tokens: u32, n_heads: u32, head_dim: u32, window: u32, pos0: u32, n_pos: u32, x_off: u32, _p: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let half = p.head_dim / 2u;
    let idx = gid.x + gid.y * nwg.x * 256u;
    let per_token = p.n_heads * half;
    if (idx >= p.tokens * per_token) { return; }
    let t = idx / per_token;
    let r = idx % per_token;
    let h = r / half;
    let i = r % half;
    let pos = p.pos0 + t % p.window;
    let c = table[pos * half + i];
    let s = table[p.n_pos * half + pos * half + i];
    let base = p.x_off + t * p.n_heads * p.head_dim + h * p.head_dim;
    let x1 = x[base + i];
    let x2 = x[base + i + half];
    x[base + i] = x1 * c - x2 * s;
    x[base + i + half] = x2 * c + x1 * s;
}
