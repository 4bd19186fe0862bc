//! f64 CPU references of the elementwise kernels (SwiGLU product, addition, row bias).

/// CPU reference of `silu_mul`.
pub fn silu_mul_ref(gate: &[f32], up: &[f32]) -> Vec<f64> {
    gate.iter().zip(up).map(|(&g, &u)| (g as f64 / (1.0 + (-(g as f64)).exp())) * u as f64).collect()
}

/// CPU reference of `add`.
pub fn add_ref(a: &[f32], b: &[f32]) -> Vec<f64> {
    a.iter().zip(b).map(|(&x, &y)| x as f64 + y as f64).collect()
}

/// CPU reference of `add_bias`.
pub fn add_bias_ref(x: &[f32], bias: &[f32], cols: usize) -> Vec<f64> {
    x.iter().enumerate().map(|(i, &v)| v as f64 + bias[i % cols] as f64).collect()
}
