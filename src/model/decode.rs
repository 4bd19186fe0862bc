//! Generation with a KV cache: every layer's keys and values for all positions a run may
//! reach are allocated once, before the first token; the prompt then runs in pieces and
//! each new token alone, attending to the cache. GPU memory is the same at every step
//! (the per-step buffers have the same sizes each time, so the pool hands back the same
//! ones), unlike the full recomputation, whose buffers grow with the sequence.

use crate::error::ErrorClass;
use crate::gpu::{attention, context::Result as GpuResult, rope, Gpu, GpuBuf};
use crate::model::config::ModelConfig;
use crate::model::forward::{ForwardError, LayerPass, LayerWeights, Runner};

/// Positions assumed when config.json gives no `max_position_embeddings` (transformers'
/// default for LLaMA).
pub const DEFAULT_POSITIONS: usize = 2048;
/// Positions never exceeded, whatever config.json says (position indices are 32-bit on
/// the GPU, and far beyond any cache that fits).
pub const MAX_POSITIONS: usize = 1 << 20;
/// Prompt tokens run through the layers at once (bounds the prompt's activations).
const PREFILL_TOKENS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("--max-new must be at least 1")]
    NoNewTokens,
    #[error("--prompt: tokenizes to nothing (an empty prompt)")]
    EmptyPrompt,
    #[error("--max-new {max_new}: the prompt's {prompt} tokens and {max_new} new ones exceed the model's {limit} positions ({source_of_limit}); at most {} new tokens fit", limit.saturating_sub(*prompt))]
    TooLong { prompt: usize, max_new: usize, limit: usize, source_of_limit: String },
    #[error("a KV cache of {positions} positions needs {bytes} bytes per layer for keys, over this GPU's storage binding limit of {limit} bytes; lower --max-new or shorten the prompt")]
    CacheTooLarge { positions: usize, bytes: u64, limit: u64 },
    #[error("stdout: {0}")]
    Output(std::io::Error),
}

impl DecodeError {
    /// The class of the errors that are about the request, not the model or the GPU
    /// (`Forward` is classified by its cause).
    pub fn class(&self) -> Option<ErrorClass> {
        match self {
            DecodeError::Forward(_) => None,
            DecodeError::NoNewTokens | DecodeError::EmptyPrompt | DecodeError::TooLong { .. } | DecodeError::CacheTooLarge { .. } => Some(ErrorClass::BadArgument),
            DecodeError::Output(_) => Some(ErrorClass::Other),
        }
    }
}

impl From<crate::gpu::GpuError> for DecodeError {
    fn from(e: crate::gpu::GpuError) -> Self {
        DecodeError::Forward(e.into())
    }
}

pub type Result<T> = std::result::Result<T, DecodeError>;

/// The positions a model handles: config.json's `max_position_embeddings` (capped at
/// `MAX_POSITIONS`), or `DEFAULT_POSITIONS` without one; and where that figure came from.
pub fn position_limit(cfg: &ModelConfig) -> (usize, String) {
    match cfg.raw.get("max_position_embeddings").and_then(|v| v.as_u64()).filter(|&n| n > 0) {
        Some(n) if n as usize > MAX_POSITIONS => (MAX_POSITIONS, format!("max_position_embeddings {n} in {}, capped at {MAX_POSITIONS}", cfg.path)),
        Some(n) => (n as usize, format!("max_position_embeddings in {}", cfg.path)),
        None => (DEFAULT_POSITIONS, format!("{} gives no max_position_embeddings; {DEFAULT_POSITIONS} assumed", cfg.path)),
    }
}

/// Checks a generation request before any GPU work: at least one new token, and the
/// prompt plus the new tokens within the model's positions. Returns the cache length.
pub fn check_request(cfg: &ModelConfig, prompt: usize, max_new: usize) -> Result<usize> {
    if prompt == 0 {
        return Err(DecodeError::EmptyPrompt);
    }
    if max_new == 0 {
        return Err(DecodeError::NoNewTokens);
    }
    let (limit, source_of_limit) = position_limit(cfg);
    match prompt.checked_add(max_new) {
        Some(n) if n <= limit => Ok(n),
        _ => Err(DecodeError::TooLong { prompt, max_new, limit, source_of_limit }),
    }
}

/// Keys and values of every layer for `capacity` positions, and the rope table for them.
pub struct KvCache {
    layers: Vec<(GpuBuf, GpuBuf)>,
    table: rope::RopeTable,
    capacity: usize,
    /// Positions filled.
    len: usize,
}

