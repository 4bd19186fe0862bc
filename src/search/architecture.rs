//! Training-free architecture search (`lorap-gpu search`): importance is sorted once on the
//! dense model (activation-weighted spectra of q/k/v/o, FFN channel scores), then per-layer
//! attention keep fractions, FFN keep fractions and dropped layers are searched, each
//! candidate scored by perplexity on calibration windows, its decoder parameter count and its
//! measured forward latency. The result is the Pareto front over the three, not one point.
//! The surgical feature-space search (`surgical`) uses the same evaluator.

use std::time::Instant;

use anyhow::Result;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::evaluator::nll_from;
use crate::calib::split_search_windows;
use crate::calib::stats::StatsNeed;
use crate::calib::walker::Walker;
use crate::format::linear::Linear;
use crate::format::plan::{Plan, PlanLayer};
use crate::methods::allocate::{self, Allocation, MatrixSpec};
use crate::methods::svd::{self, SvdOptions};
use crate::methods::ffn;
use crate::gpu::Gpu;
use crate::format::plan::LayerPlan;
use crate::model::forward::{self, GpuLinear, LayerWeights, LinearKind, Runner};
use crate::model::{Model, ModelConfig};

/// Settings of a search.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchOptions {
    /// Uniform plans evaluated first (decoder ratios); they anchor the front.
    pub uniform_ratios: Vec<f64>,
    /// Local-search steps after the uniform sweep.
    pub evaluations: usize,
    /// The decoder ratio the local search holds its parameter count at (default: the
    /// middle uniform ratio).
    pub target_ratio: Option<f64>,
    /// Moves may drop whole layers.
    pub allow_drop: bool,
    /// Keep-fraction change of one move.
    pub step: f64,
    /// Fraction of the lowest-scored FFN channels reserved (LoRAP's 1%: 0.01; `compress`'s default: none).
    pub reserve: f64,
    /// Attention rank allocation of every candidate (`compress --plan` must use the same
    /// to reproduce what the search scored; both default to LoRAP's).
    pub allocation: Allocation,
    pub seed: u64,
    #[serde(skip)]
    pub svd: SvdOptions,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions { uniform_ratios: vec![0.1, 0.2, 0.3, 0.4, 0.5], evaluations: 24, target_ratio: None, allow_drop: true, step: 0.1, reserve: crate::methods::lorap::LorapOptions::default().reserve, allocation: crate::methods::lorap::LorapOptions::default().allocation, seed: 1, svd: SvdOptions::default() }
    }
}

/// One evaluated plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Candidate {
    /// How it was made ("uniform 0.20", "move 3", ...).
    pub origin: String,
    pub plan: Plan,
    pub decoder_params: usize,
    /// 1 - decoder params / dense decoder params.
    pub decoder_ratio: f64,
    /// Perplexity on the search windows of the calibration text.
    pub calib_ppl: f64,
    /// Measured forward time per token on the search windows (seconds).
    pub seconds_per_token: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchResult {
    pub options: SearchOptions,
    pub dense_ppl: f64,
    pub dense_decoder_params: usize,
    pub candidates: Vec<Candidate>,
    /// Indices of the Pareto front over (parameters, perplexity, latency), by parameters.
    pub front: Vec<usize>,
    /// The best candidate at the target parameter count (within 0.5% of it).
    pub best_at_target: Option<usize>,
    /// The uniform plan at the target ratio.
    pub uniform_at_target: Option<usize>,
    /// The sensitivity-guided plans (alpha 0.5 and 1.0; one is missing when it could not
    /// meet the budget).
    #[serde(default)]
    pub guided: Vec<usize>,
    /// Increase of the mean calibration NLL when each layer alone is compressed at keep
    /// 1 - 2 x target (the others dense).
    pub sensitivity: Vec<f64>,
    pub adapter: String,
    pub seconds: f64,
}

