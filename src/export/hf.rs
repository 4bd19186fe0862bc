//! `export --format hf`: a compressed model as a Hugging Face folder that transformers loads
//! at its compressed size through custom code (`trust_remote_code=True`): the same tensors
//! (factor pairs renamed `factor_a.weight` / `factor_b.weight`, the two nn.Linear that hold
//! them), config.json with `model_type: lorap` and an `auto_map` naming the two Python files
//! written beside it (`configuration_lorap.py`, `modeling_lorap.py`, embedded in this
//! binary), the tokenizer, and a tokenizer_config.json when the model had none (so
//! `AutoTokenizer` knows the class without guessing it from the model type).
//!
//! The compressed folder itself stays byte for byte as `compress` writes it (its shards and
//! config.json are hashed by `scripts/golden-md5.sh`): the custom code goes into a new folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::error::CompressError;
use crate::format::linear::Linear;
use crate::format::output::{OutTensor, OutputFolder};
use crate::model::Model;

pub const MODELING: &str = include_str!("hf/modeling_lorap.py");
pub const CONFIGURATION: &str = include_str!("hf/configuration_lorap.py");

/// The checkpoint name transformers' module tree gives a stored tensor (`factor_a` and
/// `factor_b` are nn.Linear there; everything else keeps its name).
fn module_name(stored: &str) -> String {
    if stored.ends_with(".factor_a") || stored.ends_with(".factor_b") {
        format!("{stored}.weight")
    } else {
        stored.to_string()
    }
}

fn renamed(store: &crate::format::WeightStore, name: &str) -> Result<OutTensor> {
    let mut t = OutTensor::copied(store, name)?;
    t.name = module_name(name);
    Ok(t)
}

/// config.json for the custom code: the compressed config with the model type and class
/// names transformers resolves through `auto_map`.
fn hf_config(model: &Model) -> Value {
    let mut c = model.cfg.raw.clone();
    let base = c.get("model_type").cloned().unwrap_or(json!("llama"));
    c.insert("model_type".into(), json!("lorap"));
    c.insert("lorap_base_model_type".into(), base);
    c.insert("lorap_qkv_bias".into(), json!(model.cfg.qkv_bias()));
    // the model's own biases by linear (the compression's are in each layer's `biases`)
    let own: Vec<&str> = Linear::ALL.into_iter().filter(|&l| model.cfg.own_bias(l)).map(|l| l.short()).collect();
    c.insert("lorap_own_biases".into(), json!(own));
    c.insert("architectures".into(), json!(["LorapForCausalLM"]));
    c.insert("auto_map".into(), json!({"AutoConfig": "configuration_lorap.LorapConfig", "AutoModelForCausalLM": "modeling_lorap.LorapForCausalLM"}));
    Value::Object(c)
}

/// A tokenizer_config.json naming the generic fast tokenizer and the special tokens by text.
fn tokenizer_config(model: &Model) -> Result<Value> {
    let tok = model.tokenizer()?;
    let text = |id: Option<u64>| id.and_then(|i| tok.id_to_token(i as u32));
    let cfg = &model.cfg;
    let bos = text(cfg.bos_token_id.as_ref().and_then(|v| v.as_u64()));
    let eos = text(cfg.eos_token_id.as_ref().and_then(|e| e.first()).map(u64::from));
    let pad = text(cfg.raw.get("pad_token_id").and_then(|v| v.as_u64()));
    let ctx = cfg.raw.get("max_position_embeddings").and_then(|v| v.as_u64()).unwrap_or(2048);
    // no BOS added: the tool's own evaluation scores texts as tokenized, without one
    Ok(json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad.or(eos.clone()),
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": ctx,
    }))
}

/// Writes `model` (compressed by this tool) with the custom code into `out`.
pub fn export_hf(model: &Model, out: &Path, force: bool, progress: &mut dyn FnMut(usize, usize)) -> Result<PathBuf> {
    let cfg = &model.cfg;
    if cfg.lorap.is_none() {
        return Err(CompressError::BadArgument(format!("{}: not a compressed model (no `lorap` section in config.json); a dense model loads in transformers as it is", model.dir.display())).into());
    }
    let store = &model.store;
    let n = cfg.num_hidden_layers;
    let mut folder = OutputFolder::create(out, &model.dir, force, n + 1)?;
    for i in 0..n {
        progress(i, n);
        let plan = cfg.layer_plan(i);
        let mut tensors = Vec::new();
        for lin in Linear::ALL {
            // weights, factors or cores, and the bias where the linear has one
            for (name, _) in cfg.stored_tensors(&plan, lin, &crate::format::names::linear_base(i, lin)) {
                tensors.push(renamed(store, &name)?);
            }
        }
        for m in [crate::format::names::INPUT_NORM, crate::format::names::POST_NORM] {
            tensors.push(renamed(store, &crate::format::names::layer(i, m))?);
        }
        folder.write_shard(i, &tensors)?;
    }
    let mut rest = Vec::new();
    for t in [crate::format::names::EMBED, crate::format::names::FINAL_NORM, crate::format::names::LM_HEAD] {
        if store.contains(t) {
            rest.push(renamed(store, t)?);
        }
    }
    for (_, name, _) in cfg.shared_mpo() {
        rest.push(renamed(store, &name)?);
    }
    folder.write_shard(n, &rest)?;
    folder.write_json("config.json", &hf_config(model))?;
    folder.write_file("configuration_lorap.py", CONFIGURATION.as_bytes())?;
    folder.write_file("modeling_lorap.py", MODELING.as_bytes())?;
    folder.copy_side_files(&model.dir)?;
    if !model.dir.join("tokenizer_config.json").exists() {
        folder.write_json("tokenizer_config.json", &tokenizer_config(model)?).context("writing tokenizer_config.json")?;
    }
    progress(n, n);
    folder.finish().context("finishing the export folder")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factor_pairs_take_the_names_of_their_linears() {
        assert_eq!(module_name("model.layers.0.self_attn.q_proj.factor_a"), "model.layers.0.self_attn.q_proj.factor_a.weight");
        assert_eq!(module_name("model.layers.0.self_attn.q_proj.factor_b"), "model.layers.0.self_attn.q_proj.factor_b.weight");
        assert_eq!(module_name("model.layers.0.mlp.up_proj.mpo_core_1"), "model.layers.0.mlp.up_proj.mpo_core_1");
        assert_eq!(module_name("model.embed_tokens.weight"), "model.embed_tokens.weight");
    }
}
