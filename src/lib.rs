//! lorap-gpu: LoRAP compression and evaluation of LLaMA-family models through wgpu compute shaders.

pub mod cli;
pub mod compress;
pub mod error;
pub mod eval;
pub mod format;
pub mod gpu;
pub mod model;
pub mod report;