/// Indices of the candidates no other candidate dominates (all objectives <=, one <).
pub fn pareto_front(points: &[[f64; 3]]) -> Vec<usize> {
    let dominates = |a: &[f64; 3], b: &[f64; 3]| a.iter().zip(b).all(|(x, y)| x <= y) && a.iter().zip(b).any(|(x, y)| x < y);
    let mut front: Vec<usize> = (0..points.len()).filter(|&i| !points.iter().any(|p| dominates(p, &points[i]))).collect();
    front.sort_by(|&a, &b| points[a][0].total_cmp(&points[b][0]));
    front
}

/// LoRAP's building blocks for one layer, from dense-model statistics.
struct LayerLibrary {
    /// Weighted SVD and the scale of q, k, v, o.
    decs: Vec<(svd::Svd, Vec<f32>)>,
    specs: Vec<MatrixSpec>,
    ffn_scores: Vec<f64>,
}

/// Everything a candidate is built from: per-layer importance, sorted once.
struct Library {
    layers: Vec<LayerLibrary>,
}

fn build_library(gpu: &std::sync::Arc<Gpu>, model: &Model, calib: &[u32], seq_len: usize, opts: &SearchOptions, progress: &mut dyn FnMut(usize, usize, &str)) -> Result<Library> {
    let cfg = &model.cfg;
    let store = &model.store;
    let mut walker = Walker::start(gpu, model, calib, seq_len, None, false)?;
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let full = LayerPlan { ffn_width: f, ..Default::default() };
    let mut layers = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        progress(i, cfg.num_hidden_layers, "importance");
        let dense = LayerWeights::load(gpu, store, cfg, i)?;
        let stats = walker.stats(&dense, StatsNeed::Scales)?;
        let mut decs = Vec::new();
        let mut specs = Vec::new();
        for lin in Linear::ATTENTION {
            let (out, inp) = cfg.linear_shape(&full, lin);
            let w = store.f32(&crate::format::names::linear(i, lin, "weight"), &[out, inp])?;
            let sc = stats.input_scales(lin).to_vec();
            let (dec, spec) = crate::methods::lorap::weighted_svd(gpu, &w, out, inp, &sc, opts.svd)?;
            specs.push(spec);
            decs.push((dec, sc));
        }
        let (LinearKind::Dense { w: wg }, LinearKind::Dense { w: wu }, LinearKind::Dense { w: wd }) = (&dense.gate.kind, &dense.up.kind, &dense.down.kind) else {
            anyhow::bail!("layer {i}: FFN is not dense (search needs the dense model)");
        };
        let ffn_scores = ffn::channel_scores(gpu, [wg, wu, wd], &gpu.upload(stats.input_scales(Linear::Gate))?, stats.input_scales(Linear::Down), d)?;
        walker.advance(&dense)?;
        layers.push(LayerLibrary { decs, specs, ffn_scores });
    }
    Ok(Library { layers })
}

/// The LoRAP plan of one layer at keep fractions: ranks and FFN width (what it costs).
fn layer_shape(cfg: &ModelConfig, lib: &LayerLibrary, att_keep: f64, ffn_keep: f64, opts: &SearchOptions) -> (LayerPlan, Vec<usize>) {
    let f = cfg.intermediate_size;
    let mut plan = LayerPlan { ffn_width: f, ..Default::default() };
    if att_keep < 1.0 {
        let dense_att: usize = lib.specs.iter().map(|s| s.out * s.inp).sum();
        let ranks = allocate::allocate(&lib.specs, (att_keep * dense_att as f64).round() as usize, opts.allocation);
        for (lin, r) in Linear::ATTENTION.into_iter().zip(ranks) {
            plan.set_rank(lin, r);
        }
    }
    let remove = (((1.0 - ffn_keep) * f as f64).round() as usize).min(f - 1);
    let kept = ffn::kept_channels(&lib.ffn_scores, remove, opts.reserve);
    plan.ffn_width = kept.len();
    (plan, kept)
}

