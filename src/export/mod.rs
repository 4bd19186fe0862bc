//! Export of a compressed model to formats other tools load. `hf-dense`: every factor pair
//! multiplied back into its dense matrix (on the GPU) and every pruned FFN zero-padded to
//! the original width, so a stock Hugging Face `LlamaForCausalLM` (or `Qwen2`, `Mistral`)
//! loads it and computes the same function. It is as large as the original: the export is
//! for compatibility, not for size. `gguf` (`gguf.rs`): one llama.cpp file at the pruned
//! size (attention factor pairs multiplied back: llama.cpp has no factored linear). `hf`
//! (`hf.rs`): the compressed tensors as they are, with custom modeling code transformers
//! loads at the compressed size (`trust_remote_code=True`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use crate::format::dtype::encode;
use crate::format::output::{OutTensor, OutputFolder};
use crate::error::CompressError;
use crate::gpu::{matmul, Gpu};
use crate::format::plan::LinearRepr;
use crate::format::linear::Linear;
use crate::model::forward::mpo_dense;
use safetensors::Dtype;
use crate::model::Model;

pub mod gguf;
pub mod hf;
mod vocab;

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// Plain dense Hugging Face checkpoint with the original shapes.
    HfDense,
    /// Hugging Face folder with custom code (trust_remote_code) at the compressed size.
    Hf,
    /// llama.cpp GGUF (DIR/model.gguf) at the pruned size; --type f32|f16|q8_0.
    Gguf,
}

/// Dense [out, in] = A [out, r] B [r, in], computed on the GPU in f32.
fn multiply(gpu: &Gpu, a: &[f32], b: &[f32], out: usize, r: usize, inp: usize) -> Result<Vec<f32>> {
    let (ga, gb) = (gpu.upload(a)?, gpu.upload(b)?);
    let mut enc = gpu.encoder();
    let w = matmul::matmul(gpu, &mut enc, &ga, &gb, out, r, inp)?;
    gpu.submit(enc);
    Ok(gpu.read(&w)?)
}

/// Which of transformers' LlamaConfig bias switches a dense export needs.
struct BiasGroups {
    /// q, k, v, o carry biases (`attention_bias`).
    attention: bool,
    /// gate, up, down carry biases (`mlp_bias`).
    mlp: bool,
    /// The method added a bias somewhere (the export is then written as a llama).
    added: bool,
}

impl BiasGroups {
    fn of(cfg: &crate::model::ModelConfig) -> Self {
        let added: Vec<Linear> = (0..cfg.num_hidden_layers).flat_map(|i| cfg.layer_plan(i).biases).collect();
        let attention = added.iter().any(|l| l.is_attention());
        let mlp = added.iter().any(|l| !l.is_attention());
        BiasGroups { attention: attention || (cfg.qkv_bias() && !added.is_empty()), mlp, added: !added.is_empty() }
    }
}

