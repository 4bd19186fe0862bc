// C = alpha * op(A) op(B) + beta * C, f32, 64x64 output tile per workgroup, 4x4 per invocation.
// op(A) is [M,K]: A[m*lda+k], or A[k*lda+m] when TRANS_A (A stored [K,M]).
// op(B) is [K,N]: B[k*ldb+n], or B[n*ldb+k] when TRANS_B (B stored [N,K], the weight layout).
// Offsets are element offsets inside the bound windows.

struct Params {
    m: u32, n: u32, k: u32,
    lda: u32, ldb: u32, ldc: u32,
    a_off: u32, b_off: u32, c_off: u32,
    alpha: f32, beta: f32, _pad: u32,
}

override TRANS_A: bool = false;
override TRANS_B: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> A: array<f32>;
@group(0) @binding(2) var<storage, read> B: array<f32>;
@group(0) @binding(3) var<storage, read_write> C: array<f32>;

const TILE: u32 = 64u;
const BK: u32 = 16u;
// k-major tiles: As[k * TILE + m], Bs[k * TILE + n]
var<workgroup> As: array<f32, 1024>;
var<workgroup> Bs: array<f32, 1024>;

@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let m0 = wid.y * TILE;
    let n0 = wid.x * TILE;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = 0.0; }

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var i = 0u; i < 4u; i++) {
            let e = tid + i * 256u;
            var m: u32; var ka: u32;
            // load along the contiguous axis of each operand
            if (TRANS_A) { ka = e / TILE; m = e % TILE; } else { m = e / BK; ka = e % BK; }
            let gm = m0 + m; let gk = k0 + ka;
            var va = 0.0;
            if (gm < p.m && gk < p.k) {
                if (TRANS_A) { va = A[p.a_off + gk * p.lda + gm]; } else { va = A[p.a_off + gm * p.lda + gk]; }
            }
            As[ka * TILE + m] = va;

            var n: u32; var kb: u32;
            if (TRANS_B) { n = e / BK; kb = e % BK; } else { kb = e / TILE; n = e % TILE; }
            let gn = n0 + n; let gk2 = k0 + kb;
            var vb = 0.0;
            if (gn < p.n && gk2 < p.k) {
                if (TRANS_B) { vb = B[p.b_off + gn * p.ldb + gk2]; } else { vb = B[p.b_off + gk2 * p.ldb + gn]; }
            }
            Bs[kb * TILE + n] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = As[kk * TILE + ty + 16u * i];
                b[i] = Bs[kk * TILE + tx + 16u * i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] = fma(a[i], b[j], acc[i * 4u + j]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let gm = m0 + ty + 16u * i;
        if (gm >= p.m) { continue; }
        for (var j = 0u; j < 4u; j++) {
            let gn = n0 + tx + 16u * j;
            if (gn >= p.n) { continue; }
            let idx = p.c_off + gm * p.ldc + gn;
            var v = p.alpha * acc[i * 4u + j];
            if (p.beta != 0.0) { v += p.beta * C[idx]; }
            C[idx] = v;
        }
    }
}
