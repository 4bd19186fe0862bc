//! Writing a compressed model folder atomically: everything goes to a hidden `.NAME.partial`
//! folder beside the target (one safetensors shard per decoder layer plus one for the
//! embeddings and head, an index, config.json with the `lorap` section, the tokenizer, the
//! report), renamed to the target only when complete, under an exclusive claim on the
//! target (`format::claim`: no overlap with the input, one run per output).
//! After each finished layer a checkpoint (`resume.json` plus a shard index) lets an
//! interrupted run continue; a run that fails before its first checkpoint removes the
//! partial folder, so bad input never leaves anything behind.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use safetensors::{tensor::TensorView, Dtype};

use crate::error::CompressError;
use crate::format::{OutputClaim, OutputError};

/// A tensor ready to be written.
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OutTensor {
    /// The tensor `name` of `store`, copied byte for byte (dtype and shape kept).
    pub fn copied(store: &crate::format::WeightStore, name: &str) -> Result<Self> {
        let (dtype, shape, bytes) = store.raw(name)?;
        Ok(OutTensor { name: name.into(), dtype, shape: shape.to_vec(), bytes: bytes.to_vec() })
    }
}

/// Builds the output folder under a temporary name.
pub struct OutputFolder {
    /// The checked, locked right to write the target; its partial folder is where files go.
    claim: OutputClaim,
    n_shards: usize,
    weight_map: BTreeMap<String, String>,
    total_bytes: u64,
    /// Bytes this run may still write (simulates a small disk in tests); None = no limit.
    byte_limit: Option<u64>,
    /// A checkpoint exists: keep the partial folder if the run fails from here on.
    keep_on_failure: bool,
    finished: bool,
}

/// What `resume.json` holds besides the caller's state.
#[derive(serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    n_shards: usize,
    weight_map: BTreeMap<String, String>,
    total_bytes: u64,
    state: serde_json::Value,
}

const CHECKPOINT: &str = "resume.json";

impl OutputFolder {
    /// A fresh partial folder. Refuses an existing target unless `force`, a target that
    /// overlaps the input, and a target another run is writing.
    pub fn create(target: &Path, input: &Path, force: bool, n_shards: usize) -> Result<Self> {
        let claim = OutputClaim::take(target, &[input], force)?;
        claim.fresh_partial()?;
        Ok(Self::new(claim, n_shards))
    }

    /// Reopens the partial folder of an interrupted run with its saved state; starts a
    /// fresh one (state None) when there is no checkpoint to continue from.
    pub fn resume(target: &Path, input: &Path, force: bool, n_shards: usize) -> Result<(Self, Option<serde_json::Value>)> {
        let claim = OutputClaim::take(target, &[input], force)?;
        let ck_path = claim.partial().join(CHECKPOINT);
        if !ck_path.exists() {
            claim.fresh_partial()?;
            return Ok((Self::new(claim, n_shards), None));
        }
        let text = std::fs::read_to_string(&ck_path).with_context(|| format!("{}: cannot read", ck_path.display()))?;
        let ck: Checkpoint = serde_json::from_str(&text)
            .map_err(|e| CompressError::ResumeMismatch { path: ck_path.display().to_string(), what: format!("unreadable checkpoint: {e}") })?;
        if ck.n_shards != n_shards {
            return Err(CompressError::ResumeMismatch { path: ck_path.display().to_string(), what: format!("{} shards there, {n_shards} now", ck.n_shards) }.into());
        }
        let mut f = Self::new(claim, n_shards);
        f.weight_map = ck.weight_map;
        f.total_bytes = ck.total_bytes;
        f.keep_on_failure = true;
        Ok((f, Some(ck.state)))
    }

    fn new(claim: OutputClaim, n_shards: usize) -> Self {
        OutputFolder { claim, n_shards, weight_map: BTreeMap::new(), total_bytes: 0, byte_limit: None, keep_on_failure: false, finished: false }
    }

    pub fn partial_dir(&self) -> &Path {
        self.claim.partial()
    }

