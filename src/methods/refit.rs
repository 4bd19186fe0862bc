//! FFN compensation after channel pruning: the kept down_proj columns refitted by ridge
//! least squares to the dense FFN's output on the calibration features, with an intercept
//! (a down_proj bias); the ridge (or no refit, or the mean bias alone) chosen on held-out
//! calibration windows. The Gram matrices come from the GPU (`calib::stats::FfnMoments`);
//! the k x k solves are f64 Cholesky factorizations on the host (faer).
//!
//! With h the intermediate features of a token, K the kept channels, R the removed ones, the
//! pruned FFN outputs W'h_K + b in place of W h. Over the tokens, with mean mu and covariance
//! Sigma of h, least squares with an unpenalized intercept and a ridge pulling W' towards
//! the pruned columns W[:, K] (not towards zero) is
//!     W' = (W Sigma[:, K] + lambda W[:, K]) (Sigma[K, K] + lambda I)^-1,   b = W mu - W' mu_K,
//! which runs from the plain least-squares fit (lambda = 0) to FLAP's mean compensation
//! (lambda -> infinity: W' = W[:, K], b = W[:, R] mu_R). The candidates "pruned" (W[:, K],
//! no bias) and "mean bias" sit beside the ridge grid. With fewer tokens than kept channels
//! a small ridge overfits (measured: SmolLM2 at 16 x 128 tokens): the held-out windows see it.

use anyhow::{ensure, Result};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use serde::{Deserialize, Serialize};

use crate::calib::stats::{FfnMoments, Moments};

/// Ridges tried, relative to the mean kept-feature variance tr(Sigma[K, K]) / |K|.
pub const RIDGE_GRID: [f64; 7] = [1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0];

/// Output rows the held-out selection scores (a strided subset: each row is its own
/// regression with the same normal matrix, so a subset compares the candidates at a
/// fraction of the cost on wide layers).
const SELECTION_ROWS: usize = 512;

/// What the compensation of one layer's FFN became.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RefitChoice {
    /// The kept columns as they were, no bias.
    Pruned,
    /// The kept columns as they were, plus the removed channels' mean contribution as a bias.
    MeanBias,
    /// Ridge least squares with an intercept, pulled towards the pruned columns; `alpha` is
    /// the ridge relative to the mean kept-feature variance.
    Ridge { alpha: f64 },
}

/// A candidate's held-out error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CandidateScore {
    pub choice: RefitChoice,
    /// Mean squared error of the FFN output on the held-out windows relative to the mean
    /// squared dense output there (on the scored rows).
    pub held_out_rel_error: f64,
}

/// What the report shows of one layer's refit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RefitReport {
    pub choice: RefitChoice,
    pub fit_tokens: usize,
    pub held_out_tokens: usize,
    pub kept_channels: usize,
    pub candidates: Vec<CandidateScore>,
}

/// The refitted down_proj: [d, k] over the kept channels, and its bias (`None` when the
/// choice is `Pruned`).
pub struct RefitDown {
    pub w: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub report: RefitReport,
}

/// Mean and covariance of a set of moments, restricted to what the fit uses.
struct Centred {
    mu: Vec<f64>,
    /// Sigma[:, K], [f, k].
    cross: Mat<f64>,
}

fn centred(m: &Moments, f: usize, kept: &[usize]) -> Centred {
    let mu = m.mean();
    let cross = Mat::<f64>::from_fn(f, kept.len(), |i, c| m.covariance(&mu, i, kept[c]));
    Centred { mu, cross }
}

/// Rows `rows` of W [d, f] as a matrix.
fn rows_of(w: &[f32], f: usize, rows: &[usize]) -> Mat<f64> {
    Mat::<f64>::from_fn(rows.len(), f, |r, j| w[rows[r] * f + j] as f64)
}

