//! Error classes: every failure the tool reports falls in one class, which tests assert and
//! the binary turns into a distinct exit code, whatever module raised it.

use crate::compress::CompressError;
use crate::format::OutputError;
use crate::gpu::GpuError;
use crate::model::config::ConfigError;
use crate::model::weights::WeightError;
use crate::model::ModelError;

/// What kind of failure an error is, for tests and exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ErrorClass {
    /// A command-line value out of range (ratio outside (0, 1), zero windows...).
    BadArgument,
    /// A file or folder that should exist does not (model folder, weights, text).
    MissingInput,
    /// A safetensors file or index that cannot be parsed, or is truncated.
    CorruptWeights,
    /// config.json unreadable or inconsistent.
    BadConfig,
    /// A model type or tensor dtype the tool does not handle.
    Unsupported,
    /// Tensor shapes that contradict config.json.
    ShapeMismatch,
    /// Calibration text that is empty or too short for the windows asked for.
    CalibrationTooShort,
    /// The output folder exists (without --force), is not a folder, or is, contains or lies
    /// inside an input.
    OutputExists,
    /// Another run holds the lock on the same output folder.
    OutputBusy,
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
        }
    }
}

fn gpu_class(e: &GpuError) -> ErrorClass {
    match e {
        GpuError::OutOfMemory(_) | GpuError::OverBudget { .. } | GpuError::BufferTooLarge { .. } => ErrorClass::GpuOutOfMemory,
        GpuError::DeviceLost(_) => ErrorClass::GpuLost,
        _ => ErrorClass::Gpu,
    }
}

fn io_class(e: &std::io::Error) -> ErrorClass {
    match e.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => ErrorClass::DiskFull,
        std::io::ErrorKind::NotFound => ErrorClass::MissingInput,
        _ => ErrorClass::Other,
    }
}

/// The class of the first error in the chain that has one.
pub fn classify(err: &anyhow::Error) -> ErrorClass {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<CompressError>() {
            return e.class();
        }
        if let Some(e) = cause.downcast_ref::<OutputError>() {
            return match e {
                OutputError::Busy { .. } => ErrorClass::OutputBusy,
                OutputError::Io { source, .. } => io_class(source),
                OutputError::Exists(_) | OutputError::OverlapsInput { .. } | OutputError::NotAFolder(_) => ErrorClass::OutputExists,
            };
        }
        if let Some(e) = cause.downcast_ref::<GpuError>() {
            return gpu_class(e);
        }
        if let Some(e) = cause.downcast_ref::<crate::model::forward::ForwardError>() {
            match e {
                crate::model::forward::ForwardError::Gpu(g) => return gpu_class(g),
                crate::model::forward::ForwardError::Weights(w) => return weight_class(w),
                _ => return ErrorClass::BadArgument,
            }
        }
        if let Some(e) = cause.downcast_ref::<ModelError>() {
            return match e {
                ModelError::NoDir(_) => ErrorClass::MissingInput,
                ModelError::Config(c) => config_class(c),
                ModelError::Weights(w) => weight_class(w),
                ModelError::Tokenizer { .. } => ErrorClass::MissingInput,
            };
        }
        if let Some(e) = cause.downcast_ref::<WeightError>() {
            return weight_class(e);
        }
        if let Some(e) = cause.downcast_ref::<ConfigError>() {
            return config_class(e);
        }
        if let Some(e) = cause.downcast_ref::<std::io::Error>() {
            let c = io_class(e);
            if c != ErrorClass::Other {
                return c;
            }
        }
    }
    ErrorClass::Other
}

fn weight_class(e: &WeightError) -> ErrorClass {
    match e {
        WeightError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ErrorClass::MissingInput,
        WeightError::Open { .. } => ErrorClass::Other,
        WeightError::Corrupt { .. } | WeightError::Truncated { .. } | WeightError::Index { .. } => ErrorClass::CorruptWeights,
        WeightError::Missing { .. } | WeightError::MissingTensor { .. } => ErrorClass::MissingInput,
        WeightError::Dtype { .. } => ErrorClass::Unsupported,
        WeightError::Shape { .. } => ErrorClass::ShapeMismatch,
    }
}

fn config_class(e: &ConfigError) -> ErrorClass {
    match e {
        ConfigError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ErrorClass::MissingInput,
        ConfigError::Unsupported { .. } => ErrorClass::Unsupported,
        _ => ErrorClass::BadConfig,
    }
}
