//! Decoder forward pass on the GPU: per-layer weights (dense, low-rank factor pairs or
//! pruned FFNs) uploaded one layer at a time, all windows run through a layer before the
//! next is loaded, and the final norm + lm_head + token NLL computed in row chunks.

use std::sync::Arc;

use crate::gpu::{attention, context::Result as GpuResult, elementwise, loss, matmul, norms, rope, Gpu, GpuBuf};
use crate::format::plan::{LayerPlan, LinearRepr, MpoShape};
use crate::model::config::ModelConfig;
use crate::format::weights::{WeightError, WeightStore};

/// Weights of one linear layer y = x W^T (+ bias), W [out, inp] or W ~ A B.
pub enum LinearKind {
    Dense { w: GpuBuf },
    /// A [out, rank], B [rank, inp].
    LowRank { a: GpuBuf, b: GpuBuf, rank: usize },
}

/// f16 copies of a linear's weights for the cooperative-matrix (tensor core) GEMM, made only
/// where the adapter runs it (`Gpu::coop_f16`): the forward products then take f16 weights and
/// accumulate in f32, while the f32 weights stay for the decompositions and the channel scores.
pub enum HalfWeights {
    Dense(matmul::F16Weight),
    /// A [out, rank], B [rank, inp].
    LowRank { a: matmul::F16Weight, b: matmul::F16Weight },
}

impl HalfWeights {
    fn bytes(&self) -> u64 {
        match self {
            HalfWeights::Dense(w) => w.buf.bytes(),
            HalfWeights::LowRank { a, b } => a.buf.bytes() + b.buf.bytes(),
        }
    }
}

/// The f16 copy of host values [rows, cols].
fn half_copy(gpu: &Gpu, v: &[f32], rows: usize, cols: usize) -> GpuResult<matmul::F16Weight> {
    let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
    matmul::F16Weight::upload(gpu, &h, rows, cols)
}

pub struct GpuLinear {
    pub out: usize,
    pub inp: usize,
    pub kind: LinearKind,
    pub bias: Option<GpuBuf>,
    /// f16 copies for the cooperative-matrix GEMM (None: f32 products only).
    pub half: Option<HalfWeights>,
}

impl GpuLinear {
    /// A dense linear from host weights W [out, inp], with their f16 copy where the adapter
    /// runs the cooperative-matrix GEMM.
    pub fn dense(gpu: &Gpu, out: usize, inp: usize, w: &[f32], bias: Option<GpuBuf>) -> GpuResult<Self> {
        let half = if gpu.coop_f16() { Some(HalfWeights::Dense(half_copy(gpu, w, out, inp)?)) } else { None };
        Ok(GpuLinear { out, inp, kind: LinearKind::Dense { w: gpu.upload(w)? }, bias, half })
    }

    /// A factor pair A [out, rank], B [rank, inp] from host values (f16 copies as `dense`).
    pub fn low_rank(gpu: &Gpu, out: usize, inp: usize, a: &[f32], b: &[f32], rank: usize, bias: Option<GpuBuf>) -> GpuResult<Self> {
        let half = if gpu.coop_f16() { Some(HalfWeights::LowRank { a: half_copy(gpu, a, out, rank)?, b: half_copy(gpu, b, rank, inp)? }) } else { None };
        Ok(GpuLinear { out, inp, kind: LinearKind::LowRank { a: gpu.upload(a)?, b: gpu.upload(b)?, rank }, bias, half })
    }

