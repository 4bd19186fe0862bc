//! The dense linear algebra of the least-squares compensations, on the GPU or (the f64
//! twin) on the host: products, and the ridge solves X = R N^-1 (N symmetric positive
//! definite, k x k) by a blocked right-looking Cholesky factorization whose panels and
//! trailing updates are GEMMs, the small diagonal blocks factored and inverted in f64 on
//! the host, then blocked triangular solves over the GEMM.
//!
//! At 7B shapes (k ~ 8,800 kept FFN channels) these are the refit's whole cost: a k x k
//! factorization per ridge candidate and products of the same size, ~5e12 flops per layer,
//! which took 166 s per layer in f64 on this project's 2-core host (`benches/refit.rs`).
//! On the GPU they run in f32: the ridge keeps N's condition moderate (the smallest ridge is
//! 1e-3 of the mean feature variance), and a block whose f32 pivots stop being positive
//! sends that solve back to the host in f64 rather than returning a wrong answer.

use faer::linalg::solvers::Solve;
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::{Mat, MatRef, Side};

use crate::gpu::{
    matmul::{self, GemmCall, GemmOutput, GemmShape, Operand, Scale},
    Gpu, GpuBuf,
};

/// Columns per block of the GPU factorization: the host factors one block x block
/// diagonal block per step (one read-back), the GPU does the rest as products with K = block.
pub const CHOLESKY_BLOCK: usize = 256;

/// Where the compensation's products and solves run.
#[derive(Clone, Copy)]
pub enum Solver<'a> {
    /// f64 on the host (faer): the reference, and the fallback.
    Host,
    /// f32 products and the blocked factorization on this GPU.
    Gpu(&'a Gpu),
}

/// Why a solve failed.
#[derive(Debug, thiserror::Error)]
pub enum SolveError {
    #[error("the normal matrix is not positive definite (diagonal block at column {column})")]
    NotPositiveDefinite { column: usize },
    /// The two operands' (rows, columns): a product's left and right factor, or a solve's
    /// normal matrix and right-hand side.
    #[error("shapes do not fit: {left:?} and {right:?}")]
    Shape { left: (usize, usize), right: (usize, usize) },
    #[error(transparent)]
    Gpu(#[from] crate::gpu::context::GpuError),
}

/// A matrix as row-major f32 (what the GPU kernels read), rows `ld` >= its columns apart
/// (the padding zero).
fn row_major(m: MatRef<f64>, ld: usize) -> Vec<f32> {
    let (r, c) = (m.nrows(), m.ncols());
    let mut v = vec![0f32; r * ld];
    for i in 0..r {
        for (j, x) in v[i * ld..i * ld + c].iter_mut().enumerate() {
            *x = m[(i, j)] as f32;
        }
    }
    v
}

fn from_row_major(v: &[f32], rows: usize, cols: usize, ld: usize) -> Mat<f64> {
    Mat::<f64>::from_fn(rows, cols, |i, j| v[i * ld + j] as f64)
}

impl<'a> Solver<'a> {
    /// What a compression uses on `gpu`: its f32 path on a GPU; on a CPU adapter (lavapipe)
    /// the host's f64, which is exact and, the adapter being the same CPU, 16x faster
    /// (measured: `benches/refit.rs`, docs/results.md); `LORAP_DENSE_SOLVES=gpu|host`
    /// overrides (`Gpu::dense_solves_here`).
    pub fn for_adapter(gpu: &'a Gpu) -> Self {
        if gpu.dense_solves_here() {
            Solver::Gpu(gpu)
        } else {
            Solver::Host
        }
    }

    /// A B.
    pub fn product(&self, a: MatRef<f64>, b: MatRef<f64>) -> Result<Mat<f64>, SolveError> {
        if a.ncols() != b.nrows() {
            return Err(SolveError::Shape { left: (a.nrows(), a.ncols()), right: (b.nrows(), b.ncols()) });
        }
        match *self {
            Solver::Host => Ok(a * b),
            Solver::Gpu(gpu) => match gpu_product(gpu, a, b) {
                Err(e) if too_big(&e) => {
                    tracing::debug!("product on the host: {e}");
                    Ok(a * b)
                }
                r => r,
            },
        }
    }

