//! Tensor names in checkpoints: the one place that spells them (Hugging Face LLaMA
//! layout, plus this tool's factor pairs and MPO cores).

use super::linear::Linear;

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";
pub const INPUT_NORM: &str = "input_layernorm.weight";
pub const POST_NORM: &str = "post_attention_layernorm.weight";

/// `model.layers.{layer}.{rest}`.
pub fn layer(layer: usize, rest: &str) -> String {
    format!("model.layers.{layer}.{rest}")
}

/// `model.layers.{layer}.{linear}` (a linear's prefix, without a suffix).
pub fn linear_base(layer: usize, linear: Linear) -> String {
    format!("model.layers.{layer}.{}", linear.name())
}

/// `model.layers.{layer}.{linear}.{suffix}` (suffix: weight, bias, factor_a, ...).
pub fn linear(layer: usize, linear: Linear, suffix: &str) -> String {
    format!("model.layers.{layer}.{}.{suffix}", linear.name())
}

/// An MPO core stored with its layer: `{base}.mpo_core_{k}`.
pub fn mpo_core(base: &str, k: usize) -> String {
    format!("{base}.mpo_core_{k}")
}

/// The central MPO core shared by all layers: `model.mpo_shared.{linear}.mpo_core_{k}`.
pub fn shared_mpo_core(linear: Linear, k: usize) -> String {
    format!("model.mpo_shared.{}.mpo_core_{k}", linear.name())
}

/// The part of a layer tensor's name after `model.layers.{i}.`, if it is one.
pub fn within_layer(name: &str) -> Option<&str> {
    name.strip_prefix("model.layers.")?.split_once('.').map(|(_, rest)| rest)
}
