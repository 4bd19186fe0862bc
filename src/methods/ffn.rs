//! FFN structured channel pruning: Wanda-style channel scores from activation scales or
//! OBS scores from the intermediate features' covariance, optionally the lowest-scored
//! fraction reserved (the LoRAP paper's 1%; none by default), the next fraction p removed.

use serde::{Deserialize, Serialize};

use crate::gpu::{context::Result as GpuResult, norms, Gpu, GpuBuf};

/// score_j = || |Wup[j,:]| s_x || + || |Wgate[j,:]| s_x || + ||Wdown[:, j]|| s_h[j]
/// (s = 1 everywhere gives the magnitude-only ablation). `[gate, up, down]`: gate/up
/// [f, d], down [d, f], with f = s_h.len().
pub fn channel_scores(gpu: &Gpu, [gate, up, down]: [&GpuBuf; 3], s_x: &GpuBuf, s_h: &[f32], d: usize) -> GpuResult<Vec<f64>> {
    let f = s_h.len();
    let (sg, su, sd) = (gpu.alloc(f)?, gpu.alloc(f)?, gpu.zeros(f)?);
    let mut enc = gpu.encoder();
    norms::row_scaled_norms(gpu, &mut enc, gate, s_x, &sg, f, d)?;
    norms::row_scaled_norms(gpu, &mut enc, up, s_x, &su, f, d)?;
    norms::col_sumsq_accumulate(gpu, &mut enc, down, d, f, &sd)?;
    gpu.submit(enc);
    let (g, u, dn) = (gpu.read(&sg)?, gpu.read(&su)?, gpu.read(&sd)?);
    Ok((0..f).map(|j| g[j] as f64 + u[j] as f64 + (dn[j] as f64).sqrt() * s_h[j] as f64).collect())
}

/// CPU reference of `channel_scores`.
pub fn channel_scores_ref(gate: &[f32], up: &[f32], down: &[f32], s_x: &[f32], s_h: &[f32], d: usize, f: usize) -> Vec<f64> {
    let rn = |w: &[f32], j: usize| (0..d).map(|c| (w[j * d + c] as f64 * s_x[c] as f64).powi(2)).sum::<f64>().sqrt();
    (0..f).map(|j| rn(up, j) + rn(gate, j) + (0..d).map(|r| (down[r * f + j] as f64).powi(2)).sum::<f64>().sqrt() * s_h[j] as f64).collect()
}

/// How FFN channels are scored for removal.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelSelection {
    /// Wanda-style: weight norms times activation scales (`channel_scores`).
    #[default]
    Wanda,
    /// Optimal brain surgeon: the FFN output error of removing the channel when the others
    /// compensate by least squares, ||W_down[:, j]||^2 / [Sigma^-1]_jj (`obs_scores`).
    Obs,
}

/// Dampening of the covariance inverted for OBS scores, relative to its mean diagonal
/// (SparseGPT's 1%): channels that are (near) linear combinations of others stay finite.
pub const OBS_DAMPENING: f64 = 0.01;

/// OBS channel scores: with Sigma the (dampened) covariance of the intermediate features
/// h over the calibration tokens, removing channel j alone and refitting the others (and an
/// intercept) raises the mean squared FFN output error by ||W_down[:, j]||^2 / [Sigma^-1]_jj.
/// `w_down` [d, f]; `m` the features' moments over all calibration tokens.
pub fn obs_scores(w_down: &[f32], d: usize, m: &crate::calib::stats::Moments) -> anyhow::Result<Vec<f64>> {
    use faer::{Mat, Side};
    let f = m.sum.len();
    anyhow::ensure!(m.tokens > 0 && w_down.len() == d * f && m.gram.len() == f * f, "OBS scores: no calibration tokens, or down_proj is not [{d}, {f}]");
    let mu = m.mean();
    let mut sigma = Mat::<f64>::from_fn(f, f, |i, j| m.covariance(&mu, i, j));
    let damp = OBS_DAMPENING * (0..f).map(|i| sigma[(i, i)]).sum::<f64>() / f as f64;
    for i in 0..f {
        sigma[(i, i)] += damp.max(f64::MIN_POSITIVE);
    }
    let llt = sigma.llt(Side::Lower).map_err(|_| anyhow::anyhow!("OBS scores: the FFN features' covariance is not positive definite even dampened"))?;
    // diag(Sigma^-1)_j = ||L^-1 e_j||^2
    let mut linv = Mat::<f64>::zeros(f, f);
    faer::linalg::triangular_inverse::invert_lower_triangular(linv.as_mut(), llt.L(), faer::get_global_parallelism());
    Ok((0..f)
        .map(|j| {
            let inv_jj: f64 = (j..f).map(|i| linv[(i, j)] * linv[(i, j)]).sum();
            let col: f64 = (0..d).map(|r| (w_down[r * f + j] as f64).powi(2)).sum();
            col / inv_jj
        })
        .collect())
}

/// Indices (ascending) of the channels kept: sort by score ascending, keep the lowest
/// `reserve` fraction, remove the next `remove` channels, keep the rest.
pub fn kept_channels(scores: &[f64], remove: usize, reserve: f64) -> Vec<usize> {
    let f = scores.len();
    let mut order: Vec<usize> = (0..f).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let reserved = ((reserve * f as f64).round() as usize).min(f.saturating_sub(remove));
    let removed: std::collections::HashSet<usize> = order[reserved..reserved + remove.min(f - reserved)].iter().copied().collect();
    (0..f).filter(|j| !removed.contains(j)).collect()
}

