//! config.json of a Hugging Face LLaMA-family model (llama, mistral, qwen2) plus the
//! optional `lorap` section describing a compressed model's per-layer shapes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::format::plan::{CompressionSection, LayerPlan, LinearRepr};
use crate::format::linear::Linear;

/// Failures of config.json. Messages leave an underlying error out (it is the `source`,
/// which the CLI prints after them), so no cause is said twice.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Input(#[from] crate::format::input::InputError),
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
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
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
    /// Where it was read from (for messages about what it implies).
    #[serde(skip)]
    pub path: String,
    /// The attention window the model was trained with, if shorter attention than causal
    /// (see `attention_window`).
    #[serde(skip)]
    window: Option<usize>,
}

/// The rope types `rope_scaling` may name, as spelled there.
const ROPE_TYPES: &[&str] = &["default", "llama3"];

/// Mistral's sliding window when config.json does not give one (transformers'
/// `MistralConfig` default); `null` there means none.
const MISTRAL_DEFAULT_WINDOW: usize = 4096;

/// Refuses `rope_scaling` settings the forward pass does not implement (naming the key) and
/// llama3 parameters that would give NaN or infinite frequencies (a zero factor, equal
/// low/high frequency factors).
fn check_rope_scaling(raw: &serde_json::Value, path: &str) -> Result<(), ConfigError> {
    let invalid = |what: String| Err(ConfigError::Invalid { path: path.into(), what });
    let Some(s) = raw.get("rope_scaling").filter(|v| !v.is_null()) else { return Ok(()) };
    let Some(obj) = s.as_object() else { return invalid("rope_scaling must be an object or null".into()) };
    let Some(key) = ["rope_type", "type"].into_iter().find(|k| obj.contains_key(*k)) else {
        return invalid("rope_scaling has no rope_type".into());
    };
    let Some(kind) = obj[key].as_str() else { return invalid(format!("rope_scaling.{key} must be a string, got {}", obj[key])) };
    if !ROPE_TYPES.contains(&kind) {
        return Err(ConfigError::Feature { path: path.into(), what: format!("rope_scaling.{key} {kind:?} is not supported (supported: {})", ROPE_TYPES.join(", ")) });
    }
    if kind != "llama3" {
        return Ok(());
    }
    let value = |k: &str, default: f64| -> Result<f64, ConfigError> {
        match obj.get(k) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                _ => Err(ConfigError::Invalid { path: path.into(), what: format!("rope_scaling.{k} must be a positive finite number, got {v}") }),
            },
        }
    };
    let (defaults, lo, hi) = (RopeScaling::LLAMA3_DEFAULTS, "low_freq_factor", "high_freq_factor");
    value("factor", defaults.0)?;
    value("original_max_position_embeddings", defaults.3)?;
    let (l, h) = (value(lo, defaults.1)?, value(hi, defaults.2)?);
    if h <= l {
        return invalid(format!("rope_scaling.{hi} ({h}) must be larger than rope_scaling.{lo} ({l})"));
    }
    Ok(())
}

