//! Models: config.json, memory-mapped safetensors weights, tokenizer, and the GPU forward pass.

pub mod config;
pub mod decode;
pub mod forward;
pub mod reference;
pub mod synthetic;
pub mod tokens;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use config::ModelConfig;
pub use crate::format::weights::{self, WeightStore};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{0}: model folder does not exist")]
    NoDir(String),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Weights(#[from] weights::WeightError),
    #[error("{path}: cannot load tokenizer: {what}")]
    Tokenizer { path: String, what: String },
    #[error(transparent)]
    Input(#[from] crate::format::input::InputError),
}

/// A model folder: config, weights (memory-mapped), tokenizer if present.
pub struct Model {
    pub dir: PathBuf,
    pub cfg: ModelConfig,
    pub store: Arc<WeightStore>,
}

impl Model {
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::NoDir(dir.display().to_string()));
        }
        let cfg = ModelConfig::load(dir)?;
        let store = Arc::new(WeightStore::open(dir)?);
        check_shapes(&cfg, &store)?;
        Ok(Model { dir: dir.to_path_buf(), cfg, store })
    }

    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer, ModelError> {
        load_tokenizer(&self.dir)
    }
}

pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer, ModelError> {
    use crate::format::input::{self, InputKind};
    let path = dir.join("tokenizer.json");
    let bad = |e: tokenizers::Error| ModelError::Tokenizer { path: path.display().to_string(), what: e.to_string() };
    let mut tok = tokenizers::Tokenizer::from_bytes(input::read_bytes(&path, InputKind::Tokenizer)?).map_err(bad)?;
    // the tool cuts texts into windows itself: a truncation or padding setting in
    // tokenizer.json would drop or add tokens (and differently per streamed piece)
    tok.with_truncation(None).map_err(bad)?;
    tok.with_padding(None);
    Ok(tok)
}

/// Every tensor config.json implies exists with the implied shape (checked up front, so a
/// mismatch fails before any GPU work).
fn check_shapes(cfg: &ModelConfig, store: &WeightStore) -> Result<(), weights::WeightError> {
    let expect = |name: &str, want: &[usize]| -> Result<(), weights::WeightError> {
        store.check_dtype(name)?;
        let got = store.shape(name)?;
        if got != want {
            return Err(weights::WeightError::Shape { name: name.into(), got: got.to_vec(), want: want.to_vec() });
        }
        Ok(())
    };
    let d = cfg.hidden_size;
    expect(crate::format::names::EMBED, &[cfg.vocab_size, d])?;
    expect(crate::format::names::FINAL_NORM, &[d])?;
    if !cfg.tie_word_embeddings {
        expect(crate::format::names::LM_HEAD, &[cfg.vocab_size, d])?;
    }
    for i in 0..cfg.num_hidden_layers {
        let p = cfg.layer_plan(i);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        for (j, lin) in forward::LINEARS.iter().enumerate() {
            for (name, shape) in cfg.stored_tensors(&p, j, &crate::format::names::layer(i, lin)) {
                expect(&name, &shape)?;
            }
        }
        for (lin, m) in &p.mpo {
            let c = m.centre();
            if m.shared_centre {
                expect(&m.core_name(i, lin, c), &m.core_shapes()[c])?;
            }
        }
        expect(&crate::format::names::layer(i, "input_layernorm.weight"), &[d])?;
        expect(&crate::format::names::layer(i, "post_attention_layernorm.weight"), &[d])?;
        if cfg.qkv_bias() {
            for (n, out) in [("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)] {
                expect(&crate::format::names::layer(i, &format!("self_attn.{n}.bias")), &[out])?;
            }
        }
    }
    Ok(())
}
