//! Maps every module's error types to an `ErrorClass` (the exit code): the one place that
//! knows them all, at the top of the dependency order. Also the one error line the binary
//! prints for an error chain.

use crate::error::{CompressError, ErrorClass};
use crate::format::input::InputError;
use crate::format::weights::WeightError;
use crate::format::OutputError;
use crate::gpu::GpuError;
use crate::model::config::ConfigError;
use crate::model::tokens::TextError;
use crate::model::ModelError;

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

/// The one line printed for `err`: its chain, outermost first, joined by ": ", each cause
/// said once. Errors of this crate keep their source out of their own message; a cause
/// whose text an outer message already carries (a dependency's error that embeds its
/// source, such as wgpu's device request) is skipped rather than printed twice.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string().replace(['\n', '\r'], " ");
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    line
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
                OutputError::Io { source, .. } => match io_class(source) {
                    ErrorClass::DiskFull => ErrorClass::DiskFull,
                    // whatever else failed on the output side is no missing input
                    _ => ErrorClass::OutputUnwritable,
                },
                OutputError::Exists(_) | OutputError::OverlapsInput { .. } | OutputError::NotAFolder(_) => ErrorClass::OutputExists,
            };
        }
        if let Some(e) = cause.downcast_ref::<GpuError>() {
            return gpu_class(e);
        }
        if let Some(e) = cause.downcast_ref::<InputError>() {
            return e.class();
        }
        if let Some(e) = cause.downcast_ref::<TextError>() {
            return e.class();
        }
        if let Some(e) = cause.downcast_ref::<crate::model::forward::ForwardError>() {
            return forward_class(e);
        }
        if let Some(e) = cause.downcast_ref::<crate::model::decode::DecodeError>() {
            return match e {
                crate::model::decode::DecodeError::Forward(f) => forward_class(f),
                other => other.class().unwrap_or(ErrorClass::Other),
            };
        }
        if let Some(e) = cause.downcast_ref::<ModelError>() {
            return match e {
                ModelError::NoDir(_) => ErrorClass::MissingInput,
                ModelError::Config(c) => config_class(c),
                ModelError::Weights(w) => weight_class(w),
                ModelError::NoTokenizer(_) => ErrorClass::MissingInput,
                // a tokenizer.json that is there but unusable is a bad model file
                ModelError::Tokenizer { .. } | ModelError::Vocabulary { .. } => ErrorClass::BadConfig,
                ModelError::Input(e) => e.class(),
            };
        }
        if let Some(e) = cause.downcast_ref::<WeightError>() {
            return weight_class(e);
        }
        if let Some(e) = cause.downcast_ref::<ConfigError>() {
            return config_class(e);
        }
        if let Some(e) = cause.downcast_ref::<crate::eval::zeroshot::TaskError>() {
            return match e {
                crate::eval::zeroshot::TaskError::Input(e) => e.class(),
                // a task file that is not one, like a plan file that is not one
                _ => ErrorClass::BadArgument,
            };
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

fn forward_class(e: &crate::model::forward::ForwardError) -> ErrorClass {
    match e {
        crate::model::forward::ForwardError::Gpu(g) => gpu_class(g),
        crate::model::forward::ForwardError::Weights(w) => weight_class(w),
        crate::model::forward::ForwardError::Config(c) => config_class(c),
        _ => ErrorClass::BadArgument,
    }
}

fn weight_class(e: &WeightError) -> ErrorClass {
    match e {
        WeightError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ErrorClass::MissingInput,
        WeightError::Open { .. } => ErrorClass::Other,
        WeightError::Input(e) => e.class(),
        WeightError::Corrupt { .. } | WeightError::Truncated { .. } | WeightError::Index { .. } | WeightError::NonFinite { .. } | WeightError::Absurd { .. } => ErrorClass::CorruptWeights,
        WeightError::Missing { .. } | WeightError::MissingTensor { .. } => ErrorClass::MissingInput,
        WeightError::Dtype { .. } => ErrorClass::Unsupported,
        WeightError::Shape { .. } => ErrorClass::ShapeMismatch,
    }
}

fn config_class(e: &ConfigError) -> ErrorClass {
    match e {
        ConfigError::Input(e) => e.class(),
        ConfigError::Unsupported { .. } | ConfigError::Feature { .. } => ErrorClass::Unsupported,
        _ => ErrorClass::BadConfig,
    }
}
