//! lorap-gpu: LoRAP compression and evaluation of LLaMA-family models through wgpu compute shaders.
//!
//! Layers, each importing only from those before it (ARCHITECTURE.md): error (leaf), gpu,
//! format, model, calib, methods, pipeline, search, eval, export, report, cli.

// Loops over the seven linears (or four input sites) index several parallel per-linear
// arrays at once; an index loop says that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

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
