//! f64 CPU reference of the rotary position embedding.

use super::inv_freq;

/// CPU reference (f64 angles from the same f32 inverse frequencies).
pub fn rope_ref(x: &[f32], tokens: usize, n_heads: usize, head_dim: usize, window: usize, theta: f64) -> Vec<f64> {
    let f = inv_freq(head_dim, theta);
    let half = head_dim / 2;
    let mut y: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for t in 0..tokens {
        let pos = t % window;
        for h in 0..n_heads {
            let base = t * n_heads * head_dim + h * head_dim;
            for i in 0..half {
                let ang = (pos as f32 * f[i]) as f64; // the f32 product, as transformers forms it
                let (s, c) = ang.sin_cos();
                let x1 = x[base + i] as f64;
                let x2 = x[base + i + half] as f64;
                y[base + i] = x1 * c - x2 * s;
                y[base + i + half] = x2 * c + x1 * s;
            }
        }
    }
    y
}
