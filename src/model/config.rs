//! config.json of a Hugging Face LLaMA-family model (llama, mistral, qwen2) plus the
//! optional `lorap` section describing a compressed model's per-layer shapes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::format::plan::{CompressionSection, LayerPlan, LinearRepr};

/// Failures of config.json. Messages leave an underlying error out (it is the `source`,
/// which the CLI prints after them), so no cause is said twice.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: invalid JSON or missing field")]
    Parse { path: String, source: serde_json::Error },
    #[error("{path}: unsupported architecture {model_type:?} (supported: llama, mistral, qwen2)")]
    Unsupported { path: String, model_type: String },
    #[error("{path}: inconsistent config: {what}")]
    Invalid { path: String, what: String },
    /// A valid setting the forward pass does not implement (refused rather than ignored,
    /// which would give a wrong model).
    #[error("{path}: {what}")]
    Feature { path: String, what: String },
}

/// The architectures the forward pass implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    Llama,
    Mistral,
    Qwen2,
}

/// Rope frequency schemes the forward pass implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeType {
    Default,
    Llama3,
}

/// FFN activations the forward pass implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Silu,
}

/// End-of-sequence token ids (config.json gives one id or a list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EosTokens {
    One(u32),
    Many(Vec<u32>),
}

impl EosTokens {
    /// The first id: where generation stops.
    pub fn first(&self) -> Option<u32> {
        match self {
            EosTokens::One(t) => Some(*t),
            EosTokens::Many(v) => v.first().copied(),
        }
    }
}

/// Llama-3 style rope frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: RopeType,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub vocab_size: usize,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<Activation>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<EosTokens>,
    #[serde(default)]
    pub lorap: Option<CompressionSection>,
    /// Every field, kept so a compressed model's config keeps the original ones.
    #[serde(skip)]
    pub raw: serde_json::Map<String, serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}

