//! Least-squares compensation of a compressed linear: the map that now reads fewer
//! features (an FFN's kept channels, or a factor pair's rank-r projection B x) refitted by
//! ridge least squares to the dense linear's output on the calibration inputs, with an
//! intercept (a bias); the ridge (or no refit, or the mean bias alone) chosen on held-out
//! calibration windows. The Gram matrices come from the GPU (`calib::stats::SplitMoments`);
//! the products and the k x k ridge solves run where the `Solver` says (`methods::solve`:
//! the GPU in compressions, f64 on the host as the reference).
//!
//! With x an input token, z = P x its features (P selects the kept channels K, or is the
//! right factor B) and A0 the map the compression left (W[:, K], or the left factor), the
//! compressed linear outputs A z + b in place of W x. Over the tokens, with mean mu and
//! covariance Sigma of x, least squares with an unpenalized intercept and a ridge pulling A
//! towards A0 (not towards zero) is
//!     A = (W Sigma P^T + lambda A0) (P Sigma P^T + lambda I)^-1,   b = W mu - A P mu,
//! which runs from the plain least-squares fit (lambda = 0) to the mean compensation
//! (lambda -> infinity: A = A0, b = (W - A0 P) mu; for pruning FLAP's W[:, R] mu_R). The
//! candidates "as compressed" (A0, no bias) and "mean bias" sit beside the ridge grid. With
//! fewer tokens than features a small ridge overfits (measured: SmolLM2's FFN at 16 x 128
//! tokens): the held-out windows see it. For a factor pair whose B came from the SVD of W S
//! (S the diagonal activation scale), the gain is what the full input covariance and the
//! mean know beyond S.

use anyhow::{ensure, Result};
use faer::Mat;
use serde::{Deserialize, Serialize};

use crate::calib::stats::{Moments, SplitMoments};
use crate::methods::solve::{SolveError, Solver};

/// Ridges tried, relative to the mean feature variance tr(P Sigma P^T) / r.
pub const RIDGE_GRID: [f64; 7] = [1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0];

/// Output rows the held-out selection scores (a strided subset: each row is its own
/// regression with the same normal matrix, so a subset compares the candidates at a
/// fraction of the cost on wide layers).
const SELECTION_ROWS: usize = 512;

/// What the compensation of one linear became.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RefitChoice {
    /// The map as the compression left it (pruned columns, or the factor pair), no bias.
    Pruned,
    /// That map plus the mean of what it misses as a bias.
    MeanBias,
    /// Ridge least squares with an intercept, pulled towards the compressed map; `alpha` is
    /// the ridge relative to the mean feature variance.
    Ridge { alpha: f64 },
}

/// A candidate's held-out error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CandidateScore {
    pub choice: RefitChoice,
    /// Mean squared error of the linear's output on the held-out windows relative to the
    /// mean squared dense output there (on the scored rows).
    pub held_out_rel_error: f64,
}

/// What the report shows of one linear's refit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RefitReport {
    pub choice: RefitChoice,
    pub fit_tokens: usize,
    pub held_out_tokens: usize,
    /// Kept channels, or the factor pair's rank.
    #[serde(alias = "kept_channels")]
    pub features: usize,
    pub candidates: Vec<CandidateScore>,
}

/// What the refitted linear reads.
#[derive(Debug, Clone, Copy)]
pub enum Features<'a> {
    /// The input's channels `kept` (ascending): a pruned matrix, A0 = W[:, K].
    Kept(&'a [usize]),
    /// The projection `b` x, b [rank, n] row-major: a factor pair's right factor, A0 = `a0`
    /// [out, rank] its left one.
    Projected { b: &'a [f32], a0: &'a [f32], rank: usize },
}

/// The refitted map: A [out, r] and its bias (`None` when the choice is `Pruned`).
pub struct Refit {
    pub a: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub report: RefitReport,
}

/// Sums over the tokens of a moment set, seen through the features P: G P^T, P G P^T, s
/// and P s (G = sum x x^T, s = sum x).
struct Through {
    tokens: f64,
    /// G P^T, [n, r].
    gp: Mat<f64>,
    /// P G P^T, [r, r].
    pgp: Mat<f64>,
    sum: Vec<f64>,
    psum: Vec<f64>,
}

