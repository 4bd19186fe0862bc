//! Feature-space decomposition (SFSD): each linear W becomes the pair (U_k, U_k^T W), U_k the
//! top-k eigenvectors of the covariance of its outputs over the calibration tokens,
//! C = W Sigma_x W^T with Sigma_x the input second moment X^T X / n (a GPU Gram matrix).
//! Uncentred by default: the pair has no bias, so the subspace must also carry the outputs'
//! mean (the mean-centred covariance, `--sfsd-centred`, loses it; on SmolLM2 that wrecks
//! the model, docs/results.md).
//! The surgical search that picks which linears to decompose, and at what rank, lives in
//! `search::surgical`.

use anyhow::{Context, Result};

use super::svd::{self, SvdOptions};
use super::{BuiltLayer, LayerInput, LayerMethod, StatsNeed};
use crate::format::linear::Linear;
use crate::model::forward::Site;
use crate::gpu::{context::Result as GpuResult, matmul, Gpu, GpuBuf};
use crate::format::plan::LayerPlan;

/// C = W Sigma W^T [out, out] on the GPU; W [out, inp], Sigma [inp, inp] symmetric.
pub fn output_covariance(gpu: &Gpu, w: &GpuBuf, sigma: &GpuBuf, out: usize, inp: usize) -> GpuResult<GpuBuf> {
    let mut enc = gpu.encoder();
    let ws = matmul::matmul(gpu, &mut enc, w, sigma, out, inp, inp)?;
    let c = matmul::matmul_nt(gpu, &mut enc, &ws, w, out, inp, out)?;
    gpu.submit(enc);
    Ok(c)
}

/// CPU reference of `output_covariance`, in f64.
pub fn output_covariance_ref(w: &[f32], sigma: &[f32], out: usize, inp: usize) -> Vec<f64> {
    let ws = matmul::matmul_ref(w, sigma, out, inp, inp);
    let mut c = vec![0f64; out * out];
    for a in 0..out {
        for b in 0..out {
            c[a * out + b] = (0..inp).map(|k| ws[a * inp + k] * w[b * inp + k] as f64).sum();
        }
    }
    c
}

/// A rank-`r` feature-space pair of W: A = U_r [out, r], B = U_r^T W [r, inp], with the
/// eigenvalues of C found (descending) and trace(C).
pub struct FeaturePair {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub eigenvalues: Vec<f64>,
    pub trace: f64,
    /// Seconds of host-side linear algebra spent on it.
    pub host_seconds: f64,
}

impl FeaturePair {
    /// Relative output error ||(I - U U^T) W Sigma^1/2|| / ||W Sigma^1/2|| at rank `r`.
    pub fn relative_error(&self, r: usize) -> f64 {
        let kept: f64 = self.eigenvalues[..r.min(self.eigenvalues.len())].iter().sum();
        ((self.trace - kept).max(0.0) / self.trace.max(f64::MIN_POSITIVE)).sqrt()
    }

    /// The pair truncated to rank `r` (at most the rank computed).
    pub fn truncated(&self, r: usize, out: usize, inp: usize) -> (Vec<f32>, Vec<f32>) {
        let k = self.eigenvalues.len();
        let r = r.min(k);
        let a = (0..out).flat_map(|i| self.a[i * k..i * k + r].iter().copied()).collect();
        (a, self.b[..r * inp].to_vec())
    }
}

/// Lower Cholesky factor L of a symmetric positive semi-definite [n, n] matrix (f64 on the
/// CPU), with the smallest diagonal shift that makes it positive definite (a covariance
/// from fewer tokens than features is singular).
pub fn psd_cholesky(a: &[f32], n: usize) -> svd::SvdResult<Vec<f32>> {
    if a.iter().any(|x| !x.is_finite()) {
        return Err(svd::SvdError::NonFinite { m: n, n });
    }
    let m = nalgebra::DMatrix::<f64>::from_fn(n, n, |i, j| 0.5 * (a[i * n + j] as f64 + a[j * n + i] as f64));
    let trace = m.trace().max(f64::MIN_POSITIVE);
    // bounded: shifts up to the whole trace; beyond that the matrix is numerically zero
    let mut shift = 0.0;
    while shift <= trace {
        let mut h = m.clone();
        for i in 0..n {
            h[(i, i)] += shift;
        }
        if let Some(c) = nalgebra::Cholesky::new(h) {
            let l = c.l();
            return Ok((0..n * n).map(|k| l[(k / n, k % n)] as f32).collect());
        }
        shift = if shift == 0.0 { 1e-7 * trace / n as f64 } else { shift * 10.0 };
    }
    Ok((0..n * n).map(|k| if k / n == k % n { 1.0 } else { 0.0 }).collect())
}

