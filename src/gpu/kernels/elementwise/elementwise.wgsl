// Elementwise ops over flat f32 arrays: SiLU-gate product and addition.

struct Params { n: u32, a_off: u32, b_off: u32, out_off: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 { return gid.x + gid.y * nwg.x * 256u; }

// out = silu(a) * b, with a the gate projection and b the up projection.
@compute @workgroup_size(256)
fn silu_mul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.n) { return; }
    let g = a[p.a_off + i];
    out[p.out_off + i] = g / (1.0 + exp(-g)) * b[p.b_off + i];
}

// out = a + b
@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.n) { return; }
    out[p.out_off + i] = a[p.a_off + i] + b[p.b_off + i];
}

// Row bias, in place: x[r, c] += bias[c] (q/k/v biases of qwen2). Separate bindings layout.
struct BiasParams { n: u32, cols: u32, x_off: u32, b_off: u32 }
@group(0) @binding(0) var<uniform> bp: BiasParams;
@group(0) @binding(1) var<storage, read> bias: array<f32>;
@group(0) @binding(2) var<storage, read_write> bx: array<f32>;

@compute @workgroup_size(256)
fn add_bias(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= bp.n) { return; }
    bx[bp.x_off + i] += bias[bp.b_off + i % bp.cols];
}
