//! Shared test helpers: a Vulkan-pinned GPU context and seeded random data.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use lorap_gpu::gpu::{Gpu, GpuOptions};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Tests pin Vulkan (lavapipe on CI) so a missing driver fails instead of falling back to GL.
pub fn options() -> GpuOptions {
    // f32 products only: the tests' f64-reference bounds are f32 bounds (the f16
    // cooperative-matrix path is tested with its own bound where the adapter has it)
    GpuOptions { backends: Some(wgpu::Backends::VULKAN), cooperative_matrix: Some(false), ..Default::default() }
}

pub fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| Gpu::new(&options()).expect("Vulkan adapter (install mesa-vulkan-drivers)")).clone()
}

/// A context whose storage bindings are capped at `bytes`, to force tensor splitting.
pub fn gpu_with_binding(bytes: u64) -> Arc<Gpu> {
    Gpu::new(&GpuOptions { max_binding: Some(bytes), ..options() }).expect("Vulkan adapter")
}

/// Uniform values in [-1, 1) shifted away from zero, never exactly zero.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let v: f32 = r.random_range(-1.0..1.0);
            if v.abs() < 1e-3 { 0.5 } else { v }
        })
        .collect()
}

/// The real test assets (SmolLM2-135M folder, texts), fetched and built by the project's
/// own script on first use and cached (LORAP_ASSETS overrides the folder).
pub fn assets() -> std::path::PathBuf {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = std::process::Command::new("bash").arg(root.join("scripts/fetch-assets.sh")).output().expect("run scripts/fetch-assets.sh");
        assert!(out.status.success(), "fetch-assets.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        let dir = String::from_utf8_lossy(&out.stdout).lines().last().expect("asset folder").trim().to_string();
        std::path::PathBuf::from(dir)
    })
    .clone()
}

pub fn tokenize(model_dir: &std::path::Path, text_file: &str) -> Vec<u32> {
    let tok = lorap_gpu::model::load_tokenizer(model_dir).unwrap();
    let text = std::fs::read_to_string(assets().join("text").join(text_file)).unwrap();
    tok.encode(text.as_str(), false).unwrap().get_ids().to_vec()
}

/// Names of the tensors in a folder's model.safetensors.
pub fn tensor_names(dir: &std::path::Path) -> Vec<String> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
}

/// Rewrites tensor `name` of `dir`/model.safetensors as `edit(dtype, bytes)` returns it
/// (the other tensors keep theirs).
pub fn rewrite_tensor(dir: &std::path::Path, name: &str, edit: impl Fn(safetensors::Dtype, &[u8]) -> (safetensors::Dtype, Vec<u8>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let (dt, data) = if n == name { edit(v.dtype(), v.data()) } else { (v.dtype(), v.data().to_vec()) };
            (n, dt, v.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        owned.iter().map(|(n, dt, sh, b)| (n.clone(), safetensors::tensor::TensorView::new(*dt, sh.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

/// Rewrites one tensor of model.safetensors with another 2-byte dtype, same bytes.
pub fn rewrite_dtype(dir: &std::path::Path, name: &str, dtype: safetensors::Dtype) {
    rewrite_tensor(dir, name, |_, data| (dtype, data.to_vec()));
}

/// Every file under `dir` (recursively, symlinks not followed) with its size and a content
/// hash (FNV-1a), to assert that a run changed nothing there.
pub fn tree_listing(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, (u64, u64)> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut std::collections::BTreeMap<std::path::PathBuf, (u64, u64)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let ft = e.file_type().unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if ft.is_dir() {
                out.insert(rel, (0, 0));
                walk(root, &p, out);
            } else if ft.is_file() {
                let bytes = std::fs::read(&p).unwrap();
                let h = bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3));
                out.insert(rel, (bytes.len() as u64, h));
            } else {
                out.insert(rel, (u64::MAX, 0));
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A byte-level BPE tokenizer.json with two merges.
pub fn write_bpe_tokenizer(dir: &std::path::Path, vocab_size: usize) {
    let named = ["<s>", "t", "1", "2", "t1", "t2"];
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..vocab_size).map(|i| (named.get(i).map_or_else(|| format!("x{i}"), |s| s.to_string()), serde_json::json!(i))).collect();
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": ["t 1", "t 2"]},
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok).unwrap()).unwrap();
}
