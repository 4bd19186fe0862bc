//! The compression pipeline: sequential layer-by-layer calibration on the GPU (each layer
//! sees the outputs of the already compressed layers), the per-layer method (LoRAP:
//! activation-weighted low-rank q/k/v/o with rank allocation and FFN channel pruning with
//! the 1% reservation; or feature-space decomposition, or MPO), an optional per-layer plan
//! (`--plan`: keep fractions, dropped layers), and the compressed model written as it goes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::allocate::{self, Allocation, MatrixSpec};
use super::ffn;
use super::output::{encode, OutTensor, OutputFolder};
use super::states::CalibStates;
use super::CompressError;
use super::plan::Plan;
use super::svd::{self, SvdOptions};
use crate::gpu::{context::Result as GpuResult, norms, Gpu, GpuBuf};
use crate::gpu::matmul;
use crate::model::config::{CompressionSection, LayerPlan};
use crate::model::forward::{self, GpuLinear, LayerWeights, LinearKind, Observer, Site, LINEARS};
use crate::model::{Model, WeightStore};

/// The per-layer compression method.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Low-rank attention (activation-weighted SVD) + pruned FFN channels.
    #[default]
    Lorap,
    /// Feature-space decomposition: W' = U_k U_k^T W with U_k the top eigenvectors of the
    /// output covariance, for all seven linears.
    Sfsd,
    /// Matrix product operator (tensor-train) cores of every chosen linear.
    Mpo,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Lorap => "lorap",
            Method::Sfsd => "sfsd",
            Method::Mpo => "mpo",
        }
    }
}

/// What `compress` does; the ablation switches default to LoRAP itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LorapOptions {
    #[serde(default)]
    pub method: Method,
    /// Fraction of decoder-layer parameters to remove, in (0, 1).
    pub ratio: f64,
    pub allocation: Allocation,
    /// Activation-weighted SVD (false: plain SVD of W).
    pub weighted_svd: bool,
    /// Fraction of lowest-scored FFN channels kept (the paper's 1%).
    pub reserve: f64,
    /// Wanda-style activation-weighted channel scores (false: weight magnitudes only).
    pub ffn_activation_scores: bool,
    /// SFSD: mean-centred output covariance (the projection then has no bias to carry the
    /// outputs' mean; an ablation).
    #[serde(default)]
    pub sfsd_centred: bool,
    /// MPO: cores per matrix.
    #[serde(default = "default_mpo_cores")]
    pub mpo_cores: usize,
    /// MPO: largest bond dimension (default: the largest that keeps 1 - ratio of each
    /// matrix's parameters).
    #[serde(default)]
    pub mpo_max_bond: Option<usize>,
    /// MPO: one central core shared by all layers per linear (3 cores), each layer's outer
    /// cores refitted to its own weights by least squares.
    #[serde(default)]
    pub mpo_share_centre: bool,
    /// MPO: the linears decomposed (indices into `forward::LINEARS`; empty = all seven).
    #[serde(default)]
    pub mpo_matrices: Vec<usize>,
    /// Per-layer settings overriding the uniform ratio (`--plan`).
    #[serde(default)]
    pub plan: Option<Plan>,
    #[serde(skip)]
    pub svd: SvdOptions,
}

fn default_mpo_cores() -> usize {
    3
}

impl Default for LorapOptions {
    fn default() -> Self {
        LorapOptions {
            method: Method::Lorap,
            ratio: 0.2,
            allocation: Allocation::Fixed31,
            weighted_svd: true,
            reserve: 0.01,
            ffn_activation_scores: true,
            sfsd_centred: false,
            mpo_cores: default_mpo_cores(),
            mpo_max_bond: None,
            mpo_share_centre: false,
            mpo_matrices: Vec::new(),
            plan: None,
            svd: SvdOptions::default(),
        }
    }
}

/// Per-layer outcome, as written to compression_report.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerReport {
    pub layer: usize,
    /// q, k, v, o ranks (null = dense).
    pub ranks: [Option<usize>; 4],
    pub ffn_kept: usize,
    pub ffn_total: usize,
    /// Relative weighted reconstruction error ||(W - AB) S||_F / ||W S||_F of q, k, v, o.
    pub weighted_rel_error: [f64; 4],
    /// Weighted singular values of q, k, v, o (as many as were computed).
    pub spectra: [Vec<f64>; 4],
    pub params_before: usize,
    pub params_after: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompressionReport {
    pub method: String,
    /// The dense model folder it was made from.
    #[serde(default)]
    pub source_model: String,
    pub options: LorapOptions,
    pub calibration_windows: usize,
    pub calibration_seq_len: usize,
    pub decoder_params_before: usize,
    pub decoder_params_after: usize,
    /// 1 - after/before over all decoder layers (norms included).
    pub achieved_decoder_ratio: f64,
    pub total_params_before: usize,
    pub total_params_after: usize,
    pub achieved_total_ratio: f64,
    pub peak_gpu_bytes: u64,
    pub seconds: f64,
    pub adapter: String,
    pub layers: Vec<LayerReport>,
}

