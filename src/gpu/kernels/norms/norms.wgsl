// Column sums of squares accumulated over row chunks, and row-wise RMSNorm.

struct ColParams { rows: u32, cols: u32, ld: u32, x_off: u32, out_off: u32, _p0: u32, _p1: u32, _p2: u32 }

@group(0) @binding(0) var<uniform> cp: ColParams;
@group(0) @binding(1) var<storage, read> cx: array<f32>;
@group(0) @binding(2) var<storage, read_write> cout: array<f32>;

var<workgroup> part: array<f32, 256>;

// Sum of `x` over a 256-invocation workgroup (tree reduction in `part`).
fn workgroup_sum(lid: u32, x: f32) -> f32 {
    part[lid] = x;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (lid < stride) { part[lid] += part[lid + stride]; }
        workgroupBarrier();
    }
    return part[0];
}

// out[j] += sum_i x[i, j]^2. Workgroup: 64 columns x 4 row lanes.
@compute @workgroup_size(64, 4)
fn col_sumsq(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let col = wid.x * 64u + lid.x;
    var s = 0.0;
    if (col < cp.cols) {
        for (var r = lid.y; r < cp.rows; r += 4u) {
            let v = cx[cp.x_off + r * cp.ld + col];
            s = fma(v, v, s);
        }
    }
    part[lid.y * 64u + lid.x] = s;
    workgroupBarrier();
    if (lid.y == 0u && col < cp.cols) {
        let t = part[lid.x] + part[64u + lid.x] + part[128u + lid.x] + part[192u + lid.x];
        cout[cp.out_off + col] += t;
    }
}

struct NormParams { rows: u32, cols: u32, x_off: u32, w_off: u32, y_off: u32, eps: f32, _p0: u32, _p1: u32 }

@group(0) @binding(0) var<uniform> np: NormParams;
@group(0) @binding(1) var<storage, read> nx: array<f32>;
@group(0) @binding(2) var<storage, read> nw: array<f32>;
@group(0) @binding(3) var<storage, read_write> ny: array<f32>;

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w. One workgroup per row.
@compute @workgroup_size(256)
fn rms_norm(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= np.rows) { return; }
    let base = row * np.cols;
    var s = 0.0;
    for (var c = lid.x; c < np.cols; c += 256u) {
        let v = nx[np.x_off + base + c];
        s = fma(v, v, s);
    }
    let inv = inverseSqrt(workgroup_sum(lid.x, s) / f32(np.cols) + np.eps);
    for (var c = lid.x; c < np.cols; c += 256u) {
        ny[np.y_off + base + c] = nx[np.x_off + base + c] * inv * nw[np.w_off + c];
    }
}

// Row norms of W scaled by column factors: out[r] = || W[r, :] * s ||_2 (Wanda-style
// channel scores; s = 1 gives plain row norms). One workgroup per row.
struct RowParams { rows: u32, cols: u32, w_off: u32, s_off: u32, o_off: u32, _p0: u32, _p1: u32, _p2: u32 }

@group(0) @binding(0) var<uniform> rp: RowParams;
@group(0) @binding(1) var<storage, read> rw: array<f32>;
@group(0) @binding(2) var<storage, read> rs: array<f32>;
@group(0) @binding(3) var<storage, read_write> rout: array<f32>;

@compute @workgroup_size(256)
fn row_scaled_norm(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= rp.rows) { return; }
    var s = 0.0;
    for (var c = lid.x; c < rp.cols; c += 256u) {
        let v = rw[rp.w_off + row * rp.cols + c] * rs[rp.s_off + c];
        s = fma(v, v, s);
    }
    let total = workgroup_sum(lid.x, s);
    if (lid.x == 0u) { rout[rp.o_off + row] = sqrt(total); }
}