/// Largest side of a symmetric problem solved exactly (GPU Gram product, CPU f64 eigen-
/// decomposition): below it that beats subspace iteration where we measured it (576 x 576,
/// rank 115: 2.8x faster on lavapipe, `cargo bench --bench kernels`); above it the CPU
/// eigen-decomposition grows as n^3 and the randomized SVD runs on the GPU.
pub const EXACT_EIGEN_MAX: usize = 2048;

/// Top-`r` eigenpairs of a symmetric [n, n] matrix (f64 on the CPU): eigenvalues
/// descending, eigenvectors as columns of a row-major [n, r] matrix.
fn top_eigen(g: &[f32], n: usize, r: usize) -> (Vec<f64>, Vec<f32>) {
    let m = nalgebra::DMatrix::<f64>::from_fn(n, n, |i, j| 0.5 * (g[i * n + j] as f64 + g[j * n + i] as f64));
    let eig = nalgebra::SymmetricEigen::new(m);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let r = r.min(n);
    let values = order[..r].iter().map(|&k| eig.eigenvalues[k].max(0.0)).collect();
    let mut vecs = vec![0f32; n * r];
    for (c, &k) in order[..r].iter().enumerate() {
        for i in 0..n {
            vecs[i * r + c] = eig.eigenvectors[(i, k)] as f32;
        }
    }
    (values, vecs)
}

/// Top-`r` output eigenvectors of W under input covariance `sigma` (products on the GPU).
/// When W is tall (out > inp) they come from the smaller M = W L (Sigma = L L^T): U = M V
/// S^-1 with M^T M = V S^2 V^T; otherwise from C = W Sigma W^T itself. Small problems are
/// solved exactly, large ones by the randomized SVD.
pub fn feature_pair(gpu: &Gpu, w: &[f32], sigma: &GpuBuf, out: usize, inp: usize, r: usize, opts: SvdOptions) -> svd::SvdResult<FeaturePair> {
    debug_assert_eq!(w.len(), out * inp);
    feature_pair_with(gpu, w, sigma, inp, r, opts, EXACT_EIGEN_MAX)
}

/// `feature_pair` with the exact/randomized threshold given (tests cover both paths);
/// w is [out, inp] row-major.
pub fn feature_pair_with(gpu: &Gpu, w: &[f32], sigma: &GpuBuf, inp: usize, r: usize, opts: SvdOptions, exact_max: usize) -> svd::SvdResult<FeaturePair> {
    let out = w.len() / inp;
    let mut host = svd::HostClock::default();
    let wg = gpu.upload(w)?;
    let (u, k, eigenvalues, trace) = if out > inp {
        let sv = gpu.read(sigma)?;
        let l = gpu.upload(&host.time(|| psd_cholesky(&sv, inp))?)?;
        let mut enc = gpu.encoder();
        let m = matmul::matmul(gpu, &mut enc, &wg, &l, out, inp, inp)?;
        gpu.submit(enc);
        let trace: f64 = gpu.read(&m)?.iter().map(|&x| x as f64 * x as f64).sum();
        if inp <= exact_max {
            let g = gpu.zeros(inp * inp)?;
            let mut enc = gpu.encoder();
            matmul::gram_accumulate(gpu, &mut enc, &m, out, inp, &g)?;
            gpu.submit(enc);
            let gv = gpu.read(&g)?;
            let (ev, v) = host.time(|| top_eigen(&gv, inp, r));
            let k = ev.len();
            // U = M V S^-1: the columns of M V have norms sqrt(eigenvalue)
            let mut enc = gpu.encoder();
            let mv = matmul::matmul(gpu, &mut enc, &m, &gpu.upload(&v)?, out, inp, k)?;
            gpu.submit(enc);
            let mut u = gpu.read(&mv)?;
            for row in u.chunks_mut(k) {
                for (x, e) in row.iter_mut().zip(&ev) {
                    *x = if *e > 0.0 { (*x as f64 / e.sqrt()) as f32 } else { 0.0 };
                }
            }
            (u, k, ev, trace)
        } else {
            let dec = svd::randomized_svd(gpu, &m, out, inp, r, opts)?;
            host.add(dec.host_seconds);
            let ev = dec.sigma.iter().map(|s| s * s).collect();
            (dec.u, dec.sigma.len(), ev, trace)
        }
    } else {
        let c = output_covariance(gpu, &wg, sigma, out, inp)?;
        let cv = gpu.read(&c)?;
        let trace: f64 = (0..out).map(|i| cv[i * out + i] as f64).sum();
        if out <= exact_max {
            let (ev, u) = host.time(|| top_eigen(&cv, out, r));
            (u, ev.len(), ev, trace)
        } else {
            // C is symmetric positive semi-definite: its left singular vectors are its eigenvectors
            let dec = svd::randomized_svd(gpu, &c, out, out, r, opts)?;
            host.add(dec.host_seconds);
            (dec.u, dec.sigma.len(), dec.sigma, trace)
        }
    };
    let ug = gpu.upload(&u)?;
    let b = gpu.alloc(k * inp)?;
    let mut enc = gpu.encoder();
    matmul::gemm(gpu, &mut enc, matmul::GemmCall { shape: matmul::GemmShape { m: k, n: inp, k: out }, a: matmul::Operand::new(&ug, k).t(), b: matmul::Operand::new(&wg, inp), c: matmul::GemmOutput::new(&b, inp), scale: matmul::Scale::SET })?;
    gpu.submit(enc);
    Ok(FeaturePair { a: u, b: gpu.read(&b)?, eigenvalues, trace, host_seconds: host.seconds() })
}