    /// y [rows, out] = x [rows, inp] W^T (+ bias).
    pub fn forward(&self, gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, rows: usize) -> GpuResult<GpuBuf> {
        let y = gpu.alloc(rows * self.out)?;
        match (&self.kind, &self.half) {
            (LinearKind::Dense { .. }, Some(HalfWeights::Dense(w))) => {
                matmul::linear_f16_coop(gpu, enc, x, w, &y, matmul::GemmShape { m: rows, n: self.out, k: self.inp }, 0.0)?
            }
            (LinearKind::LowRank { rank, .. }, Some(HalfWeights::LowRank { a, b })) => {
                let t = gpu.alloc(rows * rank)?;
                matmul::linear_f16_coop(gpu, enc, x, b, &t, matmul::GemmShape { m: rows, n: *rank, k: self.inp }, 0.0)?;
                matmul::linear_f16_coop(gpu, enc, &t, a, &y, matmul::GemmShape { m: rows, n: self.out, k: *rank }, 0.0)?;
            }
            (LinearKind::Dense { w }, _) => matmul::linear_into(gpu, enc, x, w, &y, matmul::GemmShape { m: rows, n: self.out, k: self.inp }, 0.0)?,
            (LinearKind::LowRank { a, b, rank }, _) => {
                let t = gpu.alloc(rows * rank)?;
                matmul::linear_into(gpu, enc, x, b, &t, matmul::GemmShape { m: rows, n: *rank, k: self.inp }, 0.0)?;
                matmul::linear_into(gpu, enc, &t, a, &y, matmul::GemmShape { m: rows, n: self.out, k: *rank }, 0.0)?;
            }
        }
        if let Some(b) = &self.bias {
            elementwise::add_bias(gpu, enc, &y, b, rows, self.out)?;
        }
        Ok(y)
    }

    pub fn params(&self) -> usize {
        match &self.kind {
            LinearKind::Dense { .. } => self.out * self.inp,
            LinearKind::LowRank { rank, .. } => rank * (self.out + self.inp),
        }
    }
}

pub use crate::format::linear::{Linear, PerLinear};

/// Where a linear's input comes from, for observers collecting activation statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// Normed input of q/k/v.
    AttnInput,
    /// Attention output, input of o_proj.
    OInput,
    /// Normed input of gate/up.
    FfnInput,
    /// silu(gate) * up, input of down_proj.
    DownInput,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::AttnInput, Site::OInput, Site::FfnInput, Site::DownInput];

    /// Where `linear` takes its input from.
    pub const fn of(linear: Linear) -> Site {
        match linear {
            Linear::Q | Linear::K | Linear::V => Site::AttnInput,
            Linear::O => Site::OInput,
            Linear::Gate | Linear::Up => Site::FfnInput,
            Linear::Down => Site::DownInput,
        }
    }

    /// Position in per-site arrays (the order above).
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// Sees the inputs of a layer's linears as the forward pass produces them.
pub trait Observer {
    fn see(&mut self, gpu: &Gpu, enc: &mut wgpu::CommandEncoder, site: Site, x: &GpuBuf, rows: usize, cols: usize) -> GpuResult<()>;
}

pub struct LayerWeights {
    pub q: GpuLinear,
    pub k: GpuLinear,
    pub v: GpuLinear,
    pub o: GpuLinear,
    pub gate: GpuLinear,
    pub up: GpuLinear,
    pub down: GpuLinear,
    pub in_norm: GpuBuf,
    pub post_norm: GpuBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    #[error(transparent)]
    Config(#[from] crate::model::config::ConfigError),
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("window of {window} tokens: {what}")]
    BadWindow { window: usize, what: String },
}

pub type Result<T> = std::result::Result<T, ForwardError>;

/// Dense [out, in] matrix of MPO-stored `linear` of layer `layer` (cores contracted on
/// the CPU in f64).
pub fn mpo_dense(store: &WeightStore, layer: usize, linear: Linear, shape: &MpoShape) -> std::result::Result<Vec<f32>, WeightError> {
    let mut cores = Vec::new();
    for (k, s) in shape.core_shapes().iter().enumerate() {
        let data = store.f32(&shape.core_name(layer, linear, k), s)?;
        cores.push(crate::format::mpo::Core { left: s[0], i: s[1], j: s[2], right: s[3], data: data.iter().map(|&x| x as f64).collect() });
    }
    let m = crate::format::mpo::Mpo { rows: shape.row_factors.iter().product(), cols: shape.col_factors.iter().product(), cores, discarded: vec![] };
    Ok(m.reconstruct().iter().map(|&x| x as f32).collect())
}

