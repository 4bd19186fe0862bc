//! The compression pipeline: sequential layer-by-layer calibration on the GPU (each layer
//! sees the outputs of the already compressed layers), the per-layer method (LoRAP:
//! activation-weighted low-rank q/k/v/o with rank allocation and FFN channel pruning with
//! the 1% reservation; or feature-space decomposition, or MPO), an optional per-layer plan
//! (`--plan`: keep fractions, dropped layers), and the compressed model written as it goes.

pub mod fingerprint;
pub mod summary;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

pub use fingerprint::Fingerprint;
pub use summary::{CompressionReport, LayerReport};

use crate::calib::walker::Walker;
use crate::error::CompressError;
use crate::format::output::{OutTensor, OutputFolder};
use crate::format::plan::{CompressionSection, LayerPlan};
use crate::gpu::Gpu;
use crate::methods::phase::PhaseClock;
use crate::methods::{self, BuiltLayer, CompressOptions, LayerInput, LayerMethod, LayerSetting, MethodOptions, Phase};
use crate::format::linear::Linear;
use crate::model::forward::{DenseHost, LayerWeights};
use crate::model::{Model, WeightStore};

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
    /// Extra files (name, text) written into the output from its report before it is moved
    /// into place (the CLI passes the HTML report's renderer).
    pub report_files: Option<ReportFiles>,
}

/// Renders files from a finished run's report and the source model's folder name.
pub type ReportFiles = fn(&CompressionReport, &str) -> Vec<(String, String)>;

/// One compression run: what is compressed, on which calibration tokens, with which
/// options, and where it goes.
pub struct Run<'a> {
    pub model: &'a Model,
    /// Calibration tokens, whole windows of `seq_len`.
    pub calib: &'a [u32],
    pub seq_len: usize,
    pub opts: &'a CompressOptions,
    pub out: &'a Path,
    pub control: RunControl,
}

impl<'a> Run<'a> {
    pub fn new(model: &'a Model, calib: &'a [u32], seq_len: usize, opts: &'a CompressOptions, out: &'a Path) -> Self {
        Run { model, calib, seq_len, opts, out, control: RunControl::default() }
    }

    pub fn with_control(self, control: RunControl) -> Self {
        Run { control, ..self }
    }
}

/// What a checkpoint records: enough to check a resumed run is the same run, and the
/// finished layers' results.
#[derive(Serialize, Deserialize)]
struct ResumeState {
    fingerprint: Fingerprint,
    layers_done: usize,
    /// One entry per finished original layer; `None` = dropped.
    plans: Vec<Option<LayerPlan>>,
    reports: Vec<LayerReport>,
    seconds_before: f64,
}

/// Records the finished layers in the partial folder, for `--resume`.
fn checkpoint(folder: &mut OutputFolder, fingerprint: &Fingerprint, plans: &[Option<LayerPlan>], reports: &[LayerReport], seconds_before: f64) -> Result<()> {
    let state = ResumeState { fingerprint: fingerprint.clone(), layers_done: plans.len(), plans: plans.to_vec(), reports: reports.to_vec(), seconds_before };
    folder.checkpoint(serde_json::to_value(&state)?)
}

/// Checks everything about a run that can be checked before any GPU work or output.
pub fn validate(model: &Model, calib: &[u32], seq_len: usize, opts: &CompressOptions) -> Result<()> {
    match &opts.plan {
        None if !(opts.ratio > 0.0 && opts.ratio < 1.0) => return Err(CompressError::BadRatio(opts.ratio).into()),
        Some(_) if !(opts.ratio >= 0.0 && opts.ratio < 1.0) => return Err(CompressError::BadRatio(opts.ratio).into()),
        Some(p) => p.validate(model.cfg.num_hidden_layers)?,
        None => {}
    }
    match &opts.method {
        MethodOptions::Mpo(m) => {
            if !(2..=8).contains(&m.cores) {
                return Err(CompressError::BadArgument(format!("--mpo-cores must be in 2..=8, got {}", m.cores)).into());
            }
            if m.share_centre && (m.cores != 3 || opts.plan.is_some()) {
                return Err(CompressError::BadArgument("--mpo-share-centre needs --method mpo with 3 cores and no --plan".into()).into());
            }
            if m.max_bond == Some(0) {
                return Err(CompressError::BadArgument("--mpo-max-bond must be positive".into()).into());
            }
        }
        MethodOptions::Lorap(l) if !(0.0..1.0).contains(&l.reserve) => {
            return Err(CompressError::BadArgument(format!("FFN reserve fraction must be in [0, 1), got {}", l.reserve)).into());
        }
        MethodOptions::Lorap(l) if l.needs_split_moments() && calib.len() / seq_len.max(1) < crate::calib::stats::HOLD_OUT_EVERY => {
            return Err(CompressError::BadArgument(format!("--ffn-refit, --attention-refit and --ffn-selection obs need at least {} calibration windows (every {}th is held out to choose the ridge), got {}", crate::calib::stats::HOLD_OUT_EVERY, crate::calib::stats::HOLD_OUT_EVERY, calib.len() / seq_len.max(1))).into());
        }
        MethodOptions::Lorap(_) | MethodOptions::Sfsd(_) => {}
    }
    if model.cfg.lorap.is_some() {
        return Err(CompressError::AlreadyCompressed(model.dir.display().to_string()).into());
    }
    if seq_len < 2 || calib.is_empty() || !calib.len().is_multiple_of(seq_len) {
        return Err(CompressError::BadArgument(format!("calibration must be whole windows of at least 2 tokens ({} tokens, windows of {seq_len})", calib.len())).into());
    }
    Ok(())
}