    /// X = R N^-1 for symmetric positive definite N [k, k] (both triangles stored; the
    /// factorizations read the lower one) and R [rows, k]. On the GPU, a factorization that
    /// meets a non-positive f32 pivot, a solution whose sampled residual is above
    /// `RESIDUAL_LIMIT`, or a system over the memory budget or a buffer limit is redone on
    /// the host in f64.
    pub fn solve_right(&self, normal: &Mat<f64>, rhs: &Mat<f64>) -> Result<Mat<f64>, SolveError> {
        let k = normal.nrows();
        if normal.ncols() != k || rhs.ncols() != k {
            return Err(SolveError::Shape { left: (k, normal.ncols()), right: (rhs.nrows(), rhs.ncols()) });
        }
        match *self {
            Solver::Host => host_solve_right(normal, rhs),
            Solver::Gpu(gpu) => match gpu_solve_right(gpu, normal, rhs, CHOLESKY_BLOCK) {
                Err(SolveError::NotPositiveDefinite { column }) => {
                    tracing::debug!("f32 Cholesky lost definiteness at column {column} of {k}: solving on the host in f64");
                    host_solve_right(normal, rhs)
                }
                Err(e) if too_big(&e) => {
                    tracing::debug!("solve on the host: {e}");
                    host_solve_right(normal, rhs)
                }
                Ok(x) => {
                    // a factorization that stayed positive can still be inaccurate in f32 on
                    // an ill-conditioned N: a few rows' residual in f64 tells
                    let residual = sampled_residual(normal, rhs, &x);
                    if residual > RESIDUAL_LIMIT {
                        tracing::debug!("f32 solve residual {residual:.1e} of {k}: solving on the host in f64");
                        host_solve_right(normal, rhs)
                    } else {
                        Ok(x)
                    }
                }
                r => r,
            },
        }
    }
}

/// Relative residual ||x N - r|| / ||r|| (on the sampled rows) above which a GPU solve is
/// redone on the host: f32 rounding on a well-conditioned system stays near 1e-6.
const RESIDUAL_LIMIT: f64 = 1e-3;

/// Rows of the solution whose residual is checked (evenly spread; O(rows k^2) on the host).
const RESIDUAL_ROWS: usize = 8;

/// ||X N - R|| / ||R|| over up to `RESIDUAL_ROWS` evenly spread rows, in f64.
fn sampled_residual(normal: &Mat<f64>, rhs: &Mat<f64>, x: &Mat<f64>) -> f64 {
    let (rows, k) = (rhs.nrows(), rhs.ncols());
    let picked: Vec<usize> = (0..rows).step_by(rows.div_ceil(RESIDUAL_ROWS).max(1)).collect();
    let xs = Mat::<f64>::from_fn(picked.len(), k, |i, j| x[(picked[i], j)]);
    let rs = Mat::<f64>::from_fn(picked.len(), k, |i, j| rhs[(picked[i], j)]);
    let diff = &xs * normal - &rs;
    let norm = rs.norm_l2();
    if norm == 0.0 {
        return diff.norm_l2();
    }
    let r = diff.norm_l2() / norm;
    if r.is_finite() {
        r
    } else {
        f64::INFINITY
    }
}

/// GPU errors that only say this product does not fit (the budget, a buffer or binding
/// limit): the host can still do it.
fn too_big(e: &SolveError) -> bool {
    use crate::gpu::context::GpuError;
    matches!(e, SolveError::Gpu(GpuError::OverBudget { .. } | GpuError::BufferTooLarge { .. } | GpuError::RowTooLarge { .. }))
}

fn gpu_product(gpu: &Gpu, a: MatRef<f64>, b: MatRef<f64>) -> Result<Mat<f64>, SolveError> {
    let (m, k, n) = (a.nrows(), a.ncols(), b.ncols());
    if m == 0 || n == 0 || k == 0 {
        return Ok(Mat::zeros(m, n));
    }
    let (ga, gb) = (gpu.upload(&row_major(a, k))?, gpu.upload(&row_major(b, n))?);
    let mut enc = gpu.encoder();
    let c = matmul::matmul(gpu, &mut enc, &ga, &gb, m, k, n)?;
    gpu.submit(enc);
    Ok(from_row_major(&gpu.read(&c)?, m, n, n))
}

fn host_solve_right(normal: &Mat<f64>, rhs: &Mat<f64>) -> Result<Mat<f64>, SolveError> {
    let llt = normal.llt(Side::Lower).map_err(|_| SolveError::NotPositiveDefinite { column: 0 })?;
    Ok(llt.rsolve(rhs))
}

/// A sub-matrix of a row-major buffer: its first element's offset and the buffer's row
/// stride, as a GEMM operand or output.
struct Sub<'a> {
    buf: &'a GpuBuf,
    offset: usize,
    ld: usize,
}

