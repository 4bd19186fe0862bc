//! LoRAP end to end: sequential layer-by-layer calibration on the GPU, activation-weighted
//! low-rank factorization of q/k/v/o with rank allocation, FFN channel pruning with the 1%
//! reservation, and the compressed model written as it goes.

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
use super::svd::{self, SvdOptions};
use crate::gpu::{context::Result as GpuResult, norms, Gpu, GpuBuf};
use crate::model::config::{CompressionSection, LayerPlan};
use crate::model::forward::{self, GpuLinear, LayerWeights, LinearKind, Observer, Site};
use crate::model::{Model, WeightStore};

/// What `compress` does; the ablation switches default to LoRAP itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LorapOptions {
    /// Fraction of decoder-layer parameters to remove, in (0, 1).
    pub ratio: f64,
    pub allocation: Allocation,
    /// Activation-weighted SVD (false: plain SVD of W).
    pub weighted_svd: bool,
    /// Fraction of lowest-scored FFN channels kept (the paper's 1%).
    pub reserve: f64,
    /// Wanda-style activation-weighted channel scores (false: weight magnitudes only).
    pub ffn_activation_scores: bool,
    #[serde(skip)]
    pub svd: SvdOptions,
}

impl Default for LorapOptions {
    fn default() -> Self {
        LorapOptions { ratio: 0.2, allocation: Allocation::Fixed31, weighted_svd: true, reserve: 0.01, ffn_activation_scores: true, svd: SvdOptions::default() }
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

/// Sums of squares of the inputs of every linear, over all calibration tokens.
struct InputStats {
    attn_in: GpuBuf,
    o_in: GpuBuf,
    ffn_in: GpuBuf,
    down_in: GpuBuf,
}

impl Observer for InputStats {
    fn see(&mut self, gpu: &Gpu, enc: &mut wgpu::CommandEncoder, site: Site, x: &GpuBuf, rows: usize, cols: usize) -> GpuResult<()> {
        let out = match site {
            Site::AttnInput => &self.attn_in,
            Site::OInput => &self.o_in,
            Site::FfnInput => &self.ffn_in,
            Site::DownInput => &self.down_in,
        };
        norms::col_sumsq_accumulate(gpu, enc, x, rows, cols, out)
    }
}

/// s_j = sqrt(mean over windows of ||X_w[:, j]||^2), zeros replaced by 1e-4.
fn scales(sumsq: &[f32], windows: usize) -> Vec<f32> {
    sumsq.iter().map(|&v| (v as f64 / windows as f64).sqrt() as f32).map(|s| if s > 0.0 { s } else { 1e-4 }).collect()
}

/// Factors of one attention matrix: A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T S^-1.
fn factors(dec: &svd::Svd, r: usize, scale: &[f32]) -> (Vec<f32>, Vec<f32>) {
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
    plans: Vec<LayerPlan>,
    reports: Vec<LayerReport>,
    seconds_before: f64,
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
    if !(opts.ratio > 0.0 && opts.ratio < 1.0) {
        return Err(CompressError::BadRatio(opts.ratio).into());
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
        c2.lorap = Some(plan_section(cfg, opts.ratio, &plans));
        for i in 0..first_layer {
            progress(i, n_layers, "replaying finished layer");
            let layer = LayerWeights::load(gpu, &done, &c2, i)?;
            propagate(gpu, cfg, &layer, &table, &mut batches, seq_len)?;
        }
    }

    let (d, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
    for i in first_layer..n_layers {
        let t_layer = Instant::now();
        progress(i, n_layers, "statistics");
        let dense = LayerWeights::load(gpu, store, cfg, i)?;
        let f = dense.gate.out;
        let mut stats = InputStats { attn_in: gpu.zeros(d)?, o_in: gpu.zeros(qd)?, ffn_in: gpu.zeros(d)?, down_in: gpu.zeros(f)? };
        batches.for_each(gpu, |h, tokens| {
            let mut enc = gpu.encoder();
            // the layer's output is discarded: the next inputs come from the compressed layer
            forward::layer_forward(gpu, &mut enc, cfg, &dense, &table, h, tokens, seq_len, Some(&mut stats))?;
            gpu.submit(enc);
            Ok(None)
        })?;
        let s_attn = scales(&gpu.read(&stats.attn_in)?, windows);
        let s_o = scales(&gpu.read(&stats.o_in)?, windows);
        let s_ffn = scales(&gpu.read(&stats.ffn_in)?, windows);
        let s_down = scales(&gpu.read(&stats.down_in)?, windows);
        drop(stats);

        progress(i, n_layers, "attention SVD");
        let name = |s: &str| format!("model.layers.{i}.{s}");
        let mats = [(forward::LINEARS[0], qd, d, &s_attn), (forward::LINEARS[1], kvd, d, &s_attn), (forward::LINEARS[2], kvd, d, &s_attn), (forward::LINEARS[3], d, qd, &s_o)];
        let mut decs = Vec::new();
        let mut specs = Vec::new();
        let mut norms_sq = Vec::new();
        let mut used_scales = Vec::new();
        for (lin, out_dim, in_dim, s) in mats {
            let w = store.f32(&name(&format!("{lin}.weight")), &[out_dim, in_dim])?;
            let sc: Vec<f32> = if opts.weighted_svd { s.clone() } else { vec![1.0; in_dim] };
            let ws: Vec<f32> = w.chunks(in_dim).flat_map(|row| row.iter().zip(&sc).map(|(a, b)| a * b)).collect();
            norms_sq.push(ws.iter().map(|&x| x as f64 * x as f64).sum::<f64>());
            let spec_rank = out_dim * in_dim / (out_dim + in_dim);
            let g = gpu.upload(&ws)?;
            let dec = svd::randomized_svd(gpu, &g, out_dim, in_dim, spec_rank, opts.svd)?;
            specs.push(MatrixSpec { out: out_dim, inp: in_dim, sigma: dec.sigma.clone() });
            decs.push((dec, w));
            used_scales.push(sc);
        }
        let dense_att: usize = specs.iter().map(|s| s.out * s.inp).sum();
        let budget = ((1.0 - opts.ratio) * dense_att as f64).round() as usize;
        let ranks = allocate::allocate(&specs, budget, opts.allocation);

        let w_dtype = store.dtype(&name("self_attn.q_proj.weight"))?;
        let out_dtype = if matches!(w_dtype, Dtype::F16 | Dtype::BF16) { w_dtype } else { Dtype::F32 };
        let mut tensors = Vec::new();
        let mut push = |n: String, shape: Vec<usize>, v: &[f32]| tensors.push(OutTensor { name: n, dtype: out_dtype, bytes: encode(v, out_dtype), shape });
        let mut linears = Vec::new();
        let mut errors = [0f64; 4];
        for (j, ((dec, w), r)) in decs.iter().zip(&ranks).enumerate() {
            let (out_dim, in_dim) = (dec.m, dec.n);
            let lin = forward::LINEARS[j];
            match r {
                None => {
                    push(name(&format!("{lin}.weight")), vec![out_dim, in_dim], w);
                    linears.push(GpuLinear { out: out_dim, inp: in_dim, kind: LinearKind::Dense { w: gpu.upload(w)? }, bias: None });
                }
                Some(r) => {
                    let (a, b) = factors(dec, *r, &used_scales[j]);
                    let kept: f64 = dec.sigma[..*r].iter().map(|s| s * s).sum();
                    errors[j] = ((norms_sq[j] - kept).max(0.0) / norms_sq[j].max(f64::MIN_POSITIVE)).sqrt();
                    // the GPU layer uses the values as stored, so calibration sees what eval will
                    let (a, b) = (round_trip(&a, out_dtype), round_trip(&b, out_dtype));
                    push(name(&format!("{lin}.factor_a")), vec![out_dim, *r], &a);
                    push(name(&format!("{lin}.factor_b")), vec![*r, in_dim], &b);
                    linears.push(GpuLinear { out: out_dim, inp: in_dim, kind: LinearKind::LowRank { a: gpu.upload(&a)?, b: gpu.upload(&b)?, rank: *r }, bias: None });
                }
            }
        }
        if cfg.qkv_bias() {
            for (j, lin) in forward::LINEARS[..3].iter().enumerate() {
                let bias = store.f32(&name(&format!("{lin}.bias")), &[linears[j].out])?;
                push(name(&format!("{lin}.bias")), vec![bias.len()], &bias);
                linears[j].bias = Some(gpu.upload(&round_trip(&bias, out_dtype))?);
            }
        }

        progress(i, n_layers, "FFN pruning");
        let ones_d = vec![1f32; d];
        let ones_f = vec![1f32; f];
        let (sx, sh) = if opts.ffn_activation_scores { (&s_ffn, &s_down) } else { (&ones_d, &ones_f) };
        let (LinearKind::Dense { w: wg }, LinearKind::Dense { w: wu }, LinearKind::Dense { w: wd }) = (&dense.gate.kind, &dense.up.kind, &dense.down.kind) else {
            bail!("layer {i}: FFN is not dense");
        };
        let sxg = gpu.upload(sx)?;
        let scores = ffn::channel_scores(gpu, wg, wu, wd, &sxg, sh, d, f)?;
        let remove = (opts.ratio * f as f64).round() as usize;
        let kept = ffn::kept_channels(&scores, remove, opts.reserve);
        let gate = ffn::gather_rows(&store.f32(&name("mlp.gate_proj.weight"), &[f, d])?, d, &kept);
        let up = ffn::gather_rows(&store.f32(&name("mlp.up_proj.weight"), &[f, d])?, d, &kept);
        let down = ffn::gather_cols(&store.f32(&name("mlp.down_proj.weight"), &[d, f])?, d, f, &kept);
        let fk = kept.len();
        push(name("mlp.gate_proj.weight"), vec![fk, d], &gate);
        push(name("mlp.up_proj.weight"), vec![fk, d], &up);
        push(name("mlp.down_proj.weight"), vec![d, fk], &down);
        for n in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            tensors.push(OutTensor::copied(store, &name(n))?);
        }
        let mut it = linears.into_iter();
        let compressed = LayerWeights {
            q: it.next().unwrap(),
            k: it.next().unwrap(),
            v: it.next().unwrap(),
            o: it.next().unwrap(),
            gate: GpuLinear { out: fk, inp: d, kind: LinearKind::Dense { w: gpu.upload(&round_trip(&gate, out_dtype))? }, bias: None },
            up: GpuLinear { out: fk, inp: d, kind: LinearKind::Dense { w: gpu.upload(&round_trip(&up, out_dtype))? }, bias: None },
            down: GpuLinear { out: d, inp: fk, kind: LinearKind::Dense { w: gpu.upload(&round_trip(&down, out_dtype))? }, bias: None },
            in_norm: dense.in_norm,
            post_norm: dense.post_norm,
        };
        progress(i, n_layers, "writing");
        folder.write_shard(i, &tensors)?;
        drop(tensors);

        progress(i, n_layers, "propagating");
        propagate(gpu, cfg, &compressed, &table, &mut batches, seq_len)?;
        let plan = LayerPlan { q_rank: ranks[0], k_rank: ranks[1], v_rank: ranks[2], o_rank: ranks[3], ffn_width: fk };
        plans.push(plan);
        let mut c2 = cfg.clone();
        c2.lorap = Some(plan_section(cfg, opts.ratio, &plans));
        layer_reports.push(LayerReport {
            layer: i,
            ranks: [ranks[0], ranks[1], ranks[2], ranks[3]],
            ffn_kept: fk,
            ffn_total: f,
            weighted_rel_error: errors,
            spectra: [0, 1, 2, 3].map(|j| decs[j].0.sigma.clone()),
            params_before: cfg.layer_params(i),
            params_after: c2.layer_params(i),
            seconds: t_layer.elapsed().as_secs_f64(),
        });
        let state = ResumeState { fingerprint: print.clone(), layers_done: i + 1, plans: plans.clone(), reports: layer_reports.clone(), seconds_before: seconds_before + t_start.elapsed().as_secs_f64() };
        folder.checkpoint(serde_json::to_value(&state)?)?;
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
    folder.write_shard(n_layers, &rest)?;
    drop(rest);

    let mut new_cfg = cfg.clone();
    new_cfg.lorap = Some(plan_section(cfg, opts.ratio, &plans));
    let mut raw = cfg.raw.clone();
    raw.insert("lorap".into(), serde_json::to_value(new_cfg.lorap.as_ref().unwrap())?);
    folder.write_json("config.json", &serde_json::Value::Object(raw))?;
    folder.copy_side_files(&model.dir)?;
    let (before, after) = (cfg.decoder_params(), new_cfg.decoder_params());
    let (tb, ta) = (cfg.total_params(), new_cfg.total_params());
    let report = CompressionReport {
        method: "lorap".into(),
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

/// The `lorap` config section for the finished `plans`; later layers are listed dense.
fn plan_section(cfg: &crate::model::ModelConfig, ratio: f64, plans: &[LayerPlan]) -> CompressionSection {
    let dense = LayerPlan { ffn_width: cfg.intermediate_size, ..Default::default() };
    let layers = plans.iter().cloned().chain((plans.len()..cfg.num_hidden_layers).map(|_| dense.clone())).collect();
    CompressionSection { format_version: 1, method: "lorap".into(), ratio, layers }
}

/// Runs the calibration states through one (compressed) layer, in place.
fn propagate(gpu: &Gpu, cfg: &crate::model::ModelConfig, layer: &LayerWeights, table: &crate::gpu::rope::RopeTable, batches: &mut CalibStates, seq_len: usize) -> Result<()> {
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
fn round_trip(v: &[f32], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F16 => v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect(),
        Dtype::BF16 => v.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect(),
        _ => v.to_vec(),
    }
}