/// Uploads `linear` of layer `layer` as plan `p` stores it (MPO cores are contracted
/// into a dense matrix: the format is about size on disk, the forward pass runs dense).
fn load_linear(gpu: &Gpu, store: &WeightStore, cfg: &ModelConfig, p: &LayerPlan, layer: usize, linear: Linear) -> Result<GpuLinear> {
    let (out, inp) = cfg.linear_shape(p, linear);
    let name = crate::format::names::linear_base(layer, linear);
    let bias = if cfg.has_bias(p, linear) { Some(gpu.upload(&store.f32(&format!("{name}.bias"), &[out])?)?) } else { None };
    Ok(match p.repr(linear) {
        LinearRepr::Dense => GpuLinear::dense(gpu, out, inp, &store.f32(&format!("{name}.weight"), &[out, inp])?, bias)?,
        LinearRepr::LowRank(r) => {
            let (a, b) = (store.f32(&format!("{name}.factor_a"), &[out, r])?, store.f32(&format!("{name}.factor_b"), &[r, inp])?);
            GpuLinear::low_rank(gpu, out, inp, &a, &b, r, bias)?
        }
        LinearRepr::Mpo(m) => GpuLinear::dense(gpu, out, inp, &mpo_dense(store, layer, linear, &m)?, bias)?,
    })
}

/// A dense decoder layer's tensors converted to f32 on the host: the compression pipeline
/// reads the next layer on another thread while the GPU works on the current one, and
/// methods take their weights from here instead of converting them again.
pub struct DenseHost {
    pub layer: usize,
    /// The seven linears' weights [out, in].
    pub weights: PerLinear<Vec<f32>>,
    /// The model's own biases where it has them (`ModelConfig::own_bias`).
    pub biases: PerLinear<Option<Vec<f32>>>,
    pub in_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
}

impl DenseHost {
    /// Reads dense layer `i` (no GPU involved: safe on any thread).
    pub fn read(store: &WeightStore, cfg: &ModelConfig, i: usize) -> Result<Self> {
        let full = LayerPlan { ffn_width: cfg.intermediate_size, ..Default::default() };
        let d = cfg.hidden_size;
        let mut weights = PerLinear::<Vec<f32>>::default();
        let mut biases = PerLinear::<Option<Vec<f32>>>::default();
        for lin in Linear::ALL {
            let (out, inp) = cfg.linear_shape(&full, lin);
            let name = crate::format::names::linear_base(i, lin);
            weights[lin] = store.f32(&format!("{name}.weight"), &[out, inp])?;
            if cfg.own_bias(lin) {
                biases[lin] = Some(store.f32(&format!("{name}.bias"), &[out])?);
            }
        }
        let n = |s: &str| crate::format::names::layer(i, s);
        Ok(DenseHost { layer: i, weights, biases, in_norm: store.f32(&n("input_layernorm.weight"), &[d])?, post_norm: store.f32(&n("post_attention_layernorm.weight"), &[d])? })
    }

    /// The layer on the GPU.
    pub fn upload(&self, gpu: &Gpu, cfg: &ModelConfig) -> Result<LayerWeights> {
        let full = LayerPlan { ffn_width: cfg.intermediate_size, ..Default::default() };
        let lin = |l: Linear| -> Result<GpuLinear> {
            let (out, inp) = cfg.linear_shape(&full, l);
            let bias = match &self.biases[l] {
                Some(b) => Some(gpu.upload(b)?),
                None => None,
            };
            Ok(GpuLinear::dense(gpu, out, inp, &self.weights[l], bias)?)
        };
        LayerWeights::assemble(lin, || Ok((gpu.upload(&self.in_norm)?, gpu.upload(&self.post_norm)?)))
    }
}

impl LayerWeights {
    /// Uploads decoder layer `i` as config.json (and its lorap section) describes it.
    pub fn load(gpu: &Gpu, store: &WeightStore, cfg: &ModelConfig, i: usize) -> Result<Self> {
        let p = cfg.layer_plan(i);
        let d = cfg.hidden_size;
        let n = |s: &str| crate::format::names::layer(i, s);
        let lin = |l: Linear| load_linear(gpu, store, cfg, &p, i, l);
        LayerWeights::assemble(lin, || Ok((gpu.upload(&store.f32(&n("input_layernorm.weight"), &[d])?)?, gpu.upload(&store.f32(&n("post_attention_layernorm.weight"), &[d])?)?)))
    }