/// Statistics of the inputs of every linear, accumulated on the GPU over all calibration
/// tokens, per input site (q/k/v input, o input, gate/up input, down input).
struct InputStats {
    /// Column sums of squares.
    sumsq: [GpuBuf; 4],
    /// X^T X and column sums, when the method needs covariances.
    gram: Option<[(GpuBuf, GpuBuf); 4]>,
    ones: Option<GpuBuf>,
    tokens: usize,
}

fn site_index(site: Site) -> usize {
    match site {
        Site::AttnInput => 0,
        Site::OInput => 1,
        Site::FfnInput => 2,
        Site::DownInput => 3,
    }
}

/// Input site (index into `InputStats`) of linear `j`.
pub(crate) const SITE_OF: [usize; 7] = [0, 0, 0, 1, 2, 2, 3];

impl Observer for InputStats {
    fn see(&mut self, gpu: &Gpu, enc: &mut wgpu::CommandEncoder, site: Site, x: &GpuBuf, rows: usize, cols: usize) -> GpuResult<()> {
        let s = site_index(site);
        if s == 0 {
            self.tokens += rows;
        }
        norms::col_sumsq_accumulate(gpu, enc, x, rows, cols, &self.sumsq[s])?;
        if let Some(gram) = &self.gram {
            let (g, sum) = &gram[s];
            matmul::gram_accumulate(gpu, enc, x, rows, cols, g)?;
            if self.ones.as_ref().is_none_or(|o| (o.bytes() / 4) < rows as u64) {
                self.ones = Some(gpu.upload(&vec![1f32; rows])?);
            }
            let ones = self.ones.as_ref().unwrap();
            matmul::gemm(gpu, enc, matmul::GemmShape { m: 1, n: cols, k: rows }, matmul::Operand::new(ones, rows), matmul::Operand::new(x, cols), sum, 0, cols, 1.0, 1.0)?;
        }
        Ok(())
    }
}

/// What the per-layer methods get to work from.
pub(crate) struct LayerStats {
    /// Activation scales s of each input site.
    pub scales: [Vec<f32>; 4],
    /// Input covariance [cols, cols] of each site (methods that need it): the uncentred
    /// second moment by default.
    pub cov: Option<[Vec<f32>; 4]>,
}

/// s_j = sqrt(mean over windows of ||X_w[:, j]||^2), zeros replaced by 1e-4.
pub(crate) fn scales(sumsq: &[f32], windows: usize) -> Vec<f32> {
    sumsq.iter().map(|&v| (v as f64 / windows as f64).sqrt() as f32).map(|s| if s > 0.0 { s } else { 1e-4 }).collect()
}

/// Factors of one attention matrix: A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T S^-1.
pub(crate) fn factors(dec: &svd::Svd, r: usize, scale: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (m, n, k) = (dec.m, dec.n, dec.rank());
    let mut a = vec![0f32; m * r];
    let mut b = vec![0f32; r * n];
    for c in 0..r {
        let sq = dec.sigma[c].sqrt();
        for i in 0..m {
            a[i * r + c] = (dec.u[i * k + c] as f64 * sq) as f32;
        }
        for j in 0..n {
            b[c * n + j] = (dec.vt[c * n + j] as f64 * sq / scale[j] as f64) as f32;
        }
    }
    (a, b)
}

/// Calibration windows: `samples` non-overlapping windows of `seq_len` tokens spread evenly
/// over the text's tokens.
pub fn calibration_windows(tokens: &[u32], samples: usize, seq_len: usize) -> Result<Vec<u32>> {
    if samples == 0 || seq_len < 2 {
        return Err(CompressError::BadArgument("need at least one calibration window (--samples) of at least 2 tokens (--seq-len)".into()).into());
    }
    let avail = tokens.len() / seq_len;
    if avail < samples {
        return Err(CompressError::CalibrationTooShort { tokens: tokens.len(), samples, seq_len }.into());
    }
    let mut out = Vec::with_capacity(samples * seq_len);
    for i in 0..samples {
        let w = i * avail / samples;
        out.extend_from_slice(&tokens[w * seq_len..(w + 1) * seq_len]);
    }
    Ok(out)
}

/// How a compression run treats its output folder, beyond what it computes.
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    /// Replace an existing output folder.
    pub force: bool,
    /// Continue an interrupted run from its last finished layer (same inputs and options).
    pub resume: bool,
    /// Stop with `CompressError::Interrupted` after this many layers, as an interruption
    /// would (tests of `resume`).
    pub stop_after_layers: Option<usize>,
    /// Fail writes with "disk full" after this many bytes (tests of the disk-full path).
    pub output_byte_limit: Option<u64>,
    /// Calibration tokens per GPU batch (default: the runner's 4096).
    pub batch_tokens: Option<usize>,
}