impl ModelConfig {
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let p = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        Self::parse(&text, &p)
    }

    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigError> {
        let raw: serde_json::Value = serde_json::from_str(text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        // what the typed fields cannot hold is unsupported, not malformed: said as such
        let text_of = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_string);
        if let Some(t) = text_of(raw.get("model_type")).filter(|t| !matches!(t.as_str(), "llama" | "mistral" | "qwen2")) {
            return Err(ConfigError::Unsupported { path: path.into(), model_type: t });
        }
        if let Some(act) = text_of(raw.get("hidden_act")).filter(|a| a != "silu") {
            return Err(ConfigError::Invalid { path: path.into(), what: format!("hidden_act {act:?} (only silu)") });
        }
        let scaling = raw.get("rope_scaling");
        if let Some(t) = text_of(scaling.and_then(|s| s.get("rope_type").or_else(|| s.get("type")))).filter(|t| !matches!(t.as_str(), "llama3" | "default")) {
            return Err(ConfigError::Invalid { path: path.into(), what: format!("rope_scaling type {t:?} not supported (llama3, default)") });
        }
        let mut c: ModelConfig = serde_json::from_value(raw.clone()).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        c.raw = raw.as_object().cloned().unwrap_or_default();
        let bad = |what: String| Err(ConfigError::Invalid { path: path.into(), what });
        if c.hidden_size == 0 || c.num_hidden_layers == 0 || c.num_attention_heads == 0 || c.vocab_size == 0 || c.intermediate_size == 0 {
            return bad("a size is zero".into());
        }
        // bounds far above any real model keep every size product inside usize
        if c.hidden_size > 1 << 20 || c.num_hidden_layers > 1 << 12 || c.num_attention_heads > 1 << 12 || c.vocab_size > 1 << 24 || c.intermediate_size > 1 << 22 {
            return bad("a size is implausibly large".into());
        }
        if c.n_kv_heads() == 0 || c.head_dim() == 0 || c.head_dim.is_some_and(|h| h > 1 << 12) {
            return bad("num_key_value_heads and head_dim must be positive".into());
        }
        if !c.rms_norm_eps.is_finite() || c.rms_norm_eps <= 0.0 || !c.rope_theta.is_finite() || c.rope_theta <= 0.0 {
            return bad("rms_norm_eps and rope_theta must be positive".into());
        }
        if !c.n_heads().is_multiple_of(c.n_kv_heads()) {
            return bad(format!("{} attention heads not a multiple of {} KV heads", c.n_heads(), c.n_kv_heads()));
        }
        if !c.head_dim().is_multiple_of(4) || c.head_dim() > crate::gpu::attention::MAX_HEAD_DIM {
            return bad(format!("head_dim {} must be a multiple of 4 and at most {}", c.head_dim(), crate::gpu::attention::MAX_HEAD_DIM));
        }
        if let Some(l) = &c.lorap {
            if l.layers.len() != c.num_hidden_layers {
                return bad(format!("lorap section lists {} layers, model has {}", l.layers.len(), c.num_hidden_layers));
            }
            for (i, p) in l.layers.iter().enumerate() {
                if p.ffn_width == 0 || p.ffn_width > c.intermediate_size {
                    return bad(format!("lorap section, layer {i}: ffn_width must be in 1..={}", c.intermediate_size));
                }
                for j in 0..7 {
                    let (out, inp) = c.linear_shape(p, j);
                    if p.rank(j).is_some_and(|r| r == 0 || r > out.max(inp)) {
                        return bad(format!("lorap section, layer {i}: rank of {} must be in 1..={}", crate::format::linear::LINEARS[j], out.max(inp)));
                    }
                }
                for (name, m) in &p.mpo {
                    let Some(j) = crate::format::linear::LINEARS.iter().position(|l| l == name) else {
                        return bad(format!("lorap section, layer {i}: unknown MPO matrix {name:?}"));
                    };
                    let (out, inp) = c.linear_shape(p, j);
                    if let Err(e) = m.check(out, inp) {
                        return bad(format!("lorap section, layer {i}, {name}: {e}"));
                    }
                }
            }
        }
        Ok(c)
    }

    pub fn n_heads(&self) -> usize {
        self.num_attention_heads
    }
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    pub fn q_dim(&self) -> usize {
        self.n_heads() * self.head_dim()
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads() * self.head_dim()
    }
    /// q/k/v carry biases (qwen2 always; llama/mistral when attention_bias is set).
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.model_type == ModelType::Qwen2)
    }
    /// Shapes of layer `i` (dense unless the lorap section says otherwise).
    pub fn layer_plan(&self, i: usize) -> LayerPlan {
        match &self.lorap {
            Some(l) => l.layers[i].clone(),
            None => LayerPlan { ffn_width: self.intermediate_size, ..Default::default() },
        }
    }

    /// Rope inverse frequencies, with llama3 scaling where configured.
    pub fn inv_freq(&self) -> Vec<f32> {
        let base = crate::gpu::rope::inv_freq(self.head_dim(), self.rope_theta);
        let Some(s) = self.rope_scaling.as_ref().filter(|s| s.rope_type == RopeType::Llama3) else { return base };
        let factor = s.factor.unwrap_or(8.0);
        let lo = s.low_freq_factor.unwrap_or(1.0);
        let hi = s.high_freq_factor.unwrap_or(4.0);
        let old = s.original_max_position_embeddings.unwrap_or(8192.0);
        let (lo_wl, hi_wl) = (old / lo, old / hi);
        base.iter()
            .map(|&f| {
                let wl = 2.0 * std::f64::consts::PI / f as f64;
                let f = f as f64;
                let v = if wl < hi_wl {
                    f
                } else if wl > lo_wl {
                    f / factor
                } else {
                    let smooth = (old / wl - lo) / (hi - lo);
                    (1.0 - smooth) * f / factor + smooth * f
                };
                v as f32
            })
            .collect()
    }

    /// [out, in] of linear `j` of a layer with plan `p`.
    pub fn linear_shape(&self, p: &LayerPlan, j: usize) -> (usize, usize) {
        let (d, qd, kvd, f) = (self.hidden_size, self.q_dim(), self.kv_dim(), p.ffn_width);
        [(qd, d), (kvd, d), (kvd, d), (d, qd), (f, d), (f, d), (d, f)][j]
    }

    /// Tensors (name, shape) storing linear `j` of plan `p`, named under `base`
    /// (e.g. "model.layers.3.self_attn.q_proj").
    pub fn stored_tensors(&self, p: &LayerPlan, j: usize, base: &str) -> Vec<(String, Vec<usize>)> {
        let (out, inp) = self.linear_shape(p, j);
        match p.repr(j) {
            LinearRepr::Dense => vec![(format!("{base}.weight"), vec![out, inp])],
            LinearRepr::LowRank(r) => vec![(format!("{base}.factor_a"), vec![out, r]), (format!("{base}.factor_b"), vec![r, inp])],
            LinearRepr::Mpo(m) => m.core_shapes().iter().enumerate().filter(|(k, _)| !m.is_shared(*k)).map(|(k, s)| (format!("{base}.mpo_core_{k}"), s.to_vec())).collect(),
        }
    }

    /// Parameters linear `j` of plan `p` stores.
    pub fn linear_params(&self, p: &LayerPlan, j: usize) -> usize {
        let (out, inp) = self.linear_shape(p, j);
        match p.repr(j) {
            LinearRepr::Dense => out * inp,
            LinearRepr::LowRank(r) => r * (out + inp),
            LinearRepr::Mpo(m) => m.params(),
        }
    }

    /// Parameters of decoder layer `i` (linears and norms) as planned.
    pub fn layer_params(&self, i: usize) -> usize {
        self.plan_params(&self.layer_plan(i))
    }

    /// Parameters of a decoder layer with plan `p`.
    pub fn plan_params(&self, p: &LayerPlan) -> usize {
        let bias = if self.qkv_bias() { self.q_dim() + 2 * self.kv_dim() } else { 0 };
        (0..7).map(|j| self.linear_params(p, j)).sum::<usize>() + 2 * self.hidden_size + bias
    }

    /// Parameters of all decoder layers.
    pub fn decoder_params(&self) -> usize {
        (0..self.num_hidden_layers).map(|i| self.layer_params(i)).sum::<usize>() + self.shared_mpo().iter().map(|(_, _, s)| s.iter().product::<usize>()).sum::<usize>()
    }

    /// Shared MPO centres: (linear, tensor name, shape), once per linear.
    pub fn shared_mpo(&self) -> Vec<(String, String, [usize; 4])> {
        let mut out: Vec<(String, String, [usize; 4])> = Vec::new();
        for i in 0..self.num_hidden_layers {
            for (lin, m) in &self.layer_plan(i).mpo {
                if m.shared_centre && !out.iter().any(|(l, _, _)| l == lin) {
                    let c = m.centre();
                    out.push((lin.clone(), m.core_name(i, lin, c), m.core_shapes()[c]));
                }
            }
        }
        out
    }

    /// Parameters of the whole model (embeddings, untied lm_head, final norm included).
    pub fn total_params(&self) -> usize {
        let emb = self.vocab_size * self.hidden_size;
        self.decoder_params() + emb + if self.tie_word_embeddings { 0 } else { emb } + self.hidden_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> String {
        format!(r#"{{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10{extra}}}"#)
    }

    #[test]
    fn typed_vocabulary_parses_and_refuses_what_the_forward_pass_lacks() {
        let c = ModelConfig::parse(&config(r#", "eos_token_id": [7, 9], "rope_scaling": {"type": "llama3", "factor": 8.0}"#), "c").unwrap();
        assert_eq!((c.model_type, c.eos_token_id.as_ref().and_then(EosTokens::first)), (ModelType::Llama, Some(7)));
        assert_eq!(c.rope_scaling.unwrap().rope_type, RopeType::Llama3);
        let c = ModelConfig::parse(&config(r#", "eos_token_id": 2, "hidden_act": "silu""#), "c").unwrap();
        assert_eq!((c.eos_token_id.unwrap().first(), c.hidden_act), (Some(2), Some(Activation::Silu)));
        let qwen = config("").replace("llama", "qwen2");
        assert!(ModelConfig::parse(&qwen, "c").unwrap().qkv_bias());
        assert!(matches!(ModelConfig::parse(&config("").replace("llama", "gpt_neox"), "c"), Err(ConfigError::Unsupported { .. })));
        assert!(matches!(ModelConfig::parse(&config(r#", "hidden_act": "gelu""#), "c"), Err(ConfigError::Invalid { .. })));
        assert!(matches!(ModelConfig::parse(&config(r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#), "c"), Err(ConfigError::Invalid { .. })));
    }
}