    /// Makes writes fail with "storage full" once `bytes` more have been written (tests
    /// exercise the disk-full path with it).
    pub fn set_byte_limit(&mut self, bytes: u64) {
        self.byte_limit = Some(bytes);
    }

    fn shard_name(&self, index: usize) -> String {
        format!("model-{:05}-of-{:05}.safetensors", index + 1, self.n_shards)
    }

    /// Writes `bytes` to `file` in the partial folder, all or nothing.
    pub fn write_file(&mut self, file: &str, bytes: &[u8]) -> Result<()> {
        let path = self.claim.partial().join(file);
        // typed as an output failure, so a missing folder here is not read as a missing input
        let failed = |source: std::io::Error| {
            let what = if source.kind() == std::io::ErrorKind::StorageFull { "cannot write (disk full)" } else { "cannot write" };
            OutputError::Io { path: path.display().to_string(), what, source }
        };
        if let Some(left) = self.byte_limit {
            if bytes.len() as u64 > left {
                return Err(failed(std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device")).into());
            }
            self.byte_limit = Some(left - bytes.len() as u64);
        }
        let tmp = self.claim.partial().join(format!(".{file}.tmp"));
        let written = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(failed(e).into());
        }
        Ok(())
    }

    /// Writes shard `index` (0-based) holding `tensors`.
    pub fn write_shard(&mut self, index: usize, tensors: &[OutTensor]) -> Result<()> {
        let name = self.shard_name(index);
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|t| Ok((t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes)?)))
            .collect::<Result<_, safetensors::SafeTensorError>>()?;
        let bytes = safetensors::serialize(views, Some(HashMap::from([("format".to_string(), "pt".to_string())])))?;
        self.write_file(&name, &bytes)?;
        for t in tensors {
            self.weight_map.insert(t.name.clone(), name.clone());
            self.total_bytes += t.bytes.len() as u64;
        }
        Ok(())
    }

    /// Writes a JSON file into the folder.
    pub fn write_json(&mut self, file: &str, value: &serde_json::Value) -> Result<()> {
        self.write_file(file, serde_json::to_string_pretty(value)?.as_bytes())
    }

    /// Records that everything written so far is final, with the caller's `state`: a failed
    /// or interrupted run keeps the folder from now on and `resume` returns the state. The
    /// shard index is written too, so the finished shards load as a model store.
    pub fn checkpoint(&mut self, state: serde_json::Value) -> Result<()> {
        self.write_index()?;
        let ck = Checkpoint { n_shards: self.n_shards, weight_map: self.weight_map.clone(), total_bytes: self.total_bytes, state };
        self.write_file(CHECKPOINT, serde_json::to_string(&ck)?.as_bytes())?;
        self.keep_on_failure = true;
        Ok(())
    }

    fn write_index(&mut self) -> Result<()> {
        let index = serde_json::json!({ "metadata": { "total_size": self.total_bytes }, "weight_map": self.weight_map });
        self.write_json("model.safetensors.index.json", &index)
    }

    /// Copies tokenizer and generation files from the input folder.
    pub fn copy_side_files(&mut self, input: &Path) -> Result<()> {
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "tokenizer.model"] {
            let src = input.join(f);
            if src.exists() {
                let bytes = std::fs::read(&src).with_context(|| format!("{}: cannot read", src.display()))?;
                self.write_file(f, &bytes)?;
            }
        }
        Ok(())
    }

    /// Writes the shard index, drops the checkpoint, then moves the folder into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.write_index()?;
        let ck = self.claim.partial().join(CHECKPOINT);
        if ck.exists() {
            std::fs::remove_file(&ck).map_err(|source| OutputError::Io { path: ck.display().to_string(), what: "cannot remove", source })?;
        }
        let target = self.claim.move_into_place()?;
        self.finished = true;
        Ok(target)
    }
}

impl Drop for OutputFolder {
    /// A run that fails before its first checkpoint leaves nothing behind.
    fn drop(&mut self) {
        if !self.finished && !self.keep_on_failure {
            let _ = std::fs::remove_dir_all(self.claim.partial());
        }
    }
}