/// What a checkpoint records: enough to check a resumed run is the same run, and the
/// finished layers' results.
#[derive(Serialize, Deserialize)]
struct ResumeState {
    fingerprint: String,
    layers_done: usize,
    /// One entry per finished original layer; `None` = dropped.
    plans: Vec<Option<LayerPlan>>,
    reports: Vec<LayerReport>,
    seconds_before: f64,
}

/// Records the finished layers in the partial folder, for `--resume`.
fn checkpoint(folder: &mut OutputFolder, fingerprint: &str, plans: &[Option<LayerPlan>], reports: &[LayerReport], seconds_before: f64) -> Result<()> {
    let state = ResumeState { fingerprint: fingerprint.into(), layers_done: plans.len(), plans: plans.to_vec(), reports: reports.to_vec(), seconds_before };
    folder.checkpoint(serde_json::to_value(&state)?)
}

/// Identifies a run: model config, options, calibration tokens and window length.
fn fingerprint(model: &Model, calib: &[u32], seq_len: usize, opts: &LorapOptions) -> Result<String> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    calib.hash(&mut h);
    let v = serde_json::json!({
        "config": serde_json::Value::Object(model.cfg.raw.clone()),
        "options": opts,
        "svd": [opts.svd.power_iters, opts.svd.oversample, opts.svd.seed as usize],
        "calibration": [calib.len(), seq_len, h.finish() as usize],
    });
    Ok(serde_json::to_string(&v)?)
}

/// Checks everything about a run that can be checked before any GPU work or output.
pub fn validate(model: &Model, calib: &[u32], seq_len: usize, opts: &LorapOptions) -> Result<()> {
    match &opts.plan {
        None if !(opts.ratio > 0.0 && opts.ratio < 1.0) => return Err(CompressError::BadRatio(opts.ratio).into()),
        Some(_) if !(opts.ratio >= 0.0 && opts.ratio < 1.0) => return Err(CompressError::BadRatio(opts.ratio).into()),
        Some(p) => p.validate(model.cfg.num_hidden_layers)?,
        None => {}
    }
    if opts.method == Method::Mpo && !(2..=8).contains(&opts.mpo_cores) {
        return Err(CompressError::BadArgument(format!("--mpo-cores must be in 2..=8, got {}", opts.mpo_cores)).into());
    }
    if opts.mpo_share_centre && (opts.method != Method::Mpo || opts.mpo_cores != 3 || opts.plan.is_some()) {
        return Err(CompressError::BadArgument("--mpo-share-centre needs --method mpo with 3 cores and no --plan".into()).into());
    }
    if opts.mpo_max_bond == Some(0) || opts.mpo_matrices.iter().any(|&j| j >= LINEARS.len()) {
        return Err(CompressError::BadArgument("--mpo-max-bond must be positive and --mpo-matrices name linears of the layer".into()).into());
    }
    if !(0.0..1.0).contains(&opts.reserve) {
        return Err(CompressError::BadArgument(format!("FFN reserve fraction must be in [0, 1), got {}", opts.reserve)).into());
    }
    if model.cfg.lorap.is_some() {
        return Err(CompressError::AlreadyCompressed(model.dir.display().to_string()).into());
    }
    if seq_len < 2 || calib.is_empty() || calib.len() % seq_len != 0 {
        return Err(CompressError::BadArgument(format!("calibration must be whole windows of at least 2 tokens ({} tokens, windows of {seq_len})", calib.len())).into());
    }
    Ok(())
}

