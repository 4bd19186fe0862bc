//! Synthetic models: random weights with real (or tiny) LLaMA-family shapes written as a
//! Hugging Face folder, for tests and for benchmarking scale without downloads.

use std::collections::HashMap;
use std::path::Path;

use rand::{rngs::StdRng, Rng, SeedableRng};
use safetensors::{tensor::TensorView, Dtype};

use super::config::ModelConfig;

/// The shape of a synthetic llama-style model.
#[derive(Debug, Clone, Copy)]
pub struct Shape<'a> {
    pub model_type: &'a str,
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tied: bool,
}

/// config.json text for a llama-style model of the given shape.
pub fn config_json(shape: Shape) -> serde_json::Value {
    let Shape { model_type, layers, hidden, ffn, heads, kv_heads, vocab, tied } = shape;
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

type Tensor = (String, Vec<usize>, Vec<u8>);

/// Random f16 tensors scaled like a trained model's (uniform with std 1/sqrt(fan_in)),
/// norms near 1, handed to `sink` one group at a time: group 0 holds the embeddings, final
/// norm and untied head, group i+1 decoder layer i (so a 7B model never sits in memory).
fn random_tensor_groups(cfg: &ModelConfig, seed: u64, sink: &mut dyn FnMut(usize, Vec<Tensor>) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mat = |name: String, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut StdRng| -> Tensor {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n).flat_map(|_| half::f16::from_f32(offset + scale * rng.random_range(-1.0f32..1.0)).to_le_bytes()).collect();
        (name, shape, bytes)
    };
    let d = cfg.hidden_size;
    let s = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    let mut head = vec![mat(crate::format::names::EMBED.into(), vec![cfg.vocab_size, d], 1.0, 0.0, &mut rng), mat(crate::format::names::FINAL_NORM.into(), vec![d], 0.1, 1.0, &mut rng)];
    if !cfg.tie_word_embeddings {
        head.push(mat(crate::format::names::LM_HEAD.into(), vec![cfg.vocab_size, d], s(d), 0.0, &mut rng));
    }
    sink(0, head)?;
    for i in 0..cfg.num_hidden_layers {
        let p = |n: &str| crate::format::names::layer(i, n);
        let f = cfg.intermediate_size;
        let mut group = Vec::new();
        for (n, out, inp) in [
            ("self_attn.q_proj", cfg.q_dim(), d),
            ("self_attn.k_proj", cfg.kv_dim(), d),
            ("self_attn.v_proj", cfg.kv_dim(), d),
            ("self_attn.o_proj", d, cfg.q_dim()),
            ("mlp.gate_proj", f, d),
            ("mlp.up_proj", f, d),
            ("mlp.down_proj", d, f),
        ] {
            group.push(mat(p(&format!("{n}.weight")), vec![out, inp], s(inp), 0.0, &mut rng));
        }
        if cfg.qkv_bias() {
            for (n, out) in [("q_proj", cfg.q_dim()), ("k_proj", cfg.kv_dim()), ("v_proj", cfg.kv_dim())] {
                group.push(mat(p(&format!("self_attn.{n}.bias")), vec![out], 0.1, 0.0, &mut rng));
            }
        }
        group.push(mat(p("input_layernorm.weight"), vec![d], 0.1, 1.0, &mut rng));
        group.push(mat(p("post_attention_layernorm.weight"), vec![d], 0.1, 1.0, &mut rng));
        sink(i + 1, group)?;
    }
    Ok(())
}

fn serialize(tensors: &[Tensor], path: &Path) -> anyhow::Result<()> {
    let views: Vec<(String, TensorView)> = tensors.iter().map(|(n, sh, b)| Ok((n.clone(), TensorView::new(Dtype::F16, sh.clone(), b)?))).collect::<anyhow::Result<_>>()?;
    safetensors::serialize_to_file(views, Some(HashMap::from([("format".to_string(), "pt".to_string())])), path)?;
    Ok(())
}

/// Writes config.json and one model.safetensors with random f16 weights (small models).
pub fn write_random_model(dir: &Path, config: &serde_json::Value, seed: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(config)?;
    let cfg = ModelConfig::parse(&text, "synthetic config")?;
    let mut all = Vec::new();
    random_tensor_groups(&cfg, seed, &mut |_, g| {
        all.extend(g);
        Ok(())
    })?;
    serialize(&all, &dir.join("model.safetensors"))?;
    std::fs::write(dir.join("config.json"), text)?;
    Ok(())
}

/// Writes config.json and one safetensors shard per layer plus the index, generating one
/// layer at a time (models of any size in bounded host memory).
pub fn write_random_model_sharded(dir: &Path, config: &serde_json::Value, seed: u64, progress: &mut dyn FnMut(usize, usize)) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(config)?;
    let cfg = ModelConfig::parse(&text, "synthetic config")?;
    let n = cfg.num_hidden_layers + 1;
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    random_tensor_groups(&cfg, seed, &mut |g, tensors| {
        let file = format!("model-{:05}-of-{n:05}.safetensors", g + 1);
        serialize(&tensors, &dir.join(&file))?;
        for (name, _, b) in &tensors {
            weight_map.insert(name.clone(), file.clone().into());
            total += b.len() as u64;
        }
        progress(g + 1, n);
        Ok(())
    })?;
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    std::fs::write(dir.join("config.json"), text)?;
    Ok(())
}

/// Real model shapes for benchmarking at scale without downloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// LLaMA-2-7B: 32 layers, hidden 4096, FFN 11008, 32 heads (MHA), vocab 32000.
    Llama2_7b,
    /// LLaMA-3-8B: 32 layers, hidden 4096, FFN 14336, 32 heads / 8 KV heads, vocab 128256.
    Llama3_8b,
    /// Mistral-7B: 32 layers, hidden 4096, FFN 14336, 32 heads / 8 KV heads, vocab 32000.
    Mistral7b,
    /// SmolLM2-135M's shape: 30 layers, hidden 576, FFN 1536, 9 heads / 3 KV heads.
    Smollm2_135m,
}

impl Preset {
    /// config.json of the preset, with `layers` decoder layers if given.
    pub fn config(self, layers: Option<usize>) -> serde_json::Value {
        let mut c = match self {
            Preset::Llama2_7b => config_json(Shape { model_type: "llama", layers: 32, hidden: 4096, ffn: 11008, heads: 32, kv_heads: 32, vocab: 32000, tied: false }),
            Preset::Llama3_8b => {
                let mut c = config_json(Shape { model_type: "llama", layers: 32, hidden: 4096, ffn: 14336, heads: 32, kv_heads: 8, vocab: 128256, tied: false });
                c["rope_theta"] = 500000.0.into();
                c
            }
            Preset::Mistral7b => config_json(Shape { model_type: "mistral", layers: 32, hidden: 4096, ffn: 14336, heads: 32, kv_heads: 8, vocab: 32000, tied: false }),
            Preset::Smollm2_135m => {
                let mut c = config_json(Shape { model_type: "llama", layers: 30, hidden: 576, ffn: 1536, heads: 9, kv_heads: 3, vocab: 49152, tied: true });
                c["rope_theta"] = 100000.0.into();
                c
            }
        };
        if let Some(l) = layers {
            c["num_hidden_layers"] = l.into();
        }
        c
    }
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