    /// A layer from each linear's constructor (called in `Linear::ALL` order) and then the
    /// two norms'.
    fn assemble(lin: impl Fn(Linear) -> Result<GpuLinear>, norms: impl FnOnce() -> Result<(GpuBuf, GpuBuf)>) -> Result<Self> {
        let (q, k, v, o) = (lin(Linear::Q)?, lin(Linear::K)?, lin(Linear::V)?, lin(Linear::O)?);
        let (gate, up, down) = (lin(Linear::Gate)?, lin(Linear::Up)?, lin(Linear::Down)?);
        let (in_norm, post_norm) = norms()?;
        Ok(LayerWeights { q, k, v, o, gate, up, down, in_norm, post_norm })
    }

    pub fn linear_mut(&mut self, linear: Linear) -> &mut GpuLinear {
        match linear {
            Linear::Q => &mut self.q,
            Linear::K => &mut self.k,
            Linear::V => &mut self.v,
            Linear::O => &mut self.o,
            Linear::Gate => &mut self.gate,
            Linear::Up => &mut self.up,
            Linear::Down => &mut self.down,
        }
    }

    /// Replaces `linear` by `lin`, keeping the old one's bias.
    pub fn replace_linear(&mut self, linear: Linear, lin: GpuLinear) {
        let slot = self.linear_mut(linear);
        let bias = slot.bias.take();
        *slot = GpuLinear { bias, ..lin };
    }

    pub fn bytes(&self) -> u64 {
        let lin = |l: &GpuLinear| {
            let w = match &l.kind {
                LinearKind::Dense { w } => w.bytes(),
                LinearKind::LowRank { a, b, .. } => a.bytes() + b.bytes(),
            };
            w + l.bias.as_ref().map_or(0, |b| b.bytes()) + l.half.as_ref().map_or(0, |h| h.bytes())
        };
        [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down].iter().map(|l| lin(l)).sum::<u64>() + self.in_norm.bytes() + self.post_norm.bytes()
    }
}

/// Hidden states h [tokens, d] of whole windows of `window` tokens.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    pub h: &'a GpuBuf,
    pub tokens: usize,
    pub window: usize,
}

/// Runs decoder layer `lw` on a batch of hidden states and returns the new hidden states.
pub fn layer_forward(
    gpu: &Gpu,
    enc: &mut wgpu::CommandEncoder,
    cfg: &ModelConfig,
    lw: &LayerWeights,
    table: &rope::RopeTable,
    batch: Batch,
    obs: Option<&mut dyn Observer>,
) -> GpuResult<GpuBuf> {
    let tokens = batch.tokens;
    let (h2, a) = up_to_down_input(gpu, enc, cfg, lw, table, batch, obs)?;
    LayerPass { gpu, cfg, lw, tokens }.down_and_residual(enc, &h2, a)
}

/// Shows `obs` the inputs of every linear of layer `lw` and nothing more: down_proj and the
/// last residual are skipped (a statistics pass throws the layer's output away).
pub fn observe_inputs(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, cfg: &ModelConfig, lw: &LayerWeights, table: &rope::RopeTable, batch: Batch, obs: &mut dyn Observer) -> GpuResult<()> {
    up_to_down_input(gpu, enc, cfg, lw, table, batch, Some(obs)).map(drop)
}

/// The layer up to down_proj's input: (h + attention, silu(gate) * up).
fn up_to_down_input(
    gpu: &Gpu,
    enc: &mut wgpu::CommandEncoder,
    cfg: &ModelConfig,
    lw: &LayerWeights,
    table: &rope::RopeTable,
    batch: Batch,
    mut obs: Option<&mut dyn Observer>,
) -> GpuResult<(GpuBuf, GpuBuf)> {
    let Batch { h, tokens, window } = batch;
    let pass = LayerPass { gpu, cfg, lw, tokens };
    let (q, k, v) = pass.qkv(enc, h, obs.as_deref_mut())?;
    rope::apply(gpu, enc, &q, tokens, cfg.n_heads(), window, table)?;
    rope::apply(gpu, enc, &k, tokens, cfg.n_kv_heads(), window, table)?;
    let att = gpu.alloc(tokens * cfg.q_dim())?;
    let shape = attention::AttnShape { tokens, window, n_heads: cfg.n_heads(), n_kv: cfg.n_kv_heads(), head_dim: cfg.head_dim() };
    attention::causal_attention(gpu, enc, shape, &q, &k, &v, &att)?;
    drop((q, k, v));
    pass.after_attention(enc, h, att, obs)
}

