//! Randomized truncated SVD on the GPU (Halko-Martinsson-Tropp subspace iteration): every
//! product with the matrix runs as a WGSL matmul; re-orthonormalization is CholeskyQR2 (GPU
//! Gram, host Cholesky and triangular inverse of the small l x l factor, GPU product by
//! R^-1) with a bounded shifted-Cholesky fallback; the projected l x n problem is solved
//! through its l x l Gram matrix (GPU product, host eigen-decomposition, GPU product for V).

use std::time::Instant;

use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::{Mat, Side};
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::gpu::{context::GpuError, matmul, Gpu, GpuBuf};

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
    /// Seconds of host-side linear algebra (Cholesky, triangular inverses, the small
    /// eigen-decomposition) within `seconds`, the decomposition's wall time.
    pub host_seconds: f64,
    pub seconds: f64,
}

impl Svd {
    pub fn rank(&self) -> usize {
        self.sigma.len()
    }
}

/// Why a decomposition could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum SvdError {
    /// The matrix (or a product of it) holds NaN or infinite values: the subspace iteration
    /// would never converge, so it stops at the first check.
    #[error("the {m} x {n} matrix being decomposed has non-finite values (NaN or infinity) or values too large for f32 products")]
    NonFinite { m: usize, n: usize },
    #[error("the eigen-decomposition of the {l} x {l} projected problem did not converge")]
    NoConvergence { l: usize },
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

pub type SvdResult<T> = std::result::Result<T, SvdError>;

/// Host-side linear algebra time of a decomposition, to report where the time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostClock(std::time::Duration);

impl HostClock {
    /// Runs `f`, counting its time as host linear algebra.
    pub fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.0 += t.elapsed();
        out
    }
    /// Adds host time measured elsewhere (a nested decomposition's).
    pub fn add(&mut self, seconds: f64) {
        self.0 += std::time::Duration::from_secs_f64(seconds.max(0.0));
    }
    pub fn seconds(&self) -> f64 {
        self.0.as_secs_f64()
    }
}

/// Shifts tried on a Gram matrix that is not numerically positive definite, as fractions
/// of its trace: Y nearly rank-deficient gets a small diagonal shift (shifted CholeskyQR),
/// and the loop is bounded so no input can make it spin.
const CHOLESKY_SHIFTS: [f64; 9] = [0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];

/// R^-1 (upper triangular, f32 [l, l]) for the Gram matrix G = Y^T Y = R^T R read back from
/// the GPU: Cholesky and a triangular inversion in f64 (faer).
fn gram_to_rinv(gv: &[f32], l: usize, m: usize) -> SvdResult<Vec<f32>> {
    if gv.iter().any(|x| !x.is_finite()) {
        return Err(SvdError::NonFinite { m, n: l });
    }
    let g = Mat::<f64>::from_fn(l, l, |i, j| 0.5 * (gv[i * l + j] as f64 + gv[j * l + i] as f64));
    let trace: f64 = (0..l).map(|i| g[(i, i)]).sum::<f64>().max(f64::MIN_POSITIVE);
    let lower = CHOLESKY_SHIFTS
        .iter()
        .find_map(|&f| {
            let h = Mat::<f64>::from_fn(l, l, |i, j| g[(i, j)] + if i == j { f * trace } else { 0.0 });
            h.llt(Side::Lower).ok().map(|c| c.L().to_owned())
        })
        // a Gram matrix the largest shift cannot fix is numerically zero: any scaling will do
        .unwrap_or_else(|| Mat::<f64>::identity(l, l));
    // G = L L^T = R^T R with R = L^T, so R^-1 = (L^-1)^T
    let mut linv = Mat::<f64>::zeros(l, l);
    invert_lower_triangular(linv.as_mut(), lower.as_ref(), faer::get_global_parallelism());
    Ok((0..l * l).map(|k| linv[(k % l, k / l)] as f32).collect())
}