/// Compresses the run's model with the method its options select.
pub fn compress(gpu: &std::sync::Arc<Gpu>, run: &Run, progress: &mut dyn FnMut(usize, usize, Phase)) -> Result<(PathBuf, CompressionReport)> {
    validate(run.model, run.calib, run.seq_len, run.opts)?;
    let method = methods::for_options(run.opts, &run.model.store, &run.model.cfg)?;
    compress_with(gpu, run, method.as_ref(), progress)
}

/// Compresses the run's model layer by layer with `method`: each layer's statistics come
/// from states that went through the already compressed layers.
pub fn compress_with(gpu: &std::sync::Arc<Gpu>, run: &Run, method: &dyn LayerMethod, progress: &mut dyn FnMut(usize, usize, Phase)) -> Result<(PathBuf, CompressionReport)> {
    let Run { model, calib, seq_len, opts, out, ref control } = *run;
    validate(model, calib, seq_len, opts)?;
    let cfg = &model.cfg;
    let store = &model.store;
    let n_layers = cfg.num_hidden_layers;
    let windows = calib.len() / seq_len;
    let t_start = Instant::now();
    gpu.reset_peak();
    let print = Fingerprint::of(model, calib, seq_len, opts)?;
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
        // an older tool's checkpoint held its fingerprint as one string
        let what = if state.get("fingerprint").is_some_and(|f| f.is_string()) { "it was made by an older lorap-gpu".to_string() } else { String::new() };
        let st: ResumeState = serde_json::from_value(state).map_err(|e| CompressError::ResumeMismatch { path: ck.clone(), what: if what.is_empty() { format!("unreadable state: {e}") } else { what } })?;
        if let Some(what) = st.fingerprint.mismatch(&print) {
            return Err(CompressError::ResumeMismatch { path: ck, what }.into());
        }
        plans = st.plans;
        layer_reports = st.reports;
        seconds_before = st.seconds_before;
        tracing::info!(layers_done = st.layers_done, "resuming");
    }
    let first_layer = plans.len();
    let reports_before = layer_reports.len();

    let state_bytes = (calib.len() * cfg.hidden_size * 4) as u64;
    let mut resident = resident_bytes(cfg, control.batch_tokens.unwrap_or(crate::model::forward::DEFAULT_BATCH_TOKENS).min(calib.len()), gpu.coop_f16());
    // the refits' Gram matrices (fitting and held-out windows) on the GPU
    resident += crate::calib::stats::split_bytes(cfg, method.stats_need());
    let on_host = crate::calib::states::keep_on_host(gpu, state_bytes, resident);
    if on_host {
        tracing::info!(state_bytes, resident, "calibration states kept on the host (with a layer's work they would cross the GPU budget)");
    }
    let mut run_clock = PhaseClock::start(gpu);
    run_clock.enter(Phase::Loading);
    let mut walker = Walker::start(gpu, model, calib, seq_len, control.batch_tokens, on_host)?;
    if first_layer > 0 {
        run_clock.enter(Phase::Replaying);
        // rebuild the calibration states: the finished layers, as stored, run again
        let done = WeightStore::open(folder.partial_dir()).context("reading the finished layers of the interrupted run")?;
        let mut c2 = cfg.clone();
        c2.lorap = Some(plan_section(cfg, opts, method.name(), &plans));
        for (j, _) in plans.iter().flatten().enumerate() {
            progress(j, n_layers, Phase::Replaying);
            let layer = LayerWeights::load(gpu, &done, &c2, j)?;
            walker.advance(&layer)?;
        }
    }

    let dtype_of = store.dtype(&crate::format::names::linear(0, Linear::Q, "weight"))?;
    let out_dtype = if matches!(dtype_of, Dtype::F16 | Dtype::BF16) { dtype_of } else { Dtype::F32 };
    let mut run_phases = run_clock.finish();
    let mut prefetch: Option<std::thread::JoinHandle<Result<DenseHost>>> = None;
    for i in first_layer..n_layers {
        let t_layer = Instant::now();
        let setting = LayerSetting::of(opts, i);
        if setting.dropped {
            // a dropped layer is the identity: the states go on unchanged
            plans.push(None);
            checkpoint(&mut folder, &print, &plans, &layer_reports, seconds_before + t_start.elapsed().as_secs_f64())?;
            progress(i + 1, n_layers, Phase::Dropped);
            continue;
        }
        let out_index = plans.iter().flatten().count();
        let mut clock = PhaseClock::start(gpu);
        let mut enter = |clock: &mut PhaseClock, phase: Phase| {
            clock.enter(phase);
            progress(i, n_layers, phase);
        };
        enter(&mut clock, Phase::Loading);
        let host = match prefetch.take().map(|p| p.join()) {
            Some(Ok(Ok(h))) if h.layer == i => h,
            // none (first layer), another layer, or a failed read: read it here, where an
            // error is reported in order
            _ => DenseHost::read(store, cfg, i)?,
        };
        let dense = host.upload(gpu, cfg)?;
        enter(&mut clock, Phase::Statistics);
        let stats = walker.stats(&dense, method.stats_need())?;
        // the next layer's tensors are converted on another thread while this one works
        if let Some(next) = (i + 1..n_layers).find(|&j| !LayerSetting::of(opts, j).dropped) {
            let (store, cfg) = (model.store.clone(), cfg.clone());
            prefetch = Some(std::thread::spawn(move || DenseHost::read(&store, &cfg, next).map_err(anyhow::Error::from)));
        }
        let mut built = BuiltLayer::new(out_dtype, out_index);
        let input = LayerInput { gpu, store, cfg, layer: i, dense: &dense, host: &host, stats: &stats, setting: &setting };
        method.compress_layer(&input, &mut built, &mut |phase| enter(&mut clock, phase))?;
        enter(&mut clock, Phase::Writing);
        clock.host_linear_algebra(built.host_seconds);
        let name = |s: &str| crate::format::names::layer(i, s);
        // the model's own biases, where the method set none; a pruned gate/up keeps the
        // biases of its kept channels
        let own: Vec<Linear> = Linear::ALL.into_iter().filter(|&l| cfg.own_bias(l) && !built.plan.has_added_bias(l)).collect();
        for lin in own {
            let bias = host.biases[lin].as_deref().context("a bias the config promises is missing")?;
            let (out, _) = cfg.linear_shape(&built.plan, lin);
            let bias = match lin {
                Linear::Gate | Linear::Up if out != bias.len() => {
                    anyhow::ensure!(built.ffn_kept_channels.len() == out, "layer {i}: the method pruned the FFN without naming the kept channels");
                    built.ffn_kept_channels.iter().map(|&j| bias[j]).collect()
                }
                _ => bias.to_vec(),
            };
            built.model_bias(gpu, lin, &bias)?;
        }
        for n in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            built.push_copy(store, &name(n))?;
        }
        let BuiltLayer { tensors, linears, plan, errors, spectra, ffn_kept_channels, ffn_refit, attention_refit, .. } = built;
        // the dense linears go before propagation: under a budget only one copy of the
        // layer's weights is on the GPU while the states run through it
        let LayerWeights { q, k, v, o, gate, up, down, in_norm, post_norm } = dense;
        drop((q, k, v, o, gate, up, down));
        let mut it = linears.into_iter();
        let mut next = || it.next().context("a method built fewer than seven linears");
        let compressed = LayerWeights { q: next()?, k: next()?, v: next()?, o: next()?, gate: next()?, up: next()?, down: next()?, in_norm, post_norm };
        enter(&mut clock, Phase::Propagation);
        // the shard is serialized and written on another thread while the states run
        // through the layer; only the part of the write propagation did not hide is
        // charged to writing
        std::thread::scope(|scope| -> Result<()> {
            let writer = scope.spawn(|| folder.write_shard(i, &tensors));
            let advanced = walker.advance(&compressed);
            enter(&mut clock, Phase::Writing);
            let written = writer.join().map_err(|_| anyhow::anyhow!("layer {i}: the shard writer thread panicked"))?;
            advanced?;
            written
        })?;
        drop((tensors, compressed, host));
        let phases = clock.finish();
        run_phases.add(&phases);
        layer_reports.push(LayerReport {
            layer: i,
            ranks: [plan.q_rank, plan.k_rank, plan.v_rank, plan.o_rank],
            ffn_kept: plan.ffn_width,
            ffn_total: cfg.intermediate_size,
            ffn_kept_channels,
            ffn_refit,
            attention_refit,
            weighted_rel_error: errors,
            spectra,
            params_before: cfg.layer_params(i),
            params_after: cfg.plan_params(&plan),
            seconds: t_layer.elapsed().as_secs_f64(),
            phases,
        });
        plans.push(Some(plan));
        checkpoint(&mut folder, &print, &plans, &layer_reports, seconds_before + t_start.elapsed().as_secs_f64())?;
        progress(i + 1, n_layers, Phase::Done);
        if control.stop_after_layers == Some(i + 1) && i + 1 < n_layers {
            return Err(CompressError::Interrupted(i + 1).into());
        }
    }
    drop(walker);

    // embeddings, final norm, untied head: copied exactly
    let mut end_clock = PhaseClock::start(gpu);
    end_clock.enter(Phase::Writing);
    let mut rest = Vec::new();
    for n in [crate::format::names::EMBED, crate::format::names::FINAL_NORM, crate::format::names::LM_HEAD] {
        if n == crate::format::names::LM_HEAD && (cfg.tie_word_embeddings || !store.contains(n)) {
            continue;
        }
        rest.push(OutTensor::copied(store, n)?);
    }
    rest.extend(method.model_tensors(out_dtype));
    folder.write_shard(n_layers, &rest)?;
    drop(rest);

    let mut new_cfg = cfg.clone();
    let mut section = plan_section(cfg, opts, method.name(), &plans);
    new_cfg.num_hidden_layers = section.layers.len();
    new_cfg.lorap = Some(section.clone());
    section.ratio = 1.0 - new_cfg.decoder_params() as f64 / cfg.decoder_params() as f64;
    new_cfg.lorap = Some(section);
    let mut raw = cfg.raw.clone();
    raw.insert("num_hidden_layers".into(), new_cfg.num_hidden_layers.into());
    raw.insert("lorap".into(), serde_json::to_value(new_cfg.lorap.as_ref().unwrap())?);
    folder.write_json("config.json", &serde_json::Value::Object(raw))?;
    folder.copy_side_files(&model.dir)?;
    run_phases.add(&end_clock.finish_settled());
    // layers finished before a resume keep their own phase times
    let phases = layer_reports[..reports_before].iter().fold(run_phases, |mut acc, l| {
        acc.add(&l.phases);
        acc
    });
    let (before, after) = (cfg.decoder_params(), new_cfg.decoder_params());
    let (tb, ta) = (cfg.total_params(), new_cfg.total_params());
    let report = CompressionReport {
        method: method.name().into(),
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
        states_on_host: on_host,
        seconds: seconds_before + t_start.elapsed().as_secs_f64(),
        adapter: gpu.info.name.clone(),
        phases,
        layers: layer_reports,
    };
    folder.write_json("compression_report.json", &serde_json::to_value(&report)?)?;
    if let Some(render) = control.report_files {
        let name = model.dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        for (file, text) in render(&report, &name) {
            folder.write_file(&file, text.as_bytes())?;
        }
    }
    let path = folder.finish().context("finishing the output folder")?;
    Ok((path, report))
}

