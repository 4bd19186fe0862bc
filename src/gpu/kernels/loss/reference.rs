//! f64 CPU reference of the token negative log-likelihood.

/// CPU reference.
pub fn nll_rows_ref(logits: &[f32], targets: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    (0..rows)
        .map(|r| {
            let row = &logits[r * cols..(r + 1) * cols];
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
            m + z.ln() - row[targets[r] as usize] as f64
        })
        .collect()
}