impl Through {
    fn add(&self, o: &Through) -> Through {
        Through { tokens: self.tokens + o.tokens, gp: &self.gp + &o.gp, pgp: &self.pgp + &o.pgp, sum: self.sum.iter().zip(&o.sum).map(|(a, b)| a + b).collect(), psum: self.psum.iter().zip(&o.psum).map(|(a, b)| a + b).collect() }
    }
}

/// The Gram sums as a symmetric f64 matrix (`Moments::gram_sym`).
fn gram_matrix(m: &Moments) -> Mat<f64> {
    let n = m.sum.len();
    Mat::<f64>::from_fn(n, n, |i, j| m.gram_sym(i, j))
}

impl Features<'_> {
    fn rank(&self) -> usize {
        match self {
            Features::Kept(k) => k.len(),
            Features::Projected { rank, .. } => *rank,
        }
    }

    /// P as a matrix [r, n] (only for projections: a selection is gathered instead).
    fn projection(b: &[f32], rank: usize, n: usize) -> Mat<f64> {
        Mat::<f64>::from_fn(rank, n, |c, j| b[c * n + j] as f64)
    }

    fn through(&self, m: &Moments, gram: &Mat<f64>, solver: Solver) -> Result<Through> {
        let n = m.sum.len();
        let sum: Vec<f64> = m.sum.iter().map(|&x| x as f64).collect();
        let (gp, pgp, psum) = match *self {
            Features::Kept(kept) => {
                let gp = Mat::<f64>::from_fn(n, kept.len(), |i, c| gram[(i, kept[c])]);
                let pgp = Mat::<f64>::from_fn(kept.len(), kept.len(), |a, c| gp[(kept[a], c)]);
                (gp, pgp, kept.iter().map(|&j| sum[j]).collect())
            }
            Features::Projected { b, rank, .. } => {
                let p = Self::projection(b, rank, n);
                let gp = solver.product(gram.as_ref(), p.transpose())?;
                let pgp = solver.product(p.as_ref(), gp.as_ref())?;
                let psum = (0..rank).map(|c| (0..n).map(|j| p[(c, j)] * sum[j]).sum()).collect();
                (gp, pgp, psum)
            }
        };
        Ok(Through { tokens: m.tokens as f64, gp, pgp, sum, psum })
    }

    /// A0 for rows `rows` of W (`w` holds those rows).
    fn start(&self, w: &Mat<f64>, rows: &[usize]) -> Mat<f64> {
        match *self {
            Features::Kept(kept) => Mat::<f64>::from_fn(w.nrows(), kept.len(), |r, c| w[(r, kept[c])]),
            Features::Projected { a0, rank, .. } => Mat::<f64>::from_fn(rows.len(), rank, |r, c| a0[rows[r] * rank + c] as f64),
        }
    }
}

/// Rows `rows` of W [.., n] as a matrix.
fn rows_of(w: &[f32], n: usize, rows: &[usize]) -> Mat<f64> {
    Mat::<f64>::from_fn(rows.len(), n, |r, j| w[rows[r] * n + j] as f64)
}

/// The candidate `choice` fitted for the rows `w` of W (with `wgp` = W G P^T of the sums
/// `t`) and starting map `a0`: A [rows, r] and b.
fn fit(w: &Mat<f64>, wgp: &Mat<f64>, a0: &Mat<f64>, t: &Through, choice: RefitChoice, solver: Solver) -> Result<(Mat<f64>, Vec<f64>)> {
    let (rows, r) = (w.nrows(), a0.ncols());
    let n = t.tokens;
    let mu_z: Vec<f64> = t.psum.iter().map(|x| x / n).collect();
    let w_mu: Vec<f64> = (0..rows).map(|i| (0..w.ncols()).map(|j| w[(i, j)] * t.sum[j]).sum::<f64>() / n).collect();
    let bias_of = |a: &Mat<f64>| -> Vec<f64> { (0..rows).map(|i| w_mu[i] - (0..r).map(|c| a[(i, c)] * mu_z[c]).sum::<f64>()).collect() };
    Ok(match choice {
        RefitChoice::Pruned => (a0.clone(), vec![0.0; rows]),
        RefitChoice::MeanBias => (a0.clone(), bias_of(a0)),
        RefitChoice::Ridge { alpha } => {
            // the features' covariance P Sigma P^T and the cross term W Sigma P^T
            let mut normal = Mat::<f64>::from_fn(r, r, |a, c| t.pgp[(a, c)] / n - mu_z[a] * mu_z[c]);
            let lambda = alpha * (0..r).map(|a| normal[(a, a)]).sum::<f64>() / r as f64;
            for a in 0..r {
                normal[(a, a)] += lambda.max(f64::MIN_POSITIVE);
            }
            let mut rhs = wgp.clone();
            for i in 0..rows {
                for c in 0..r {
                    rhs[(i, c)] = rhs[(i, c)] / n - w_mu[i] * mu_z[c] + lambda * a0[(i, c)];
                }
            }
            let a = solver.solve_right(&normal, &rhs)?;
            let b = bias_of(&a);
            (a, b)
        }
    })
}

