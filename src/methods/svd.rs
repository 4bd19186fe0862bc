//! Randomized truncated SVD on the GPU (Halko-Martinsson-Tropp subspace iteration): the
//! tall products run as WGSL matmuls, re-orthonormalization is CholeskyQR2 (GPU Gram, CPU
//! Cholesky of the small l x l matrix, GPU triangular solve as a matmul by R^-1) with a
//! shifted-Cholesky fallback, and the small l x n problem is solved on the CPU in f64.

use nalgebra::{DMatrix, SymmetricEigen};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::gpu::{context::Result as GpuResult, matmul, Gpu, GpuBuf};

/// Settings of the randomized SVD.
#[derive(Debug, Clone, Copy)]
pub struct SvdOptions {
    /// Power (subspace) iterations.
    pub power_iters: usize,
    /// Extra columns beyond the wanted rank.
    pub oversample: usize,
    pub seed: u64,
}

impl Default for SvdOptions {
    fn default() -> Self {
        SvdOptions { power_iters: 4, oversample: 16, seed: 0x5eed }
    }
}

/// Top singular triplets of an [m, n] matrix: u [m, k] (row-major), sigma [k], vt [k, n].
#[derive(Debug, Clone)]
pub struct Svd {
    pub m: usize,
    pub n: usize,
    pub u: Vec<f32>,
    pub sigma: Vec<f64>,
    pub vt: Vec<f32>,
}

impl Svd {
    pub fn rank(&self) -> usize {
        self.sigma.len()
    }
}

/// Gram on the GPU, Cholesky in f64; returns R^-1 (upper triangular) as f32 [l, l].
fn cholesky_inverse(gpu: &Gpu, y: &GpuBuf, rows: usize, l: usize) -> GpuResult<Vec<f32>> {
    let g = gpu.zeros(l * l)?;
    let mut enc = gpu.encoder();
    matmul::gram_accumulate(gpu, &mut enc, y, rows, l, &g)?;
    gpu.submit(enc);
    let gv = gpu.read(&g)?;
    let mut gm = DMatrix::<f64>::from_fn(l, l, |i, j| 0.5 * (gv[i * l + j] as f64 + gv[j * l + i] as f64));
    let trace = gm.trace().max(f64::MIN_POSITIVE);
    // Shifted CholeskyQR: a rank-deficient Y gets a small diagonal shift instead of failing.
    let mut shift = 0.0;
    let chol = loop {
        let mut h = gm.clone();
        for i in 0..l {
            h[(i, i)] += shift;
        }
        if let Some(c) = nalgebra::Cholesky::new(h) {
            break c;
        }
        shift = if shift == 0.0 { 1e-7 * trace } else { shift * 10.0 };
        if shift > trace {
            // Y is numerically zero: any orthonormal-ish scaling will do
            for i in 0..l {
                gm[(i, i)] += 1.0;
            }
            break nalgebra::Cholesky::new(gm.clone()).expect("identity-shifted Gram is positive definite");
        }
    };
    let r = chol.l().transpose(); // G = R^T R
    let rinv = r.try_inverse().unwrap_or_else(|| DMatrix::identity(l, l));
    Ok((0..l * l).map(|k| rinv[(k / l, k % l)] as f32).collect())
}

/// Y <- Y R^-1 twice (CholeskyQR2): Y [rows, l] gets orthonormal columns.
fn orthonormalize(gpu: &Gpu, y: GpuBuf, rows: usize, l: usize) -> GpuResult<GpuBuf> {
    let mut y = y;
    for _ in 0..2 {
        let rinv = gpu.upload(&cholesky_inverse(gpu, &y, rows, l)?)?;
        let mut enc = gpu.encoder();
        let next = matmul::matmul(gpu, &mut enc, &y, &rinv, rows, l, l)?;
        gpu.submit(enc);
        y = next;
    }
    Ok(y)
}

