//! Shared helpers of the kernel rooms' unit tests: a Vulkan-pinned GPU (lavapipe on CI, so a
//! missing driver fails instead of falling back to GL), seeded random data and the error bound.

use std::sync::{Arc, OnceLock};

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::gpu::{rel_frobenius, Gpu, GpuOptions};

/// Relative Frobenius error every kernel must stay under (f32 storage and arithmetic).
pub const TOL: f64 = 1e-4;

/// Vulkan, f32 products only (the f16 cooperative-matrix path has its own tests and bound).
pub fn options() -> GpuOptions {
    GpuOptions { backends: Some(wgpu::Backends::VULKAN), cooperative_matrix: Some(false), ..Default::default() }
}

/// One shared context per test binary.
pub fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| Gpu::new(&options()).expect("Vulkan adapter (install mesa-vulkan-drivers)")).clone()
}

/// A context whose storage bindings are capped at `bytes`, to force tensor splitting.
pub fn gpu_with_binding(bytes: u64) -> Arc<Gpu> {
    Gpu::new(&GpuOptions { max_binding: Some(bytes), ..options() }).expect("Vulkan adapter")
}

/// Uniform values in [-1, 1) shifted away from zero, never exactly zero.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let v: f32 = r.random_range(-1.0..1.0);
            if v.abs() < 1e-3 {
                0.5
            } else {
                v
            }
        })
        .collect()
}

/// Asserts the relative Frobenius error against the f64 reference is under `TOL`.
pub fn check(name: &str, got: &[f32], want: &[f64]) {
    let e = rel_frobenius(got, want);
    assert!(e < TOL, "{name}: relative Frobenius error {e:e} >= {TOL:e}");
}

/// Uploads `data` ([rows, cols] row-major) at element `offset` of a buffer with leading
/// dimension `ld`, every other element (the padding of each row, the head and the tail) NaN:
/// a kernel that reads an element outside the block inside its binding turns results NaN.
pub fn fenced(g: &Gpu, data: &[f32], rows: usize, cols: usize, ld: usize, offset: usize) -> crate::gpu::GpuBuf {
    assert!(ld >= cols && data.len() == rows * cols);
    let mut v = vec![f32::NAN; offset + rows * ld + 7];
    for r in 0..rows {
        v[offset + r * ld..][..cols].copy_from_slice(&data[r * cols..][..cols]);
    }
    g.upload(&v).unwrap()
}

/// The [rows, cols] block of a `fenced` layout, after asserting every element outside it is
/// still NaN (a kernel wrote nothing outside its output).
pub fn unfence(name: &str, all: &[f32], rows: usize, cols: usize, ld: usize, offset: usize) -> Vec<f32> {
    let inside = |i: usize| i >= offset && (i - offset) / ld < rows && (i - offset) % ld < cols;
    let stray = (0..all.len()).filter(|&i| !inside(i) && !all[i].is_nan()).count();
    assert_eq!(stray, 0, "{name}: {stray} elements written outside the output block");
    (0..rows).flat_map(|r| all[offset + r * ld..][..cols].to_vec()).collect()
}
