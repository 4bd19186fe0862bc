//! f64 CPU references of the norms room (column sums of squares, RMSNorm, scaled row norms).

/// CPU reference of `col_sumsq_accumulate` (from zero).
pub fn col_sumsq_ref(x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0f64; cols];
    for r in 0..rows {
        for (o, &v) in out.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
            *o += v as f64 * v as f64;
        }
    }
    out
}

/// CPU reference of `rms_norm`.
pub fn rms_norm_ref(x: &[f32], w: &[f32], rows: usize, cols: usize, eps: f64) -> Vec<f64> {
    let mut y = vec![0f64; rows * cols];
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / cols as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for c in 0..cols {
            y[r * cols + c] = xr[c] as f64 * inv * w[c] as f64;
        }
    }
    y
}

/// CPU reference of `row_scaled_norms`.
pub fn row_scaled_norms_ref(w: &[f32], s: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    (0..rows).map(|r| (0..cols).map(|c| (w[r * cols + c] as f64 * s[c] as f64).powi(2)).sum::<f64>().sqrt()).collect()
}