/// GPU bytes a layer's work holds at its peak beside the calibration states (the estimate
/// that decides where the states live; the allocator enforces the budget itself): the
/// largest dense layer in f32 (and f16 where the tensor-core GEMM runs) and its compressed
/// copy, one batch's activations, and the decomposition's buffers for the largest attention
/// matrix.
fn resident_bytes(cfg: &crate::model::ModelConfig, batch_tokens: usize, half_copies: bool) -> u64 {
    // f32 weights, plus their f16 copies where the cooperative-matrix GEMM runs
    let per_param = if half_copies { 6 } else { 4 };
    let layer = (0..cfg.num_hidden_layers).map(|i| cfg.layer_params(i)).max().unwrap_or(0) as u64 * per_param;
    let (d, f, q) = (cfg.hidden_size as u64, cfg.intermediate_size as u64, cfg.q_dim() as u64);
    let activations = batch_tokens as u64 * (3 * d + 3 * q + 3 * f) * 4;
    // W S, Y, Z, Q, B at up to the break-even rank: about four copies of the matrix
    let decomposition = 4 * d.max(q) * d.max(q) * 4;
    2 * layer + activations + decomposition
}

/// The `lorap` config section for the finished `plans` (`None` = dropped layer); the
/// layers still to do are listed dense unless the run's plan drops them.
fn plan_section(cfg: &crate::model::ModelConfig, opts: &CompressOptions, method: &str, plans: &[Option<LayerPlan>]) -> CompressionSection {
    let dense = LayerPlan { ffn_width: cfg.intermediate_size, ..Default::default() };
    let later = (plans.len()..cfg.num_hidden_layers).filter(|&i| !LayerSetting::of(opts, i).dropped).map(|_| dense.clone());
    let layers = plans.iter().flatten().cloned().chain(later).collect();
    let dropped_layers = (0..cfg.num_hidden_layers).filter(|&i| LayerSetting::of(opts, i).dropped).collect();
    CompressionSection { format_version: 1, method: method.into(), ratio: opts.ratio, layers, dropped_layers }
}