/// Compresses `model` with LoRAP using `calib` (whole windows of `seq_len`), writing to `out`.
#[allow(clippy::too_many_arguments)]
pub fn compress(
    gpu: &std::sync::Arc<Gpu>,
    model: &Model,
    calib: &[u32],
    seq_len: usize,
    opts: &LorapOptions,
    out: &Path,
    control: &RunControl,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<(PathBuf, CompressionReport)> {
    validate(model, calib, seq_len, opts)?;
    let cfg = &model.cfg;
    let store = &model.store;
    let n_layers = cfg.num_hidden_layers;
    let windows = calib.len() / seq_len;
    let t_start = Instant::now();
    gpu.reset_peak();
    let print = fingerprint(model, calib, seq_len, opts)?;
    let (mut folder, saved) = if control.resume {
        OutputFolder::resume(out, &model.dir, control.force, n_layers + 1)?
    } else {
        (OutputFolder::create(out, &model.dir, control.force, n_layers + 1)?, None)
    };
    if let Some(limit) = control.output_byte_limit {
        folder.set_byte_limit(limit);
    }
    let mut plans = Vec::new();
    let mut layer_reports = Vec::new();
    let mut seconds_before = 0.0;
    if let Some(state) = saved {
        let ck = folder.partial_dir().display().to_string();
        let st: ResumeState = serde_json::from_value(state).map_err(|e| CompressError::ResumeMismatch { path: ck.clone(), what: format!("unreadable state: {e}") })?;
        if st.fingerprint != print {
            return Err(CompressError::ResumeMismatch { path: ck, what: "it was made from another model, calibration text or options".into() }.into());
        }
        plans = st.plans;
        layer_reports = st.reports;
        seconds_before = st.seconds_before;
        tracing::info!(layers_done = st.layers_done, "resuming");
    }
    let first_layer = plans.len();

    let runner = forward::Runner::new(gpu.clone(), cfg.clone(), store.clone(), false);
    let state_bytes = (calib.len() * cfg.hidden_size * 4) as u64;
    let on_host = super::states::keep_on_host(gpu, state_bytes);
    if on_host {
        tracing::info!(state_bytes, "calibration states kept on the host (over half the GPU budget)");
    }
    let batch_tokens = control.batch_tokens.unwrap_or(runner.batch_tokens).max(1);
    let mut batches = CalibStates::embed(&runner, calib, seq_len, batch_tokens, on_host)?;
    let table = crate::gpu::rope::RopeTable::from_inv_freq(gpu, seq_len.next_power_of_two(), &cfg.inv_freq())?;
    if first_layer > 0 {
        // rebuild the calibration states: the finished layers, as stored, run again
        let done = WeightStore::open(folder.partial_dir()).context("reading the finished layers of the interrupted run")?;
        let mut c2 = cfg.clone();
        c2.lorap = Some(plan_section(cfg, opts, &plans));
        for (j, _) in plans.iter().flatten().enumerate() {
            progress(j, n_layers, "replaying finished layer");
            let layer = LayerWeights::load(gpu, &done, &c2, j)?;
            propagate(gpu, cfg, &layer, &table, &mut batches, seq_len)?;
        }
    }

    let dtype_of = store.dtype(&format!("model.layers.0.{}.weight", LINEARS[0]))?;
    let out_dtype = if matches!(dtype_of, Dtype::F16 | Dtype::BF16) { dtype_of } else { Dtype::F32 };
    let need_cov = opts.method == Method::Sfsd;
    let shared_mpo = if opts.method == Method::Mpo { super::mpo::shared_decompositions(store, cfg, opts)? } else { Default::default() };
    for i in first_layer..n_layers {
        let t_layer = Instant::now();
        let setting = LayerSetting::of(opts, i);
        if setting.dropped {
            // a dropped layer is the identity: the states go on unchanged
            plans.push(None);
            checkpoint(&mut folder, &print, &plans, &layer_reports, seconds_before + t_start.elapsed().as_secs_f64())?;
            progress(i + 1, n_layers, "dropped");
            continue;
        }
        let out_index = plans.iter().flatten().count();
        progress(i, n_layers, "statistics");
        let dense = LayerWeights::load(gpu, store, cfg, i)?;
        let stats = collect_stats(gpu, cfg, &dense, &table, &mut batches, seq_len, windows, need_cov, opts.sfsd_centred)?;
        let mut built = BuiltLayer::new(out_dtype, out_index);
        match opts.method {
            Method::Lorap => lorap_layer(gpu, store, cfg, i, &dense, &stats, opts, &setting, &mut built, progress)?,
            Method::Sfsd => super::sfsd::sfsd_layer(gpu, store, cfg, i, &stats, &setting, opts.svd, &mut built, progress)?,
            Method::Mpo => super::mpo::mpo_layer(gpu, store, cfg, i, opts, &shared_mpo, &mut built, progress)?,
        }
        let name = |s: &str| format!("model.layers.{i}.{s}");
        if cfg.qkv_bias() {
            for j in 0..3 {
                let bias = store.f32(&name(&format!("{}.bias", LINEARS[j])), &[built.linears[j].out])?;
                built.linears[j].bias = Some(gpu.upload(&round_trip(&bias, out_dtype))?);
                built.push_copy(store, &name(&format!("{}.bias", LINEARS[j])))?;
            }
        }
        for n in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            built.push_copy(store, &name(n))?;
        }
        let BuiltLayer { tensors, linears, plan, errors, spectra, .. } = built;
        let mut it = linears.into_iter();
        let mut next = || it.next().context("a method built fewer than seven linears");
        let compressed = LayerWeights { q: next()?, k: next()?, v: next()?, o: next()?, gate: next()?, up: next()?, down: next()?, in_norm: dense.in_norm, post_norm: dense.post_norm };
        progress(i, n_layers, "writing");
        folder.write_shard(i, &tensors)?;
        drop(tensors);

        progress(i, n_layers, "propagating");
        propagate(gpu, cfg, &compressed, &table, &mut batches, seq_len)?;
        layer_reports.push(LayerReport {
            layer: i,
            ranks: [plan.q_rank, plan.k_rank, plan.v_rank, plan.o_rank],
            ffn_kept: plan.ffn_width,
            ffn_total: cfg.intermediate_size,
            weighted_rel_error: errors,
            spectra,
            params_before: cfg.layer_params(i),
            params_after: cfg.plan_params(&plan),
            seconds: t_layer.elapsed().as_secs_f64(),
        });
        plans.push(Some(plan));
        checkpoint(&mut folder, &print, &plans, &layer_reports, seconds_before + t_start.elapsed().as_secs_f64())?;
        progress(i + 1, n_layers, "done");
        if control.stop_after_layers == Some(i + 1) && i + 1 < n_layers {
            return Err(CompressError::Interrupted(i + 1).into());
        }
    }
    drop(batches);

    // embeddings, final norm, untied head: copied exactly
    let mut rest = Vec::new();
    for n in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] {
        if n == "lm_head.weight" && (cfg.tie_word_embeddings || !store.contains(n)) {
            continue;
        }
        rest.push(OutTensor::copied(store, n)?);
    }
    for (&j, m) in &shared_mpo {
        // the shared centre, rounded as the layers used it
        let c = &m.cores[m.cores.len() / 2];
        let v: Vec<f32> = round_trip(&c.data.iter().map(|&x| x as f32).collect::<Vec<_>>(), out_dtype);
        rest.push(OutTensor { name: format!("model.mpo_shared.{}.mpo_core_{}", LINEARS[j], m.cores.len() / 2), dtype: out_dtype, bytes: encode(&v, out_dtype), shape: vec![c.left, c.i, c.j, c.right] });
    }
    folder.write_shard(n_layers, &rest)?;
    drop(rest);

    let mut new_cfg = cfg.clone();
    let mut section = plan_section(cfg, opts, &plans);
    new_cfg.num_hidden_layers = section.layers.len();
    new_cfg.lorap = Some(section.clone());
    section.ratio = 1.0 - new_cfg.decoder_params() as f64 / cfg.decoder_params() as f64;
    new_cfg.lorap = Some(section);
    let mut raw = cfg.raw.clone();
    raw.insert("num_hidden_layers".into(), new_cfg.num_hidden_layers.into());
    raw.insert("lorap".into(), serde_json::to_value(new_cfg.lorap.as_ref().unwrap())?);
    folder.write_json("config.json", &serde_json::Value::Object(raw))?;
    folder.copy_side_files(&model.dir)?;
    let (before, after) = (cfg.decoder_params(), new_cfg.decoder_params());
    let (tb, ta) = (cfg.total_params(), new_cfg.total_params());
    let report = CompressionReport {
        method: opts.method.name().into(),
        source_model: model.dir.canonicalize().unwrap_or_else(|_| model.dir.clone()).display().to_string(),
        options: opts.clone(),
        calibration_windows: windows,
        calibration_seq_len: seq_len,
        decoder_params_before: before,
        decoder_params_after: after,
        achieved_decoder_ratio: 1.0 - after as f64 / before as f64,
        total_params_before: tb,
        total_params_after: ta,
        achieved_total_ratio: 1.0 - ta as f64 / tb as f64,
        peak_gpu_bytes: gpu.memory_stats().1,
        seconds: seconds_before + t_start.elapsed().as_secs_f64(),
        adapter: gpu.info.name.clone(),
        layers: layer_reports,
    };
    folder.write_json("compression_report.json", &serde_json::to_value(&report)?)?;
    let name = model.dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    for (file, text) in crate::report::render(&report, &name, None) {
        folder.write_file(&file, text.as_bytes())?;
    }
    let path = folder.finish().context("finishing the output folder")?;
    Ok((path, report))
}