/// The parts of one decoder layer every way of running it shares (the windowed pass here,
/// the KV-cached step in `model::decode`): only the attention between them differs, so the
/// operations and their order (and with them the results) stay the same in both.
pub(crate) struct LayerPass<'a> {
    pub gpu: &'a Gpu,
    pub cfg: &'a ModelConfig,
    pub lw: &'a LayerWeights,
    pub tokens: usize,
}

impl LayerPass<'_> {
    /// q, k, v of the normalized input h (rope not applied yet).
    pub(crate) fn qkv<'o>(&self, enc: &mut wgpu::CommandEncoder, h: &GpuBuf, obs: Option<&mut (dyn Observer + 'o)>) -> GpuResult<(GpuBuf, GpuBuf, GpuBuf)> {
        let LayerPass { gpu, cfg, lw, tokens } = *self;
        let d = cfg.hidden_size;
        let xn = gpu.alloc(tokens * d)?;
        norms::rms_norm(gpu, enc, h, &lw.in_norm, &xn, norms::NormShape { rows: tokens, cols: d, eps: cfg.rms_norm_eps as f32 })?;
        if let Some(o) = obs {
            o.see(gpu, enc, Site::AttnInput, &xn, tokens, d)?;
        }
        Ok((lw.q.forward(gpu, enc, &xn, tokens)?, lw.k.forward(gpu, enc, &xn, tokens)?, lw.v.forward(gpu, enc, &xn, tokens)?))
    }

    /// From the attention output `att`: h2 = h + o(att), then the FFN up to down_proj's
    /// input a = silu(gate(xn2)) * up(xn2); returns (h2, a).
    pub(crate) fn after_attention<'o>(&self, enc: &mut wgpu::CommandEncoder, h: &GpuBuf, att: GpuBuf, mut obs: Option<&mut (dyn Observer + 'o)>) -> GpuResult<(GpuBuf, GpuBuf)> {
        let LayerPass { gpu, cfg, lw, tokens } = *self;
        let d = cfg.hidden_size;
        if let Some(o) = obs.as_deref_mut() {
            o.see(gpu, enc, Site::OInput, &att, tokens, cfg.q_dim())?;
        }
        let o = lw.o.forward(gpu, enc, &att, tokens)?;
        drop(att);
        let h2 = gpu.alloc(tokens * d)?;
        elementwise::add(gpu, enc, h, &o, &h2, tokens * d)?;
        drop(o);
        let xn2 = gpu.alloc(tokens * d)?;
        norms::rms_norm(gpu, enc, &h2, &lw.post_norm, &xn2, norms::NormShape { rows: tokens, cols: d, eps: cfg.rms_norm_eps as f32 })?;
        if let Some(o) = obs.as_deref_mut() {
            o.see(gpu, enc, Site::FfnInput, &xn2, tokens, d)?;
        }
        let g = lw.gate.forward(gpu, enc, &xn2, tokens)?;
        let u = lw.up.forward(gpu, enc, &xn2, tokens)?;
        drop(xn2);
        let f = lw.gate.out;
        let a = gpu.alloc(tokens * f)?;
        elementwise::silu_mul(gpu, enc, &g, &u, &a, tokens * f)?;
        drop((g, u));
        if let Some(o) = obs {
            o.see(gpu, enc, Site::DownInput, &a, tokens, f)?;
        }
        Ok((h2, a))
    }

    /// h3 = h2 + down(a): the layer's output.
    pub(crate) fn down_and_residual(&self, enc: &mut wgpu::CommandEncoder, h2: &GpuBuf, a: GpuBuf) -> GpuResult<GpuBuf> {
        let LayerPass { gpu, cfg, lw, tokens } = *self;
        let d = cfg.hidden_size;
        let dn = lw.down.forward(gpu, enc, &a, tokens)?;
        drop(a);
        let h3 = gpu.alloc(tokens * d)?;
        elementwise::add(gpu, enc, h2, &dn, &h3, tokens * d)?;
        Ok(h3)
    }
}