/// Top-`k` SVD of the row-major matrix `a` [m, n] already on the GPU.
pub fn randomized_svd(gpu: &Gpu, a: &GpuBuf, m: usize, n: usize, k: usize, opts: SvdOptions) -> GpuResult<Svd> {
    let k = k.min(m).min(n).max(1);
    let l = (k + opts.oversample).min(m).min(n);
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let omega: Vec<f32> = (0..n * l).map(|_| StandardNormal.sample(&mut rng)).collect();
    let omega = gpu.upload(&omega)?;
    let mut enc = gpu.encoder();
    let y = matmul::matmul(gpu, &mut enc, a, &omega, m, n, l)?; // [m, l]
    gpu.submit(enc);
    let mut q = orthonormalize(gpu, y, m, l)?;
    for _ in 0..opts.power_iters {
        // Z = A^T Q [n, l]
        let z = gpu.alloc(n * l)?;
        let mut enc = gpu.encoder();
        matmul::gemm(gpu, &mut enc, matmul::GemmShape { m: n, n: l, k: m }, matmul::Operand::new(a, n).t(), matmul::Operand::new(&q, l), &z, 0, l, 1.0, 0.0)?;
        gpu.submit(enc);
        let z = orthonormalize(gpu, z, n, l)?;
        let mut enc = gpu.encoder();
        let y = matmul::matmul(gpu, &mut enc, a, &z, m, n, l)?;
        gpu.submit(enc);
        q = orthonormalize(gpu, y, m, l)?;
    }
    // B = Q^T A [l, n]
    let b = gpu.alloc(l * n)?;
    let mut enc = gpu.encoder();
    matmul::gemm(gpu, &mut enc, matmul::GemmShape { m: l, n, k: m }, matmul::Operand::new(&q, l).t(), matmul::Operand::new(a, n), &b, 0, n, 1.0, 0.0)?;
    gpu.submit(enc);
    let bh = gpu.read(&b)?;
    let (ub, sigma, vt) = small_svd(&bh, l, n, k);
    // U = Q Ub [m, k]
    let ubg = gpu.upload(&ub)?;
    let mut enc = gpu.encoder();
    let u = matmul::matmul(gpu, &mut enc, &q, &ubg, m, l, k)?;
    gpu.submit(enc);
    Ok(Svd { m, n, u: gpu.read(&u)?, sigma, vt })
}

/// Top-k SVD of a small dense [l, n] matrix (l <= n) through the eigen-decomposition of
/// B B^T in f64: returns Ub [l, k], sigma [k], Vt [k, n].
fn small_svd(b: &[f32], l: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f64>, Vec<f32>) {
    let bm = DMatrix::<f64>::from_fn(l, n, |i, j| b[i * n + j] as f64);
    let bbt = &bm * bm.transpose();
    let eig = SymmetricEigen::new(bbt);
    let mut order: Vec<usize> = (0..l).collect();
    order.sort_by(|&i, &j| eig.eigenvalues[j].total_cmp(&eig.eigenvalues[i]));
    let mut ub = vec![0f32; l * k];
    let mut sigma = Vec::with_capacity(k);
    let mut vt = vec![0f32; k * n];
    for (c, &e) in order.iter().take(k).enumerate() {
        let s = eig.eigenvalues[e].max(0.0).sqrt();
        sigma.push(s);
        let col = eig.eigenvectors.column(e);
        for i in 0..l {
            ub[i * k + c] = col[i] as f32;
        }
        if s > 0.0 {
            // v = B^T u / sigma
            let v = bm.transpose() * col / s;
            for j in 0..n {
                vt[c * n + j] = v[j] as f32;
            }
        }
    }
    (ub, sigma, vt)
}

/// Exact singular values of a row-major [m, n] matrix (CPU, f64): the reference for tests
/// and for measuring how close the randomized SVD gets to the optimum.
pub fn exact_singular_values(a: &[f32], m: usize, n: usize) -> Vec<f64> {
    let am = DMatrix::<f64>::from_fn(m, n, |i, j| a[i * n + j] as f64);
    let mut s: Vec<f64> = am.singular_values().iter().copied().collect();
    s.sort_by(|a, b| b.total_cmp(a));
    s
}

/// ||A - U_k S_k V_k^T||_F computed in f64 on the CPU.
pub fn truncation_error(a: &[f32], svd: &Svd, k: usize) -> f64 {
    let (m, n, r) = (svd.m, svd.n, svd.rank());
    let mut err = 0f64;
    for i in 0..m {
        for j in 0..n {
            let mut approx = 0f64;
            for c in 0..k.min(r) {
                approx += svd.u[i * r + c] as f64 * svd.sigma[c] * svd.vt[c * n + j] as f64;
            }
            err += (a[i * n + j] as f64 - approx).powi(2);
        }
    }
    err.sqrt()
}