/// The `lorap` config section for the finished `plans` (`None` = dropped layer); the
/// layers still to do are listed dense unless the run's plan drops them.
fn plan_section(cfg: &crate::model::ModelConfig, opts: &LorapOptions, plans: &[Option<LayerPlan>]) -> CompressionSection {
    let dense = LayerPlan { ffn_width: cfg.intermediate_size, ..Default::default() };
    let later = (plans.len()..cfg.num_hidden_layers).filter(|&i| !LayerSetting::of(opts, i).dropped).map(|_| dense.clone());
    let layers = plans.iter().flatten().cloned().chain(later).collect();
    let dropped_layers = (0..cfg.num_hidden_layers).filter(|&i| LayerSetting::of(opts, i).dropped).collect();
    CompressionSection { format_version: 1, method: opts.method.name().into(), ratio: opts.ratio, layers, dropped_layers }
}

/// What one layer gets: the run's uniform ratio unless the plan says otherwise.
pub(crate) struct LayerSetting {
    pub dropped: bool,
    /// Fraction of the attention parameters kept (LoRAP).
    pub attention_keep: f64,
    /// Fraction of the FFN channels kept (LoRAP).
    pub ffn_keep: f64,
    /// Fraction of each linear's break-even rank kept (feature-space decomposition);
    /// `None` = dense.
    pub module_keep: [Option<f64>; 7],
}

