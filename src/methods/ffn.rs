//! FFN structured channel pruning: Wanda-style channel scores from activation scales, the
//! lowest-scored 1% reserved, the next fraction p removed.

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
}
