// Out-of-place transpose of a row-major [rows, cols] block (leading dimension ld_in) into
// a packed [cols, rows] array: lets CPU adapters run every product on the A B^T kernel.

struct Params { rows: u32, cols: u32, ld_in: u32, in_off: u32, out_off: u32, _p0: u32, _p1: u32, _p2: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(16, 16)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let r = gid.y;
    if (r >= p.rows || c >= p.cols) { return; }
    dst[p.out_off + c * p.rows + r] = src[p.in_off + r * p.ld_in + c];
}