impl<'a> Sub<'a> {
    fn at(buf: &'a GpuBuf, ld: usize, row: usize, col: usize) -> Self {
        Sub { buf, offset: row * ld + col, ld }
    }
    fn op(&self, trans: bool) -> Operand<'a> {
        Operand { buf: self.buf, offset: self.offset, ld: self.ld, trans }
    }
    fn out(&self) -> GemmOutput<'a> {
        GemmOutput { buf: self.buf, offset: self.offset, ld: self.ld }
    }
}

/// Records C = alpha op(A) op(B) + beta C, C [m, n], K = `k` (nothing for an empty one).
fn gemm(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, (m, n, k): (usize, usize, usize), a: Operand, b: Operand, c: GemmOutput, scale: Scale) -> Result<(), SolveError> {
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    matmul::gemm(gpu, enc, GemmCall { shape: GemmShape { m, n, k }, a, b, c, scale })?;
    Ok(())
}

const SUBTRACT: Scale = Scale { alpha: -1.0, beta: 1.0 };

/// The blocked factorization and solves of `Solver::solve_right` on the GPU, blocks of
/// `block` columns (a parameter so the tests reach ragged and single-block cases).
pub fn gpu_solve_right(gpu: &Gpu, normal: &Mat<f64>, rhs: &Mat<f64>, block: usize) -> Result<Mat<f64>, SolveError> {
    let (k, rows) = (normal.nrows(), rhs.nrows());
    if k == 0 || rows == 0 {
        return Ok(Mat::zeros(rows, k));
    }
    let block = block.max(1).next_multiple_of(4);
    // the system padded to a whole number of vec4s by an identity block (the padded
    // unknowns come out zero): the GEMM's vec4 paths need aligned leading dimensions,
    // offsets and K, and every block boundary is then aligned when `block` is
    let ld = k.next_multiple_of(4);
    let mut padded = row_major(normal.as_ref(), ld);
    padded.resize(ld * ld, 0.0);
    for i in k..ld {
        padded[i * ld + i] = 1.0;
    }
    let (k_wanted, k) = (k, ld);
    // N is overwritten by its trailing updates; L (below its diagonal blocks: those are
    // only ever used through their inverses) lives in a buffer of its own, so that no
    // product reads and writes one buffer
    let nbuf = gpu.upload(&padded)?;
    drop(padded);
    let lbuf = gpu.zeros(k * ld)?;
    let blocks: Vec<(usize, usize)> = (0..k).step_by(block).map(|j0| (j0, (j0 + block).min(k))).collect();
    // L_jj^-1 per block, row-major [b, b]
    let mut inverses: Vec<GpuBuf> = Vec::with_capacity(blocks.len());
    for &(j0, j1) in &blocks {
        let b = j1 - j0;
        // the diagonal block, after every earlier trailing update (the read drains the queue)
        let segments: Vec<(&GpuBuf, usize, usize)> = (j0..j1).map(|r| (&nbuf, r * ld + j0, b)).collect();
        let rows_j = gpu.read_ranges(&segments)?;
        let lower = |i: usize, c: usize| rows_j[i.max(c)][i.min(c)] as f64;
        let d = Mat::<f64>::from_fn(b, b, lower);
        let llt = d.llt(Side::Lower).map_err(|_| SolveError::NotPositiveDefinite { column: j0 })?;
        let l = llt.L();
        let mut linv = Mat::<f64>::zeros(b, b);
        invert_lower_triangular(linv.as_mut(), l, faer::Par::Seq);
        if !(0..b).all(|i| linv[(i, i)].is_finite()) {
            return Err(SolveError::NotPositiveDefinite { column: j0 });
        }
        let inv = gpu.upload(&row_major(linv.as_ref(), b))?;
        if j1 < k {
            let rest = k - j1;
            let mut enc = gpu.encoder();
            // panel: L[j1.., j] = N[j1.., j] L_jj^-T
            gemm(gpu, &mut enc, (rest, b, b), Sub::at(&nbuf, ld, j1, j0).op(false), Operand::new(&inv, b).t(), Sub::at(&lbuf, ld, j1, j0).out(), Scale::SET)?;
            // trailing update of the lower triangle, one block column c at a time:
            // N[c0.., c] -= L[c0.., j] L[c, j]^T (half the flops of the whole square)
            for &(c0, c1) in blocks.iter().filter(|(c0, _)| *c0 >= j1) {
                gemm(gpu, &mut enc, (k - c0, c1 - c0, b), Sub::at(&lbuf, ld, c0, j0).op(false), Sub::at(&lbuf, ld, c0, j0).op(true), Sub::at(&nbuf, ld, c0, c0).out(), SUBTRACT)?;
            }
            gpu.submit(enc);
        }
        inverses.push(inv);
    }
    drop(nbuf);
    // X = R L^-T L^-1: forward Y L^T = R by column blocks (R's buffer takes the partial
    // sums), then backward X L = Y (X written into R's buffer, which is spent by then)
    let rbuf = gpu.upload(&row_major(rhs.as_ref(), ld))?;
    let ybuf = gpu.zeros(rows * ld)?;
    let mut enc = gpu.encoder();
    for (&(j0, j1), inv) in blocks.iter().zip(&inverses) {
        let b = j1 - j0;
        // R_j -= Y[:, ..j0] L[j, ..j0]^T
        gemm(gpu, &mut enc, (rows, b, j0), Sub::at(&ybuf, ld, 0, 0).op(false), Sub::at(&lbuf, ld, j0, 0).op(true), Sub::at(&rbuf, ld, 0, j0).out(), SUBTRACT)?;
        // Y_j = R_j L_jj^-T
        gemm(gpu, &mut enc, (rows, b, b), Sub::at(&rbuf, ld, 0, j0).op(false), Operand::new(inv, b).t(), Sub::at(&ybuf, ld, 0, j0).out(), Scale::SET)?;
    }
    for (&(j0, j1), inv) in blocks.iter().zip(&inverses).rev() {
        let b = j1 - j0;
        // Y_j -= X[:, j1..] L[j1.., j]
        gemm(gpu, &mut enc, (rows, b, k - j1), Sub::at(&rbuf, ld, 0, j1).op(false), Sub::at(&lbuf, ld, j1, j0).op(false), Sub::at(&ybuf, ld, 0, j0).out(), SUBTRACT)?;
        // X_j = Y_j L_jj^-1
        gemm(gpu, &mut enc, (rows, b, b), Sub::at(&ybuf, ld, 0, j0).op(false), Operand::new(inv, b), Sub::at(&rbuf, ld, 0, j0).out(), Scale::SET)?;
    }
    gpu.submit(enc);
    Ok(from_row_major(&gpu.read(&rbuf)?, rows, k_wanted, ld))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::test_util::gpu as test_gpu;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// A symmetric positive definite k x k matrix with condition number about `cond`:
    /// Q diag(spread) Q^T from a random orthogonal Q, plus a non-zero mean-like rank one
    /// term as activation Grams have.
    fn spd(k: usize, cond: f64, seed: u64) -> Mat<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        let g = Mat::<f64>::from_fn(k, k, |_, _| rng.random_range(-1.0..1.0));
        let q = g.qr().compute_Q();
        let eig: Vec<f64> = (0..k).map(|i| cond.powf(-(i as f64) / (k.max(2) - 1) as f64)).collect();
        let mean: Vec<f64> = (0..k).map(|_| rng.random_range(0.1..0.5)).collect();
        Mat::<f64>::from_fn(k, k, |i, j| (0..k).map(|c| q[(i, c)] * eig[c] * q[(j, c)]).sum::<f64>() + 0.2 * mean[i] * mean[j])
    }

    fn random(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        Mat::<f64>::from_fn(rows, cols, |_, _| rng.random_range(-1.0..1.0))
    }

    fn max_rel(x: &Mat<f64>, y: &Mat<f64>) -> f64 {
        let scale = (0..y.nrows()).flat_map(|i| (0..y.ncols()).map(move |j| (i, j))).map(|(i, j)| y[(i, j)].abs()).fold(0.0, f64::max).max(f64::MIN_POSITIVE);
        (0..y.nrows()).flat_map(|i| (0..y.ncols()).map(move |j| (i, j))).map(|(i, j)| (x[(i, j)] - y[(i, j)]).abs()).fold(0.0, f64::max) / scale
    }

    /// f32 blocked Cholesky and solves against faer's f64 Cholesky: ragged last blocks, a
    /// single block, blocks of four columns, one right-hand side, sizes padded to vec4s. Bound: f32 rounding (6e-8)
    /// amplified by the condition number (1e3 here) and the k-long sums: 2e-3 of the largest
    /// entry.
    #[test]
    fn blocked_gpu_solve_matches_the_f64_cholesky() {
        let gpu = test_gpu();
        for (k, rows, block, seed) in [(37, 5, 8, 1u64), (64, 1, 64, 2), (100, 33, 32, 3), (130, 17, 48, 4), (9, 4, 4, 5), (70, 130, 256, 6)] {
            let n = spd(k, 1e3, seed);
            let r = random(rows, k, seed + 100);
            let want = host_solve_right(&n, &r).unwrap();
            let got = gpu_solve_right(&gpu, &n, &r, block).unwrap();
            let err = max_rel(&got, &want);
            assert!(err < 2e-3, "k {k} rows {rows} block {block}: relative error {err}");
        }
    }

    /// Storage bindings capped at 16 KiB: every product of the factorization and the solves
    /// is split into windows (no tensor is assumed to fit one binding).
    #[test]
    fn blocked_gpu_solve_splits_over_small_bindings() {
        let gpu = crate::gpu::kernels::test_util::gpu_with_binding(16 << 10);
        let (n, r) = (spd(150, 1e2, 11), random(40, 150, 12));
        let err = max_rel(&gpu_solve_right(&gpu, &n, &r, 64).unwrap(), &host_solve_right(&n, &r).unwrap());
        assert!(err < 2e-3, "relative error {err}");
    }

    /// An ill-conditioned system (condition 1e9): the f32 factorization either loses a pivot
    /// or answers inaccurately; `Solver::Gpu` notices either (the sampled residual) and
    /// answers as the f64 host does.
    #[test]
    fn an_inaccurate_gpu_solve_is_redone_on_the_host() {
        let gpu = test_gpu();
        let (n, r) = (spd(96, 1e9, 13), random(9, 96, 14));
        let want = host_solve_right(&n, &r).unwrap();
        match gpu_solve_right(&gpu, &n, &r, 32) {
            Ok(x) => assert!(sampled_residual(&n, &r, &x) > RESIDUAL_LIMIT, "f32 was accurate at condition 1e9: the test needs a worse matrix"),
            Err(e) => assert!(matches!(e, SolveError::NotPositiveDefinite { .. }), "{e}"),
        }
        let got = Solver::Gpu(&gpu).solve_right(&n, &r).unwrap();
        assert!(max_rel(&got, &want) < 1e-9);
    }

    /// Over the memory budget the GPU cannot hold the system: the host answers instead.
    #[test]
    fn over_the_budget_the_host_answers() {
        let gpu = Gpu::new(&crate::gpu::kernels::test_util::options()).unwrap();
        gpu.set_budget(8 << 10);
        let (n, r) = (spd(100, 10.0, 15), random(6, 100, 16));
        assert!(matches!(gpu_solve_right(&gpu, &n, &r, 32), Err(e) if too_big(&e)));
        let got = Solver::Gpu(&gpu).solve_right(&n, &r).unwrap();
        assert!(max_rel(&got, &host_solve_right(&n, &r).unwrap()) < 1e-12);
        let (a, b) = (random(50, 60, 17), random(60, 70, 18));
        assert!(max_rel(&Solver::Gpu(&gpu).product(a.as_ref(), b.as_ref()).unwrap(), &(&a * &b)) < 1e-12);
    }

    #[test]
    fn gpu_product_matches_the_host() {
        let gpu = test_gpu();
        for (m, k, n) in [(1, 1, 1), (7, 13, 5), (65, 130, 33)] {
            let (a, b) = (random(m, k, 7), random(k, n, 8));
            let want = Solver::Host.product(a.as_ref(), b.as_ref()).unwrap();
            let got = Solver::Gpu(&gpu).product(a.as_ref(), b.as_ref()).unwrap();
            assert!(max_rel(&got, &want) < 1e-5, "{m}x{k}x{n}");
            // a transposed view reads the same as its copy
            let got_t = Solver::Gpu(&gpu).product(b.transpose(), a.transpose()).unwrap();
            assert!(max_rel(&got_t, &want.transpose().to_owned()) < 1e-5);
        }
    }

    /// An indefinite matrix is refused by the GPU factorization (never a wrong answer), and
    /// `Solver::Gpu` answers it as the host does: an error for an indefinite matrix.
    #[test]
    fn an_indefinite_matrix_is_refused() {
        let gpu = test_gpu();
        let mut n = spd(40, 10.0, 9);
        n[(30, 30)] = -5.0;
        let r = random(3, 40, 10);
        assert!(matches!(gpu_solve_right(&gpu, &n, &r, 16), Err(SolveError::NotPositiveDefinite { column: 16.. })));
        assert!(Solver::Gpu(&gpu).solve_right(&n, &r).is_err());
        assert!(matches!(Solver::Gpu(&gpu).solve_right(&n, &random(3, 39, 1)), Err(SolveError::Shape { .. })));
    }
}
