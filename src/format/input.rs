//! Bounded reads of the files a user hands the tool: each kind of file has a size cap, and
//! anything that is not a regular file (a folder, a FIFO, `/dev/zero`, a socket) is refused
//! before it is opened, so no input can hang a run (opening a FIFO blocks until a writer
//! comes) or grow its memory without bound.

use std::io::Read;
use std::path::Path;

use crate::error::ErrorClass;

const MIB: u64 = 1 << 20;

/// What a file is to the tool: it picks the size cap and the class of a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// config.json. Real ones are a few KiB, a compressed one's `lorap` section a few more
    /// per layer; parsing holds several copies of the JSON tree (about 30 bytes per byte
    /// of a number array), so the cap also bounds that.
    Config,
    /// model.safetensors.index.json (about 100 bytes per tensor name).
    WeightIndex,
    /// A safetensors shard (memory-mapped, never read whole; no size cap).
    Weights,
    /// tokenizer.json (LLaMA-3's is 9 MiB, the largest common ones about 35 MiB).
    Tokenizer,
    /// A `--plan` file (a few hundred bytes per layer).
    Plan,
    /// compression_report.json of a compressed model.
    Report,
    /// A zero-shot task (JSONL).
    Task,
    /// A calibration or evaluation text: read in chunks, never whole (the cap bounds the
    /// time a tokenization can take, about 3 minutes a pass at 256 MiB, not its memory).
    Text,
}

impl InputKind {
    /// The largest file of this kind the tool reads.
    pub fn max_bytes(self) -> u64 {
        match self {
            InputKind::Config | InputKind::Plan => 4 * MIB,
            InputKind::WeightIndex | InputKind::Report => 16 * MIB,
            InputKind::Tokenizer => 64 * MIB,
            InputKind::Task => 256 * MIB,
            InputKind::Text => 256 * MIB,
            InputKind::Weights => u64::MAX,
        }
    }

    fn noun(self) -> &'static str {
        match self {
            InputKind::Config => "config file",
            InputKind::WeightIndex => "shard index",
            InputKind::Weights => "safetensors file",
            InputKind::Tokenizer => "tokenizer file",
            InputKind::Plan => "plan file",
            InputKind::Report => "compression report",
            InputKind::Task => "task file",
            InputKind::Text => "text file",
        }
    }

    /// The exit class of a refusal: a model's own files are bad model files, the files
    /// named on the command line are bad arguments.
    fn class(self) -> ErrorClass {
        match self {
            InputKind::Config | InputKind::Tokenizer => ErrorClass::BadConfig,
            InputKind::WeightIndex | InputKind::Weights => ErrorClass::CorruptWeights,
            InputKind::Plan | InputKind::Report | InputKind::Task | InputKind::Text => ErrorClass::BadArgument,
        }
    }
}

/// What a path names, when it is not a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAFile {
    Folder,
    Fifo,
    Device,
    Socket,
    Other,
}

impl std::fmt::Display for NotAFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NotAFile::Folder => "a folder",
            NotAFile::Fifo => "a FIFO (named pipe)",
            NotAFile::Device => "a device",
            NotAFile::Socket => "a socket",
            NotAFile::Other => "not a regular file",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// (the I/O error is the source, which the CLI's error line prints after this)
    #[error("{path}: cannot read the {}", kind.noun())]
    Io { path: String, kind: InputKind, source: std::io::Error },
    #[error("{path}: is {what}, not a regular file; give a {} (a FIFO or device could block or never end)", kind.noun())]
    NotAFile { path: String, kind: InputKind, what: NotAFile },
    #[error("{path}: {size} bytes, over the {} MiB limit for a {}", limit / MIB, kind.noun())]
    TooLarge { path: String, kind: InputKind, size: u64, limit: u64 },
    #[error("{path}: not UTF-8 text (invalid byte at offset {at})")]
    NotUtf8 { path: String, kind: InputKind, at: u64 },
}

impl InputError {
    pub fn class(&self) -> ErrorClass {
        match self {
            InputError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ErrorClass::MissingInput,
            InputError::Io { .. } => ErrorClass::Other,
            InputError::NotAFile { kind, .. } | InputError::TooLarge { kind, .. } | InputError::NotUtf8 { kind, .. } => kind.class(),
        }
    }
}

