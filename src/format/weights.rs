//! Memory-mapped safetensors weights (single file or sharded with an index), read as f32
//! whatever the stored dtype (f32, f16, bf16), one tensor at a time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use super::digest::{Digest, StableHasher};

/// The default for the largest weight magnitude accepted (`--max-abs-weight`). Trained
/// LLaMA-family checkpoints stay orders of magnitude below it (f16 ones cannot even hold
/// more than 65504), while it keeps the products and sums of squares that the statistics
/// and the SVD form (|x|^2 times a width of 10^5: 10^17) far inside f32's 3.4 x 10^38; a
/// weight like the 10^25 of a corrupted bf16 tensor overflows them to infinity.
pub const DEFAULT_MAX_ABS: f64 = 1e6;

/// Failures of reading weights. Messages leave an underlying error out (it is the
/// `source`, which the CLI prints after them), so no cause is said twice.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{path}: cannot open")]
    Open { path: String, source: std::io::Error },
    #[error(transparent)]
    Input(#[from] super::input::InputError),
    #[error("{path}: not a valid safetensors file (truncated or corrupt)")]
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
    #[error("{path}: tensor {name} holds {value} at element {index}; the weights are corrupt (no valid model has NaN or infinite weights)")]
    NonFinite { path: String, name: String, index: usize, value: NonFinite },
    #[error("{path}: tensor {name} holds {value:e} at element {index}, beyond the largest plausible magnitude {limit:e}; the weights are likely corrupt (--max-abs-weight raises the limit)")]
    Absurd { path: String, name: String, index: usize, value: f64, limit: f64 },
}

/// Which non-finite value a tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonFinite {
    NaN,
    PlusInfinity,
    MinusInfinity,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NonFinite::NaN => "NaN",
            NonFinite::PlusInfinity => "+infinity",
            NonFinite::MinusInfinity => "-infinity",
        })
    }
}

/// The largest magnitude accepted, as the largest bit pattern (sign cleared) of each stored
/// dtype whose value is not above it. Among non-negative floats the order of bit patterns
/// is the order of values, and NaN and infinity lie above every finite value, so one
/// integer compare per element finds NaN, infinities and absurd values alike.
#[derive(Debug, Clone, Copy)]
struct LimitBits {
    max_abs: f64,
    f32: u32,
    f16: u16,
    bf16: u16,
}

impl LimitBits {
    fn new(max_abs: f64) -> Self {
        // NaN or beyond f32's range: only non-finite values are refused
        let t = if max_abs.is_nan() || max_abs > f32::MAX as f64 { f32::MAX as f64 } else { max_abs.max(0.0) };
        let mut x = t as f32;
        if x as f64 > t {
            x = f32::from_bits(x.to_bits() - 1);
        }
        let f32_bits = x.to_bits();
        // truncating a positive f32 to its upper half rounds it toward zero in bf16
        let bf16 = (f32_bits >> 16) as u16;
        let f16 = if t >= half::f16::MAX.to_f64() {
            half::f16::MAX.to_bits()
        } else {
            let h = half::f16::from_f64(t);
            if h.to_f64() > t { h.to_bits() - 1 } else { h.to_bits() }
        };
        LimitBits { max_abs: t, f32: f32_bits, f16, bf16 }
    }
}