/// Y <- Y R^-1 twice (CholeskyQR2): Y [rows, l] gets orthonormal columns.
fn orthonormalize(gpu: &Gpu, y: GpuBuf, rows: usize, l: usize, host: &mut HostClock) -> SvdResult<GpuBuf> {
    let mut y = y;
    for _ in 0..2 {
        let g = gpu.zeros(l * l)?;
        let mut enc = gpu.encoder();
        matmul::gram_accumulate(gpu, &mut enc, &y, rows, l, &g)?;
        gpu.submit(enc);
        let gv = gpu.read(&g)?;
        let rinv = host.time(|| gram_to_rinv(&gv, l, rows))?;
        let rinv = gpu.upload(&rinv)?;
        let mut enc = gpu.encoder();
        let next = matmul::matmul(gpu, &mut enc, &y, &rinv, rows, l, l)?;
        gpu.submit(enc);
        y = next;
    }
    Ok(y)
}

/// Top-`k` SVD of the row-major matrix `a` [m, n] already on the GPU. Every product with
/// `a` (and the projected problem's Gram matrix and V) runs on the GPU; the host does only
/// O(l^3) work on l x l matrices, l = k + oversample: Cholesky factors and their triangular
/// inverses, and one symmetric eigen-decomposition.
pub fn randomized_svd(gpu: &Gpu, a: &GpuBuf, m: usize, n: usize, k: usize, opts: SvdOptions) -> SvdResult<Svd> {
    let started = Instant::now();
    let mut host = HostClock::default();
    let k = k.min(m).min(n).max(1);
    let l = (k + opts.oversample).min(m).min(n);
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let omega: Vec<f32> = (0..n * l).map(|_| StandardNormal.sample(&mut rng)).collect();
    let omega = gpu.upload(&omega)?;
    let mut enc = gpu.encoder();
    let y = matmul::matmul(gpu, &mut enc, a, &omega, m, n, l)?; // [m, l]
    gpu.submit(enc);
    drop(omega);
    let mut q = orthonormalize(gpu, y, m, l, &mut host)?;
    for _ in 0..opts.power_iters {
        // Z = A^T Q [n, l]
        let z = gpu.alloc(n * l)?;
        let mut enc = gpu.encoder();
        matmul::gemm(gpu, &mut enc, matmul::GemmCall { shape: matmul::GemmShape { m: n, n: l, k: m }, a: matmul::Operand::new(a, n).t(), b: matmul::Operand::new(&q, l), c: matmul::GemmOutput::new(&z, l), scale: matmul::Scale::SET })?;
        gpu.submit(enc);
        drop(q);
        let z = orthonormalize(gpu, z, n, l, &mut host)?;
        let mut enc = gpu.encoder();
        let y = matmul::matmul(gpu, &mut enc, a, &z, m, n, l)?;
        gpu.submit(enc);
        drop(z);
        q = orthonormalize(gpu, y, m, l, &mut host)?;
    }
    // B = Q^T A [l, n], and its Gram matrix B B^T [l, l]
    let b = gpu.alloc(l * n)?;
    let bbt = gpu.alloc(l * l)?;
    let mut enc = gpu.encoder();
    matmul::gemm(gpu, &mut enc, matmul::GemmCall { shape: matmul::GemmShape { m: l, n, k: m }, a: matmul::Operand::new(&q, l).t(), b: matmul::Operand::new(a, n), c: matmul::GemmOutput::new(&b, n), scale: matmul::Scale::SET })?;
    matmul::gemm(gpu, &mut enc, matmul::GemmCall { shape: matmul::GemmShape { m: l, n: l, k: n }, a: matmul::Operand::new(&b, n), b: matmul::Operand::new(&b, n).t(), c: matmul::GemmOutput::new(&bbt, l), scale: matmul::Scale::SET })?;
    gpu.submit(enc);
    let gv = gpu.read(&bbt)?;
    drop(bbt);
    let small = host.time(|| top_eigenpairs(&gv, l, k, m, n))?;
    // U = Q Ub [m, k]; V^T = (Ub S^-1)^T B [k, n]
    let ub = gpu.upload(&small.ub)?;
    let ub_scaled = gpu.upload(&small.ub_over_sigma)?;
    let vt = gpu.alloc(k * n)?;
    let mut enc = gpu.encoder();
    let u = matmul::matmul(gpu, &mut enc, &q, &ub, m, l, k)?;
    matmul::gemm(gpu, &mut enc, matmul::GemmCall { shape: matmul::GemmShape { m: k, n, k: l }, a: matmul::Operand::new(&ub_scaled, k).t(), b: matmul::Operand::new(&b, n), c: matmul::GemmOutput::new(&vt, n), scale: matmul::Scale::SET })?;
    gpu.submit(enc);
    let mut read = gpu.read_many(&[&u, &vt])?.into_iter();
    let (u, vt) = (read.next().unwrap_or_default(), read.next().unwrap_or_default());
    if u.iter().chain(&vt).any(|x| !x.is_finite()) {
        return Err(SvdError::NonFinite { m, n });
    }
    Ok(Svd { m, n, u, sigma: small.sigma, vt, host_seconds: host.seconds(), seconds: started.elapsed().as_secs_f64() })
}