fn file_type(m: &std::fs::Metadata) -> Option<NotAFile> {
    let t = m.file_type();
    if t.is_file() {
        return None;
    }
    if t.is_dir() {
        return Some(NotAFile::Folder);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return Some(NotAFile::Fifo);
        }
        if t.is_char_device() || t.is_block_device() {
            return Some(NotAFile::Device);
        }
        if t.is_socket() {
            return Some(NotAFile::Socket);
        }
    }
    Some(NotAFile::Other)
}

/// Opens a regular file of at most `kind`'s cap (symlinks followed). The type is checked
/// before opening (opening a FIFO would block) and again on the open handle (the path may
/// have been swapped in between). Returns the file and its size.
pub fn open_regular(path: &Path, kind: InputKind) -> Result<(std::fs::File, u64), InputError> {
    let p = || path.display().to_string();
    let io = |source| InputError::Io { path: p(), kind, source };
    let meta = std::fs::metadata(path).map_err(io)?;
    if let Some(what) = file_type(&meta) {
        return Err(InputError::NotAFile { path: p(), kind, what });
    }
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if let Some(what) = file_type(&meta) {
        return Err(InputError::NotAFile { path: p(), kind, what });
    }
    let limit = kind.max_bytes();
    if meta.len() > limit {
        return Err(InputError::TooLarge { path: p(), kind, size: meta.len(), limit });
    }
    Ok((file, meta.len()))
}

/// The bytes of a regular file of at most `kind`'s cap. Reads at most cap + 1 bytes
/// whatever the file claims (a file growing while read, or /proc-style files that report
/// size 0, are held to the cap too).
pub fn read_bytes(path: &Path, kind: InputKind) -> Result<Vec<u8>, InputError> {
    let (file, size) = open_regular(path, kind)?;
    let limit = kind.max_bytes();
    let mut out = Vec::with_capacity(size as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut out).map_err(|source| InputError::Io { path: path.display().to_string(), kind, source })?;
    if out.len() as u64 > limit {
        return Err(InputError::TooLarge { path: path.display().to_string(), kind, size: out.len() as u64, limit });
    }
    Ok(out)
}

/// A regular file of at most `kind`'s cap, as UTF-8 text.
pub fn read_text(path: &Path, kind: InputKind) -> Result<String, InputError> {
    String::from_utf8(read_bytes(path, kind)?).map_err(|e| InputError::NotUtf8 { path: path.display().to_string(), kind, at: e.utf8_error().valid_up_to() as u64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_and_everything_else_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.json");
        std::fs::write(&f, "{}").unwrap();
        assert_eq!(read_text(&f, InputKind::Config).unwrap(), "{}");
        let e = read_text(dir.path(), InputKind::Text).unwrap_err();
        assert!(matches!(e, InputError::NotAFile { what: NotAFile::Folder, .. }), "{e}");
        assert_eq!(e.class(), ErrorClass::BadArgument);
        let e = read_text(&dir.path().join("missing"), InputKind::Config).unwrap_err();
        assert_eq!(e.class(), ErrorClass::MissingInput);
        #[cfg(unix)]
        {
            let e = read_bytes(Path::new("/dev/zero"), InputKind::Text).unwrap_err();
            assert!(matches!(e, InputError::NotAFile { what: NotAFile::Device, .. }), "{e}");
            assert!(e.to_string().starts_with("/dev/zero: is a device, not a regular file"), "{e}");
        }
        // over the cap: refused from its size, before reading
        let big = dir.path().join("big.json");
        let file = std::fs::File::create(&big).unwrap();
        file.set_len(InputKind::Config.max_bytes() + 1).unwrap();
        let e = read_text(&big, InputKind::Config).unwrap_err();
        assert!(matches!(e, InputError::TooLarge { .. }) && e.class() == ErrorClass::BadConfig, "{e}");
        std::fs::write(&f, b"{\"a\": \"\xff\"}").unwrap();
        let e = read_text(&f, InputKind::Plan).unwrap_err();
        assert!(matches!(e, InputError::NotUtf8 { at: 7, .. }), "{e}");
    }
}