fn not_definite(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<SolveError>(), Some(SolveError::NotPositiveDefinite { .. }))
}

/// What the held-out error of any candidate needs of the held-out sums for rows `w`:
/// diag(W G W^T), W G P^T and W s.
struct HeldOut<'a> {
    t: &'a Through,
    wgw: Vec<f64>,
    wgp: Mat<f64>,
    ws: Vec<f64>,
}

impl<'a> HeldOut<'a> {
    fn new(w: &Mat<f64>, gram: &Mat<f64>, t: &'a Through, solver: Solver) -> Result<Self> {
        let wg = solver.product(w.as_ref(), gram.as_ref())?;
        let wgw = (0..w.nrows()).map(|i| (0..w.ncols()).map(|j| wg[(i, j)] * w[(i, j)]).sum()).collect();
        let ws = (0..w.nrows()).map(|i| (0..w.ncols()).map(|j| w[(i, j)] * t.sum[j]).sum()).collect();
        Ok(HeldOut { t, wgw, wgp: solver.product(w.as_ref(), t.gp.as_ref())?, ws })
    }

    /// Mean squared error per token of x -> A P x + b against x -> W x, and the mean
    /// squared target.
    fn error(&self, a: &Mat<f64>, b: &[f64], solver: Solver) -> Result<(f64, f64)> {
        let (n, r) = (self.t.tokens, a.ncols());
        let apgp = solver.product(a.as_ref(), self.t.pgp.as_ref())?;
        let mut err = 0.0;
        for i in 0..a.nrows() {
            let dot = |x: &dyn Fn(usize) -> f64| (0..r).map(|c| a[(i, c)] * x(c)).sum::<f64>();
            let quad = self.wgw[i] - 2.0 * dot(&|c| self.wgp[(i, c)]) + dot(&|c| apgp[(i, c)]);
            let cross = self.ws[i] - dot(&|c| self.t.psum[c]);
            err += quad - 2.0 * b[i] * cross + n * b[i] * b[i];
        }
        Ok(((err / n).max(0.0), self.wgw.iter().sum::<f64>() / n))
    }
}