/// Decoder parameters of a plan.
fn plan_params(cfg: &ModelConfig, lib: &Library, plan: &Plan, opts: &SearchOptions) -> usize {
    plan.layers
        .iter()
        .zip(&lib.layers)
        .filter(|(l, _)| !l.dropped)
        .map(|(l, ll)| cfg.plan_params(&layer_shape(cfg, ll, l.attention_keep.unwrap_or(1.0), l.ffn_keep.unwrap_or(1.0), opts).0))
        .sum()
}

/// GPU weights of layer `i` under a plan entry (from the library and the dense FFN).
fn build_layer(gpu: &Gpu, model: &Model, lib: &LayerLibrary, i: usize, l: &PlanLayer, opts: &SearchOptions) -> Result<Option<LayerWeights>> {
    if l.dropped {
        return Ok(None);
    }
    let cfg = &model.cfg;
    let (plan, kept) = layer_shape(cfg, lib, l.attention_keep.unwrap_or(1.0), l.ffn_keep.unwrap_or(1.0), opts);
    let dense = LayerWeights::load(gpu, &model.store, cfg, i)?;
    let mut lin = Vec::new();
    for (linear, (dec, sc)) in Linear::ATTENTION.into_iter().zip(&lib.decs) {
        lin.push(match plan.rank(linear) {
            None => None,
            Some(r) => {
                let (a, b) = crate::methods::lorap::factors(dec, r, sc);
                Some(GpuLinear::low_rank(gpu, dec.m, dec.n, &a, &b, r, None)?)
            }
        });
    }
    let mut lw = dense;
    for (linear, l) in Linear::ATTENTION.into_iter().zip(lin) {
        if let Some(l) = l {
            lw.replace_linear(linear, l);
        }
    }
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    if kept.len() < f {
        let fk = kept.len();
        let [gate, up, down] = ffn::pruned_weights(&model.store, i, d, f, &kept)?;
        for (linear, w, out, inp) in [(Linear::Gate, gate, fk, d), (Linear::Up, up, fk, d), (Linear::Down, down, d, fk)] {
            lw.replace_linear(linear, GpuLinear::dense(gpu, out, inp, &w, None)?);
        }
    }
    Ok(Some(lw))
}