impl LayerSetting {
    pub fn of(opts: &LorapOptions, i: usize) -> Self {
        let keep = 1.0 - opts.ratio;
        match opts.plan.as_ref().and_then(|p| p.layers.get(i)) {
            None => LayerSetting { dropped: false, attention_keep: keep, ffn_keep: keep, module_keep: [Some(keep); 7] },
            Some(l) => LayerSetting {
                dropped: l.dropped,
                attention_keep: l.attention_keep.unwrap_or(keep),
                ffn_keep: l.ffn_keep.unwrap_or(keep),
                module_keep: std::array::from_fn(|j| if l.module_keep.is_empty() { Some(keep) } else { l.module_keep.get(LINEARS[j]).copied() }),
            },
        }
    }
}

/// A compressed layer as a method builds it: the tensors to write (named for the output
/// layer index), the GPU linears that calibration continues with, and what the report shows.
pub(crate) struct BuiltLayer {
    pub dtype: Dtype,
    /// Layer index in the output model (dropped layers renumber the rest).
    pub out_index: usize,
    pub tensors: Vec<OutTensor>,
    /// The seven linears in `LINEARS` order.
    pub linears: Vec<GpuLinear>,
    pub plan: LayerPlan,
    /// Relative (weighted where the method weights) error of q, k, v, o.
    pub errors: [f64; 4],
    pub spectra: [Vec<f64>; 4],
}

impl BuiltLayer {
    fn new(dtype: Dtype, out_index: usize) -> Self {
        BuiltLayer { dtype, out_index, tensors: Vec::new(), linears: Vec::new(), plan: LayerPlan::default(), errors: [0.0; 4], spectra: Default::default() }
    }

    fn name(&self, j: usize, suffix: &str) -> String {
        format!("model.layers.{}.{}.{suffix}", self.out_index, LINEARS[j])
    }

    fn push(&mut self, name: String, shape: Vec<usize>, v: &[f32]) {
        self.tensors.push(OutTensor { name, dtype: self.dtype, bytes: encode(v, self.dtype), shape });
    }

    /// Copies tensor `name` of the input (`model.layers.{i}.x`) under the output index.
    pub fn push_copy(&mut self, store: &WeightStore, name: &str) -> Result<()> {
        let mut t = OutTensor::copied(store, name)?;
        let rest = name.splitn(4, '.').nth(3).context("not a layer tensor")?;
        t.name = format!("model.layers.{}.{rest}", self.out_index);
        self.tensors.push(t);
        Ok(())
    }

    /// Linear `j` (next in order) stays a dense [out, inp] matrix.
    pub fn dense(&mut self, gpu: &Gpu, j: usize, w: &[f32], out: usize, inp: usize) -> Result<()> {
        debug_assert_eq!(self.linears.len(), j);
        self.push(self.name(j, "weight"), vec![out, inp], w);
        let w = round_trip(w, self.dtype);
        self.linears.push(GpuLinear { out, inp, kind: LinearKind::Dense { w: gpu.upload(&w)? }, bias: None });
        Ok(())
    }

    /// Linear `j` (next in order) becomes the pair A [out, r] B [r, inp].
    #[allow(clippy::too_many_arguments)]
    pub fn low_rank(&mut self, gpu: &Gpu, j: usize, a: &[f32], b: &[f32], out: usize, r: usize, inp: usize) -> Result<()> {
        debug_assert_eq!(self.linears.len(), j);
        // the GPU layer uses the values as stored, so calibration sees what eval will
        let (a, b) = (round_trip(a, self.dtype), round_trip(b, self.dtype));
        self.push(self.name(j, "factor_a"), vec![out, r], &a);
        self.push(self.name(j, "factor_b"), vec![r, inp], &b);
        self.plan.set_rank(j, Some(r));
        self.linears.push(GpuLinear { out, inp, kind: LinearKind::LowRank { a: gpu.upload(&a)?, b: gpu.upload(&b)?, rank: r }, bias: None });
        Ok(())
    }

