//! Error classes: every failure the tool reports falls in one class, which tests assert and
//! the binary turns into a distinct exit code, whatever module raised it (`cli::classify`
//! maps each module's errors to a class), and the argument errors every layer raises.
//! A leaf: it imports nothing from the crate.


/// What kind of failure an error is, for tests and exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ErrorClass {
    /// A command-line value out of range (ratio outside (0, 1), zero windows...).
    BadArgument,
    /// A file or folder that should exist does not (model folder, weights, tokenizer, text).
    MissingInput,
    /// A safetensors file or index that cannot be parsed, or is truncated, or a tensor that
    /// holds NaN, infinite or absurdly large values.
    CorruptWeights,
    /// config.json or tokenizer.json unreadable or inconsistent (with each other included:
    /// a tokenizer whose ids the model's vocabulary lacks).
    BadConfig,
    /// A model type, config feature (biases, sliding window, rope type) or tensor dtype the
    /// tool does not handle.
    Unsupported,
    /// Tensor shapes that contradict config.json.
    ShapeMismatch,
    /// A calibration or evaluation text that is empty or too short for the windows asked for.
    CalibrationTooShort,
    /// The output folder exists (without --force), is not a folder, or is, contains or lies
    /// inside an input.
    OutputExists,
    /// Another run holds the lock on the same output folder.
    OutputBusy,
    /// The output cannot be written for a reason other than a full disk (no permission, a
    /// parent that is a file, a read-only file system...).
    OutputUnwritable,
    /// `--resume` found a partial output made with other inputs or options.
    ResumeMismatch,
    /// No space left on the output device.
    DiskFull,
    /// The GPU ran out of memory, or the run exceeded `--max-vram`.
    GpuOutOfMemory,
    /// The GPU device was lost (driver reset, device removed).
    GpuLost,
    /// No usable GPU adapter or device, or another GPU error.
    Gpu,
    /// Anything else (I/O errors other than a full disk, tokenizer failures...).
    Other,
}

impl ErrorClass {
    /// Process exit code for the class (1 is left for "other").
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorClass::Other => 1,
            ErrorClass::BadArgument => 2,
            ErrorClass::MissingInput => 3,
            ErrorClass::CorruptWeights => 4,
            ErrorClass::BadConfig => 5,
            ErrorClass::Unsupported => 6,
            ErrorClass::ShapeMismatch => 7,
            ErrorClass::CalibrationTooShort => 8,
            ErrorClass::OutputExists => 9,
            ErrorClass::ResumeMismatch => 10,
            ErrorClass::DiskFull => 11,
            ErrorClass::GpuOutOfMemory => 12,
            ErrorClass::GpuLost => 13,
            ErrorClass::Gpu => 14,
            ErrorClass::OutputBusy => 15,
            ErrorClass::OutputUnwritable => 16,
        }
    }
}

/// Failures of a compression run that are about its inputs, not the model files or GPU.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("--ratio must be in (0, 1), got {0}")]
    BadRatio(f64),
    #[error("{0}")]
    BadArgument(String),
    #[error("calibration text has {tokens} tokens: fewer than {samples} windows of {seq_len} (lower --samples or --seq-len, or give more text)")]
    CalibrationTooShort { tokens: usize, samples: usize, seq_len: usize },
    #[error("{path}: {tokens} tokens, fewer than one window of {seq_len} (lower --seq-len or give more text)")]
    TextTooShort { path: String, tokens: usize, seq_len: usize },
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
            CompressError::CalibrationTooShort { .. } | CompressError::TextTooShort { .. } => ErrorClass::CalibrationTooShort,
            CompressError::ResumeMismatch { .. } => ErrorClass::ResumeMismatch,
            CompressError::Interrupted(_) => ErrorClass::Other,
        }
    }
}