impl KvCache {
    /// Allocates everything up front, so a cache over the `--max-vram` budget or the GPU's
    /// binding limit fails before the first token.
    pub fn new(gpu: &Gpu, cfg: &ModelConfig, capacity: usize) -> Result<Self> {
        let kd = cfg.kv_dim();
        let elems = capacity.checked_mul(kd).filter(|&e| e <= gpu.max_binding_elems());
        let Some(elems) = elems else {
            return Err(DecodeError::CacheTooLarge { positions: capacity, bytes: capacity as u64 * kd as u64 * 4, limit: gpu.max_binding_bytes() });
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            layers.push((gpu.alloc(elems)?, gpu.alloc(elems)?));
        }
        let table = rope::RopeTable::from_inv_freq(gpu, capacity, &cfg.inv_freq())?;
        Ok(KvCache { layers, table, capacity, len: 0 })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// New tokens' hidden states h [tokens, d], at positions pos0...
struct Step<'a> {
    h: &'a GpuBuf,
    tokens: usize,
    pos0: usize,
}

/// One decoder layer for new tokens: `forward::layer_forward`'s operations in the same order
/// (the shared `LayerPass` parts), except that the new keys and values are written into the
/// layer's cache rows and attention reads the cache.
fn layer_step(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, cfg: &ModelConfig, lw: &LayerWeights, cache: (&GpuBuf, &GpuBuf), table: &rope::RopeTable, step: Step) -> GpuResult<GpuBuf> {
    let Step { h, tokens, pos0 } = step;
    let kd = cfg.kv_dim();
    let pass = LayerPass { gpu, cfg, lw, tokens };
    let (q, k, v) = pass.qkv(enc, h, None)?;
    rope::apply_at(gpu, enc, &q, tokens, cfg.n_heads(), pos0, table)?;
    rope::apply_at(gpu, enc, &k, tokens, cfg.n_kv_heads(), pos0, table)?;
    let (row, bytes) = ((pos0 * kd * 4) as u64, (tokens * kd * 4) as u64);
    enc.copy_buffer_to_buffer(k.raw(), 0, cache.0.raw(), row, bytes);
    enc.copy_buffer_to_buffer(v.raw(), 0, cache.1.raw(), row, bytes);
    drop((k, v));
    let att = gpu.alloc(tokens * cfg.q_dim())?;
    let shape = attention::CachedShape { tokens, pos0, n_heads: cfg.n_heads(), n_kv: cfg.n_kv_heads(), head_dim: cfg.head_dim() };
    attention::cached_attention(gpu, enc, shape, &q, cache.0, cache.1, &att)?;
    drop(q);
    let (h2, a) = pass.after_attention(enc, h, att, None)?;
    pass.down_and_residual(enc, &h2, a)
}

/// Runs `tokens` at the cache's next positions and returns the logits of the last one.
pub fn feed(runner: &mut Runner, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>> {
    let n = tokens.len();
    assert!(n > 0 && cache.len + n <= cache.capacity, "feed: {n} tokens at position {} of a cache of {}", cache.len, cache.capacity);
    let mut h = runner.embed(tokens)?;
    for i in 0..runner.cfg.num_hidden_layers {
        let (kc, vc) = &cache.layers[i];
        let (table, pos0) = (&cache.table, cache.len);
        h = runner.with_layer(i, |gpu, cfg, lw| {
            let mut enc = gpu.encoder();
            let next = layer_step(gpu, &mut enc, cfg, lw, (kc, vc), table, Step { h: &h, tokens: n, pos0 })?;
            gpu.submit(enc);
            Ok(next)
        })?;
    }
    cache.len += n;
    Ok(runner.logits_rows(&h, n, &[n - 1])?.pop().unwrap_or_default())
}

/// The index of the largest logit (the first of equals, as the full recomputation picks).
fn argmax(logits: &[f32]) -> u32 {
    logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32
}

/// Greedy continuation of `prompt` with a KV cache: up to `max_new` tokens, stopping at
/// `stop`; `on_token` sees each new token as soon as it is chosen (an error from it ends
/// the run). The cache is sized for prompt + max_new, checked by `check_request`.
pub fn generate(runner: &mut Runner, prompt: &[u32], max_new: usize, stop: Option<u32>, on_token: &mut dyn FnMut(u32) -> std::io::Result<()>) -> Result<Vec<u32>> {
    let capacity = check_request(&runner.cfg, prompt.len(), max_new)?;
    let mut cache = KvCache::new(&runner.gpu, &runner.cfg, capacity)?;
    let mut logits = Vec::new();
    for piece in prompt.chunks(PREFILL_TOKENS) {
        logits = feed(runner, &mut cache, piece)?;
    }
    let mut new = Vec::new();
    loop {
        let next = argmax(&logits);
        if Some(next) == stop {
            break;
        }
        new.push(next);
        on_token(next).map_err(DecodeError::Output)?;
        if new.len() == max_new {
            break;
        }
        logits = feed(runner, &mut cache, &[next])?;
    }
    Ok(new)
}
