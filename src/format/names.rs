//! Tensor names in checkpoints: the one place that spells them (Hugging Face LLaMA
//! layout, plus this tool's factor pairs and MPO cores).

use super::linear::LINEARS;

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";
pub const INPUT_NORM: &str = "input_layernorm.weight";
pub const POST_NORM: &str = "post_attention_layernorm.weight";

/// `model.layers.{layer}.{rest}`.
pub fn layer(layer: usize, rest: &str) -> String {
    format!("model.layers.{layer}.{rest}")
}

/// `model.layers.{layer}.{linear j}` (a linear's prefix, without a suffix).
pub fn linear_base(layer: usize, j: usize) -> String {
    format!("model.layers.{layer}.{}", LINEARS[j])
}

/// `model.layers.{layer}.{linear j}.{suffix}` (suffix: weight, bias, factor_a, ...).
pub fn linear(layer: usize, j: usize, suffix: &str) -> String {
    format!("model.layers.{layer}.{}.{suffix}", LINEARS[j])
}

/// An MPO core stored with its layer: `{base}.mpo_core_{k}`.
pub fn mpo_core(base: &str, k: usize) -> String {
    format!("{base}.mpo_core_{k}")
}

/// The central MPO core shared by all layers: `model.mpo_shared.{linear}.mpo_core_{k}`.
pub fn shared_mpo_core(linear: &str, k: usize) -> String {
    format!("model.mpo_shared.{linear}.mpo_core_{k}")
}

/// The part of a layer tensor's name after `model.layers.{i}.`, if it is one.
pub fn within_layer(name: &str) -> Option<&str> {
    name.strip_prefix("model.layers.")?.split_once('.').map(|(_, rest)| rest)
}