impl RopeScaling {
    /// llama3's factor, low and high frequency factors and original context when
    /// config.json leaves one out (Llama 3.1's values).
    pub const LLAMA3_DEFAULTS: (f64, f64, f64, f64) = (8.0, 1.0, 4.0, 8192.0);
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
        let text = crate::format::input::read_text(&path, crate::format::input::InputKind::Config)?;
        Self::parse(&text, &path.display().to_string())
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
        check_rope_scaling(&raw, path)?;
        let mut c: ModelConfig = serde_json::from_value(raw.clone()).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        c.raw = raw.as_object().cloned().unwrap_or_default();
        c.path = path.into();
        let bad = |what: String| Err(ConfigError::Invalid { path: path.into(), what });
        let unsupported = |what: String| Err(ConfigError::Feature { path: path.into(), what });
        // llama's bias switches are honoured; mistral's modules have no biases whatever its
        // config says, so a mistral config asking for them is refused, not dropped
        // (transformers' qwen2 has q/k/v biases whatever attention_bias says)
        if c.model_type == ModelType::Mistral && (c.attention_bias == Some(true) || c.mlp_bias == Some(true)) {
            return unsupported("attention_bias / mlp_bias: true on a mistral model (transformers' mistral has no biases) is not supported".into());
        }
        if c.model_type == ModelType::Qwen2 && c.mlp_bias == Some(true) {
            return unsupported("mlp_bias: true on a qwen2 model (transformers' qwen2 has no FFN biases) is not supported".into());
        }
        if c.sliding_window == Some(0) {
            return bad("sliding_window must be positive (or null for none)".into());
        }
        c.window = match c.model_type {
            ModelType::Mistral if !c.raw.contains_key("sliding_window") => Some(MISTRAL_DEFAULT_WINDOW),
            ModelType::Mistral => c.sliding_window,
            // transformers' qwen2 uses it only with use_sliding_window (off by default)
            ModelType::Qwen2 => c.sliding_window.filter(|_| c.use_sliding_window == Some(true)),
            ModelType::Llama => None,
        };
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
                for lin in Linear::ALL {
                    let (out, inp) = c.linear_shape(p, lin);
                    if p.rank(lin).is_some_and(|r| r == 0 || r > out.max(inp)) {
                        return bad(format!("lorap section, layer {i}: rank of {lin} must be in 1..={}", out.max(inp)));
                    }
                }
                for (name, m) in &p.mpo {
                    let Some(lin) = Linear::from_name(name) else {
                        return bad(format!("lorap section, layer {i}: unknown MPO matrix {name:?}"));
                    };
                    let (out, inp) = c.linear_shape(p, lin);
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
    /// q/k/v carry biases: qwen2 always (llama's and mistral's `attention_bias`, which
    /// adds an o_proj bias too, is refused when parsed).
    pub fn qkv_bias(&self) -> bool {
        self.model_type == ModelType::Qwen2
    }

    /// Whether the model's own `linear` has a bias: qwen2's q/k/v, llama's with
    /// `attention_bias` (q/k/v/o) or `mlp_bias` (gate/up/down).
    pub fn own_bias(&self, linear: Linear) -> bool {
        match self.model_type {
            ModelType::Qwen2 => linear.is_qkv(),
            _ if linear.is_attention() => self.attention_bias == Some(true),
            _ => self.mlp_bias == Some(true),
        }
    }

    /// Whether `linear` of a layer with plan `p` has a bias: the model's own or one the
    /// compression method added (`LayerPlan::biases`).
    pub fn has_bias(&self, p: &LayerPlan, linear: Linear) -> bool {
        self.own_bias(linear) || p.has_added_bias(linear)
    }

    /// The sliding attention window the model uses (Mistral's `sliding_window`, Qwen2's
    /// with `use_sliding_window`), if any.
    pub fn attention_window(&self) -> Option<usize> {
        self.window
    }

    /// Refuses running windows of `tokens` tokens (what asks for them: `asked`) on a model
    /// whose sliding attention window is shorter: the forward pass attends over the whole
    /// window, which matches the model's own attention only up to its window.
    pub fn check_window(&self, tokens: usize, asked: &str) -> Result<(), ConfigError> {
        match self.window {
            Some(w) if tokens > w => Err(ConfigError::Feature {
                path: self.path.clone(),
                what: format!("sliding_window {w} is shorter than the {tokens} tokens {asked}; sliding-window attention is not supported, so use at most {w}"),
            }),
            _ => Ok(()),
        }
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
        let (factor, lo, hi, old) = RopeScaling::LLAMA3_DEFAULTS;
        let factor = s.factor.unwrap_or(factor);
        let lo = s.low_freq_factor.unwrap_or(lo);
        let hi = s.high_freq_factor.unwrap_or(hi);
        let old = s.original_max_position_embeddings.unwrap_or(old);
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

    /// [out, in] of `linear` in a layer with plan `p`.
    pub fn linear_shape(&self, p: &LayerPlan, linear: Linear) -> (usize, usize) {
        let (d, qd, kvd, f) = (self.hidden_size, self.q_dim(), self.kv_dim(), p.ffn_width);
        match linear {
            Linear::Q => (qd, d),
            Linear::K | Linear::V => (kvd, d),
            Linear::O => (d, qd),
            Linear::Gate | Linear::Up => (f, d),
            Linear::Down => (d, f),
        }
    }

    /// Tensors (name, shape) storing `linear` of plan `p`, named under `base`
    /// (e.g. "model.layers.3.self_attn.q_proj").
    pub fn stored_tensors(&self, p: &LayerPlan, linear: Linear, base: &str) -> Vec<(String, Vec<usize>)> {
        let (out, inp) = self.linear_shape(p, linear);
        let mut v = match p.repr(linear) {
            LinearRepr::Dense => vec![(format!("{base}.weight"), vec![out, inp])],
            LinearRepr::LowRank(r) => vec![(format!("{base}.factor_a"), vec![out, r]), (format!("{base}.factor_b"), vec![r, inp])],
            LinearRepr::Mpo(m) => m.core_shapes().iter().enumerate().filter(|(k, _)| !m.is_shared(*k)).map(|(k, s)| (format!("{base}.mpo_core_{k}"), s.to_vec())).collect(),
        };
        if self.has_bias(p, linear) {
            v.push((format!("{base}.bias"), vec![out]));
        }
        v
    }

    /// Parameters `linear` of plan `p` stores (its bias included).
    pub fn linear_params(&self, p: &LayerPlan, linear: Linear) -> usize {
        let (out, inp) = self.linear_shape(p, linear);
        let bias = if self.has_bias(p, linear) { out } else { 0 };
        bias + match p.repr(linear) {
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
        Linear::ALL.into_iter().map(|l| self.linear_params(p, l)).sum::<usize>() + 2 * self.hidden_size
    }

    /// Parameters of all decoder layers.
    pub fn decoder_params(&self) -> usize {
        (0..self.num_hidden_layers).map(|i| self.layer_params(i)).sum::<usize>() + self.shared_mpo().iter().map(|(_, _, s)| s.iter().product::<usize>()).sum::<usize>()
    }

    /// Shared MPO centres: (linear, tensor name, shape), once per linear.
    pub fn shared_mpo(&self) -> Vec<(Linear, String, [usize; 4])> {
        let mut out: Vec<(Linear, String, [usize; 4])> = Vec::new();
        for i in 0..self.num_hidden_layers {
            let plan = self.layer_plan(i);
            // names were checked against `Linear` when config.json was parsed
            for (lin, m) in plan.mpo.iter().filter_map(|(name, m)| Some((Linear::from_name(name)?, m))) {
                if m.shared_centre && !out.iter().any(|(l, _, _)| *l == lin) {
                    let c = m.centre();
                    out.push((lin, m.core_name(i, lin, c), m.core_shapes()[c]));
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
        assert!(matches!(ModelConfig::parse(&config(r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#), "c"), Err(ConfigError::Feature { .. })));
    }

    /// What the forward pass lacks is refused with the key named; what is off is off.
    #[test]
    fn unsupported_features_and_bad_rope_settings_are_refused() {
        let err = |extra: &str| ModelConfig::parse(&config(extra), "c").err().map(|e| e.to_string()).unwrap_or_default();
        let feature = |extra: &str, with: &str| match ModelConfig::parse(&config(extra), "c") {
            Err(ConfigError::Feature { what, .. }) => assert!(what.contains(with), "{extra}: {what}"),
            other => panic!("{extra}: expected a refused feature, got {other:?}"),
        };
        let invalid = |extra: &str, with: &str| match ModelConfig::parse(&config(extra), "c") {
            Err(ConfigError::Invalid { what, .. }) => assert!(what.contains(with), "{extra}: {what}"),
            other => panic!("{extra}: expected an invalid config, got {other:?}"),
        };
        // llama honours its bias switches; mistral's and qwen2's FFN modules have none
        let llama = ModelConfig::parse(&config(r#", "attention_bias": true, "mlp_bias": true"#), "c").unwrap();
        assert!(Linear::ALL.into_iter().all(|l| llama.own_bias(l)));
        let on = |t: &str, extra: &str, with: &str| match ModelConfig::parse(&config(extra).replace("llama", t), "c") {
            Err(ConfigError::Feature { what, .. }) => assert!(what.contains(with), "{t} {extra}: {what}"),
            other => panic!("{t} {extra}: expected a refused feature, got {other:?}"),
        };
        on("mistral", r#", "attention_bias": true"#, "mistral");
        on("qwen2", r#", "mlp_bias": true"#, "qwen2");
        feature(r#", "rope_scaling": {"type": "linear", "factor": 2.0}"#, "rope_scaling.type \"linear\"");
        feature(r#", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}"#, "rope_scaling.rope_type");
        for bad in [r#"{"rope_type": "llama3", "factor": 0}"#, r#"{"rope_type": "llama3", "factor": -2}"#, r#"{"rope_type": "llama3", "factor": "8"}"#] {
            invalid(&format!(r#", "rope_scaling": {bad}"#), "rope_scaling.factor");
        }
        invalid(r#", "rope_scaling": {"rope_type": "llama3", "low_freq_factor": 4, "high_freq_factor": 4}"#, "high_freq_factor");
        invalid(r#", "rope_scaling": {"rope_type": "llama3", "original_max_position_embeddings": 0}"#, "original_max_position_embeddings");
        invalid(r#", "rope_scaling": {"factor": 2}"#, "rope_type");
        invalid(r#", "rope_scaling": 3"#, "object");
        invalid(r#", "sliding_window": 0"#, "sliding_window");
        assert_eq!(err(r#", "attention_bias": false, "mlp_bias": false, "rope_scaling": null"#), "");
        // every llama3 frequency is finite with sane settings
        let c = ModelConfig::parse(&config(r#", "rope_scaling": {"rope_type": "llama3", "factor": 32, "low_freq_factor": 1, "high_freq_factor": 4, "original_max_position_embeddings": 8192}"#), "c").unwrap();
        assert!(c.inv_freq().iter().all(|f| f.is_finite() && *f > 0.0));
        // sliding windows: mistral's (4096 when not given), qwen2's only when switched on
        let with = |t: &str, extra: &str| ModelConfig::parse(&config(extra).replace("llama", t), "c").unwrap().attention_window();
        assert_eq!(with("mistral", ""), Some(4096));
        assert_eq!(with("mistral", r#", "sliding_window": null"#), None);
        assert_eq!(with("mistral", r#", "sliding_window": 512"#), Some(512));
        assert_eq!(with("qwen2", r#", "sliding_window": 512"#), None);
        assert_eq!(with("qwen2", r#", "sliding_window": 512, "use_sliding_window": false"#), None);
        assert_eq!(with("qwen2", r#", "sliding_window": 512, "use_sliding_window": true"#), Some(512));
        assert_eq!(with("llama", r#", "sliding_window": 512"#), None);
        let m = ModelConfig::parse(&config(r#", "sliding_window": 512"#).replace("llama", "mistral"), "m/config.json").unwrap();
        assert!(m.check_window(512, "per window").is_ok());
        let e = m.check_window(513, "per window (--seq-len)").unwrap_err().to_string();
        assert!(e.starts_with("m/config.json: sliding_window 512 is shorter than the 513 tokens per window (--seq-len)"), "{e}");
        // qwen2's q/k/v biases stay whatever attention_bias says
        assert!(ModelConfig::parse(&config(r#", "attention_bias": false"#).replace("llama", "qwen2"), "c").unwrap().qkv_bias());
    }
}
