// C = alpha * A B^T + beta * C for A [M,K] and B [N,K] both K-contiguous (the linear-layer
// layout), K a multiple of 4. No workgroup memory: each invocation computes a 4x4 block
// from vec4 loads. On CPU Vulkan drivers (lavapipe), where workgroup memory and barriers
// are emulated, this beats the tiled kernel; GPUs use the tiled one.

struct Params {
    m: u32, n: u32, k: u32,
    lda: u32, ldb: u32, ldc: u32,
    a_off: u32, b_off: u32, c_off: u32,
    alpha: f32, beta: f32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> A: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> B: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> C: array<f32>;

@compute @workgroup_size(8, 8)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let m0 = gid.y * 4u;
    let n0 = gid.x * 4u;
    if (m0 >= p.m || n0 >= p.n) { return; }
    // rows past the end repeat the last row (results discarded) so the loop has no branches
    var ar: array<u32, 4>;
    var br: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        ar[i] = (p.a_off + min(m0 + i, p.m - 1u) * p.lda) / 4u;
        br[i] = (p.b_off + min(n0 + i, p.n - 1u) * p.ldb) / 4u;
    }
    var acc0 = vec4<f32>(0.0); var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0); var acc3 = vec4<f32>(0.0);
    let k4 = p.k / 4u;
    for (var kk = 0u; kk < k4; kk++) {
        let b0 = B[br[0] + kk]; let b1 = B[br[1] + kk]; let b2 = B[br[2] + kk]; let b3 = B[br[3] + kk];
        let a0 = A[ar[0] + kk]; let a1 = A[ar[1] + kk]; let a2 = A[ar[2] + kk]; let a3 = A[ar[3] + kk];
        acc0 += vec4<f32>(dot(a0, b0), dot(a0, b1), dot(a0, b2), dot(a0, b3));
        acc1 += vec4<f32>(dot(a1, b0), dot(a1, b1), dot(a1, b2), dot(a1, b3));
        acc2 += vec4<f32>(dot(a2, b0), dot(a2, b1), dot(a2, b2), dot(a2, b3));
        acc3 += vec4<f32>(dot(a3, b0), dot(a3, b1), dot(a3, b2), dot(a3, b3));
    }
    var acc = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let gm = m0 + i;
        if (gm >= p.m) { break; }
        for (var j = 0u; j < 4u; j++) {
            let gn = n0 + j;
            if (gn >= p.n) { break; }
            let idx = p.c_off + gm * p.ldc + gn;
            var v = p.alpha * acc[i][j];
            if (p.beta != 0.0) { v += p.beta * C[idx]; }
            C[idx] = v;
        }
    }
}