/// Refits the linear `w` [out, n] that now reads `features`: every candidate is fitted on
/// the fitting windows and scored on the held-out ones; the winner is fitted again on all
/// windows. The products and solves run on `solver`.
pub fn refit(w: &[f32], out: usize, features: Features, moments: &SplitMoments, solver: Solver) -> Result<Refit> {
    let n = moments.dim;
    let r = features.rank();
    ensure!(w.len() == out * n && r > 0, "refit: the weight is not [{out}, {n}] or there is nothing to fit");
    match features {
        Features::Kept(kept) => ensure!(kept.iter().all(|&j| j < n), "refit: kept channels out of range"),
        Features::Projected { b, a0, rank } => ensure!(b.len() == rank * n && a0.len() == out * rank, "refit: factors are not [{out}, {rank}] x [{rank}, {n}]"),
    }
    ensure!(moments.fit.tokens > 0 && moments.held_out.tokens > 0, "refit: needs fitting and held-out calibration windows ({} and {} tokens)", moments.fit.tokens, moments.held_out.tokens);
    let step = out.div_ceil(SELECTION_ROWS);
    let scored: Vec<usize> = (0..out).step_by(step).collect();
    let ws = rows_of(w, n, &scored);
    let a0s = features.start(&ws, &scored);
    let fit_sums = features.through(&moments.fit, &gram_matrix(&moments.fit), solver)?;
    let held_gram = gram_matrix(&moments.held_out);
    let held_sums = features.through(&moments.held_out, &held_gram, solver)?;
    let held = HeldOut::new(&ws, &held_gram, &held_sums, solver)?;
    drop(held_gram);
    // W G P^T does not depend on the candidate
    let fit_wgp = solver.product(ws.as_ref(), fit_sums.gp.as_ref())?;
    let mut candidates = vec![RefitChoice::Pruned, RefitChoice::MeanBias];
    candidates.extend(RIDGE_GRID.iter().map(|&alpha| RefitChoice::Ridge { alpha }));
    let mut scores = Vec::new();
    for choice in candidates {
        let (a, b) = match fit(&ws, &fit_wgp, &a0s, &fit_sums, choice, solver) {
            Err(e) if not_definite(&e) => {
                // covariance sums in f32 minus the squared mean: with few tokens and a large
                // mean the smallest ridges can leave it indefinite; that candidate drops out
                tracing::debug!("refit: {choice:?} left out: {e}");
                continue;
            }
            r => r?,
        };
        let (err, target) = held.error(&a, &b, solver)?;
        scores.push(CandidateScore { choice, held_out_rel_error: err / target.max(f64::MIN_POSITIVE) });
    }
    let all_rows: Vec<usize> = (0..out).collect();
    let wall = rows_of(w, n, &all_rows);
    let all_sums = fit_sums.add(&held_sums);
    let start = features.start(&wall, &all_rows);
    // the winner refitted on all windows; one that is indefinite there where it was not on
    // the fitting windows gives way to the next best (Pruned needs no solve)
    let mut ranked: Vec<RefitChoice> = {
        let mut by_error: Vec<&CandidateScore> = scores.iter().collect();
        by_error.sort_by(|a, b| a.held_out_rel_error.total_cmp(&b.held_out_rel_error));
        by_error.iter().map(|s| s.choice).collect()
    };
    ranked.push(RefitChoice::Pruned);
    // W G P^T over all rows, for ridge candidates only (computed once, when first needed;
    // the fit of Pruned and MeanBias does not read it)
    let mut all_wgp: Option<Mat<f64>> = None;
    let unread = Mat::<f64>::zeros(0, 0);
    let mut fitted = None;
    for choice in ranked {
        let ridge = matches!(choice, RefitChoice::Ridge { .. });
        if ridge && all_wgp.is_none() {
            all_wgp = Some(solver.product(wall.as_ref(), all_sums.gp.as_ref())?);
        }
        let wgp = match (&all_wgp, ridge) {
            (Some(m), true) => m,
            _ => &unread,
        };
        match fit(&wall, wgp, &start, &all_sums, choice, solver) {
            Err(e) if not_definite(&e) => tracing::debug!("refit: {choice:?} on all windows left out: {e}"),
            r => {
                fitted = Some((choice, r?));
                break;
            }
        }
    }
    let (best, (a, b)) = fitted.ok_or_else(|| anyhow::anyhow!("refit: no candidate could be fitted on all windows"))?;
    let report = RefitReport { choice: best, fit_tokens: moments.fit.tokens, held_out_tokens: moments.held_out.tokens, features: r, candidates: scores };
    let a: Vec<f32> = (0..out * r).map(|x| a[(x / r, x % r)] as f32).collect();
    let bias = (best != RefitChoice::Pruned).then(|| b.iter().map(|&x| x as f32).collect());
    Ok(Refit { a, bias, report })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Features with a non-zero mean, correlated channels and a few near-duplicates (the
    /// refit should move the removed channels' share onto them).
    fn features(tokens: usize, f: usize, seed: u64) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        let base: Vec<f64> = (0..tokens * 4).map(|_| rng.random_range(-1.0..1.0)).collect();
        (0..tokens * f)
            .map(|x| {
                let (t, j) = (x / f, x % f);
                0.3 + 0.1 * j as f64 / f as f64 + base[t * 4 + j % 4] * (1.0 + (j % 3) as f64) + 0.05 * rng.random_range(-1.0..1.0)
            })
            .collect()
    }

    /// The f64 reference: least squares of the targets W x on the token matrix of the
    /// case's features z with an unpenalized intercept and the penalty
    /// n lambda ||A - A0||^2, lambda = alpha * (mean feature variance), by normal equations
    /// in plain f64 Gauss-Jordan elimination.
    fn ridge_reference(case: &Case, h: &[f64], tokens: usize, w: &[f32], alpha: f64) -> (Vec<f64>, Vec<f64>) {
        let (n, d, a0) = (case.n, case.d, case.a0(w));
        let zs: Vec<Vec<f64>> = (0..tokens).map(|t| case.z(&h[t * n..(t + 1) * n])).collect();
        let k = zs[0].len();
        let mean: Vec<f64> = (0..k).map(|c| zs.iter().map(|z| z[c]).sum::<f64>() / tokens as f64).collect();
        let lambda = alpha * (0..k).map(|c| zs.iter().map(|z| (z[c] - mean[c]).powi(2)).sum::<f64>() / tokens as f64).sum::<f64>() / k as f64;
        let p = k + 1;
        let mut a = vec![0f64; p * p];
        let mut rhs = vec![0f64; p * d];
        for (t, z) in zs.iter().enumerate() {
            let z: Vec<f64> = z.iter().copied().chain([1.0]).collect();
            let y: Vec<f64> = (0..d).map(|r| (0..n).map(|j| w[r * n + j] as f64 * h[t * n + j]).sum()).collect();
            for i in 0..p {
                for j in 0..p {
                    a[i * p + j] += z[i] * z[j];
                }
                for r in 0..d {
                    rhs[i * d + r] += z[i] * y[r];
                }
            }
        }
        for i in 0..k {
            a[i * p + i] += tokens as f64 * lambda;
            for r in 0..d {
                rhs[i * d + r] += tokens as f64 * lambda * a0[r * k + i];
            }
        }
        // Gauss-Jordan with partial pivoting
        for c in 0..p {
            let piv = (c..p).max_by(|&x, &y| a[x * p + c].abs().total_cmp(&a[y * p + c].abs())).unwrap();
            for j in 0..p {
                a.swap(c * p + j, piv * p + j);
            }
            for r in 0..d {
                rhs.swap(c * d + r, piv * d + r);
            }
            let inv = 1.0 / a[c * p + c];
            for i in 0..p {
                if i != c {
                    let m = a[i * p + c] * inv;
                    for j in 0..p {
                        a[i * p + j] -= m * a[c * p + j];
                    }
                    for r in 0..d {
                        rhs[i * d + r] -= m * rhs[c * d + r];
                    }
                }
            }
        }
        let sol: Vec<f64> = (0..p * d).map(|x| rhs[x] / a[(x / d) * p + x / d]).collect();
        let wk = (0..d * k).map(|x| sol[(x % k) * d + x / k]).collect();
        let b = (0..d).map(|r| sol[k * d + r]).collect();
        (wk, b)
    }

    fn random_matrix(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The case's features: a selection, or a random projection with a random A0.
    struct Case {
        n: usize,
        d: usize,
        kept: Vec<usize>,
        /// (B [rank, n], A0 [d, rank]) for a projection.
        pair: Option<(Vec<f32>, Vec<f32>)>,
    }

    impl Case {
        fn features(&self) -> Features<'_> {
            match &self.pair {
                None => Features::Kept(&self.kept),
                Some((b, a0)) => Features::Projected { b, a0, rank: b.len() / self.n },
            }
        }

        fn z(&self, x: &[f64]) -> Vec<f64> {
            match &self.pair {
                None => self.kept.iter().map(|&j| x[j]).collect(),
                Some((b, _)) => b.chunks(self.n).map(|row| row.iter().zip(x).map(|(p, v)| *p as f64 * v).sum()).collect(),
            }
        }

        fn a0(&self, w: &[f32]) -> Vec<f64> {
            match &self.pair {
                None => (0..self.d).flat_map(|r| self.kept.iter().map(move |&j| w[r * self.n + j] as f64)).collect(),
                Some((_, a0)) => a0.iter().map(|&x| x as f64).collect(),
            }
        }
    }

    fn cases() -> Vec<Case> {
        vec![
            Case { n: 12, d: 5, kept: vec![0, 2, 3, 5, 7, 8, 11], pair: None },
            Case { n: 9, d: 7, kept: vec![1, 4, 8], pair: None },
            Case { n: 11, d: 6, kept: vec![], pair: Some((random_matrix(4 * 11, 21), random_matrix(6 * 4, 22))) },
            Case { n: 7, d: 9, kept: vec![], pair: Some((random_matrix(3 * 7, 23), random_matrix(9 * 3, 24))) },
        ]
    }

    #[test]
    fn ridge_fit_matches_the_f64_reference() {
        for (ci, case) in cases().iter().enumerate() {
            let (n, d, tokens) = (case.n, case.d, 150 + 20 * ci);
            let h = features(tokens, n, n as u64);
            let w = random_matrix(d * n, 3);
            let m = Moments::of_tokens(&h, n, 0..tokens);
            let f = case.features();
            let rows: Vec<usize> = (0..d).collect();
            let wm = rows_of(&w, n, &rows);
            let gpu = crate::gpu::kernels::test_util::gpu();
            for (alpha, solver) in [(1e-2, Solver::Host), (1.0, Solver::Host), (1e-2, Solver::Gpu(&gpu)), (1.0, Solver::Gpu(&gpu))] {
                let sums = f.through(&m, &gram_matrix(&m), solver).unwrap();
                let wgp = &wm * &sums.gp;
                let (a, b) = fit(&wm, &wgp, &f.start(&wm, &rows), &sums, RefitChoice::Ridge { alpha }, solver).unwrap();
                let (ra, rb) = ridge_reference(case, &h, tokens, &w, alpha);
                // f32 Gram sums over a few hundred tokens: ~1e-6 relative, amplified by the
                // conditioning of the features' covariance
                let r = a.ncols();
                for (x, y) in (0..d * r).map(|x| a[(x / r, x % r)]).zip(&ra) {
                    assert!((x - y).abs() <= 1e-3 * (1.0 + y.abs()), "case {ci} alpha {alpha}: weight {x} vs {y}");
                }
                for (x, y) in b.iter().zip(&rb) {
                    assert!((x - y).abs() <= 1e-3 * (1.0 + y.abs()), "case {ci} alpha {alpha}: bias {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn held_out_error_matches_the_token_sum() {
        for (ci, case) in cases().iter().enumerate() {
            let (n, d, tokens) = (case.n, case.d, 80);
            let h = features(tokens, n, 7 + ci as u64);
            let w = random_matrix(d * n, 9);
            let m = Moments::of_tokens(&h, n, 0..tokens);
            let f = case.features();
            let rows: Vec<usize> = (0..d).collect();
            let wm = rows_of(&w, n, &rows);
            let start = f.start(&wm, &rows);
            let a = Mat::<f64>::from_fn(d, start.ncols(), |r, c| start[(r, c)] * 1.1 + 0.01 * r as f64);
            let b: Vec<f64> = (0..d).map(|r| 0.1 * r as f64 - 0.2).collect();
            let gram = gram_matrix(&m);
            let sums = f.through(&m, &gram, Solver::Host).unwrap();
            let (err, target) = HeldOut::new(&wm, &gram, &sums, Solver::Host).unwrap().error(&a, &b, Solver::Host).unwrap();
            let (mut e, mut t) = (0.0, 0.0);
            for tok in 0..tokens {
                let x = &h[tok * n..(tok + 1) * n];
                let z = case.z(x);
                for r in 0..d {
                    let y: f64 = (0..n).map(|j| wm[(r, j)] * x[j]).sum();
                    let p: f64 = z.iter().enumerate().map(|(c, v)| a[(r, c)] * v).sum::<f64>() + b[r];
                    e += (y - p).powi(2);
                    t += y * y;
                }
            }
            let (e, t) = (e / tokens as f64, t / tokens as f64);
            assert!((err - e).abs() <= 1e-4 * e && (target - t).abs() <= 1e-4 * t, "case {ci}: {err} vs {e}, {target} vs {t}");
        }
    }

    #[test]
    fn the_held_out_windows_pick_a_candidate_no_worse_than_pruning() {
        let (f, d) = (16, 6);
        let h = features(400, f, 11);
        let w: Vec<f32> = (0..d * f).map(|x| ((x * 13 % 17) as f32 - 8.0) / 8.0).collect();
        let kept: Vec<usize> = (0..f).filter(|j| j % 5 != 1).collect();
        let fm = SplitMoments { dim: f, fit: Moments::of_tokens(&h, f, 0..300), held_out: Moments::of_tokens(&h, f, 300..400) };
        let out = refit(&w, d, Features::Kept(&kept), &fm, Solver::Host).unwrap();
        let score = |c: RefitChoice| out.report.candidates.iter().find(|s| s.choice == c).unwrap().held_out_rel_error;
        let chosen = score(out.report.choice);
        assert!(chosen <= score(RefitChoice::Pruned) && chosen <= score(RefitChoice::MeanBias));
        // near-duplicate channels: the refit recovers most of what pruning lost
        assert!(matches!(out.report.choice, RefitChoice::Ridge { .. }) && chosen < 0.5 * score(RefitChoice::Pruned), "{:?}", out.report);
        assert_eq!((out.a.len(), out.bias.as_ref().map(|b| b.len())), (d * kept.len(), Some(d)));
        // independent features and fewer fitting tokens than kept channels: a small ridge
        // overfits the fitting windows, and the held-out ones choose no refit, the mean
        // bias or a large ridge
        let mut rng = StdRng::seed_from_u64(5);
        let noise: Vec<f64> = (0..200 * f).map(|_| 0.5 + rng.random_range(-1.0..1.0)).collect();
        let few = SplitMoments { dim: f, fit: Moments::of_tokens(&noise, f, 0..6), held_out: Moments::of_tokens(&noise, f, 100..200) };
        let out = refit(&w, d, Features::Kept(&kept), &few, Solver::Host).unwrap();
        let score = |c: RefitChoice| out.report.candidates.iter().find(|s| s.choice == c).unwrap().held_out_rel_error;
        assert!(score(RefitChoice::Ridge { alpha: RIDGE_GRID[0] }) > score(RefitChoice::Pruned), "{:?}", out.report);
        assert!(!matches!(out.report.choice, RefitChoice::Ridge { alpha } if alpha < 0.1), "{:?}", out.report);
    }

    /// The refit with its products and solves on the GPU (f32) chooses what the f64 host
    /// refit chooses and fits the same map: within 1e-3 of the largest weight (the bound of
    /// the f32 solves in `methods::solve`, on features as correlated as these), and the
    /// held-out errors within 1e-3 relative. 300 kept features: two blocks of the GPU
    /// factorization (`CHOLESKY_BLOCK` 256), so its trailing update is in the path.
    #[test]
    fn the_gpu_refit_agrees_with_the_host_refit() {
        let gpu = crate::gpu::kernels::test_util::gpu();
        let (f, d) = (400, 9);
        let h = features(900, f, 13);
        let w = random_matrix(d * f, 17);
        let kept: Vec<usize> = (0..f).filter(|j| j % 4 != 2).collect();
        assert!(kept.len() > crate::methods::solve::CHOLESKY_BLOCK);
        let fm = SplitMoments { dim: f, fit: Moments::of_tokens(&h, f, 0..700), held_out: Moments::of_tokens(&h, f, 700..900) };
        let host = refit(&w, d, Features::Kept(&kept), &fm, Solver::Host).unwrap();
        let on_gpu = refit(&w, d, Features::Kept(&kept), &fm, Solver::Gpu(&gpu)).unwrap();
        assert_eq!(host.report.choice, on_gpu.report.choice, "{:?}\n{:?}", host.report, on_gpu.report);
        for (x, y) in host.report.candidates.iter().zip(&on_gpu.report.candidates) {
            assert!((x.held_out_rel_error - y.held_out_rel_error).abs() <= 1e-3 * x.held_out_rel_error.max(1e-3), "{x:?} vs {y:?}");
        }
        let scale = host.a.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(host.a.iter().zip(&on_gpu.a).all(|(x, y)| (x - y).abs() <= 1e-3 * scale));
    }

    /// Features with a large mean and a small spread over fewer tokens than channels: the
    /// covariance from f32 sums minus the squared mean is indefinite at the smallest
    /// ridges; those candidates drop out and the refit still answers (never an error).
    #[test]
    fn an_indefinite_candidate_drops_out() {
        let (f, d) = (24, 5);
        let mut rng = StdRng::seed_from_u64(3);
        let h: Vec<f64> = (0..40 * f).map(|_| 300.0 + 0.01 * rng.random_range(-1.0..1.0)).collect();
        let w = random_matrix(d * f, 4);
        let kept: Vec<usize> = (0..f).filter(|j| j % 3 != 0).collect();
        let sm = SplitMoments { dim: f, fit: Moments::of_tokens(&h, f, 0..8), held_out: Moments::of_tokens(&h, f, 8..40) };
        let out = refit(&w, d, Features::Kept(&kept), &sm, Solver::Host).unwrap();
        assert!(out.report.candidates.len() < 2 + RIDGE_GRID.len(), "{:?}", out.report);
        assert!(out.report.candidates.iter().any(|c| c.choice == out.report.choice));
    }

    /// A factor pair from the SVD of W S (S the diagonal activation scale) on correlated
    /// inputs with a non-zero mean: the full covariance and the intercept reduce the
    /// held-out error of the same rank.
    #[test]
    fn a_factor_pair_refit_beats_the_scaled_svd_on_correlated_inputs() {
        let (n, d, rank) = (14usize, 10usize, 3usize);
        let h = features(500, n, 19);
        let w = random_matrix(d * n, 31);
        let fit_m = Moments::of_tokens(&h, n, 0..400);
        let scales: Vec<f64> = (0..n).map(|j| (fit_m.gram[j * n + j] as f64 / 400.0).sqrt()).collect();
        let ws = Mat::<f64>::from_fn(d, n, |r, j| w[r * n + j] as f64 * scales[j]);
        let svd = ws.thin_svd().unwrap();
        let (u, sv, v) = (svd.U(), svd.S().column_vector(), svd.V());
        let a0: Vec<f32> = (0..d * rank).map(|x| (u[(x / rank, x % rank)] * sv[x % rank].sqrt()) as f32).collect();
        let b: Vec<f32> = (0..rank * n).map(|x| (sv[x / n].sqrt() * v[(x % n, x / n)] / scales[x % n]) as f32).collect();
        let sm = SplitMoments { dim: n, fit: fit_m, held_out: Moments::of_tokens(&h, n, 400..500) };
        let out = refit(&w, d, Features::Projected { b: &b, a0: &a0, rank }, &sm, Solver::Host).unwrap();
        let score = |c: RefitChoice| out.report.candidates.iter().find(|s| s.choice == c).unwrap().held_out_rel_error;
        assert!(score(RefitChoice::MeanBias) < score(RefitChoice::Pruned), "{:?}", out.report);
        assert!(score(out.report.choice) < 0.9 * score(RefitChoice::Pruned), "{:?}", out.report);
        assert_eq!((out.a.len(), out.report.features), (d * rank, rank));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let fm = SplitMoments { dim: 4, fit: Moments { gram: vec![1.0; 16], sum: vec![0.0; 4], tokens: 0 }, held_out: Moments { gram: vec![1.0; 16], sum: vec![0.0; 4], tokens: 3 } };
        assert!(refit(&[0.5; 8], 2, Features::Kept(&[0, 1]), &fm, Solver::Host).is_err());
        let fm = SplitMoments { fit: fm.held_out.clone(), ..fm };
        assert!(refit(&[0.5; 8], 2, Features::Kept(&[0, 9]), &fm, Solver::Host).is_err());
        assert!(refit(&[0.5; 7], 2, Features::Kept(&[0, 1]), &fm, Solver::Host).is_err());
        assert!(refit(&[0.5; 8], 2, Features::Kept(&[]), &fm, Solver::Host).is_err());
        assert!(refit(&[0.5; 8], 2, Features::Projected { b: &[0.5; 4], a0: &[0.5; 4], rank: 2 }, &fm, Solver::Host).is_err());
    }
}