    /// Linear `j` (next in order) is stored as MPO cores; calibration continues with the
    /// matrix the stored (rounded) cores give.
    /// With `shared`, the central core is not written here (it is stored once per model).
    pub fn mpo(&mut self, gpu: &Gpu, j: usize, m: &super::mpo::Mpo, shared: bool) -> Result<()> {
        debug_assert_eq!(self.linears.len(), j);
        let mut rounded = m.clone();
        let centre = m.cores.len() / 2;
        for (k, c) in rounded.cores.iter_mut().enumerate() {
            let v: Vec<f32> = round_trip(&c.data.iter().map(|&x| x as f32).collect::<Vec<_>>(), self.dtype);
            if !(shared && k == centre) {
                self.push(self.name(j, &format!("mpo_core_{k}")), vec![c.left, c.i, c.j, c.right], &v);
            }
            c.data = v.iter().map(|&x| x as f64).collect();
        }
        let shape = crate::model::config::MpoShape {
            row_factors: m.cores.iter().map(|c| c.i).collect(),
            col_factors: m.cores.iter().map(|c| c.j).collect(),
            bonds: m.cores[..m.cores.len() - 1].iter().map(|c| c.right).collect(),
            shared_centre: shared,
        };
        self.plan.mpo.insert(LINEARS[j].to_string(), shape);
        let w: Vec<f32> = rounded.reconstruct().iter().map(|&x| x as f32).collect();
        self.linears.push(GpuLinear { out: m.rows, inp: m.cols, kind: LinearKind::Dense { w: gpu.upload(&w)? }, bias: None });
        Ok(())
    }
}

/// Truncated SVD of the activation-weighted W S (to the break-even rank) and what the rank
/// allocation needs of it (spectrum and ||W S||_F^2). `scales` = S's diagonal.
pub(crate) fn weighted_svd(gpu: &Gpu, w: &[f32], out: usize, inp: usize, scales: &[f32], svd_opts: svd::SvdOptions) -> Result<(svd::Svd, MatrixSpec)> {
    let ws: Vec<f32> = w.chunks(inp).flat_map(|row| row.iter().zip(scales).map(|(a, b)| a * b)).collect();
    let energy = ws.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
    let dec = svd::randomized_svd(gpu, &gpu.upload(&ws)?, out, inp, out * inp / (out + inp), svd_opts)?;
    let spec = MatrixSpec { out, inp, sigma: dec.sigma.clone(), energy };
    Ok((dec, spec))
}

/// One statistics pass of the calibration states through the dense layer `dense`.
/// `need_cov`: also the input covariances, mean-centred when `centred`, otherwise the
/// uncentred second moments X^T X / n.
#[allow(clippy::too_many_arguments)]
pub(crate) fn collect_stats(
    gpu: &Gpu,
    cfg: &crate::model::ModelConfig,
    dense: &LayerWeights,
    table: &crate::gpu::rope::RopeTable,
    batches: &mut CalibStates,
    seq_len: usize,
    windows: usize,
    need_cov: bool,
    centred: bool,
) -> Result<LayerStats> {
    let dims = [cfg.hidden_size, cfg.q_dim(), cfg.hidden_size, dense.gate.out];
    let gram = if need_cov {
        let mk = |n: usize| -> GpuResult<(GpuBuf, GpuBuf)> { Ok((gpu.zeros(n * n)?, gpu.zeros(n)?)) };
        Some([mk(dims[0])?, mk(dims[1])?, mk(dims[2])?, mk(dims[3])?])
    } else {
        None
    };
    let mut stats = InputStats { sumsq: [gpu.zeros(dims[0])?, gpu.zeros(dims[1])?, gpu.zeros(dims[2])?, gpu.zeros(dims[3])?], gram, ones: None, tokens: 0 };
    batches.for_each(gpu, |h, tokens| {
        let mut enc = gpu.encoder();
        // the layer's output is discarded: the next inputs come from the compressed layer
        forward::layer_forward(gpu, &mut enc, cfg, dense, table, h, tokens, seq_len, Some(&mut stats))?;
        gpu.submit(enc);
        Ok(None)
    })?;
    let mut sc: Vec<Vec<f32>> = Vec::new();
    for b in &stats.sumsq {
        sc.push(scales(&gpu.read(b)?, windows));
    }
    let cov = match &stats.gram {
        None => None,
        Some(gram) => {
            let n_tok = stats.tokens.max(1) as f64;
            let mut out: Vec<Vec<f32>> = Vec::new();
            for (s, (g, sum)) in gram.iter().enumerate() {
                let (g, sum) = (gpu.read(g)?, gpu.read(sum)?);
                let n = dims[s];
                let mu: Vec<f64> = sum.iter().map(|&x| x as f64 / n_tok).collect();
                let centre = if centred { 1.0 } else { 0.0 };
                out.push((0..n * n).map(|k| (g[k] as f64 / n_tok - centre * mu[k / n] * mu[k % n]) as f32).collect());
            }
            let mut it = out.into_iter();
            Some(std::array::from_fn(|_| it.next().unwrap()))
        }
    };
    let mut it = sc.into_iter();
    Ok(LayerStats { scales: std::array::from_fn(|_| it.next().unwrap()), cov })
}

