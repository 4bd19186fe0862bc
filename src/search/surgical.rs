//! Surgical feature-space search: walks the linears from the last layer backwards and
//! gives each the smallest feature-space rank whose perplexity on the scoring windows stays
//! within a growing bound (or leaves it dense); the result is a plan for `compress --plan`.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::error::CompressError;
use crate::format::plan::{LayerPlan, Plan, PlanLayer};
use crate::gpu::{context::Result as GpuResult, Gpu, GpuBuf};
use crate::methods::sfsd::{feature_pair, rank_for, FeaturePair};
use crate::methods::svd::SvdOptions;
use crate::format::linear::{Linear, PerLinear};
use crate::model::forward::Site;

/// Settings of the surgical search.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SurgicalOptions {
    /// Leading decoder layers never decomposed (the reference skips 4).
    pub skip_first: usize,
    /// Consider only the last this-many layers (default: all after `skip_first`).
    pub last_layers: Option<usize>,
    /// Per-module loosening of the allowed perplexity: base x (1 + tolerance)^modules visited.
    pub tolerance: f64,
    /// Candidate keep fractions of the break-even rank, ascending.
    pub grid: Vec<f64>,
    #[serde(skip)]
    pub svd: SvdOptions,
}

impl Default for SurgicalOptions {
    fn default() -> Self {
        SurgicalOptions { skip_first: 4, last_layers: None, tolerance: 0.005, grid: (1..=9).map(|k| k as f64 / 10.0).collect(), svd: SvdOptions::default() }
    }
}

/// What the surgical search decided, module by module.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SurgicalStep {
    pub layer: usize,
    pub linear: String,
    /// Chosen keep fraction of the break-even rank (`None`: stays dense).
    pub keep: Option<f64>,
    pub ppl: f64,
    pub allowed: f64,
    pub evaluations: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SurgicalReport {
    pub options: SurgicalOptions,
    pub base_ppl: f64,
    pub final_ppl: f64,
    pub steps: Vec<SurgicalStep>,
    pub seconds: f64,
}

