//! `export --format gguf`: a model folder (dense or compressed) as one GGUF file that
//! llama.cpp loads and runs at the pruned size. Pruned FFNs keep their kept widths
//! (`feed_forward_length` per layer), dropped layers are simply absent (the kept ones are
//! numbered from 0, as in the folder), the tokenizer is embedded (`vocab.rs`: byte-level or
//! SentencePiece-style BPE). llama.cpp has no factored or MPO linear, so attention (and any
//! factored FFN) matrices are multiplied back into dense ones: that is the size this format
//! costs over the folder (`GgufSummary`).
//!
//! Architecture: llama.cpp's `llama` graph builds every layer's FFN at one width, so a model
//! whose layers kept different widths is written as `deci` (llama.cpp's LLaMA variant with
//! per-layer FFN widths and head counts: the same RMSNorm, rope, attention and SiLU-gated
//! FFN); uniform widths stay `llama`. q_proj and k_proj rows are reordered per head from
//! Hugging Face's half-split rope layout to the interleaved pairs llama.cpp rotates.
//!
//! Qwen2 is written as `llama` / `deci` too, not as llama.cpp's `qwen2`: both graphs load
//! `attn_q/k/v.bias` where present (their q/k rows interleaved like the weights), and they
//! also apply the `ffn_down` / `attn_output` biases a compression method adds and per-layer
//! FFN widths, where the `qwen2` graph ignores FFN biases and has one width. Past the
//! biases, Qwen2's layer is LLaMA's (the rope's half-split layout is the interleave's job).

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::format::gguf::{GgufWriter, TensorInfo, TensorType, Value};
use crate::format::plan::LinearRepr;
use crate::format::OutputClaim;
use crate::gpu::Gpu;
use crate::model::config::RopeType;
use crate::format::linear::Linear;
use crate::model::forward::mpo_dense;
use crate::model::Model;

/// Encoding of the 2-D weights (`--type`); norms and rope factors are always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufType {
    F32,
    F16,
    /// 8-bit blocks of 32 with an f16 scale; a matrix whose rows are not a multiple of 32
    /// long (a pruned `down_proj` whose kept width is not) stays f16.
    #[value(name = "q8_0")]
    Q8_0,
}

impl GgufType {
    fn tensor_type(self) -> TensorType {
        match self {
            GgufType::F32 => TensorType::F32,
            GgufType::F16 => TensorType::F16,
            GgufType::Q8_0 => TensorType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_*).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgufType::F32 => "f32",
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
        }
    }
}

/// The llama.cpp architecture a model is written as (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArch {
    Llama,
    Deci,
}

impl GgufArch {
    pub fn name(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::Deci => "deci",
        }
    }
}

/// The file name inside the export folder.
pub const FILE: &str = "model.gguf";

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    pub path: PathBuf,
    pub arch: GgufArch,
    pub bytes: u64,
    /// Values stored in the file (the tied head counted once).
    pub params: u64,
    /// Parameters of the model folder (`ModelConfig::total_params`).
    pub folder_params: u64,
    pub tensors: usize,
    /// The sliding attention window written as the training context, where the model has
    /// one (llama.cpp's LLaMA graphs attend over the whole context).
    pub window_as_context: Option<usize>,
}