/// The candidate `choice` fitted for the rows of `w` ([rows, f]): W' [rows, k] and b.
fn fit(w: &Mat<f64>, kept: &[usize], removed: &[usize], c: &Centred, choice: RefitChoice) -> Result<(Mat<f64>, Vec<f64>)> {
    let (rows, k) = (w.nrows(), kept.len());
    let kept_cols = Mat::<f64>::from_fn(rows, k, |r, c| w[(r, kept[c])]);
    Ok(match choice {
        RefitChoice::Pruned => (kept_cols, vec![0.0; rows]),
        RefitChoice::MeanBias => {
            let b = (0..rows).map(|r| removed.iter().map(|&j| w[(r, j)] * c.mu[j]).sum()).collect();
            (kept_cols, b)
        }
        RefitChoice::Ridge { alpha } => {
            let mut normal = Mat::<f64>::from_fn(k, k, |a, b| c.cross[(kept[a], b)]);
            let lambda = alpha * (0..k).map(|a| normal[(a, a)]).sum::<f64>() / k as f64;
            for a in 0..k {
                normal[(a, a)] += lambda.max(f64::MIN_POSITIVE);
            }
            let llt = normal.llt(Side::Lower).map_err(|_| anyhow::anyhow!("FFN refit: the kept features' covariance plus a ridge of {alpha} is not positive definite"))?;
            let mut rhs = w * &c.cross;
            for r in 0..rows {
                for a in 0..k {
                    rhs[(r, a)] += lambda * kept_cols[(r, a)];
                }
            }
            let wk = llt.rsolve(&rhs);
            let b = (0..rows).map(|r| (0..w.ncols()).map(|j| w[(r, j)] * c.mu[j]).sum::<f64>() - (0..k).map(|a| wk[(r, a)] * c.mu[kept[a]]).sum::<f64>()).collect();
            (wk, b)
        }
    })
}

/// Mean squared error per token of x -> W'x_K + b against x -> W x over the tokens of
/// `m`, and the mean squared target, for the rows of `w`.
fn held_out_error(w: &Mat<f64>, wk: &Mat<f64>, b: &[f64], kept: &[usize], m: &Moments, gram: &Mat<f64>) -> (f64, f64) {
    let n = m.tokens as f64;
    let mut diff = w.clone();
    for r in 0..w.nrows() {
        for (a, &j) in kept.iter().enumerate() {
            diff[(r, j)] -= wk[(r, a)];
        }
    }
    let quad = |x: &Mat<f64>| -> f64 {
        let xg = x * gram;
        (0..x.nrows()).flat_map(|r| (0..x.ncols()).map(move |j| (r, j))).map(|(r, j)| xg[(r, j)] * x[(r, j)]).sum()
    };
    let sum: Vec<f64> = m.sum.iter().map(|&s| s as f64).collect();
    let cross: f64 = (0..w.nrows()).map(|r| b[r] * (0..w.ncols()).map(|j| diff[(r, j)] * sum[j]).sum::<f64>()).sum();
    let err = (quad(&diff) - 2.0 * cross + n * b.iter().map(|x| x * x).sum::<f64>()) / n;
    (err.max(0.0), quad(w) / n)
}

