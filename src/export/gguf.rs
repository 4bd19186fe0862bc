//! `export --format gguf`: a model folder (dense or compressed) as one GGUF file that
//! llama.cpp loads and runs at the pruned size. Pruned FFNs keep their kept widths
//! (`feed_forward_length` per layer), dropped layers are simply absent (the kept ones are
//! numbered from 0, as in the folder), the tokenizer is embedded. llama.cpp has no
//! factored or MPO linear, so attention (and any factored FFN) matrices are multiplied back
//! into dense ones: that is the size this format costs over the folder (`GgufSummary`).
//!
//! Architecture: llama.cpp's `llama` graph builds every layer's FFN at one width, so a model
//! whose layers kept different widths is written as `deci` (llama.cpp's LLaMA variant with
//! per-layer FFN widths and head counts: the same RMSNorm, rope, attention and SiLU-gated
//! FFN); uniform widths stay `llama`. q_proj and k_proj rows are reordered per head from
//! Hugging Face's half-split rope layout to the interleaved pairs llama.cpp rotates.

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::format::gguf::{GgufWriter, TensorInfo, TensorType, Value};
use crate::format::input::{self, InputKind};
use crate::format::plan::LinearRepr;
use crate::format::OutputClaim;
use crate::gpu::Gpu;
use crate::model::config::{ConfigError, ModelType, RopeType};
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
}

/// llama.cpp's token types.
#[derive(Debug, Clone, Copy)]
#[repr(i32)]
enum TokenType {
    Normal = 1,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
}

/// The pre-tokenizer regex set llama.cpp applies (`tokenizer.ggml.pre`), recognized from
/// tokenizer.json's `pre_tokenizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreTokenizer {
    /// ByteLevel with GPT-2's regex.
    Gpt2,
    /// Single digits split first, then GPT-2's regex (SmolLM, StarCoder).
    Smollm,
    /// LLaMA-3's split regex, then ByteLevel without its own regex.
    Llama3,
}

impl PreTokenizer {
    fn name(self) -> &'static str {
        match self {
            PreTokenizer::Gpt2 => "gpt2",
            PreTokenizer::Smollm => "smollm",
            PreTokenizer::Llama3 => "llama-bpe",
        }
    }

    const LLAMA3_REGEX: &'static str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    fn detect(pre: &serde_json::Value) -> Option<Self> {
        let kind = |v: &serde_json::Value| v.get("type").and_then(|t| t.as_str()).unwrap_or("").to_string();
        let byte_level_regex = |v: &serde_json::Value| kind(v) == "ByteLevel" && v.get("use_regex").and_then(|b| b.as_bool()).unwrap_or(true);
        if byte_level_regex(pre) {
            return Some(PreTokenizer::Gpt2);
        }
        let parts = pre.get("pretokenizers")?.as_array()?;
        match parts.as_slice() {
            [one] if byte_level_regex(one) => Some(PreTokenizer::Gpt2),
            [digits, bl] if kind(digits) == "Digits" && digits.get("individual_digits").and_then(|b| b.as_bool()) == Some(true) && byte_level_regex(bl) => {
                Some(PreTokenizer::Smollm)
            }
            [split, bl] if kind(split) == "Split" && kind(bl) == "ByteLevel" && split.pointer("/pattern/Regex").and_then(|r| r.as_str()) == Some(Self::LLAMA3_REGEX) => {
                Some(PreTokenizer::Llama3)
            }
            _ => None,
        }
    }
}

