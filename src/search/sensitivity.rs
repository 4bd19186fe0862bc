//! Sensitivity-driven per-layer allocation (`compress --layer-allocation sensitivity`): the
//! cheap part of the architecture search only (importance once, one probe per layer, the
//! uniform plan and the two sensitivity-guided plans at the same budget), keeping whichever
//! of those scored best on the scoring windows.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::architecture::{best_within, budget_at, search, Candidate, SearchOptions};
use crate::error::CompressError;
use crate::format::plan::Plan;
use crate::gpu::Gpu;
use crate::methods::allocate::Allocation;
use crate::methods::svd::SvdOptions;
use crate::model::Model;

/// How `compress` spreads its ratio over the decoder layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerAllocation {
    /// Every layer keeps the same fraction (LoRAP's uniform ratio).
    #[default]
    Uniform,
    /// One calibration probe per layer, then the best of the uniform plan and two
    /// sensitivity-guided plans on the scoring windows.
    Sensitivity,
}

/// Settings of the sensitivity allocation: the target and what the candidates are built
/// with (the same as the compression after it, so their parameter counts are the ones
/// `compress` gets).
#[derive(Debug, Clone)]
pub struct SensitivityOptions {
    /// Fraction of decoder parameters to remove, in (0, 1).
    pub ratio: f64,
    /// Attention rank allocation inside each layer.
    pub allocation: Allocation,
    /// Fraction of the lowest-scored FFN channels reserved.
    pub reserve: f64,
    pub svd: SvdOptions,
}

/// What the allocation measured and chose (written as `layer_allocation.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SensitivityReport {
    pub ratio: f64,
    /// Perplexity of the dense model on the scoring windows.
    pub dense_ppl: f64,
    pub dense_decoder_params: usize,
    /// Increase of the mean scoring-window NLL when each layer alone is compressed at keep
    /// 1 - 2 x ratio (the others dense).
    pub sensitivity: Vec<f64>,
    /// The uniform plan, then the sensitivity-guided plans that met the budget.
    pub candidates: Vec<Candidate>,
    /// Index into `candidates` of the plan compressed with.
    pub picked: usize,
    pub adapter: String,
    /// Wall time of the whole allocation (importance, probes, candidates).
    pub seconds: f64,
}

/// The plan kept: the lowest scoring-window perplexity among `candidates` within `tol`
/// parameters of `budget`, `candidates[0]` (the uniform plan) always eligible and the
/// winner of ties, so the pick never scored worse than uniform.
pub(crate) fn pick(candidates: &[Candidate], budget: usize, tol: f64) -> usize {
    match best_within(candidates, 0..candidates.len(), budget, tol) {
        Some(k) if candidates[k].calib_ppl < candidates[0].calib_ppl => k,
        _ => 0,
    }
}