/// Rank for keeping the fraction `keep` of the break-even rank; `None` (dense) for a keep of
/// 1 or more, or when the pair would not be smaller than the dense matrix.
pub fn rank_for(keep: f64, out: usize, inp: usize) -> Option<usize> {
    if keep >= 1.0 {
        return None;
    }
    let be = out * inp / (out + inp);
    let r = ((keep * be as f64).round() as usize).max(1);
    (r * (out + inp) < out * inp).then_some(r)
}

/// The feature-space decomposition's options.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SfsdOptions {
    /// Mean-centred output covariance (the projection then has no bias to carry the
    /// outputs' mean; an ablation; the default is the second moment).
    #[serde(default, alias = "sfsd_centred")]
    pub centred: bool,
}

/// Feature-space decomposition of one layer: every linear with a keep fraction becomes a
/// feature pair at that fraction of its break-even rank; the FFN keeps its width.
pub struct Sfsd {
    pub opts: SfsdOptions,
    pub svd: SvdOptions,
}

impl LayerMethod for Sfsd {
    fn name(&self) -> &'static str {
        "sfsd"
    }

    fn stats_need(&self) -> StatsNeed {
        StatsNeed::Covariance { centred: self.opts.centred }
    }

    fn compress_layer(&self, input: &LayerInput, built: &mut BuiltLayer, progress: &mut dyn FnMut(super::Phase)) -> Result<()> {
        sfsd_layer(input, self.svd, built, progress)
    }
}

fn sfsd_layer(input: &LayerInput, opts: SvdOptions, built: &mut BuiltLayer, progress: &mut dyn FnMut(super::Phase)) -> Result<()> {
    let LayerInput { gpu, store, cfg, layer: i, stats, setting, .. } = *input;
    progress(super::Phase::Decomposition);
    let cov = stats.cov.as_ref().context("feature-space decomposition needs the input covariances")?;
    let full = LayerPlan { ffn_width: cfg.intermediate_size, ..Default::default() };
    built.plan.ffn_width = full.ffn_width;
    let mut sigma: [Option<GpuBuf>; 4] = Default::default();
    for lin in Linear::ALL {
        let (j, (out, inp)) = (lin.index(), cfg.linear_shape(&full, lin));
        let w = store.f32(&crate::format::names::linear(i, lin, "weight"), &[out, inp])?;
        match setting.module_keep[lin].and_then(|k| rank_for(k, out, inp)) {
            None => built.dense(gpu, lin, &w, out, inp)?,
            Some(r) => {
                let s = Site::of(lin).index();
                if sigma[s].is_none() {
                    sigma[s] = Some(gpu.upload(&cov[s])?);
                }
                let pair = feature_pair(gpu, &w, sigma[s].as_ref().unwrap(), out, inp, r, opts)?;
                built.host_seconds += pair.host_seconds;
                if lin.is_attention() {
                    built.errors[j] = pair.relative_error(r);
                    built.spectra[j] = pair.eigenvalues.iter().map(|e| e.max(0.0).sqrt()).collect();
                }
                let (a, b) = pair.truncated(r, out, inp);
                built.low_rank(gpu, lin, &a, &b, r)?;
            }
        }
    }
    Ok(())
}