/// The `tokenizer.ggml.*` metadata of a byte-level BPE tokenizer.json.
fn vocab_metadata(model: &Model) -> Result<Vec<(String, Value)>> {
    let path = model.dir.join("tokenizer.json");
    let unsupported = |what: String| ConfigError::Feature { path: path.display().to_string(), what };
    let tok: serde_json::Value = serde_json::from_slice(&input::read_bytes(&path, InputKind::Tokenizer)?)
        .map_err(|e| ConfigError::Parse { path: path.display().to_string(), source: e })?;
    let m = &tok["model"];
    if m["type"].as_str() != Some("BPE") || m["byte_fallback"].as_bool() == Some(true) {
        return Err(unsupported("GGUF export embeds byte-level BPE tokenizers (GPT-2, SmolLM, LLaMA-3 style); this one is SentencePiece-style or not BPE".into()).into());
    }
    let pre = PreTokenizer::detect(&tok["pre_tokenizer"])
        .ok_or_else(|| unsupported(format!("pre-tokenizer {} has no llama.cpp counterpart this export knows (gpt2, smollm, llama-bpe)", tok["pre_tokenizer"])))?;
    let n_vocab = model.cfg.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n_vocab];
    let mut types = vec![TokenType::Normal; n_vocab];
    let mut place = |id: u64, text: &str, ty: TokenType| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| unsupported(format!("token {text:?} has id {id}, outside the vocabulary of {n_vocab}")))?;
        *slot = Some(text.to_string());
        types[id as usize] = ty;
        Ok(())
    };
    for (text, id) in m["vocab"].as_object().context("tokenizer.json: model.vocab is not an object")? {
        place(id.as_u64().context("tokenizer.json: a vocabulary id is not a number")?, text, TokenType::Normal)?;
    }
    for t in tok["added_tokens"].as_array().into_iter().flatten() {
        let ty = if t["special"].as_bool() == Some(true) { TokenType::Control } else { TokenType::UserDefined };
        place(t["id"].as_u64().context("tokenizer.json: an added token has no id")?, t["content"].as_str().unwrap_or(""), ty)?;
    }
    // ids the tokenizer never produces (a vocabulary padded past the tokenizer) still need a
    // name; llama.cpp marks them unused
    let types: Vec<i32> = tokens.iter().zip(types).map(|(t, ty)| (if t.is_none() { TokenType::Unused } else { ty }) as i32).collect();
    let tokens: Vec<String> = tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]"))).collect();
    let merges: Vec<String> = m["merges"]
        .as_array()
        .context("tokenizer.json: model.merges is not a list")?
        .iter()
        .map(|x| match x {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(pair) => Ok(pair.iter().filter_map(|p| p.as_str()).collect::<Vec<_>>().join(" ")),
            _ => Err(anyhow::anyhow!("tokenizer.json: a merge is neither a string nor a pair")),
        })
        .collect::<Result<_>>()?;
    // the tool scores texts without a BOS; llama.cpp adds one only when told to, so say what
    // the tokenizer itself does (a template post-processor that inserts the BOS token)
    let cfg = &model.cfg;
    let bos = cfg.bos_token_id.as_ref().and_then(|v| v.as_u64()).map(|v| v as u32);
    let eos = cfg.eos_token_id.as_ref().and_then(|e| e.first());
    let pad = cfg.raw.get("pad_token_id").and_then(|v| v.as_u64()).map(|v| v as u32);
    let bos_text = bos.and_then(|b| tokens.get(b as usize)).cloned().unwrap_or_default();
    let add_bos = tok["post_processor"]["type"].as_str() == Some("TemplateProcessing") && !bos_text.is_empty() && tok["post_processor"]["single"].to_string().contains(&bos_text);
    let mut md = vec![
        ("tokenizer.ggml.model".to_string(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::Str(pre.name().into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Strs(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::I32s(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Strs(merges)),
    ];
    for (key, id) in [("bos_token_id", bos), ("eos_token_id", eos), ("padding_token_id", pad)] {
        if let Some(id) = id {
            md.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    md.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    Ok(md)
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
        let ctx = cfg.raw.get("max_position_embeddings").and_then(|v| v.as_u64()).unwrap_or(2048) as u32;
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
        md.extend(vocab_metadata(self.model)?);
        Ok((arch, md))
    }
}

/// Writes `model` as `out/model.gguf` (`out` is claimed and built like every output folder:
/// checked against the input, locked, moved into place when complete).
pub fn export_gguf(gpu: &Gpu, model: &Model, ty: GgufType, out: &Path, force: bool, progress: &mut dyn FnMut(usize, usize)) -> Result<GgufSummary> {
    let cfg = &model.cfg;
    if cfg.qkv_bias() {
        return Err(ConfigError::Feature { path: cfg.path.clone(), what: "GGUF export writes llama.cpp's llama/deci graphs, which have no q/k/v biases (qwen2 is not exported)".into() }.into());
    }
    if cfg.model_type == ModelType::Mistral && cfg.attention_window().is_some() {
        return Err(ConfigError::Feature { path: cfg.path.clone(), what: "GGUF export does not carry a sliding attention window".into() }.into());
    }
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
    Ok(GgufSummary { path: target.join(FILE), arch, bytes, params, folder_params: cfg.total_params() as u64, tensors: n_tensors })
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

    #[test]
    fn pre_tokenizers_are_recognized_by_structure() {
        let j = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        let smollm = j(r#"{"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}]}"#);
        assert_eq!(PreTokenizer::detect(&smollm), Some(PreTokenizer::Smollm));
        assert_eq!(PreTokenizer::detect(&j(r#"{"type": "ByteLevel", "use_regex": true}"#)), Some(PreTokenizer::Gpt2));
        assert_eq!(PreTokenizer::detect(&j(r#"{"type": "Metaspace"}"#)), None);
    }
}