/// Refits down_proj `w` [d, f] restricted to `kept` (ascending): every candidate is fitted
/// on the fitting windows and scored on the held-out ones; the winner is fitted again on
/// all windows.
pub fn refit_down(w: &[f32], d: usize, kept: &[usize], moments: &FfnMoments) -> Result<RefitDown> {
    let f = moments.dim;
    ensure!(w.len() == d * f && !kept.is_empty() && kept.iter().all(|&j| j < f), "FFN refit: down_proj is not [{d}, {f}] or the kept channels are out of range");
    ensure!(moments.fit.tokens > 0 && moments.held_out.tokens > 0, "FFN refit: needs fitting and held-out calibration windows ({} and {} tokens)", moments.fit.tokens, moments.held_out.tokens);
    let removed: Vec<usize> = (0..f).filter(|j| kept.binary_search(j).is_err()).collect();
    let step = d.div_ceil(SELECTION_ROWS);
    let scored: Vec<usize> = (0..d).step_by(step).collect();
    let ws = rows_of(w, f, &scored);
    let fit_stats = centred(&moments.fit, f, kept);
    let held = &moments.held_out;
    let held_gram = Mat::<f64>::from_fn(f, f, |i, j| held.gram[i * f + j] as f64);
    let mut candidates = vec![RefitChoice::Pruned, RefitChoice::MeanBias];
    candidates.extend(RIDGE_GRID.iter().map(|&alpha| RefitChoice::Ridge { alpha }));
    let mut scores = Vec::new();
    for choice in candidates {
        let (wk, b) = fit(&ws, kept, &removed, &fit_stats, choice)?;
        let (err, target) = held_out_error(&ws, &wk, &b, kept, held, &held_gram);
        scores.push(CandidateScore { choice, held_out_rel_error: err / target.max(f64::MIN_POSITIVE) });
    }
    drop(held_gram);
    let best = scores.iter().min_by(|a, b| a.held_out_rel_error.total_cmp(&b.held_out_rel_error)).map(|s| s.choice).unwrap_or(RefitChoice::Pruned);
    let all = moments.fit.merged(held);
    let (wk, b) = fit(&rows_of(w, f, &(0..d).collect::<Vec<_>>()), kept, &removed, &centred(&all, f, kept), best)?;
    let k = kept.len();
    let report = RefitReport { choice: best, fit_tokens: moments.fit.tokens, held_out_tokens: held.tokens, kept_channels: k, candidates: scores };
    let wk: Vec<f32> = (0..d * k).map(|x| wk[(x / k, x % k)] as f32).collect();
    let bias = (best != RefitChoice::Pruned).then(|| b.iter().map(|&x| x as f32).collect());
    Ok(RefitDown { w: wk, bias, report })
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

    /// The f64 reference: least squares on the token matrix itself with an unpenalized
    /// intercept and the penalty n lambda ||W' - W[:, K]||^2, by normal equations in plain
    /// f64 Gaussian elimination.
    fn ridge_reference(h: &[f64], f: usize, tokens: usize, w: &[f32], d: usize, kept: &[usize], lambda: f64) -> (Vec<f64>, Vec<f64>) {
        let k = kept.len();
        let p = k + 1;
        let mut a = vec![0f64; p * p];
        let mut rhs = vec![0f64; p * d];
        for t in 0..tokens {
            let z: Vec<f64> = kept.iter().map(|&j| h[t * f + j]).chain([1.0]).collect();
            let y: Vec<f64> = (0..d).map(|r| (0..f).map(|j| w[r * f + j] as f64 * h[t * f + j]).sum()).collect();
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
                rhs[i * d + r] += tokens as f64 * lambda * w[r * f + kept[i]] as f64;
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

    #[test]
    fn ridge_fit_matches_the_f64_reference() {
        for (f, d, tokens, kept) in [(12usize, 5usize, 200usize, vec![0usize, 2, 3, 5, 7, 8, 11]), (9, 7, 60, vec![1, 4, 8])] {
            let h = features(tokens, f, f as u64);
            let w: Vec<f32> = { let mut rng = StdRng::seed_from_u64(3); (0..d * f).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
            let m = Moments::of_tokens(&h, f, 0..tokens);
            let removed: Vec<usize> = (0..f).filter(|j| !kept.contains(j)).collect();
            let c = centred(&m, f, &kept);
            let alpha = 1e-2;
            let (wk, b) = fit(&rows_of(&w, f, &(0..d).collect::<Vec<_>>()), &kept, &removed, &c, RefitChoice::Ridge { alpha }).unwrap();
            let lambda = alpha * kept.iter().enumerate().map(|(a, _)| c.cross[(kept[a], a)]).sum::<f64>() / kept.len() as f64;
            let (rw, rb) = ridge_reference(&h, f, tokens, &w, d, &kept, lambda);
            // f32 Gram sums over a few hundred tokens: ~1e-6 relative, amplified by the
            // conditioning of the kept features' covariance
            for (x, y) in (0..d * kept.len()).map(|x| wk[(x / kept.len(), x % kept.len())]).zip(&rw) {
                assert!((x - y).abs() <= 1e-3 * (1.0 + y.abs()), "f {f}: weight {x} vs {y}");
            }
            for (x, y) in b.iter().zip(&rb) {
                assert!((x - y).abs() <= 1e-3 * (1.0 + y.abs()), "f {f}: bias {x} vs {y}");
            }
        }
    }

    #[test]
    fn held_out_error_matches_the_token_sum() {
        let (f, d, tokens) = (10, 4, 80);
        let h = features(tokens, f, 7);
        let w: Vec<f32> = (0..d * f).map(|x| ((x * 7 % 11) as f32 - 5.0) / 5.0).collect();
        let kept = vec![0, 1, 4, 6, 9];
        let m = Moments::of_tokens(&h, f, 0..tokens);
        let wm = rows_of(&w, f, &(0..d).collect::<Vec<_>>());
        let wk = Mat::<f64>::from_fn(d, kept.len(), |r, a| wm[(r, kept[a])] * 1.1 + 0.01 * r as f64);
        let b: Vec<f64> = (0..d).map(|r| 0.1 * r as f64 - 0.2).collect();
        let gram = Mat::<f64>::from_fn(f, f, |i, j| m.gram[i * f + j] as f64);
        let (err, target) = held_out_error(&wm, &wk, &b, &kept, &m, &gram);
        let (mut e, mut t) = (0.0, 0.0);
        for tok in 0..tokens {
            for r in 0..d {
                let y: f64 = (0..f).map(|j| wm[(r, j)] * h[tok * f + j]).sum();
                let p: f64 = kept.iter().enumerate().map(|(a, &j)| wk[(r, a)] * h[tok * f + j]).sum::<f64>() + b[r];
                e += (y - p).powi(2);
                t += y * y;
            }
        }
        let (e, t) = (e / tokens as f64, t / tokens as f64);
        assert!((err - e).abs() <= 1e-4 * e && (target - t).abs() <= 1e-4 * t, "{err} vs {e}, {target} vs {t}");
    }

    #[test]
    fn the_held_out_windows_pick_a_candidate_no_worse_than_pruning() {
        let (f, d) = (16, 6);
        let h = features(400, f, 11);
        let w: Vec<f32> = (0..d * f).map(|x| ((x * 13 % 17) as f32 - 8.0) / 8.0).collect();
        let kept: Vec<usize> = (0..f).filter(|j| j % 5 != 1).collect();
        let fm = FfnMoments { dim: f, fit: Moments::of_tokens(&h, f, 0..300), held_out: Moments::of_tokens(&h, f, 300..400) };
        let out = refit_down(&w, d, &kept, &fm).unwrap();
        let score = |c: RefitChoice| out.report.candidates.iter().find(|s| s.choice == c).unwrap().held_out_rel_error;
        let chosen = score(out.report.choice);
        assert!(chosen <= score(RefitChoice::Pruned) && chosen <= score(RefitChoice::MeanBias));
        // near-duplicate channels: the refit recovers most of what pruning lost
        assert!(matches!(out.report.choice, RefitChoice::Ridge { .. }) && chosen < 0.5 * score(RefitChoice::Pruned), "{:?}", out.report);
        assert_eq!((out.w.len(), out.bias.as_ref().map(|b| b.len())), (d * kept.len(), Some(d)));
        // independent features and fewer fitting tokens than kept channels: a small ridge
        // overfits the fitting windows, and the held-out ones choose no refit, the mean
        // bias or a large ridge
        let mut rng = StdRng::seed_from_u64(5);
        let noise: Vec<f64> = (0..200 * f).map(|_| 0.5 + rng.random_range(-1.0..1.0)).collect();
        let few = FfnMoments { dim: f, fit: Moments::of_tokens(&noise, f, 0..6), held_out: Moments::of_tokens(&noise, f, 100..200) };
        let out = refit_down(&w, d, &kept, &few).unwrap();
        let score = |c: RefitChoice| out.report.candidates.iter().find(|s| s.choice == c).unwrap().held_out_rel_error;
        assert!(score(RefitChoice::Ridge { alpha: RIDGE_GRID[0] }) > score(RefitChoice::Pruned), "{:?}", out.report);
        assert!(!matches!(out.report.choice, RefitChoice::Ridge { alpha } if alpha < 0.1), "{:?}", out.report);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let fm = FfnMoments { dim: 4, fit: Moments { gram: vec![1.0; 16], sum: vec![0.0; 4], tokens: 0 }, held_out: Moments { gram: vec![1.0; 16], sum: vec![0.0; 4], tokens: 3 } };
        assert!(refit_down(&[0.5; 8], 2, &[0, 1], &fm).is_err());
        let fm = FfnMoments { fit: fm.held_out.clone(), ..fm };
        assert!(refit_down(&[0.5; 8], 2, &[0, 9], &fm).is_err());
        assert!(refit_down(&[0.5; 7], 2, &[0, 1], &fm).is_err());
    }
}