/// GEMM FLOPs `randomized_svd` runs on the GPU for a top-`k` SVD of an [m, n] matrix (for
/// benchmarks: the decomposition's rate against the adapter's matmul ceiling).
pub fn gemm_flops(m: usize, n: usize, k: usize, opts: SvdOptions) -> f64 {
    let k = k.min(m).min(n).max(1);
    let (m, n, k, l, q) = (m as f64, n as f64, k as f64, (k + opts.oversample).min(m).min(n) as f64, opts.power_iters as f64);
    // products with A: A Omega, then A^T Q and A Z per power iteration, then B = Q^T A
    let with_a = (2.0 + 2.0 * q) * 2.0 * m * n * l;
    // each CholeskyQR2 of a [rows, l] block: two (Gram 2 rows l^2 + product by R^-1 2 rows l^2)
    let orthonormal = 8.0 * l * l * (m + q * (m + n));
    // B B^T, U = Q Ub, V^T = (Ub S^-1)^T B
    let small = 2.0 * l * l * n + 2.0 * m * l * k + 2.0 * k * l * n;
    with_a + orthonormal + small
}

/// The top-k eigenpairs of the projected problem's Gram matrix B B^T = Ub S^2 Ub^T.
struct SmallSvd {
    /// Ub [l, k] row-major.
    ub: Vec<f32>,
    /// Ub S^-1 [l, k] (a zero column where sigma is zero): V^T = (Ub S^-1)^T B.
    ub_over_sigma: Vec<f32>,
    sigma: Vec<f64>,
}

fn top_eigenpairs(gv: &[f32], l: usize, k: usize, m: usize, n: usize) -> SvdResult<SmallSvd> {
    if gv.iter().any(|x| !x.is_finite()) {
        return Err(SvdError::NonFinite { m, n });
    }
    let g = Mat::<f64>::from_fn(l, l, |i, j| 0.5 * (gv[i * l + j] as f64 + gv[j * l + i] as f64));
    let eig = g.self_adjoint_eigen(Side::Lower).map_err(|_| SvdError::NoConvergence { l })?;
    let (values, vectors) = (eig.S().column_vector(), eig.U());
    // faer sorts eigenvalues ascending: the top k are the last k, taken in reverse
    let mut ub = vec![0f32; l * k];
    let mut ub_over_sigma = vec![0f32; l * k];
    let mut sigma = Vec::with_capacity(k);
    for c in 0..k {
        let e = l - 1 - c;
        let s = values[e].max(0.0).sqrt();
        sigma.push(s);
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for i in 0..l {
            let x = vectors[(i, e)];
            ub[i * k + c] = x as f32;
            ub_over_sigma[i * k + c] = (x * inv) as f32;
        }
    }
    Ok(SmallSvd { ub, ub_over_sigma, sigma })
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