/// Rows of a q or k projection reordered per head from [half, half] to interleaved pairs:
/// llama.cpp's rope rotates (x[2i], x[2i+1]) where Hugging Face rotates (x[i], x[i+d/2]).
fn rope_interleave(w: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    let half = head_dim / 2;
    for h in 0..heads {
        for i in 0..half {
            for p in 0..2 {
                let src = (h * head_dim + p * half + i) * cols;
                let dst = (h * head_dim + 2 * i + p) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// llama.cpp's name of a linear.
fn gguf_name(linear: Linear) -> &'static str {
    match linear {
        Linear::Q => "attn_q",
        Linear::K => "attn_k",
        Linear::V => "attn_v",
        Linear::O => "attn_output",
        Linear::Gate => "ffn_gate",
        Linear::Up => "ffn_up",
        Linear::Down => "ffn_down",
    }
}

/// What goes into the file for one export: the choices made from the model and `--type`.
struct Layout<'a> {
    gpu: &'a Gpu,
    model: &'a Model,
    ty: GgufType,
    /// Rope scaling factors (`rope_freqs.weight`) for llama3 rope scaling.
    rope_freqs: Option<Vec<f32>>,
}

impl Layout<'_> {
    /// Type of a 2-D weight whose rows are `cols` long.
    fn matrix_type(&self, cols: usize) -> TensorType {
        let t = self.ty.tensor_type();
        if t.fits(cols as u64) {
            t
        } else {
            TensorType::F16
        }
    }

    fn tensor_infos(&self) -> Vec<TensorInfo> {
        let cfg = &self.model.cfg;
        let d = cfg.hidden_size;
        let mut t = vec![TensorInfo::new("token_embd.weight", &[cfg.vocab_size, d], self.matrix_type(d)), TensorInfo::new("output_norm.weight", &[d], TensorType::F32)];
        if !cfg.tie_word_embeddings {
            t.push(TensorInfo::new("output.weight", &[cfg.vocab_size, d], self.matrix_type(d)));
        }
        if let Some(f) = &self.rope_freqs {
            t.push(TensorInfo::new("rope_freqs.weight", &[f.len()], TensorType::F32));
        }
        for i in 0..cfg.num_hidden_layers {
            let plan = cfg.layer_plan(i);
            t.push(TensorInfo::new(format!("blk.{i}.attn_norm.weight"), &[d], TensorType::F32));
            for lin in Linear::ALL {
                let (o, inp) = cfg.linear_shape(&plan, lin);
                t.push(TensorInfo::new(format!("blk.{i}.{}.weight", gguf_name(lin)), &[o, inp], self.matrix_type(inp)));
                // a bias (the model's or one the method added): llama.cpp's llama and deci
                // graphs load them where present
                if cfg.has_bias(&plan, lin) {
                    t.push(TensorInfo::new(format!("blk.{i}.{}.bias", gguf_name(lin)), &[o], TensorType::F32));
                }
                // llama.cpp's order: the FFN norm follows the attention output
                if lin == Linear::O {
                    t.push(TensorInfo::new(format!("blk.{i}.ffn_norm.weight"), &[d], TensorType::F32));
                }
            }
        }
        t
    }

    /// Dense [out, in] weight of `linear` of layer `i`, as llama.cpp wants it.
    fn linear(&self, i: usize, linear: Linear) -> Result<Vec<f32>> {
        let cfg = &self.model.cfg;
        let store = &self.model.store;
        let plan = cfg.layer_plan(i);
        let (o, inp) = cfg.linear_shape(&plan, linear);
        let base = crate::format::names::linear_base(i, linear);
        let w = match plan.repr(linear) {
            LinearRepr::Dense => store.f32(&format!("{base}.weight"), &[o, inp])?,
            LinearRepr::LowRank(r) => {
                let a = store.f32(&format!("{base}.factor_a"), &[o, r])?;
                let b = store.f32(&format!("{base}.factor_b"), &[r, inp])?;
                super::multiply(self.gpu, &a, &b, o, r, inp)?
            }
            LinearRepr::Mpo(m) => mpo_dense(store, i, linear, &m)?,
        };
        Ok(match linear {
            Linear::Q => rope_interleave(&w, cfg.n_heads(), cfg.head_dim(), inp),
            Linear::K => rope_interleave(&w, cfg.n_kv_heads(), cfg.head_dim(), inp),
            _ => w,
        })
    }

    fn metadata(&self) -> Result<(GgufArch, Vec<(String, Value)>)> {
        let cfg = &self.model.cfg;
        let n = cfg.num_hidden_layers;
        let widths: Vec<u32> = (0..n).map(|i| cfg.layer_plan(i).ffn_width as u32).collect();
        let uniform = widths.windows(2).all(|w| w[0] == w[1]);
        let arch = if uniform { GgufArch::Llama } else { GgufArch::Deci };
        let a = arch.name();
        let name = self.model.dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let max_pos = cfg.raw.get("max_position_embeddings").and_then(|v| v.as_u64()).unwrap_or(2048) as usize;
        // llama's and deci's graphs attend over the whole context, which equals sliding-window
        // attention up to the window (as this tool's own forward runs it): the window becomes
        // the training context, past which llama.cpp warns (Mistral v0.1: 4,096)
        let ctx = cfg.attention_window().map_or(max_pos, |w| w.min(max_pos)) as u32;
        let mut md = vec![
            ("general.architecture".to_string(), Value::Str(a.into())),
            ("general.name".to_string(), Value::Str(name)),
            ("general.file_type".to_string(), Value::U32(self.ty.file_type())),
            ("general.quantization_version".to_string(), Value::U32(2)),
            (format!("{a}.vocab_size"), Value::U32(cfg.vocab_size as u32)),
            (format!("{a}.context_length"), Value::U32(ctx)),
            (format!("{a}.embedding_length"), Value::U32(cfg.hidden_size as u32)),
            (format!("{a}.block_count"), Value::U32(n as u32)),
            (format!("{a}.feed_forward_length"), if uniform { Value::U32(widths[0]) } else { Value::U32s(widths) }),
            (format!("{a}.attention.head_count"), Value::U32(cfg.n_heads() as u32)),
            (format!("{a}.attention.head_count_kv"), Value::U32(cfg.n_kv_heads() as u32)),
            (format!("{a}.attention.key_length"), Value::U32(cfg.head_dim() as u32)),
            (format!("{a}.attention.value_length"), Value::U32(cfg.head_dim() as u32)),
            (format!("{a}.rope.dimension_count"), Value::U32(cfg.head_dim() as u32)),
            (format!("{a}.rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
            (format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        ];
        md.extend(super::vocab::vocab_metadata(self.model)?);
        Ok((arch, md))
    }
}

/// Writes `model` as `out/model.gguf` (`out` is claimed and built like every output folder:
/// checked against the input, locked, moved into place when complete).
pub fn export_gguf(gpu: &Gpu, model: &Model, ty: GgufType, out: &Path, force: bool, progress: &mut dyn FnMut(usize, usize)) -> Result<GgufSummary> {
    let cfg = &model.cfg;
    let rope_freqs = cfg.rope_scaling.as_ref().filter(|s| s.rope_type == RopeType::Llama3).map(|_| {
        let base = crate::gpu::rope::inv_freq(cfg.head_dim(), cfg.rope_theta);
        // llama.cpp divides each base frequency by its factor
        base.iter().zip(cfg.inv_freq()).map(|(b, s)| b / s).collect()
    });
    let layout = Layout { gpu, model, ty, rope_freqs };
    let (arch, metadata) = layout.metadata()?;
    let infos = layout.tensor_infos();
    let params = infos.iter().map(|t| t.elements()).sum();
    let n_tensors = infos.len();

    let claim = OutputClaim::take(out, &[&model.dir], force)?;
    claim.fresh_partial()?;
    let file_path = claim.partial().join(FILE);
    let written = (|| -> Result<u64> {
        let file = std::fs::File::create(&file_path).with_context(|| format!("{}: cannot create", file_path.display()))?;
        let mut w = GgufWriter::new(BufWriter::with_capacity(1 << 20, file), &metadata, infos)?;
        let store = &model.store;
        w.write_tensor(&store.f32(crate::format::names::EMBED, &[cfg.vocab_size, cfg.hidden_size])?)?;
        w.write_tensor(&store.f32(crate::format::names::FINAL_NORM, &[cfg.hidden_size])?)?;
        if !cfg.tie_word_embeddings {
            w.write_tensor(&store.f32(crate::format::names::LM_HEAD, &[cfg.vocab_size, cfg.hidden_size])?)?;
        }
        if let Some(f) = &layout.rope_freqs {
            w.write_tensor(f)?;
        }
        let n = cfg.num_hidden_layers;
        for i in 0..n {
            progress(i, n);
            let norm = |s: &str| store.f32(&crate::format::names::layer(i, s), &[cfg.hidden_size]);
            w.write_tensor(&norm(crate::format::names::INPUT_NORM)?)?;
            let plan = cfg.layer_plan(i);
            for lin in Linear::ALL {
                w.write_tensor(&layout.linear(i, lin)?)?;
                if cfg.has_bias(&plan, lin) {
                    let (o, _) = cfg.linear_shape(&plan, lin);
                    let b = store.f32(&crate::format::names::linear(i, lin, "bias"), &[o])?;
                    // q and k rows are interleaved for llama.cpp's rope: their biases too
                    w.write_tensor(&match lin {
                        Linear::Q => rope_interleave(&b, cfg.n_heads(), cfg.head_dim(), 1),
                        Linear::K => rope_interleave(&b, cfg.n_kv_heads(), cfg.head_dim(), 1),
                        _ => b,
                    })?;
                }
                if lin == Linear::O {
                    w.write_tensor(&norm(crate::format::names::POST_NORM)?)?;
                }
            }
        }
        progress(n, n);
        w.finish()
    })();
    let bytes = match written {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_dir_all(claim.partial());
            return Err(e);
        }
    };
    let target = claim.move_into_place()?;
    Ok(GgufSummary { path: target.join(FILE), arch, bytes, params, folder_params: cfg.total_params() as u64, tensors: n_tensors, window_as_context: cfg.attention_window() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rows_interleave_per_head() {
        // 2 heads of dim 4, one column: rows h*4 + [0, 1, 2, 3] -> [0, 2, 1, 3]
        let w: Vec<f32> = (0..8).map(|x| x as f32).collect();
        assert_eq!(rope_interleave(&w, 2, 4, 1), vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    }
}