/// Searches per-layer LoRAP settings of `model`: `calib` (whole windows of `seq_len`) is
/// split into statistics windows and search (scoring) windows, `search_windows` of them.
pub fn search(
    gpu: &std::sync::Arc<Gpu>,
    model: &Model,
    calib: &[u32],
    seq_len: usize,
    search_windows: usize,
    opts: &SearchOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<SearchResult> {
    let cfg = &model.cfg;
    let n = cfg.num_hidden_layers;
    anyhow::ensure!(cfg.lorap.is_none(), crate::error::CompressError::AlreadyCompressed(model.dir.display().to_string()));
    let (stats_tokens, search_tokens) = split_search_windows(calib, seq_len, search_windows)?;
    anyhow::ensure!(opts.uniform_ratios.iter().all(|r| (0.0..1.0).contains(r)) && opts.step > 0.0 && opts.step < 1.0, crate::error::CompressError::BadArgument("uniform ratios must be in [0, 1) and the step in (0, 1)".into()));
    let t0 = Instant::now();
    let lib = build_library(gpu, model, stats_tokens, seq_len, opts, progress)?;
    let mut runner = Runner::new(gpu.clone(), cfg.clone(), model.store.clone(), false);
    let table = crate::gpu::rope::RopeTable::from_inv_freq(gpu, seq_len.next_power_of_two(), &cfg.inv_freq())?;
    let h0 = runner.embed(search_tokens)?;
    let dense_params = cfg.decoder_params();
    let evaluate = |runner: &mut Runner, plan: &Plan| -> Result<(f64, f64)> {
        let (nll, secs) = nll_from(runner, &table, &h0, 0, &mut |i| build_layer(gpu, model, &lib.layers[i], i, &plan.layers[i], opts), search_tokens, seq_len)?;
        Ok((nll.exp(), secs / search_tokens.len() as f64))
    };
    let mut candidates: Vec<Candidate> = Vec::new();
    // dense, the uniform plans, one sensitivity probe per layer, two guided plans, the
    // guided drop, the moves
    let total = opts.uniform_ratios.len() + 1 + n + 3 + opts.evaluations;
    let record = |origin: String, plan: Plan, ppl: f64, spt: f64, candidates: &mut Vec<Candidate>| -> usize {
        let p = plan_params(cfg, &lib, &plan, opts);
        candidates.push(Candidate { origin, plan, decoder_params: p, decoder_ratio: 1.0 - p as f64 / dense_params as f64, calib_ppl: ppl, seconds_per_token: spt });
        candidates.len() - 1
    };
    progress(0, total, "dense");
    let (dense_ppl, dense_spt) = evaluate(&mut runner, &Plan::uniform(n, 1.0))?;
    record("dense".into(), Plan::uniform(n, 1.0), dense_ppl, dense_spt, &mut candidates);
    let mut uniform_idx = Vec::new();
    for (k, &r) in opts.uniform_ratios.iter().enumerate() {
        progress(k + 1, total, "uniform plans");
        let plan = Plan::uniform(n, 1.0 - r);
        let (ppl, spt) = evaluate(&mut runner, &plan)?;
        uniform_idx.push((r, record(format!("uniform {r:.2}"), plan, ppl, spt, &mut candidates)));
    }
    let target = opts.target_ratio.unwrap_or_else(|| opts.uniform_ratios.get(opts.uniform_ratios.len() / 2).copied().unwrap_or(0.2));
    let (budget, tol) = budget_at(target, dense_params);
    let start = Plan::uniform(n, 1.0 - target);
    let uniform_at_target = match uniform_idx.iter().find(|(r, _)| (r - target).abs() < 1e-9) {
        Some((_, k)) => *k,
        None => {
            let (ppl, spt) = evaluate(&mut runner, &start)?;
            record(format!("uniform {target:.2}"), start.clone(), ppl, spt, &mut candidates)
        }
    };
    let mut best = (start, candidates[uniform_at_target].calib_ppl);

    // sensitivity: each layer alone compressed harder than the target, the others dense;
    // scored from the dense states entering it, so only the layers after it run again
    let mut entering = vec![runner.embed(search_tokens)?];
    for i in 0..n - 1 {
        let lw = LayerWeights::load(gpu, &model.store, cfg, i)?;
        let mut enc = gpu.encoder();
        let next = forward::layer_forward(gpu, &mut enc, cfg, &lw, &table, forward::Batch { h: &entering[i], tokens: search_tokens.len(), window: seq_len }, None)?;
        gpu.submit(enc);
        entering.push(next);
    }
    let probe_keep = (1.0 - 2.0 * target).max(0.1);
    let mut sensitivity = Vec::with_capacity(n);
    for i in 0..n {
        progress(opts.uniform_ratios.len() + 1 + i, total, "layer sensitivity");
        let probe = PlanLayer { attention_keep: Some(probe_keep), ffn_keep: Some(probe_keep), ..Default::default() };
        let (nll, _) = nll_from(&mut runner, &table, &entering[i], i, &mut |k| {
            if k == i {
                build_layer(gpu, model, &lib.layers[k], k, &probe, opts)
            } else {
                Ok(Some(LayerWeights::load(gpu, &model.store, cfg, k)?))
            }
        }, search_tokens, seq_len)?;
        sensitivity.push(nll - dense_ppl.ln());
    }
    drop(entering);
    // guided plans: each layer removes a share inversely related to its sensitivity
    let mut guided = Vec::new();
    for (k, alpha) in [0.5, 1.0].into_iter().enumerate() {
        progress(opts.uniform_ratios.len() + 1 + n + k, total, "sensitivity-guided plans");
        let Some(plan) = guided_plan(&sensitivity, alpha, |p| plan_params(cfg, &lib, p, opts), budget) else { continue };
        let (ppl, spt) = evaluate(&mut runner, &plan)?;
        guided.push(record(format!("sensitivity-guided a={alpha}"), plan.clone(), ppl, spt, &mut candidates));
        if ppl < best.1 {
            best = (plan, ppl);
        }
    }
    // the least sensitive layer dropped from the best plan so far, its parameters spread
    // over the others: the drop a random move would rarely find in a short search
    progress(opts.uniform_ratios.len() + 1 + n + 2, total, "sensitivity-guided drop");
    if let Some((victim, plan)) = guided_drop(&best.0, &sensitivity, opts, |p| plan_params(cfg, &lib, p, opts), budget) {
        let (ppl, spt) = evaluate(&mut runner, &plan)?;
        record(format!("drop layer {victim}"), plan.clone(), ppl, spt, &mut candidates);
        if ppl < best.1 {
            best = (plan, ppl);
        }
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let att_unit = Linear::ATTENTION.into_iter().map(|l| cfg.linear_params(&LayerPlan { ffn_width: cfg.intermediate_size, ..Default::default() }, l)).sum::<usize>() as f64;
    let ffn_unit = (3 * cfg.hidden_size * cfg.intermediate_size) as f64;
    for step in 0..opts.evaluations {
        progress(opts.uniform_ratios.len() + 1 + n + 3 + step, total, "local search");
        let Some(plan) = propose(&best.0, &mut rng, opts, att_unit, ffn_unit, |p| plan_params(cfg, &lib, p, opts), budget) else { continue };
        let (ppl, spt) = evaluate(&mut runner, &plan)?;
        let better = ppl < best.1;
        record(format!("move {}", step + 1), plan.clone(), ppl, spt, &mut candidates);
        if better {
            best = (plan, ppl);
        }
    }
    progress(total, total, "done");
    let points: Vec<[f64; 3]> = candidates.iter().map(|c| [c.decoder_params as f64, c.calib_ppl, c.seconds_per_token]).collect();
    // latency is measured, so noisy: the front uses it but parameters and perplexity decide ties
    let front = pareto_front(&points);
    let best_at_target = best_within(&candidates, 0..candidates.len(), budget, tol);
    let mut opts = opts.clone();
    opts.target_ratio = Some(target);
    Ok(SearchResult {
        options: opts,
        dense_ppl,
        dense_decoder_params: dense_params,
        candidates,
        front,
        best_at_target,
        uniform_at_target: Some(uniform_at_target),
        guided,
        sensitivity,
        adapter: gpu.info.name.clone(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The decoder-parameter budget of a target ratio, and how far from it a plan may land and
/// still count as "at the target" (half a percent of the dense decoder).
pub(crate) fn budget_at(target: f64, dense_params: usize) -> (usize, f64) {
    (((1.0 - target) * dense_params as f64) as usize, 0.005 * dense_params as f64)
}

/// The candidate of `among` with the lowest calibration perplexity whose parameter count is
/// within `tol` of `budget` (the first of equals, so order says who wins a tie).
pub(crate) fn best_within(candidates: &[Candidate], among: impl IntoIterator<Item = usize>, budget: usize, tol: f64) -> Option<usize> {
    among.into_iter().filter(|&k| (candidates[k].decoder_params as f64 - budget as f64).abs() <= tol).min_by(|&a, &b| candidates[a].calib_ppl.total_cmp(&candidates[b].calib_ppl))
}

/// Per-layer removal r_i = c / (sensitivity_i + eps)^alpha (normalised, clamped to
/// [0, 0.95]), with c found so the plan meets `budget`.
pub(crate) fn guided_plan(sensitivity: &[f64], alpha: f64, params: impl Fn(&Plan) -> usize, budget: usize) -> Option<Plan> {
    let n = sensitivity.len();
    let mean = sensitivity.iter().map(|s| s.max(0.0)).sum::<f64>() / n as f64;
    let eps = 0.1 * mean.max(1e-6);
    let w: Vec<f64> = sensitivity.iter().map(|s| 1.0 / (s.max(0.0) + eps).powf(alpha)).collect();
    let wm = w.iter().sum::<f64>() / n as f64;
    let plan_at = |c: f64| {
        let mut p = Plan::uniform(n, 1.0);
        for (l, wi) in p.layers.iter_mut().zip(&w) {
            let keep = 1.0 - (c * wi / wm).clamp(0.0, 0.95);
            l.attention_keep = Some(keep);
            l.ffn_keep = Some(keep);
        }
        p
    };
    // more removal, fewer parameters: bisect on c
    let (mut lo, mut hi) = (0.0, 1.0 / w.iter().map(|x| x / wm).fold(f64::INFINITY, f64::min).max(1e-9));
    if params(&plan_at(hi)) > budget {
        return None;
    }
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if params(&plan_at(mid)) > budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(plan_at(hi))
}

/// A budget-neutral move from `plan`: one layer gains `step` of attention or FFN, another
/// loses what keeps the parameter count at `budget` (within half a percent); or a layer is
/// dropped and its parameters spread over the others. `None` when the move is infeasible.
fn propose(plan: &Plan, rng: &mut StdRng, opts: &SearchOptions, att_unit: f64, ffn_unit: f64, params: impl Fn(&Plan) -> usize, budget: usize) -> Option<Plan> {
    let n = plan.layers.len();
    let live: Vec<usize> = (0..n).filter(|&i| !plan.layers[i].dropped).collect();
    let mut p = plan.clone();
    if opts.allow_drop && live.len() > 2 && rng.random_bool(0.15) {
        let victim = live[rng.random_range(0..live.len())];
        p.layers[victim].dropped = true;
    } else {
        if live.len() < 2 {
            return None;
        }
        let a = live[rng.random_range(0..live.len())];
        let b = live[rng.random_range(0..live.len())];
        let (xa, xb) = (rng.random_bool(0.5), rng.random_bool(0.5));
        let (ua, ub) = (if xa { att_unit } else { ffn_unit }, if xb { att_unit } else { ffn_unit });
        let gain = opts.step;
        let loss = gain * ua / ub;
        let get = |l: &PlanLayer, att: bool| if att { l.attention_keep.unwrap_or(1.0) } else { l.ffn_keep.unwrap_or(1.0) };
        let (ka, kb) = (get(&p.layers[a], xa) + gain, get(&p.layers[b], xb) - loss);
        if (a == b && xa == xb) || ka > 1.0 + 1e-9 || kb < 0.05 {
            return None;
        }
        let set = |l: &mut PlanLayer, att: bool, k: f64| if att { l.attention_keep = Some(k.min(1.0)) } else { l.ffn_keep = Some(k.min(1.0)) };
        set(&mut p.layers[a], xa, ka);
        set(&mut p.layers[b], xb, kb);
    }
    meet_budget(p, params, budget)
}

/// `plan` with its least sensitive live layer dropped and the budget met again: (the
/// layer, the plan). `None` when drops are off, two layers or fewer live, or the budget
/// cannot be met.
fn guided_drop(plan: &Plan, sensitivity: &[f64], opts: &SearchOptions, params: impl Fn(&Plan) -> usize, budget: usize) -> Option<(usize, Plan)> {
    let live: Vec<usize> = (0..plan.layers.len()).filter(|&i| !plan.layers[i].dropped).collect();
    if !opts.allow_drop || live.len() <= 2 {
        return None;
    }
    let victim = live.into_iter().min_by(|&a, &b| sensitivity[a].total_cmp(&sensitivity[b]))?;
    let mut p = plan.clone();
    p.layers[victim].dropped = true;
    meet_budget(p, params, budget).map(|p| (victim, p))
}

/// `p` with every live layer's keep fractions rescaled so the parameters meet `budget`
/// (within 0.4%); `None` when the clamps keep it from getting there.
fn meet_budget(mut p: Plan, params: impl Fn(&Plan) -> usize, budget: usize) -> Option<Plan> {
    for _ in 0..30 {
        let have = params(&p) as f64;
        if (have - budget as f64).abs() <= 0.004 * budget as f64 {
            return Some(p);
        }
        let s = budget as f64 / have;
        for l in p.layers.iter_mut().filter(|l| !l.dropped) {
            l.attention_keep = Some((l.attention_keep.unwrap_or(1.0) * s).clamp(0.05, 1.0));
            l.ffn_keep = Some((l.ffn_keep.unwrap_or(1.0) * s).clamp(0.05, 1.0));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pareto_front_keeps_exactly_the_non_dominated_points() {
        let pts = [[1.0, 5.0, 1.0], [2.0, 4.0, 1.0], [2.0, 6.0, 1.0], [3.0, 3.0, 2.0], [3.0, 3.0, 1.0], [0.5, 9.0, 3.0], [4.0, 4.0, 0.5]];
        // [2,6,1] is dominated by [1,5,1]; [3,3,2] by [3,3,1]; [4,4,0.5] is kept: lowest latency
        assert_eq!(pareto_front(&pts), vec![5, 0, 1, 4, 6]);
    }

    #[test]
    fn guided_plans_meet_the_budget_and_spare_sensitive_layers() {
        let sens = [4.0, 0.5, 0.1, 2.0];
        // parameters proportional to the summed keep fractions
        let params = |p: &Plan| (p.layers.iter().filter(|l| !l.dropped).map(|l| l.attention_keep.unwrap() + l.ffn_keep.unwrap()).sum::<f64>() * 1000.0) as usize;
        let budget = 6000; // 75% of 8000
        let p = guided_plan(&sens, 1.0, params, budget).unwrap();
        assert!((params(&p) as f64 - budget as f64).abs() <= 10.0, "{}", params(&p));
        let k: Vec<f64> = p.layers.iter().map(|l| l.attention_keep.unwrap()).collect();
        assert!(k[0] > k[3] && k[3] > k[1] && k[1] > k[2], "{k:?}");
    }

    #[test]
    fn the_guided_drop_removes_the_least_sensitive_live_layer_within_budget() {
        let sens = [4.0, 0.5, 0.1, 2.0, 0.3];
        let params = |p: &Plan| (p.layers.iter().filter(|l| !l.dropped).map(|l| l.attention_keep.unwrap() + l.ffn_keep.unwrap()).sum::<f64>() * 1000.0) as usize;
        let budget = 5000; // 50% of 10000
        let plan = Plan::uniform(5, 0.5);
        let (victim, p) = guided_drop(&plan, &sens, &SearchOptions::default(), params, budget).unwrap();
        assert_eq!(victim, 2);
        assert!(p.layers[2].dropped && p.layers.iter().filter(|l| l.dropped).count() == 1);
        assert!((params(&p) as f64 - budget as f64).abs() <= 0.004 * budget as f64, "{}", params(&p));
        // the others gained what the dropped layer held
        assert!(p.layers[0].attention_keep.unwrap() > 0.6);
        // already dropped layers are skipped; drops off or too few live layers: none
        let (victim, _) = guided_drop(&p, &sens, &SearchOptions::default(), params, budget).unwrap();
        assert_eq!(victim, 4);
        assert!(guided_drop(&plan, &sens, &SearchOptions { allow_drop: false, ..Default::default() }, params, budget).is_none());
        assert!(guided_drop(&Plan::uniform(2, 0.5), &sens[..2], &SearchOptions::default(), params, 1000).is_none());
    }
}
