//! Memory-mapped safetensors weights (single file or sharded with an index), read as f32
//! whatever the stored dtype (f32, f16, bf16), one tensor at a time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{path}: cannot open: {source}")]
    Open { path: String, source: std::io::Error },
    #[error(transparent)]
    Input(#[from] super::input::InputError),
    #[error("{path}: not a valid safetensors file (truncated or corrupt): {source}")]
    Corrupt { path: String, source: safetensors::SafeTensorError },
    #[error("{path}: truncated: tensor {name} needs {need} bytes, the file has {have}")]
    Truncated { path: String, name: String, need: usize, have: usize },
    #[error("{path}: invalid shard index: {what}")]
    Index { path: String, what: String },
    #[error("{dir}: no model.safetensors or model.safetensors.index.json")]
    Missing { dir: String },
    #[error("tensor {name} is missing from the model files")]
    MissingTensor { name: String },
    #[error("{path}: tensor {name} has dtype {dtype:?}; supported: F32, F16, BF16")]
    Dtype { path: String, name: String, dtype: Dtype },
    #[error("tensor {name} has shape {got:?}, config.json implies {want:?}")]
    Shape { name: String, got: Vec<usize>, want: Vec<usize> },
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the mapped file.
    start: usize,
    end: usize,
}

/// Every tensor of a model folder, memory-mapped.
pub struct WeightStore {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    entries: HashMap<String, Entry>,
}

impl WeightStore {
    pub fn open(dir: &Path) -> Result<Self, WeightError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index.exists() {
            let ip = index.display().to_string();
            let text = super::input::read_text(&index, super::input::InputKind::WeightIndex)?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| WeightError::Index { path: ip.clone(), what: e.to_string() })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| WeightError::Index { path: ip.clone(), what: "no weight_map object".into() })?;
            let mut names: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
            names.sort();
            names.dedup();
            if names.iter().any(|n| n.contains('/') || n.contains("..")) {
                return Err(WeightError::Index { path: ip, what: "shard names must be plain file names".into() });
            }
            names
        } else if single.exists() {
            vec!["model.safetensors".into()]
        } else {
            return Err(WeightError::Missing { dir: dir.display().to_string() });
        };
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (fi, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            let ps = path.display().to_string();
            // a FIFO or device named like a shard would block the open or map nothing useful
            let (f, _) = super::input::open_regular(&path, super::input::InputKind::Weights)?;
            // SAFETY: the file is opened read-only; a concurrent writer would be a user error
            // that at worst yields wrong values, never memory unsafety in safe code paths here.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|source| WeightError::Open { path: ps.clone(), source })?;
            let (header, meta) = SafeTensors::read_metadata(&map).map_err(|source| WeightError::Corrupt { path: ps.clone(), source })?;
            let base = 8 + header;
            for (tname, info) in meta.tensors() {
                // a data range past the end of the file means it was cut short
                if base + info.data_offsets.1 > map.len() {
                    return Err(WeightError::Truncated { path: ps.clone(), name: tname, need: base + info.data_offsets.1, have: map.len() });
                }
                entries.insert(
                    tname,
                    Entry { file: fi, dtype: info.dtype, shape: info.shape.clone(), start: base + info.data_offsets.0, end: base + info.data_offsets.1 },
                );
            }
            files.push((path, map));
        }
        Ok(WeightStore { files, entries })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Result<&[usize], WeightError> {
        self.entry(name).map(|e| e.shape.as_slice())
    }

    fn entry(&self, name: &str) -> Result<&Entry, WeightError> {
        self.entries.get(name).ok_or_else(|| WeightError::MissingTensor { name: name.into() })
    }

    /// The tensor as f32, after checking its shape.
    pub fn f32(&self, name: &str, want: &[usize]) -> Result<Vec<f32>, WeightError> {
        let e = self.entry(name)?;
        if e.shape != want {
            return Err(WeightError::Shape { name: name.into(), got: e.shape.clone(), want: want.to_vec() });
        }
        self.rows_f32(name, 0, want.first().copied().unwrap_or(1))
    }

    /// Rows [r0, r1) of a tensor (leading axis) as f32.
    pub fn rows_f32(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<f32>, WeightError> {
        let e = self.entry(name)?;
        let row: usize = e.shape.iter().skip(1).product();
        let elem = match e.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            dtype => return Err(WeightError::Dtype { path: self.files[e.file].0.display().to_string(), name: name.into(), dtype }),
        };
        let bytes = &self.files[e.file].1[e.start..e.end][r0 * row * elem..r1 * row * elem];
        Ok(match e.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        })
    }

    /// Fails unless the tensor is stored as F32, F16 or BF16.
    pub fn check_dtype(&self, name: &str) -> Result<(), WeightError> {
        let e = self.entry(name)?;
        match e.dtype {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => Ok(()),
            dtype => Err(WeightError::Dtype { path: self.files[e.file].0.display().to_string(), name: name.into(), dtype }),
        }
    }

    pub fn dtype(&self, name: &str) -> Result<Dtype, WeightError> {
        self.entry(name).map(|e| e.dtype)
    }

    /// The stored bytes of a tensor, with dtype and shape (for exact copies).
    pub fn raw(&self, name: &str) -> Result<(Dtype, &[usize], &[u8]), WeightError> {
        let e = self.entry(name)?;
        Ok((e.dtype, &e.shape, &self.files[e.file].1[e.start..e.end]))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }
}
