//! GPU layer: the device/context room (buffers, pipeline cache, uniform ring) and one room
//! per kernel family under `kernels/` (wrapper, WGSL, f64 CPU reference, unit tests).

pub mod context;
pub mod kernels;
pub mod timer;

// The kernel families keep their old public paths (`gpu::matmul`, `gpu::norms`, ...).
pub use kernels::{attention, elementwise, loss, matmul, norms, rope};

pub use context::{list_adapters, Gpu, GpuBuf, GpuError, GpuOptions, ShaderChecks};

/// Relative Frobenius error ||got - want|| / ||want||, the bound every kernel test states.
pub fn rel_frobenius(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}