/// Writes `model` (compressed by this tool) as a dense checkpoint in `out`.
pub fn export_hf_dense(gpu: &Gpu, model: &Model, out: &Path, force: bool, progress: &mut dyn FnMut(usize, usize)) -> Result<PathBuf> {
    let cfg = &model.cfg;
    if cfg.lorap.is_none() {
        return Err(CompressError::BadArgument(format!("{}: not a compressed model (no `lorap` section in config.json); nothing to export", model.dir.display())).into());
    }
    let store = &model.store;
    let n = cfg.num_hidden_layers;
    let groups = BiasGroups::of(cfg);
    if groups.added && cfg.attention_window().is_some() {
        return Err(crate::model::config::ConfigError::Feature { path: cfg.path.clone(), what: "hf-dense export of a model with added biases writes a llama config, which has no sliding attention window".into() }.into());
    }
    let mut folder = OutputFolder::create(out, &model.dir, force, n + 1)?;
    let (d, f_full) = (cfg.hidden_size, cfg.intermediate_size);
    for i in 0..n {
        progress(i, n);
        let plan = cfg.layer_plan(i);
        let name = |s: &str| crate::format::names::layer(i, s);
        let mut tensors = Vec::new();
        let f_kept = plan.ffn_width;
        let dtype = store.dtype(&name("input_layernorm.weight"))?;
        let dtype = if matches!(dtype, Dtype::F16 | Dtype::BF16) { dtype } else { Dtype::F32 };
        for lin in Linear::ALL {
            let base = crate::format::names::linear_base(i, lin);
            let wname = format!("{base}.weight");
            let (o, inp) = cfg.linear_shape(&plan, lin);
            let w = match plan.repr(lin) {
                LinearRepr::Dense if f_kept == f_full || lin.is_attention() => {
                    tensors.push(OutTensor::copied(store, &wname)?);
                    continue;
                }
                LinearRepr::Dense => store.f32(&wname, &[o, inp])?,
                LinearRepr::LowRank(r) => {
                    let a = store.f32(&format!("{base}.factor_a"), &[o, r])?;
                    let b = store.f32(&format!("{base}.factor_b"), &[r, inp])?;
                    multiply(gpu, &a, &b, o, r, inp)?
                }
                LinearRepr::Mpo(m) => mpo_dense(store, i, lin, &m)?,
            };
            // zero channels are exact no-ops: silu(0) * 0 = 0 feeds zero columns of down_proj
            let (w, shape) = match lin {
                Linear::Gate | Linear::Up => {
                    let mut w = w;
                    w.resize(f_full * d, 0.0);
                    (w, vec![f_full, d])
                }
                Linear::Down => {
                    let mut padded = vec![0f32; d * f_full];
                    for (row, src) in padded.chunks_mut(f_full).zip(w.chunks(f_kept.max(1))) {
                        row[..f_kept].copy_from_slice(&src[..f_kept]);
                    }
                    (padded, vec![d, f_full])
                }
                _ => (w, vec![o, inp]),
            };
            tensors.push(OutTensor { name: wname, dtype, bytes: encode(&w, dtype), shape });
        }
        let group_on = |l: Linear| if l.is_attention() { groups.attention } else { groups.mlp };
        for lin in Linear::ALL.into_iter().filter(|&l| group_on(l) || cfg.has_bias(&plan, l)) {
            let bname = crate::format::names::linear(i, lin, "bias");
            let (o, _) = cfg.linear_shape(&plan, lin);
            // transformers switches biases on per group: the group's others are zeros, and a
            // pruned gate/up bias is zero-padded like its rows
            let mut b = if cfg.has_bias(&plan, lin) { store.f32(&bname, &[o])? } else { vec![0.0; o] };
            let full = match lin {
                Linear::Gate | Linear::Up => f_full,
                _ => o,
            };
            b.resize(full, 0.0);
            tensors.push(OutTensor { name: bname, dtype, bytes: encode(&b, dtype), shape: vec![full] });
        }
        for m in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            tensors.push(OutTensor::copied(store, &name(m))?);
        }
        folder.write_shard(i, &tensors)?;
    }
    let mut rest = Vec::new();
    for t in [crate::format::names::EMBED, crate::format::names::FINAL_NORM, crate::format::names::LM_HEAD] {
        if store.contains(t) {
            rest.push(OutTensor::copied(store, t)?);
        }
    }
    folder.write_shard(n, &rest)?;
    let mut cfg_json = cfg.raw.clone();
    cfg_json.remove("lorap");
    if groups.added {
        // stock transformers has per-group bias switches only in LlamaConfig (qwen2's and
        // mistral's MLPs have none): the same function as a llama, the q/k/v biases kept
        cfg_json.insert("model_type".into(), "llama".into());
        cfg_json.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"]));
        cfg_json.insert("attention_bias".into(), groups.attention.into());
        cfg_json.insert("mlp_bias".into(), groups.mlp.into());
    }
    folder.write_json("config.json", &serde_json::Value::Object(cfg_json))?;
    folder.copy_side_files(&model.dir)?;
    progress(n, n);
    folder.finish().context("finishing the export folder")
}
