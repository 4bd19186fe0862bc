//! Synthetic models: random weights with real (or tiny) LLaMA-family shapes written as a
//! Hugging Face folder, for tests and for benchmarking scale without downloads.

use std::collections::HashMap;
use std::path::Path;

use rand::{rngs::StdRng, Rng, SeedableRng};
use safetensors::{tensor::TensorView, Dtype};

use super::config::ModelConfig;

/// config.json text for a llama-style model of the given shape.
#[allow(clippy::too_many_arguments)]
pub fn config_json(model_type: &str, layers: usize, hidden: usize, ffn: usize, heads: usize, kv_heads: usize, vocab: usize, tied: bool) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
    })
}

/// Writes config.json and model.safetensors with random f16 weights scaled like a trained
/// model's (std 1/sqrt(fan_in)), norms near 1.
pub fn write_random_model(dir: &Path, config: &serde_json::Value, seed: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(config)?;
    let cfg = ModelConfig::parse(&text, "synthetic config")?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut mat = |name: String, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut StdRng| {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n).flat_map(|_| half::f16::from_f32(offset + scale * rng.random_range(-1.0f32..1.0)).to_le_bytes()).collect();
        tensors.push((name, shape, bytes));
    };
    let d = cfg.hidden_size;
    let s = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    mat("model.embed_tokens.weight".into(), vec![cfg.vocab_size, d], 1.0, 0.0, &mut rng);
    mat("model.norm.weight".into(), vec![d], 0.1, 1.0, &mut rng);
    if !cfg.tie_word_embeddings {
        mat("lm_head.weight".into(), vec![cfg.vocab_size, d], s(d), 0.0, &mut rng);
    }
    for i in 0..cfg.num_hidden_layers {
        let p = |n: &str| format!("model.layers.{i}.{n}");
        let f = cfg.intermediate_size;
        for (n, out, inp) in [
            ("self_attn.q_proj", cfg.q_dim(), d),
            ("self_attn.k_proj", cfg.kv_dim(), d),
            ("self_attn.v_proj", cfg.kv_dim(), d),
            ("self_attn.o_proj", d, cfg.q_dim()),
            ("mlp.gate_proj", f, d),
            ("mlp.up_proj", f, d),
            ("mlp.down_proj", d, f),
        ] {
            mat(p(&format!("{n}.weight")), vec![out, inp], s(inp), 0.0, &mut rng);
        }
        if cfg.qkv_bias() {
            for (n, out) in [("q_proj", cfg.q_dim()), ("k_proj", cfg.kv_dim()), ("v_proj", cfg.kv_dim())] {
                mat(p(&format!("self_attn.{n}.bias")), vec![out], 0.1, 0.0, &mut rng);
            }
        }
        mat(p("input_layernorm.weight"), vec![d], 0.1, 1.0, &mut rng);
        mat(p("post_attention_layernorm.weight"), vec![d], 0.1, 1.0, &mut rng);
    }
    let views: Vec<(String, TensorView)> = tensors.iter().map(|(n, sh, b)| (n.clone(), TensorView::new(Dtype::F16, sh.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, Some(HashMap::from([("format".to_string(), "pt".to_string())])), &dir.join("model.safetensors"))?;
    std::fs::write(dir.join("config.json"), text)?;
    Ok(())
}

/// Writes a word-level tokenizer.json (whitespace pre-tokenizer) whose ids are below
/// `vocab`: `<unk>` = 0, then common English words, then `w3`, `w4`... (tests run the CLI on
/// synthetic models with it).
pub fn write_word_tokenizer(dir: &Path, vocab: usize) -> anyhow::Result<()> {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    const WORDS: &[&str] = &["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", ".", ",", "a", "of", "and", "to", "in", "is"];
    let mut map = std::collections::HashMap::new();
    map.insert("<unk>".to_string(), 0u32);
    for (i, w) in WORDS.iter().chain(std::iter::repeat(&"")).take(vocab.saturating_sub(1)).enumerate() {
        let id = i as u32 + 1;
        map.insert(if w.is_empty() { format!("w{id}") } else { w.to_string() }, id);
    }
    let model = WordLevel::builder().vocab(map.into_iter().collect()).unk_token("<unk>".into()).build().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