/// LoRAP for one layer: activation-weighted SVD of q/k/v/o with the attention budget
/// allocated across them, then FFN channel pruning with the reservation.
#[allow(clippy::too_many_arguments)]
fn lorap_layer(
    gpu: &Gpu,
    store: &WeightStore,
    cfg: &crate::model::ModelConfig,
    i: usize,
    dense: &LayerWeights,
    stats: &LayerStats,
    opts: &LorapOptions,
    setting: &LayerSetting,
    built: &mut BuiltLayer,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<()> {
    let n_layers = cfg.num_hidden_layers;
    let d = cfg.hidden_size;
    let f = cfg.intermediate_size;
    progress(i, n_layers, "attention SVD");
    let name = |s: &str| format!("model.layers.{i}.{s}");
    let full = LayerPlan { ffn_width: f, ..Default::default() };
    let mut decs = Vec::new();
    let mut specs = Vec::new();
    let mut used_scales = Vec::new();
    for j in 0..4 {
        let (out_dim, in_dim) = cfg.linear_shape(&full, j);
        let w = store.f32(&name(&format!("{}.weight", LINEARS[j])), &[out_dim, in_dim])?;
        let sc: Vec<f32> = if opts.weighted_svd { stats.scales[SITE_OF[j]].clone() } else { vec![1.0; in_dim] };
        let (dec, spec) = weighted_svd(gpu, &w, out_dim, in_dim, &sc, opts.svd)?;
        specs.push(spec);
        decs.push((dec, w));
        used_scales.push(sc);
    }
    let dense_att: usize = specs.iter().map(|s| s.out * s.inp).sum();
    let ranks = if setting.attention_keep >= 1.0 {
        vec![None; 4]
    } else {
        let budget = (setting.attention_keep * dense_att as f64).round() as usize;
        allocate::allocate(&specs, budget, opts.allocation)
    };
    for (j, ((dec, w), r)) in decs.iter().zip(&ranks).enumerate() {
        let (out_dim, in_dim) = (dec.m, dec.n);
        match r {
            None => built.dense(gpu, j, w, out_dim, in_dim)?,
            Some(r) => {
                let (a, b) = factors(dec, *r, &used_scales[j]);
                let kept: f64 = dec.sigma[..*r].iter().map(|s| s * s).sum();
                let energy = specs[j].energy;
                built.errors[j] = ((energy - kept).max(0.0) / energy.max(f64::MIN_POSITIVE)).sqrt();
                built.low_rank(gpu, j, &a, &b, out_dim, *r, in_dim)?;
            }
        }
    }
    built.spectra = [0, 1, 2, 3].map(|j| decs[j].0.sigma.clone());

    progress(i, n_layers, "FFN pruning");
    let ones_d = vec![1f32; d];
    let ones_f = vec![1f32; f];
    let (sx, sh) = if opts.ffn_activation_scores { (&stats.scales[2], &stats.scales[3]) } else { (&ones_d, &ones_f) };
    let (LinearKind::Dense { w: wg }, LinearKind::Dense { w: wu }, LinearKind::Dense { w: wd }) = (&dense.gate.kind, &dense.up.kind, &dense.down.kind) else {
        bail!("layer {i}: FFN is not dense");
    };
    let sxg = gpu.upload(sx)?;
    let scores = ffn::channel_scores(gpu, wg, wu, wd, &sxg, sh, d, f)?;
    let remove = (((1.0 - setting.ffn_keep) * f as f64).round() as usize).min(f - 1);
    let kept = ffn::kept_channels(&scores, remove, opts.reserve);
    let [gate, up, down] = ffn::pruned_weights(store, i, d, f, &kept)?;
    let fk = kept.len();
    built.plan.ffn_width = fk;
    built.dense(gpu, 4, &gate, fk, d)?;
    built.dense(gpu, 5, &up, fk, d)?;
    built.dense(gpu, 6, &down, d, fk)?;
    Ok(())
}

/// Runs the calibration states through one (compressed) layer, in place.
pub(crate) fn propagate(gpu: &Gpu, cfg: &crate::model::ModelConfig, layer: &LayerWeights, table: &crate::gpu::rope::RopeTable, batches: &mut CalibStates, seq_len: usize) -> Result<()> {
    batches.for_each(gpu, |h, tokens| {
        let mut enc = gpu.encoder();
        let next = forward::layer_forward(gpu, &mut enc, cfg, layer, table, h, tokens, seq_len, None)?;
        gpu.submit(enc);
        Ok(Some(next))
    })?;
    gpu.wait()?;
    Ok(())
}

/// Values as they will be read back from the stored dtype.
pub(crate) fn round_trip(v: &[f32], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F16 => v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect(),
        Dtype::BF16 => v.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect(),
        _ => v.to_vec(),
    }
}