/// Tokens per GPU batch unless a caller asks otherwise: large enough to keep the matmuls
/// efficient, small enough that a 7B layer's activations stay well under a GiB.
pub const DEFAULT_BATCH_TOKENS: usize = 4096;

/// Final norm and lm_head on the GPU.
pub struct Head {
    pub norm: GpuBuf,
    /// lm_head weight [vocab, d] (the embedding when tied).
    pub lm_head: GpuBuf,
}

impl Head {
    pub fn load(gpu: &Gpu, store: &WeightStore, cfg: &ModelConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let name = if cfg.tie_word_embeddings || !store.contains(crate::format::names::LM_HEAD) { crate::format::names::EMBED } else { crate::format::names::LM_HEAD };
        Ok(Head { norm: gpu.upload(&store.f32(crate::format::names::FINAL_NORM, &[d])?)?, lm_head: gpu.upload(&store.f32(name, &[cfg.vocab_size, d])?)? })
    }
}

/// Decoder layer `i` for one use: the resident copy (loaded on first use) when the runner
/// keeps layers, otherwise one uploaded now and dropped with the reference.
enum LayerRef<'a> {
    Resident(&'a LayerWeights),
    Streamed(Box<LayerWeights>),
}

impl std::ops::Deref for LayerRef<'_> {
    type Target = LayerWeights;
    fn deref(&self) -> &LayerWeights {
        match self {
            LayerRef::Resident(l) => l,
            LayerRef::Streamed(l) => l,
        }
    }
}

/// Takes the runner's fields apart so callers keep using its other fields (the rope table).
fn layer_ref<'a>(resident: &'a mut Option<Vec<Option<LayerWeights>>>, gpu: &Gpu, store: &WeightStore, cfg: &ModelConfig, i: usize) -> Result<LayerRef<'a>> {
    Ok(match resident {
        Some(r) => {
            if r[i].is_none() {
                r[i] = Some(LayerWeights::load(gpu, store, cfg, i)?);
            }
            LayerRef::Resident(r[i].as_ref().unwrap())
        }
        None => LayerRef::Streamed(Box::new(LayerWeights::load(gpu, store, cfg, i)?)),
    })
}

/// What a runner reports while it works: (layers done, layers total).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// Runs a model on windows of tokens, streaming or keeping layer weights on the GPU.
pub struct Runner {
    pub gpu: Arc<Gpu>,
    pub cfg: ModelConfig,
    store: Arc<WeightStore>,
    table: Option<rope::RopeTable>,
    resident: Option<Vec<Option<LayerWeights>>>,
    head: Option<Head>,
    /// Tokens per GPU batch (whole windows).
    pub batch_tokens: usize,
}

impl Runner {
    /// `keep_resident`: keep every layer's weights on the GPU after first use (fast when
    /// the model fits); otherwise each layer is uploaded, used for all windows, and dropped.
    pub fn new(gpu: Arc<Gpu>, cfg: ModelConfig, store: Arc<WeightStore>, keep_resident: bool) -> Self {
        let resident = keep_resident.then(|| (0..cfg.num_hidden_layers).map(|_| None).collect());
        Runner { gpu, cfg, store, table: None, resident, head: None, batch_tokens: DEFAULT_BATCH_TOKENS }
    }

    /// Keeps layers resident when all weights (as f32) fit in half of `max_vram_bytes`,
    /// streams them one layer at a time otherwise.
    pub fn with_budget(gpu: Arc<Gpu>, cfg: ModelConfig, store: Arc<WeightStore>, max_vram_bytes: u64) -> Self {
        let resident = cfg.total_params() as u64 * 4 <= max_vram_bytes / 2;
        Self::new(gpu, cfg, store, resident)
    }

    /// Whether layer weights stay on the GPU between uses.
    pub fn is_resident(&self) -> bool {
        self.resident.is_some()
    }

    fn table(&mut self, window: usize) -> Result<&rope::RopeTable> {
        if self.table.as_ref().is_none_or(|t| t.n_pos < window) {
            self.table = Some(rope::RopeTable::from_inv_freq(&self.gpu, window.next_power_of_two(), &self.cfg.inv_freq())?);
        }
        Ok(self.table.as_ref().unwrap())
    }