/// Per-layer LoRAP keep fractions at `opts.ratio` from one sensitivity probe per layer:
/// `calib` (whole windows of `seq_len`) is split as the search splits it, the last
/// `search_windows` windows scoring the candidates and the others giving the statistics.
/// Returns the picked plan (uniform, or guided when that scored lower) and the report.
pub fn sensitivity_plan(
    gpu: &std::sync::Arc<Gpu>,
    model: &Model,
    calib: &[u32],
    seq_len: usize,
    search_windows: usize,
    opts: &SensitivityOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<(Plan, SensitivityReport)> {
    anyhow::ensure!(opts.ratio > 0.0 && opts.ratio < 1.0, CompressError::BadRatio(opts.ratio));
    // the search without its uniform sweep and local search: the dense plan (the probes'
    // reference), the uniform plan at the ratio, the probes and the two guided plans
    let sopts = SearchOptions {
        uniform_ratios: vec![opts.ratio],
        evaluations: 0,
        target_ratio: Some(opts.ratio),
        allow_drop: false,
        reserve: opts.reserve,
        allocation: opts.allocation,
        svd: opts.svd,
        ..Default::default()
    };
    let res = search(gpu, model, calib, seq_len, search_windows, &sopts, progress)?;
    let uniform = res.uniform_at_target.context("the search scored no uniform plan at the ratio")?;
    let candidates: Vec<Candidate> = std::iter::once(uniform).chain(res.guided.iter().copied()).map(|k| res.candidates[k].clone()).collect();
    let (budget, tol) = budget_at(opts.ratio, res.dense_decoder_params);
    let picked = pick(&candidates, budget, tol);
    let chosen = &candidates[picked];
    let mut plan = chosen.plan.clone();
    plan.note = format!(
        "sensitivity-driven layer allocation at ratio {}: {} (scoring-window ppl {:.3}, uniform {:.3})",
        opts.ratio, chosen.origin, chosen.calib_ppl, candidates[0].calib_ppl
    );
    let report = SensitivityReport {
        ratio: opts.ratio,
        dense_ppl: res.dense_ppl,
        dense_decoder_params: res.dense_decoder_params,
        sensitivity: res.sensitivity,
        candidates,
        picked,
        adapter: res.adapter,
        seconds: res.seconds,
    };
    Ok((plan, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::architecture::guided_plan;

    fn candidate(origin: &str, plan: Plan, decoder_params: usize, calib_ppl: f64) -> Candidate {
        Candidate { origin: origin.into(), plan, decoder_params, decoder_ratio: 0.0, calib_ppl, seconds_per_token: 0.0 }
    }

    /// Parameters proportional to the summed keep fractions (1000 per unit), as in the
    /// guided-plan test.
    fn params(p: &Plan) -> usize {
        (p.layers.iter().map(|l| l.attention_keep.unwrap_or(1.0) + l.ffn_keep.unwrap_or(1.0)).sum::<f64>() * 1000.0) as usize
    }

    #[test]
    fn the_pick_never_scores_worse_than_uniform_and_meets_the_budget() {
        let sens = [4.0, 0.5, 0.1, 2.0];
        let dense = params(&Plan::uniform(4, 1.0));
        let (budget, tol) = budget_at(0.25, dense);
        let uniform = Plan::uniform(4, 0.75);
        let guided: Vec<Plan> = [0.5, 1.0].into_iter().map(|a| guided_plan(&sens, a, params, budget).unwrap()).collect();
        for p in std::iter::once(&uniform).chain(&guided) {
            assert!((params(p) as f64 - budget as f64).abs() <= tol, "{} vs {budget}", params(p));
        }
        // every order of scores: the pick is the lowest and never above uniform
        let scores = [[50.0, 45.0, 48.0], [50.0, 55.0, 60.0], [50.0, 50.0, 50.0], [50.0, 49.0, 40.0]];
        for s in scores {
            let c = vec![candidate("uniform", uniform.clone(), params(&uniform), s[0]), candidate("a=0.5", guided[0].clone(), params(&guided[0]), s[1]), candidate("a=1", guided[1].clone(), params(&guided[1]), s[2])];
            let k = pick(&c, budget, tol);
            let lowest = s.iter().copied().fold(f64::INFINITY, f64::min);
            assert_eq!(c[k].calib_ppl, lowest, "{s:?}");
            assert!(c[k].calib_ppl <= c[0].calib_ppl);
            assert!((c[k].decoder_params as f64 - budget as f64).abs() <= tol);
            if s[0] == lowest {
                assert_eq!(k, 0, "uniform wins ties: {s:?}");
            }
        }
        // a lower score off the budget is not taken; uniform is kept even if it were off
        let c = vec![candidate("uniform", uniform.clone(), params(&uniform), 50.0), candidate("over", Plan::uniform(4, 0.9), params(&Plan::uniform(4, 0.9)), 30.0)];
        assert_eq!(pick(&c, budget, tol), 0);
        let c = vec![candidate("uniform", uniform.clone(), budget + 10 * tol as usize, 50.0), candidate("a=1", guided[1].clone(), params(&guided[1]), 60.0)];
        assert_eq!(pick(&c, budget, tol), 0);
    }
}
