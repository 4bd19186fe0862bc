// C = alpha * op(A) op(B) + beta * C, f32, register-tiled for GPUs: a 128x128 output tile per
// workgroup of 16x16 invocations, 8x8 outputs per invocation (two 4x4 quads 64 apart per
// axis), K in steps of 8 through two workgroup-memory stages (double buffering: the next
// step's global loads are in flight while this step multiplies; one barrier per step).
// op(A) is [M,K]: A[m*lda+k], or A[k*lda+m] when TRANS_A (A stored [K,M]).
// op(B) is [K,N]: B[k*ldb+n], or B[n*ldb+k] when TRANS_B (B stored [N,K], the weight layout).
// A and B are bound as vec4 arrays whose windows cover whole vec4s (the wrapper rounds them);
// with VEC_A / VEC_B each invocation's four consecutive elements are one aligned vec4 load
// (the wrapper sets them only when the contiguous extent, leading dimension and offset are
// multiples of 4), otherwise the four elements are read one by one. Every global index is
// guarded by the exact bounds (M, N, K): the module is compiled without runtime checks.

struct Params {
    m: u32, n: u32, k: u32,
    lda: u32, ldb: u32, ldc: u32,
    a_off: u32, b_off: u32, c_off: u32,
    alpha: f32, beta: f32, _pad: u32,
}

override TRANS_A: bool = false;
override TRANS_B: bool = false;
override VEC_A: bool = false;
override VEC_B: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> A: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> B: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> C: array<f32>;

const BM: u32 = 128u;
const BK: u32 = 8u;
// k-major tiles of vec4s along M (or N): 32 vec4 per k row plus one of padding, so the
// transposing stores of a K-contiguous operand (rows m, m+1, ... at the same k) fall in
// different banks
const ROW4: u32 = 33u;
var<workgroup> As: array<vec4<f32>, 528>;  // 2 stages x BK x ROW4
var<workgroup> Bs: array<vec4<f32>, 528>;

fn a_elem(i: u32) -> f32 { return A[i >> 2u][i & 3u]; }
fn b_elem(i: u32) -> f32 { return B[i >> 2u][i & 3u]; }

// Four consecutive elements of A's tile for this invocation at step k0 (zeros outside op(A)).
// Not TRANS_A: row m = tid / 2, k = k0 + 4 (tid % 2) .. +3. TRANS_A: k = k0 + tid / 32,
// m = 4 (tid % 32) .. +3.
fn load_a(tid: u32, m0: u32, k0: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (TRANS_A) {
        let gk = k0 + tid / 32u;
        let gm = m0 + (tid % 32u) * 4u;
        if (gk < p.k) {
            let base = p.a_off + gk * p.lda + gm;
            if (VEC_A) {
                // M % 4 == 0: the vec4 is inside op(A) whenever its first element is
                if (gm < p.m) { v = A[base >> 2u]; }
            } else {
                for (var j = 0u; j < 4u; j++) { if (gm + j < p.m) { v[j] = a_elem(base + j); } }
            }
        }
    } else {
        let gm = m0 + tid / 2u;
        let gk = k0 + (tid % 2u) * 4u;
        if (gm < p.m) {
            let base = p.a_off + gm * p.lda + gk;
            if (VEC_A) {
                if (gk < p.k) { v = A[base >> 2u]; }
            } else {
                for (var j = 0u; j < 4u; j++) { if (gk + j < p.k) { v[j] = a_elem(base + j); } }
            }
        }
    }
    return v;
}

// The same for op(B): TRANS_B: column n = tid / 2, k = k0 + 4 (tid % 2) .. +3; otherwise
// k = k0 + tid / 32, n = 4 (tid % 32) .. +3.
fn load_b(tid: u32, n0: u32, k0: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (TRANS_B) {
        let gn = n0 + tid / 2u;
        let gk = k0 + (tid % 2u) * 4u;
        if (gn < p.n) {
            let base = p.b_off + gn * p.ldb + gk;
            if (VEC_B) {
                if (gk < p.k) { v = B[base >> 2u]; }
            } else {
                for (var j = 0u; j < 4u; j++) { if (gk + j < p.k) { v[j] = b_elem(base + j); } }
            }
        }
    } else {
        let gk = k0 + tid / 32u;
        let gn = n0 + (tid % 32u) * 4u;
        if (gk < p.k) {
            let base = p.b_off + gk * p.ldb + gn;
            if (VEC_B) {
                if (gn < p.n) { v = B[base >> 2u]; }
            } else {
                for (var j = 0u; j < 4u; j++) { if (gn + j < p.n) { v[j] = b_elem(base + j); } }
            }
        }
    }
    return v;
}