    /// Embeds tokens [n] into hidden states [n, d] on the GPU.
    pub fn embed(&self, tokens: &[u32]) -> Result<GpuBuf> {
        let d = self.cfg.hidden_size;
        let mut h = Vec::with_capacity(tokens.len() * d);
        for &t in tokens {
            if t as usize >= self.cfg.vocab_size {
                return Err(ForwardError::TokenOutOfRange { id: t, vocab: self.cfg.vocab_size });
            }
            h.extend(self.store.rows_f32(crate::format::names::EMBED, t as usize, t as usize + 1)?);
        }
        Ok(self.gpu.upload(&h)?)
    }

    /// Runs all decoder layers over `batches` (hidden states of whole windows), in place.
    pub fn run_layers(&mut self, batches: &mut [(GpuBuf, usize)], window: usize, progress: Progress) -> Result<()> {
        let n_layers = self.cfg.num_hidden_layers;
        // attention runs over the whole window: refused past a shorter sliding window
        self.cfg.check_window(window, "per window")?;
        self.table(window)?;
        for i in 0..n_layers {
            let lw = layer_ref(&mut self.resident, &self.gpu, &self.store, &self.cfg, i)?;
            let table = self.table.as_ref().unwrap();
            for (h, tokens) in batches.iter_mut() {
                let mut enc = self.gpu.encoder();
                let next = layer_forward(&self.gpu, &mut enc, &self.cfg, &lw, table, Batch { h, tokens: *tokens, window }, None)?;
                self.gpu.submit(enc);
                *h = next;
            }
            self.gpu.wait()?;
            progress(i + 1, n_layers);
        }
        Ok(())
    }

    fn head(&mut self) -> Result<&Head> {
        if self.head.is_none() {
            self.head = Some(Head::load(&self.gpu, &self.store, &self.cfg)?);
        }
        Ok(self.head.as_ref().unwrap())
    }

    /// Logits of selected rows of final hidden states h [tokens, d].
    pub fn logits_rows(&mut self, h: &GpuBuf, tokens: usize, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
        let (d, v, eps) = (self.cfg.hidden_size, self.cfg.vocab_size, self.cfg.rms_norm_eps as f32);
        let gpu = self.gpu.clone();
        let head = self.head()?;
        let xn = gpu.alloc(tokens * d)?;
        let mut enc = gpu.encoder();
        norms::rms_norm(&gpu, &mut enc, h, &head.norm, &xn, norms::NormShape { rows: tokens, cols: d, eps })?;
        gpu.submit(enc);
        let logits = gpu.alloc(v)?;
        let mut out = Vec::new();
        for &r in rows {
            let mut enc = gpu.encoder();
            let shape = matmul::GemmShape { m: 1, n: v, k: d };
            let x = matmul::Operand { buf: &xn, offset: r * d, ld: d, trans: false };
            matmul::gemm(&gpu, &mut enc, matmul::GemmCall { shape, a: x, b: matmul::Operand::new(&head.lm_head, d).t(), c: matmul::GemmOutput::new(&logits, v), scale: matmul::Scale::SET })?;
            gpu.submit(enc);
            out.push(gpu.read(&logits)?);
        }
        Ok(out)
    }

    /// NLL of every next token inside each window: tokens is n_windows * window long; the
    /// result holds window - 1 values per window (positions 1..window scored).
    pub fn window_nll(&mut self, tokens: &[u32], window: usize, progress: Progress) -> Result<Vec<f32>> {
        if window < 2 || !tokens.len().is_multiple_of(window) {
            return Err(ForwardError::BadWindow { window, what: format!("{} tokens are not whole windows of at least 2", tokens.len()) });
        }
        let per_batch = (self.batch_tokens / window).max(1) * window;
        let mut batches = Vec::new();
        for chunk in tokens.chunks(per_batch) {
            batches.push((self.embed(chunk)?, chunk.len()));
        }
        self.run_layers(&mut batches, window, progress)?;
        self.head_nll(batches, tokens, window)
    }

