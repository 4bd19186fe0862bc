//! Writing a compressed model folder atomically: everything goes to a hidden `.NAME.partial`
//! folder beside the target (one safetensors shard per decoder layer plus one for the
//! embeddings and head, an index, config.json with the `lorap` section, the tokenizer, the
//! report), renamed to the target only when complete. The input folder is never touched.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::{tensor::TensorView, Dtype};

/// Stored element type of written tensors.
pub fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        Dtype::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// A tensor ready to be written.
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Builds the output folder under a temporary name.
pub struct OutputFolder {
    target: PathBuf,
    partial: PathBuf,
    n_shards: usize,
    weight_map: BTreeMap<String, String>,
    total_bytes: u64,
}

impl OutputFolder {
    /// Refuses an existing target unless `force`; refuses the input folder itself.
    pub fn create(target: &Path, input: &Path, force: bool, n_shards: usize) -> Result<Self> {
        let canon_in = input.canonicalize().with_context(|| format!("{}: cannot resolve", input.display()))?;
        if target.exists() {
            if target.canonicalize().ok().as_deref() == Some(canon_in.as_path()) {
                bail!("{}: the output folder is the input model folder; choose another --out", target.display());
            }
            if !force {
                bail!("{}: output folder exists (use --force to replace it)", target.display());
            }
        }
        let name = target.file_name().with_context(|| format!("{}: not a folder name", target.display()))?.to_string_lossy().to_string();
        let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
        let partial = parent.join(format!(".{name}.partial"));
        if partial.exists() {
            std::fs::remove_dir_all(&partial).with_context(|| format!("{}: cannot clear an earlier partial output", partial.display()))?;
        }
        std::fs::create_dir_all(&partial).with_context(|| format!("{}: cannot create", partial.display()))?;
        Ok(OutputFolder { target: target.to_path_buf(), partial, n_shards, weight_map: BTreeMap::new(), total_bytes: 0 })
    }

    pub fn partial_dir(&self) -> &Path {
        &self.partial
    }

    fn shard_name(&self, index: usize) -> String {
        format!("model-{:05}-of-{:05}.safetensors", index + 1, self.n_shards)
    }

    /// Writes shard `index` (0-based) holding `tensors`.
    pub fn write_shard(&mut self, index: usize, tensors: &[OutTensor]) -> Result<()> {
        let name = self.shard_name(index);
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|t| Ok((t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes)?)))
            .collect::<Result<_, safetensors::SafeTensorError>>()?;
        let path = self.partial.join(&name);
        safetensors::serialize_to_file(views, Some(HashMap::from([("format".to_string(), "pt".to_string())])), &path)
            .with_context(|| format!("{}: cannot write (disk full?)", path.display()))?;
        for t in tensors {
            self.weight_map.insert(t.name.clone(), name.clone());
            self.total_bytes += t.bytes.len() as u64;
        }
        Ok(())
    }

    /// Writes a JSON file into the folder.
    pub fn write_json(&self, file: &str, value: &serde_json::Value) -> Result<()> {
        let path = self.partial.join(file);
        std::fs::write(&path, serde_json::to_string_pretty(value)?).with_context(|| format!("{}: cannot write", path.display()))
    }

    /// Copies tokenizer and generation files from the input folder.
    pub fn copy_side_files(&self, input: &Path) -> Result<()> {
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "tokenizer.model"] {
            let src = input.join(f);
            if src.exists() {
                std::fs::copy(&src, self.partial.join(f)).with_context(|| format!("{}: cannot copy", src.display()))?;
            }
        }
        Ok(())
    }

    /// Writes the shard index, then moves the folder into place.
    pub fn finish(self) -> Result<PathBuf> {
        let index = serde_json::json!({ "metadata": { "total_size": self.total_bytes }, "weight_map": self.weight_map });
        self.write_json("model.safetensors.index.json", &index)?;
        if self.target.exists() {
            std::fs::remove_dir_all(&self.target).with_context(|| format!("{}: cannot replace", self.target.display()))?;
        }
        std::fs::rename(&self.partial, &self.target).with_context(|| format!("{}: cannot move into place", self.target.display()))?;
        Ok(self.target)
    }
}