/// Bytes hashed and checked between progress updates and early exits.
const SCAN_BLOCK: usize = 1 << 20;

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

    /// Reads the tensors `names` once, in parallel: refuses any that holds NaN, an infinity
    /// or a magnitude above `max_abs` (naming the tensor, its file and the first bad
    /// element), and returns a digest of their names, dtypes, shapes and bytes in the order
    /// given (stable across platforms and builds; the shard layout does not enter it).
    /// `progress` gets (bytes done, bytes in all).
    pub fn scan(&self, names: &[String], max_abs: f64, progress: &mut dyn FnMut(u64, u64)) -> Result<Digest, WeightError> {
        use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
        let entries: Vec<&Entry> = names.iter().map(|n| self.entry(n)).collect::<Result<_, _>>()?;
        let total: u64 = entries.iter().map(|e| (e.end - e.start) as u64).sum();
        let limit = LimitBits::new(max_abs);
        let next = AtomicUsize::new(0);
        let done = AtomicU64::new(0);
        let failed = AtomicBool::new(false);
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8).min(entries.len()).max(1);
        let mut results: Vec<Option<Result<Digest, WeightError>>> = (0..entries.len()).map(|_| None).collect();
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel::<Vec<(usize, Result<Digest, WeightError>)>>();
            for _ in 0..workers {
                let tx = tx.clone();
                let (entries, next, done, failed) = (&entries, &next, &done, &failed);
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    // tensors are taken in order and a failure stops only new takes, so every
                    // tensor before the first bad one is finished: the error reported is
                    // always that of the first bad tensor in `names`
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= entries.len() {
                            break;
                        }
                        let r = self.scan_tensor(&names[i], entries[i], limit, done);
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        mine.push((i, r));
                    }
                    let _ = tx.send(mine);
                });
            }
            drop(tx);
            let mut finished = 0;
            while finished < workers {
                match rx.recv_timeout(std::time::Duration::from_millis(200)) {
                    Ok(batch) => {
                        finished += 1;
                        for (i, r) in batch {
                            results[i] = Some(r);
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
                progress(done.load(Ordering::Relaxed), total);
            }
        });
        let mut h = StableHasher::new();
        for (i, r) in results.into_iter().enumerate() {
            let e = entries[i];
            let d = r.unwrap_or_else(|| Err(WeightError::MissingTensor { name: names[i].clone() }))?;
            h.field(names[i].as_bytes());
            h.field(dtype_name(e.dtype).as_bytes());
            h.u64(e.shape.len() as u64);
            e.shape.iter().for_each(|&s| h.u64(s as u64));
            h.u64(d.0[0]);
            h.u64(d.0[1]);
        }
        progress(total, total);
        Ok(h.finish())
    }

    /// Hashes and checks one tensor (see `scan`).
    fn scan_tensor(&self, name: &str, e: &Entry, limit: LimitBits, done: &std::sync::atomic::AtomicU64) -> Result<Digest, WeightError> {
        let data = &self.files[e.file].1[e.start..e.end];
        let path = || self.files[e.file].0.display().to_string();
        let elem = match e.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            dtype => return Err(WeightError::Dtype { path: path(), name: name.into(), dtype }),
        };
        let mut h = StableHasher::new();
        for (b, block) in data.chunks(SCAN_BLOCK).enumerate() {
            h.update(block);
            // the largest magnitude's bits (a max reduction the compiler vectorizes); only a
            // block over the limit is searched for its first bad element
            let over = match e.dtype {
                Dtype::F32 => block.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7fff_ffff).fold(0, u32::max) > limit.f32,
                Dtype::F16 => block.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7fff).fold(0, u16::max) > limit.f16,
                _ => block.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7fff).fold(0, u16::max) > limit.bf16,
            };
            if over {
                let value = |c: &[u8]| -> f64 {
                    match e.dtype {
                        Dtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64,
                        Dtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
                        _ => half::bf16::from_le_bytes([c[0], c[1]]).to_f64(),
                    }
                };
                // NaN fails every comparison, so it is asked for by name
                let Some((k, v)) = block.chunks_exact(elem).map(value).enumerate().find(|(_, v)| v.is_nan() || v.abs() > limit.max_abs) else {
                    unreachable!("a block whose largest bit pattern is over the limit holds a value over it")
                };
                let index = b * SCAN_BLOCK / elem + k;
                let name = name.to_string();
                return Err(if v.is_finite() {
                    WeightError::Absurd { path: path(), name, index, value: v, limit: limit.max_abs }
                } else {
                    let value = if v.is_nan() { NonFinite::NaN } else if v > 0.0 { NonFinite::PlusInfinity } else { NonFinite::MinusInfinity };
                    WeightError::NonFinite { path: path(), name, index, value }
                });
            }
            done.fetch_add(block.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(h.finish())
    }
}