    /// NLL of the next tokens from final hidden states: `batches` hold the states of
    /// consecutive chunks of `tokens` (whole windows of `window`), as `run_layers` leaves them.
    pub fn head_nll(&mut self, batches: Vec<(GpuBuf, usize)>, tokens: &[u32], window: usize) -> Result<Vec<f32>> {
        let (d, v, eps) = (self.cfg.hidden_size, self.cfg.vocab_size, self.cfg.rms_norm_eps as f32);
        let gpu = self.gpu.clone();
        let rows_per_chunk = (gpu.max_binding_elems() / v).clamp(1, 512);
        let mut out = Vec::with_capacity(tokens.len());
        let mut at = 0;
        for (h, n) in batches {
            let chunk = &tokens[at..at + n];
            at += n;
            let targets: Vec<f32> = (0..n).map(|p| if (p + 1) % window == 0 { 0.0 } else { chunk[p + 1] as f32 }).collect();
            let head = self.head()?;
            let xn = gpu.alloc(n * d)?;
            let tg = gpu.upload(&targets)?;
            let nll = gpu.alloc(n)?;
            let logits = gpu.alloc(rows_per_chunk.min(n) * v)?;
            let mut enc = gpu.encoder();
            norms::rms_norm(&gpu, &mut enc, &h, &head.norm, &xn, norms::NormShape { rows: n, cols: d, eps })?;
            drop(h);
            for r0 in (0..n).step_by(rows_per_chunk) {
                let r1 = (r0 + rows_per_chunk).min(n);
                let shape = matmul::GemmShape { m: r1 - r0, n: v, k: d };
                let x = matmul::Operand { buf: &xn, offset: r0 * d, ld: d, trans: false };
                matmul::gemm(&gpu, &mut enc, matmul::GemmCall { shape, a: x, b: matmul::Operand::new(&head.lm_head, d).t(), c: matmul::GemmOutput::new(&logits, v), scale: matmul::Scale::SET })?;
                let tw = gpu.alloc(r1 - r0)?;
                let nw = gpu.alloc(r1 - r0)?;
                enc.copy_buffer_to_buffer(tg.raw(), (r0 * 4) as u64, tw.raw(), 0, ((r1 - r0) * 4) as u64);
                loss::nll_rows(&gpu, &mut enc, &logits, &tw, &nw, r1 - r0, v)?;
                enc.copy_buffer_to_buffer(nw.raw(), 0, nll.raw(), (r0 * 4) as u64, ((r1 - r0) * 4) as u64);
                // submit per chunk so the logits buffer is not needed twice in one command buffer
                gpu.submit(std::mem::replace(&mut enc, gpu.encoder()));
            }
            gpu.submit(enc);
            let vals = gpu.read(&nll)?;
            out.extend(vals.iter().enumerate().filter(|(p, _)| (p + 1) % window != 0).map(|(_, &x)| x));
        }
        Ok(out)
    }

    /// Runs `f` on decoder layer `i`'s weights: the resident copy, or one uploaded for this
    /// call and dropped after it (the KV-cached generation in `model::decode` runs one
    /// token through the layers at a time).
    pub fn with_layer<T>(&mut self, i: usize, f: impl FnOnce(&Gpu, &ModelConfig, &LayerWeights) -> Result<T>) -> Result<T> {
        let lw = layer_ref(&mut self.resident, &self.gpu, &self.store, &self.cfg, i)?;
        f(&self.gpu, &self.cfg, &lw)
    }

    /// Greedy continuation by full recomputation: every step runs the whole sequence again
    /// (GPU memory grows with its length). The reference `model::decode::generate` (a KV
    /// cache, constant memory) is tested against; the CLI uses that one.
    pub fn generate_recompute(&mut self, prompt: &[u32], max_new: usize, stop: Option<u32>) -> Result<Vec<u32>> {
        let mut toks = prompt.to_vec();
        let mut new = Vec::new();
        for _ in 0..max_new {
            let n = toks.len();
            let mut batches = vec![(self.embed(&toks)?, n)];
            self.run_layers(&mut batches, n, &mut |_, _| {})?;
            let (h, _) = batches.pop().unwrap();
            let logits = self.logits_rows(&h, n, &[n - 1])?.pop().unwrap();
            let next = logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32;
            if Some(next) == stop {
                break;
            }
            toks.push(next);
            new.push(next);
        }
        Ok(new)
    }
}
