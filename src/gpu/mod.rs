//! GPU layer: device/context, buffers, pipeline cache, and one module per kernel family
//! (each paired with a CPU f64 reference used by the tests).

pub mod attention;
pub mod context;
pub mod elementwise;
pub mod loss;
pub mod matmul;
pub mod norms;
pub mod rope;

pub use context::{list_adapters, Gpu, GpuBuf, GpuError, GpuOptions};

/// Relative Frobenius error ||got - want|| / ||want||, the bound every kernel test states.
pub fn rel_frobenius(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}
