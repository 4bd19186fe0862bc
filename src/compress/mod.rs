//! Compression methods. `lorap` is the main one; `svd`, `allocate`, `ffn` and `output` are
//! the pieces it (and the related methods) share.

pub mod allocate;
pub mod ffn;
pub mod lorap;
pub mod mpo;
pub mod output;
pub mod plan;
pub mod search;
pub mod sfsd;
pub mod states;
pub mod svd;

use crate::error::ErrorClass;

/// Failures of a compression run that are about its inputs, not the model files or GPU.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("--ratio must be in (0, 1), got {0}")]
    BadRatio(f64),
    #[error("{0}")]
    BadArgument(String),
    #[error("calibration text has {tokens} tokens: fewer than {samples} windows of {seq_len} (lower --samples or --seq-len, or give more text)")]
    CalibrationTooShort { tokens: usize, samples: usize, seq_len: usize },
    #[error("{0}: this model is already compressed; compress the dense original")]
    AlreadyCompressed(String),
    #[error("{path}: cannot resume: {what} (run without --resume to start over)")]
    ResumeMismatch { path: String, what: String },
    #[error("stopped after {0} layers as asked; `--resume` continues")]
    Interrupted(usize),
}

impl CompressError {
    pub fn class(&self) -> ErrorClass {
        match self {
            CompressError::BadRatio(_) | CompressError::BadArgument(_) | CompressError::AlreadyCompressed(_) => ErrorClass::BadArgument,
            CompressError::CalibrationTooShort { .. } => ErrorClass::CalibrationTooShort,
            CompressError::ResumeMismatch { .. } => ErrorClass::ResumeMismatch,
            CompressError::Interrupted(_) => ErrorClass::Other,
        }
    }
}