/// gate, up [kept, d] and down [d, kept] of decoder layer `layer` restricted to the `kept`
/// channels, read from the dense model.
pub fn pruned_weights(store: &crate::format::WeightStore, layer: usize, d: usize, f: usize, kept: &[usize]) -> Result<[Vec<f32>; 3], crate::format::weights::WeightError> {
    let name = |s: &str| crate::format::names::layer(layer, &format!("mlp.{s}.weight"));
    Ok([
        gather_rows(&store.f32(&name("gate_proj"), &[f, d])?, d, kept),
        gather_rows(&store.f32(&name("up_proj"), &[f, d])?, d, kept),
        gather_cols(&store.f32(&name("down_proj"), &[d, f])?, d, f, kept),
    ])
}

/// Rows `keep` of a row-major [rows, cols] matrix.
pub fn gather_rows(w: &[f32], cols: usize, keep: &[usize]) -> Vec<f32> {
    keep.iter().flat_map(|&r| w[r * cols..(r + 1) * cols].iter().copied()).collect()
}

/// Columns `keep` of a row-major [rows, cols] matrix.
pub fn gather_cols(w: &[f32], rows: usize, cols: usize, keep: &[usize]) -> Vec<f32> {
    (0..rows).flat_map(|r| keep.iter().map(move |&c| w[r * cols + c])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_keeps_the_lowest_and_removes_the_next() {
        let scores: Vec<f64> = (0..200).map(|i| ((i * 37) % 200) as f64).collect();
        let kept = kept_channels(&scores, 50, 0.01);
        assert_eq!(kept.len(), 150);
        let kept_scores: Vec<f64> = kept.iter().map(|&j| scores[j]).collect();
        // scores 0,1 (the lowest 1%) stay; 2..=51 go; 52.. stay
        assert!(kept_scores.contains(&0.0) && kept_scores.contains(&1.0));
        assert!((2..52).all(|s| !kept_scores.contains(&(s as f64))));
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
        let none = kept_channels(&scores, 50, 0.0);
        assert!((0..50).all(|s| !none.iter().any(|&j| scores[j] == s as f64)));
    }

    /// OBS scores against their definition, in f64 by elimination: the Schur complement
    /// Sigma_jj - Sigma_j,-j Sigma_-j,-j^-1 Sigma_-j,j (the error left after the others
    /// compensate) times ||W_down[:, j]||^2, on random correlated features.
    #[test]
    fn obs_scores_match_the_schur_complement() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        for (f, d, tokens) in [(7usize, 3usize, 50usize), (13, 5, 40)] {
            let mut rng = StdRng::seed_from_u64(f as u64);
            let base: Vec<f64> = (0..tokens * 3).map(|_| rng.random_range(-1.0..1.0)).collect();
            let h: Vec<f64> = (0..tokens * f).map(|x| 0.2 + base[(x / f) * 3 + (x % f) % 3] * (1.0 + (x % f) as f64 * 0.1) + 0.3 * rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..d * f).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let m = crate::calib::stats::Moments::of_tokens(&h, f, 0..tokens);
            let got = obs_scores(&w, d, &m).unwrap();
            // the dampened covariance in f64 from the tokens themselves
            let mu: Vec<f64> = (0..f).map(|i| (0..tokens).map(|t| h[t * f + i]).sum::<f64>() / tokens as f64).collect();
            let mut s: Vec<f64> = (0..f * f).map(|x| (0..tokens).map(|t| (h[t * f + x / f] - mu[x / f]) * (h[t * f + x % f] - mu[x % f])).sum::<f64>() / tokens as f64).collect();
            let damp = OBS_DAMPENING * (0..f).map(|i| s[i * f + i]).sum::<f64>() / f as f64;
            for i in 0..f {
                s[i * f + i] += damp;
            }
            for j in 0..f {
                // eliminate every other index from the matrix: what is left at (j, j) is the
                // Schur complement
                let mut a = s.clone();
                for p in (0..f).filter(|&p| p != j) {
                    let piv = a[p * f + p];
                    let (rowp, colp): (Vec<f64>, Vec<f64>) = ((0..f).map(|c| a[p * f + c]).collect(), (0..f).map(|r| a[r * f + p]).collect());
                    for r in 0..f {
                        for c in 0..f {
                            a[r * f + c] -= colp[r] * rowp[c] / piv;
                        }
                    }
                    for x in 0..f {
                        a[p * f + x] = 0.0;
                        a[x * f + p] = 0.0;
                    }
                    a[p * f + p] = 1.0;
                }
                let col: f64 = (0..d).map(|r| (w[r * f + j] as f64).powi(2)).sum();
                let want = a[j * f + j] * col;
                // f32 Gram sums over tens of tokens: ~1e-6 relative, through a dampened inverse
                assert!((got[j] - want).abs() <= 1e-4 * want.abs().max(1e-9), "f {f} channel {j}: {} vs {want}", got[j]);
            }
        }
    }
}