fn store_a(tid: u32, stage: u32, v: vec4<f32>) {
    if (TRANS_A) {
        As[(stage * BK + tid / 32u) * ROW4 + tid % 32u] = v;
    } else {
        let m = tid / 2u;
        let k = (tid % 2u) * 4u;
        for (var j = 0u; j < 4u; j++) { As[(stage * BK + k + j) * ROW4 + m / 4u][m % 4u] = v[j]; }
    }
}

fn store_b(tid: u32, stage: u32, v: vec4<f32>) {
    if (TRANS_B) {
        let n = tid / 2u;
        let k = (tid % 2u) * 4u;
        for (var j = 0u; j < 4u; j++) { Bs[(stage * BK + k + j) * ROW4 + n / 4u][n % 4u] = v[j]; }
    } else {
        Bs[(stage * BK + tid / 32u) * ROW4 + tid % 32u] = v;
    }
}

@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let m0 = wid.y * BM;
    let n0 = wid.x * BM;
    // acc[2 r + h]: output row (r < 4: 4 ty + r, else 64 + 4 ty + r - 4), columns 4 tx + 64 h .. +3
    var acc: array<vec4<f32>, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = vec4<f32>(0.0); }

    let steps = (p.k + BK - 1u) / BK;
    if (steps > 0u) {
        store_a(tid, 0u, load_a(tid, m0, 0u));
        store_b(tid, 0u, load_b(tid, n0, 0u));
    }
    workgroupBarrier();
    for (var s = 0u; s < steps; s++) {
        let cur = s % 2u;
        let more = s + 1u < steps;
        var na = vec4<f32>(0.0);
        var nb = vec4<f32>(0.0);
        if (more) {
            na = load_a(tid, m0, (s + 1u) * BK);
            nb = load_b(tid, n0, (s + 1u) * BK);
        }
        for (var kk = 0u; kk < BK; kk++) {
            let row = (cur * BK + kk) * ROW4;
            let a0 = As[row + ty];
            let a1 = As[row + ty + 16u];
            let b0 = Bs[row + tx];
            let b1 = Bs[row + tx + 16u];
            for (var r = 0u; r < 4u; r++) {
                acc[2u * r] = fma(vec4<f32>(a0[r]), b0, acc[2u * r]);
                acc[2u * r + 1u] = fma(vec4<f32>(a0[r]), b1, acc[2u * r + 1u]);
                acc[2u * r + 8u] = fma(vec4<f32>(a1[r]), b0, acc[2u * r + 8u]);
                acc[2u * r + 9u] = fma(vec4<f32>(a1[r]), b1, acc[2u * r + 9u]);
            }
        }
        if (more) {
            store_a(tid, 1u - cur, na);
            store_b(tid, 1u - cur, nb);
        }
        workgroupBarrier();
    }

    for (var r = 0u; r < 8u; r++) {
        var gm = m0 + 4u * ty + r;
        if (r >= 4u) { gm = m0 + 64u + 4u * ty + r - 4u; }
        if (gm >= p.m) { continue; }
        for (var h = 0u; h < 2u; h++) {
            let v = acc[2u * r + h];
            for (var j = 0u; j < 4u; j++) {
                let gn = n0 + 64u * h + 4u * tx + j;
                if (gn >= p.n) { continue; }
                let idx = p.c_off + gm * p.ldc + gn;
                var c = p.alpha * v[j];
                if (p.beta != 0.0) { c += p.beta * C[idx]; }
                C[idx] = c;
            }
        }
    }
}