/// Surgical feature-space search on the dense model: walks the linears from the last layer
/// backwards and gives each the smallest rank on the grid whose perplexity on the search
/// windows (the last `search_windows` windows of `calib`, never used for statistics) stays
/// within the allowed bound, or leaves it dense. Returns the plan for `compress --plan`.
pub fn surgical(
    gpu: &std::sync::Arc<Gpu>,
    model: &crate::model::Model,
    calib: &[u32],
    seq_len: usize,
    search_windows: usize,
    opts: &SurgicalOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<(Plan, SurgicalReport)> {
    use crate::model::forward::{self, GpuLinear, LayerWeights, Runner};
    let t0 = std::time::Instant::now();
    let cfg = &model.cfg;
    let n = cfg.num_hidden_layers;
    let (stats_tokens, search_tokens) = crate::calib::split_search_windows(calib, seq_len, search_windows)?;
    anyhow::ensure!(
        !opts.grid.is_empty() && opts.grid.iter().all(|&k| k > 0.0 && k < 1.0) && opts.grid.windows(2).all(|w| w[0] < w[1]) && opts.tolerance >= 0.0,
        CompressError::BadArgument("the rank grid must be ascending fractions in (0, 1) and the tolerance non-negative".into())
    );
    let first = opts.skip_first.max(n.saturating_sub(opts.last_layers.unwrap_or(n)));
    anyhow::ensure!(first < n, CompressError::BadArgument(format!("no layer to decompose: the model has {n} layers, {first} skipped")));

    // dense statistics: covariances of every layer's inputs, and the states entering each
    // layer for the search windows
    let mut walker = crate::calib::walker::Walker::start(gpu, model, stats_tokens, seq_len, None, false)?;
    let mut runner = Runner::new(gpu.clone(), cfg.clone(), model.store.clone(), false);
    let mut entering = vec![runner.embed(search_tokens)?];
    let full = LayerPlan { ffn_width: cfg.intermediate_size, ..Default::default() };
    let mut pairs: Vec<PerLinear<Option<FeaturePair>>> = Vec::new();
    for i in 0..n {
        progress(i, n, "statistics");
        let dense = LayerWeights::load(gpu, &model.store, cfg, i)?;
        let mut layer_pairs = PerLinear::<Option<FeaturePair>>::default();
        if i >= first {
            let stats = walker.stats(&dense, crate::calib::stats::StatsNeed::Covariance { centred: false })?;
            let cov = stats.cov.as_ref().context("covariances")?;
            let sig: Vec<GpuBuf> = cov.iter().map(|c| gpu.upload(c)).collect::<GpuResult<_>>()?;
            for lin in Linear::ALL {
                let (out, inp) = cfg.linear_shape(&full, lin);
                let w = model.store.f32(&crate::format::names::linear(i, lin, "weight"), &[out, inp])?;
                let top = rank_for(opts.grid[opts.grid.len() - 1], out, inp);
                layer_pairs[lin] = match top {
                    Some(r) => Some(feature_pair(gpu, &w, &sig[Site::of(lin).index()], out, inp, r, opts.svd)?),
                    None => None,
                };
            }
        }
        pairs.push(layer_pairs);
        if i + 1 < n {
            walker.advance(&dense)?;
            let mut enc = gpu.encoder();
            let next = forward::layer_forward(gpu, &mut enc, cfg, &dense, walker.table(), forward::Batch { h: &entering[i], tokens: search_tokens.len(), window: seq_len }, None)?;
            gpu.submit(enc);
            entering.push(next);
        }
    }
    let table = walker.finish();

    // layer weights with the keeps decided so far (plus one candidate)
    let build = |i: usize, keeps: &PerLinear<Option<f64>>| -> Result<LayerWeights> {
        let mut lw = LayerWeights::load(gpu, &model.store, cfg, i)?;
        for lin in Linear::ALL {
            let (Some(k), Some(pair)) = (keeps[lin], &pairs[i][lin]) else { continue };
            let (out, inp) = cfg.linear_shape(&full, lin);
            let Some(r) = rank_for(k, out, inp) else { continue };
            let (a, b) = pair.truncated(r, out, inp);
            lw.replace_linear(lin, GpuLinear::low_rank(gpu, out, inp, &a, &b, r, None)?);
        }
        Ok(lw)
    };
    let mut keeps: Vec<PerLinear<Option<f64>>> = vec![PerLinear::default(); n];
    let (base_nll, _) = super::evaluator::nll_from(&mut runner, &table, &entering[0], 0, &mut |k| Ok(Some(build(k, &keeps[k])?)), search_tokens, seq_len)?;
    let base = base_nll.exp();
    let modules: Vec<(usize, Linear)> = (first..n).rev().flat_map(|i| Linear::ALL.into_iter().rev().map(move |lin| (i, lin))).collect();
    let mut steps = Vec::new();
    let mut current = base;
    for (visited, &(i, lin)) in modules.iter().enumerate() {
        progress(visited, modules.len(), "surgical search");
        let allowed = base * (1.0 + opts.tolerance).powi(visited as i32 + 1);
        if pairs[i][lin].is_none() {
            continue;
        }
        // binary search for the smallest passing keep (perplexity falls as the rank grows)
        let (mut lo, mut hi) = (0usize, opts.grid.len()); // answer in [lo, hi]; hi = dense
        let mut best_ppl = current;
        let mut evaluations = 0;
        while lo < hi {
            let mid = (lo + hi) / 2;
            let mut trial = keeps.clone();
            trial[i][lin] = Some(opts.grid[mid]);
            let (nll, _) = super::evaluator::nll_from(&mut runner, &table, &entering[i], i, &mut |k| Ok(Some(build(k, &trial[k])?)), search_tokens, seq_len)?;
            evaluations += 1;
            let ppl = nll.exp();
            if ppl <= allowed {
                hi = mid;
                best_ppl = ppl;
            } else {
                lo = mid + 1;
            }
        }
        let keep = (hi < opts.grid.len()).then(|| opts.grid[hi]);
        if keep.is_some() {
            keeps[i][lin] = keep;
            current = best_ppl;
        }
        steps.push(SurgicalStep { layer: i, linear: lin.name().into(), keep, ppl: current, allowed, evaluations });
    }
    progress(modules.len(), modules.len(), "done");
    let mut plan = Plan { layers: Vec::new(), note: format!("surgical feature-space search: search-window ppl {base:.3} -> {current:.3}") };
    for k in &keeps {
        let mut l = PlanLayer::default();
        for (lin, keep) in k.iter() {
            if let Some(x) = keep {
                l.module_keep.insert(lin.name().to_string(), *x);
            }
        }
        // a layer with nothing decomposed lists one dense-equivalent keep so it is not read
        // as "uniform ratio"
        if l.module_keep.is_empty() {
            l.module_keep.insert(Linear::Q.name().to_string(), 1.0);
        }
        plan.layers.push(l);
    }
    Ok((plan, SurgicalReport { options: opts.clone(), base_ppl: base, final_ppl: current, steps, seconds: t0.elapsed().as_secs_f64() }))
}
