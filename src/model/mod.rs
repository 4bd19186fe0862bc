//! Models: config.json, memory-mapped safetensors weights, tokenizer, and the GPU forward pass.

pub mod config;
pub mod decode;
pub mod forward;
pub mod reference;
pub mod synthetic;
pub mod tokens;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use crate::format::linear::Linear;

pub use config::ModelConfig;
pub use crate::format::digest::Digest;
pub use crate::format::weights::{self, WeightStore};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{0}: model folder does not exist")]
    NoDir(String),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Weights(#[from] weights::WeightError),
    #[error("{0}: no tokenizer.json in the model folder")]
    NoTokenizer(String),
    #[error("{path}: cannot load tokenizer: {what}")]
    Tokenizer { path: String, what: String },
    #[error(transparent)]
    Input(#[from] crate::format::input::InputError),
    #[error("{tokenizer}: token {token:?} has id {id}, outside the vocabulary of {vocab} in {config}; the tokenizer does not belong to this model")]
    Vocabulary { tokenizer: String, config: String, token: String, id: u32, vocab: usize },
}

/// A model folder: config, weights (memory-mapped), tokenizer if present.
pub struct Model {
    pub dir: PathBuf,
    pub cfg: ModelConfig,
    pub store: Arc<WeightStore>,
    /// The digest of the weights and the magnitude limit they were checked against, once
    /// `check_weights` has read them (so a run reads them for that only once).
    checked: OnceLock<(f64, Digest)>,
}

impl Model {
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::NoDir(dir.display().to_string()));
        }
        let cfg = ModelConfig::load(dir)?;
        let store = Arc::new(WeightStore::open(dir)?);
        check_shapes(&cfg, &store)?;
        Ok(Model { dir: dir.to_path_buf(), cfg, store, checked: OnceLock::new() })
    }

    /// The tokenizer, checked against config.json: every id it can produce must be inside
    /// the model's vocabulary (otherwise the first text with such a token would fail late,
    /// or a window of text would be embedded from another model's rows).
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer, ModelError> {
        let tok = load_tokenizer(&self.dir)?;
        if let Some((token, &id)) = tok.get_vocab(true).iter().max_by_key(|(_, &id)| id) {
            if id as usize >= self.cfg.vocab_size {
                return Err(ModelError::Vocabulary {
                    tokenizer: self.dir.join("tokenizer.json").display().to_string(),
                    config: self.dir.join("config.json").display().to_string(),
                    token: token.clone(),
                    id,
                    vocab: self.cfg.vocab_size,
                });
            }
        }
        Ok(tok)
    }

    /// Reads every tensor the model uses once (in parallel): refuses NaN, infinities and
    /// magnitudes above `max_abs`, naming the tensor and its file, and returns the digest of
    /// their content. Later calls with a limit no lower return the digest without reading
    /// again. `progress` gets (bytes done, bytes in all).
    pub fn check_weights(&self, max_abs: f64, progress: &mut dyn FnMut(u64, u64)) -> Result<Digest, ModelError> {
        if let Some(&(limit, digest)) = self.checked.get() {
            if max_abs >= limit {
                return Ok(digest);
            }
        }
        let names: Vec<String> = expected_tensors(&self.cfg).into_iter().map(|(n, _)| n).collect();
        let digest = self.store.scan(&names, max_abs, progress)?;
        let _ = self.checked.set((max_abs, digest));
        Ok(digest)
    }

    /// The weights' content digest (for `--resume` fingerprints): the one `check_weights`
    /// found, or, when nothing checked them yet, a check with the default limit.
    pub fn weights_digest(&self) -> Result<Digest, ModelError> {
        match self.checked.get() {
            Some(&(_, digest)) => Ok(digest),
            None => self.check_weights(weights::DEFAULT_MAX_ABS, &mut |_, _| {}),
        }
    }
}

pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer, ModelError> {
    use crate::format::input::{self, InputKind};
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(ModelError::NoTokenizer(dir.display().to_string()));
    }
    // one line: the tokenizers crate's messages may span several
    let bad = |e: tokenizers::Error| ModelError::Tokenizer { path: path.display().to_string(), what: e.to_string().replace('\n', " ") };
    let mut tok = tokenizers::Tokenizer::from_bytes(input::read_bytes(&path, InputKind::Tokenizer)?).map_err(bad)?;
    // the tool cuts texts into windows itself: a truncation or padding setting in
    // tokenizer.json would drop or add tokens (and differently per streamed piece)
    tok.with_truncation(None).map_err(bad)?;
    tok.with_padding(None);
    Ok(tok)
}

/// Every tensor config.json implies, with the shape it implies, in a fixed order (the
/// embeddings, final norm and untied head, then layer by layer): what a forward pass or a
/// compression reads.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    use crate::format::names;
    let d = cfg.hidden_size;
    let mut out = vec![(names::EMBED.to_string(), vec![cfg.vocab_size, d]), (names::FINAL_NORM.to_string(), vec![d])];
    if !cfg.tie_word_embeddings {
        out.push((names::LM_HEAD.to_string(), vec![cfg.vocab_size, d]));
    }
    let mut shared: Vec<String> = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        let p = cfg.layer_plan(i);
        for lin in Linear::ALL {
            out.extend(cfg.stored_tensors(&p, lin, &names::linear_base(i, lin)));
        }
        // names were checked against `Linear` when config.json was parsed
        for (lin, m) in p.mpo.iter().filter_map(|(name, m)| Some((Linear::from_name(name)?, m))) {
            let c = m.centre();
            let name = m.core_name(i, lin, c);
            if m.shared_centre && !shared.contains(&name) {
                shared.push(name.clone());
                out.push((name, m.core_shapes()[c].to_vec()));
            }
        }
        out.push((names::layer(i, "input_layernorm.weight"), vec![d]));
        out.push((names::layer(i, "post_attention_layernorm.weight"), vec![d]));
    }
    out
}

/// Every tensor config.json implies exists with the implied shape (checked up front, so a
/// mismatch fails before any GPU work).
fn check_shapes(cfg: &ModelConfig, store: &WeightStore) -> Result<(), weights::WeightError> {
    for (name, want) in expected_tensors(cfg) {
        store.check_dtype(&name)?;
        let got = store.shape(&name)?;
        if got != want.as_slice() {
            return Err(weights::WeightError::Shape { name, got: got.to_vec(), want });
        }
    }
    Ok(())
}
