//! lorap-gpu: LoRAP compression and evaluation of LLaMA-family models through wgpu compute shaders.
//!
//! Layers, each importing only from those before it (ARCHITECTURE.md): error (leaf), gpu,
//! format, model, calib, methods, pipeline, search, eval, export, report, cli.

pub mod calib;
pub mod cli;
pub mod error;
pub mod eval;
pub mod export;
pub mod format;
pub mod gpu;
pub mod methods;
pub mod model;
pub mod pipeline;
pub mod report;
pub mod search;
