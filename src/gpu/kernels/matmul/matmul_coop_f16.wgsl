enable f16;
enable wgpu_cooperative_matrix;

// Y = alpha X W^T + beta Y on cooperative matrices (tensor cores): X [M,K] f32 activations,
// W [N,K] f16 weights (the linear layout), f32 accumulation and output. A 64x64 output tile
// per workgroup of 128 invocations = 4 subgroups of 32 (the wrapper runs this only where the
// subgroup size is fixed at 32 and the adapter advertises 16x16x16 f16 -> f32); subgroup s
// owns the 32x32 quarter (s / 2, s % 2) as 2x2 matrices of 16x16. K advances by 32: each step
// stages X (rounded to f16) and W in workgroup memory with exact guards (zeros outside), then
// two 16-deep multiply-adds. The result goes through workgroup memory so that the global
// writes are guarded element by element (any M, N, leading dimension and offset).

struct Params {
    m: u32, n: u32, k: u32,
    lda: u32, ldw: u32, ldc: u32,
    a_off: u32, w_off: u32, c_off: u32,
    alpha: f32, beta: f32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> W: array<f16>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;

const BM: u32 = 64u;
const BK: u32 = 32u;
// f16 row stride of the staged tiles: 32 + 8 padding halves (80 bytes, a multiple of 16)
const STR: u32 = 40u;
var<workgroup> xs: array<f16, 2560>;  // [64 rows of X][STR]
var<workgroup> ws: array<f16, 2560>;  // [64 rows of W][STR]
var<workgroup> ys: array<f32, 4096>;  // [64][64] result tile

@compute @workgroup_size(128)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32,
        @builtin(workgroup_id) wid: vec3<u32>) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BM;
    let rb = (sg / 2u) * 32u;
    let cb = (sg % 2u) * 32u;
    var acc00 = coop_mat16x16<f32, C>();
    var acc01 = coop_mat16x16<f32, C>();
    var acc10 = coop_mat16x16<f32, C>();
    var acc11 = coop_mat16x16<f32, C>();
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // 64 x 32 of each operand, 16 elements per invocation, consecutive along K
        for (var i = 0u; i < 16u; i++) {
            let e = lid + 128u * i;
            let r = e / BK;
            let kk = e % BK;
            let gk = k0 + kk;
            var xv = 0.0h;
            if (m0 + r < p.m && gk < p.k) { xv = f16(X[p.a_off + (m0 + r) * p.lda + gk]); }
            xs[r * STR + kk] = xv;
            var wv = 0.0h;
            if (n0 + r < p.n && gk < p.k) { wv = W[p.w_off + (n0 + r) * p.ldw + gk]; }
            ws[r * STR + kk] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += 16u) {
            // X rows are row-major A; W rows [n][k] are B = W^T stored column-major
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&xs[rb * STR + kk], STR);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&xs[(rb + 16u) * STR + kk], STR);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&ws[cb * STR + kk], STR);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&ws[(cb + 16u) * STR + kk], STR);
            acc00 = coopMultiplyAdd(a0, b0, acc00);
            acc01 = coopMultiplyAdd(a0, b1, acc01);
            acc10 = coopMultiplyAdd(a1, b0, acc10);
            acc11 = coopMultiplyAdd(a1, b1, acc11);
        }
        workgroupBarrier();
    }
    coopStoreT(acc00, &ys[rb * BM + cb], BM);
    coopStoreT(acc01, &ys[rb * BM + cb + 16u], BM);
    coopStoreT(acc10, &ys[(rb + 16u) * BM + cb], BM);
    coopStoreT(acc11, &ys[(rb + 16u) * BM + cb + 16u], BM);
    workgroupBarrier();
    for (var e = lid; e < BM * BM; e += 128u) {
        let gm = m0 + e / BM;
        let gn = n0 + e % BM;
        if (gm < p.m && gn < p.n) {
            let idx = p.c_off + gm * p.ldc + gn;
            var v = p.alpha * ys[e];
            if (p.beta != 0.0) { v += p.beta * Y[idx]; }
            Y[idx] = v;
        }
    }
}