/// A dtype's name as it enters a digest (spelled here, not by a dependency's `Debug`).
fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "F32",
        Dtype::F16 => "F16",
        Dtype::BF16 => "BF16",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model.safetensors in `dir` holding `tensors` (name, dtype, values).
    fn write(dir: &Path, file: &str, tensors: &[(&str, Dtype, Vec<f32>)]) {
        let owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors.iter().map(|(n, d, v)| (n.to_string(), *d, vec![v.len()], crate::format::dtype::encode(v, *d))).collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = owned.iter().map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
    }

    fn scan_one(dtype: Dtype, value: f32, max_abs: f64) -> Result<Digest, WeightError> {
        let dir = tempfile::tempdir().unwrap();
        let mut v = vec![0.5f32; 3000];
        v[2500] = value;
        write(dir.path(), "model.safetensors", &[("t", dtype, v)]);
        WeightStore::open(dir.path()).unwrap().scan(&["t".to_string()], max_abs, &mut |_, _| {})
    }

    #[test]
    fn limits_hold_at_the_boundary_of_each_dtype() {
        let refused = |d: Dtype, x: f32, limit: f64| scan_one(d, x, limit).is_err();
        // f32: the limit itself passes, the next float above it does not
        let next = f32::from_bits(1e6f32.to_bits() + 1);
        assert!(!refused(Dtype::F32, 1e6, 1e6) && !refused(Dtype::F32, -1e6, 1e6));
        assert!(refused(Dtype::F32, next, 1e6) && refused(Dtype::F32, -next, 1e6));
        // bf16 steps by 4096 near 1e6: 999424 is the largest value not above it
        assert!(!refused(Dtype::BF16, 999_424.0, 1e6) && refused(Dtype::BF16, 1_003_520.0, 1e6));
        assert!(refused(Dtype::BF16, 1e25, 1e6) && !refused(Dtype::BF16, 1e25, f64::INFINITY));
        // f16 cannot exceed 1e6: only its infinities and NaN are refused; a lower limit bites
        assert!(!refused(Dtype::F16, 65504.0, 1e6) && refused(Dtype::F16, f32::INFINITY, 1e6));
        assert!(refused(Dtype::F16, 1000.0, 999.0) && !refused(Dtype::F16, 999.0, 999.0));
        for d in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            for x in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                match scan_one(d, x, f64::INFINITY) {
                    Err(WeightError::NonFinite { index: 2500, name, .. }) => assert_eq!(name, "t"),
                    other => panic!("{d:?} {x}: {other:?}"),
                }
            }
        }
        match scan_one(Dtype::F32, -3e7, 1e6) {
            Err(e @ WeightError::Absurd { index: 2500, .. }) => assert!(e.to_string().contains("holds -3e7 at element 2500"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_digest_follows_content_not_layout() {
        let names = ["a".to_string(), "b".to_string()];
        let digest = |dir: &Path| WeightStore::open(dir).unwrap().scan(&names, DEFAULT_MAX_ABS, &mut |_, _| {}).unwrap();
        let (a, b) = (vec![1.0f32, 2.0, 3.0], vec![-1.0f32; 70_000]);
        let one = tempfile::tempdir().unwrap();
        write(one.path(), "model.safetensors", &[("a", Dtype::F16, a.clone()), ("b", Dtype::BF16, b.clone())]);
        // the same tensors in two shards
        let two = tempfile::tempdir().unwrap();
        write(two.path(), "s1.safetensors", &[("a", Dtype::F16, a.clone())]);
        write(two.path(), "s2.safetensors", &[("b", Dtype::BF16, b.clone())]);
        std::fs::write(two.path().join("model.safetensors.index.json"), r#"{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#).unwrap();
        assert_eq!(digest(one.path()), digest(two.path()));
        // one value, or one dtype, changed
        let mut b2 = b.clone();
        b2[69_999] = -2.0;
        let other = tempfile::tempdir().unwrap();
        write(other.path(), "model.safetensors", &[("a", Dtype::F16, a.clone()), ("b", Dtype::BF16, b2)]);
        assert_ne!(digest(one.path()), digest(other.path()));
        write(other.path(), "model.safetensors", &[("a", Dtype::F32, a), ("b", Dtype::BF16, b)]);
        assert_ne!(digest(one.path()), digest(other.path()));
    }
}
