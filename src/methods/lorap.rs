//! LoRAP for one layer: activation-weighted low-rank q/k/v/o (randomized SVD of W S, the
//! attention budget allocated across the four matrices) and gradient-free FFN channel
//! pruning (method.md section 1; the paper's 1% reservation as an option); optionally OBS channel scores
//! and the least-squares refit of down_proj with a bias (`refit`).

use anyhow::{bail, Context, Result};

use serde::{Deserialize, Serialize};

use super::allocate::{self, Allocation, MatrixSpec};
use super::ffn::{self, ChannelSelection};
use super::refit::{self, Features};
use super::solve::Solver;
use super::svd;
use super::{BuiltLayer, LayerInput, LayerMethod, StatsNeed};
use crate::calib::stats::SplitSites;
use crate::format::linear::Linear;
use crate::format::plan::LayerPlan;
use crate::gpu::Gpu;
use crate::model::forward::LinearKind;

/// Factors of one attention matrix: A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T S^-1.
pub fn factors(dec: &svd::Svd, r: usize, scale: &[f32]) -> (Vec<f32>, Vec<f32>) {
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

/// W S (each column j of W times s_j) and ||W S||_F^2.
pub fn weighted_matrix(w: &[f32], inp: usize, scales: &[f32]) -> (Vec<f32>, f64) {
    let ws: Vec<f32> = w.chunks(inp).flat_map(|row| row.iter().zip(scales).map(|(a, b)| a * b)).collect();
    let energy = ws.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
    (ws, energy)
}

/// Truncated SVD of the activation-weighted W S (to the break-even rank) and what the rank
/// allocation needs of it (spectrum and ||W S||_F^2). `scales` = S's diagonal.
pub fn weighted_svd(gpu: &Gpu, w: &[f32], out: usize, inp: usize, scales: &[f32], svd_opts: svd::SvdOptions) -> Result<(svd::Svd, MatrixSpec)> {
    let (ws, energy) = weighted_matrix(w, inp, scales);
    let dec = svd::randomized_svd(gpu, &gpu.upload(&ws)?, out, inp, out * inp / (out + inp), svd_opts)?;
    let spec = MatrixSpec { out, inp, sigma: dec.sigma.clone(), energy };
    Ok((dec, spec))
}

/// LoRAP's options (the ablation switches default to LoRAP itself).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LorapOptions {
    /// How the attention budget is split across q, k, v, o.
    pub allocation: Allocation,
    /// Activation-weighted SVD (false: plain SVD of W).
    pub weighted_svd: bool,
    /// Fraction of lowest-scored FFN channels kept, in [0, 1): the paper's 1% (0.01);
    /// none by default (with the refit it lost on both held-out texts at 0.2 and 0.5).
    pub reserve: f64,
    /// Wanda-style activation-weighted channel scores (false: weight magnitudes only).
    pub ffn_activation_scores: bool,
    /// How FFN channels are scored for removal.
    #[serde(default)]
    pub ffn_selection: ChannelSelection,
    /// Refit the kept down_proj columns by ridge least squares with a bias (`refit`).
    /// `compress` turns it on unless told otherwise when its statistics have the windows
    /// for the held-out choice; the library default is off, so that a caller's run on
    /// fewer windows never fails on it.
    #[serde(default)]
    pub ffn_refit: bool,
    /// Which factor pairs' left factors are refitted, with a bias, against the full input
    /// covariance and mean (`refit`); none by default.
    #[serde(default)]
    pub attention_refit: Option<AttentionRefit>,
}

/// The attention matrices the factor refit covers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionRefit {
    /// v and o: their output error reaches the residual stream linearly (v's through the
    /// attention average), so the output least squares is the error that matters.
    Vo,
    /// q and k too, whose output error matters through the attention logits q.k; on
    /// SmolLM2 this lowered their held-out output error but not the model's perplexity
    /// (docs/results.md).
    Qkvo,
}

impl AttentionRefit {
    pub fn covers(self, linear: Linear) -> bool {
        match self {
            AttentionRefit::Vo => matches!(linear, Linear::V | Linear::O),
            AttentionRefit::Qkvo => Linear::ATTENTION.contains(&linear),
        }
    }
}

impl LorapOptions {
    /// The sites whose moments the refits and OBS scores need, split into fitting and
    /// held-out windows.
    pub fn split_sites(&self) -> SplitSites {
        SplitSites { attention: self.attention_refit.is_some(), ffn: self.ffn_refit || self.ffn_selection == ChannelSelection::Obs }
    }

    /// Whether any of them is needed (every 4th window is then held out).
    pub fn needs_split_moments(&self) -> bool {
        self.split_sites() != SplitSites::default()
    }
}

impl Default for LorapOptions {
    fn default() -> Self {
        LorapOptions { allocation: Allocation::Fixed31, weighted_svd: true, reserve: 0.0, ffn_activation_scores: true, ffn_selection: ChannelSelection::Wanda, ffn_refit: false, attention_refit: None }
    }
}

/// LoRAP over one layer.
pub struct Lorap {
    pub opts: LorapOptions,
    pub svd: svd::SvdOptions,
}

impl LayerMethod for Lorap {
    fn name(&self) -> &'static str {
        "lorap"
    }

    fn stats_need(&self) -> StatsNeed {
        if self.opts.needs_split_moments() {
            StatsNeed::SplitMoments(self.opts.split_sites())
        } else {
            StatsNeed::Scales
        }
    }

    /// Activation-weighted SVD of q/k/v/o with the attention budget allocated across them,
    /// then FFN channel pruning with the reservation.
    fn compress_layer(&self, input: &LayerInput, built: &mut BuiltLayer, progress: &mut dyn FnMut(super::Phase)) -> Result<()> {
        attention(self, input, built, progress)?;
        ffn_channels(self, input, built, progress)
    }
}

/// One attention matrix on its way through the allocation: the weight, S's diagonal, W S
/// and what the allocation knows of it.
struct AttentionMatrix {
    w: Vec<f32>,
    scales: Vec<f32>,
    ws: Vec<f32>,
    spec: MatrixSpec,
    /// Its SVD, once computed (to the break-even rank for spectrum-driven allocations).
    dec: Option<svd::Svd>,
}

fn attention(opts: &Lorap, input: &LayerInput, built: &mut BuiltLayer, progress: &mut dyn FnMut(super::Phase)) -> Result<()> {
    let LayerInput { gpu, cfg, stats, setting, .. } = *input;
    progress(super::Phase::Decomposition);
    let full = LayerPlan { ffn_width: cfg.intermediate_size, ..Default::default() };
    let mut mats = Vec::new();
    for lin in Linear::ATTENTION {
        let (out, inp) = cfg.linear_shape(&full, lin);
        let w = input.host.weights[lin].clone();
        let scales: Vec<f32> = if opts.opts.weighted_svd { stats.input_scales(lin).to_vec() } else { vec![1.0; inp] };
        let (ws, energy) = weighted_matrix(&w, inp, &scales);
        mats.push(AttentionMatrix { w, scales, ws, spec: MatrixSpec { out, inp, sigma: Vec::new(), energy }, dec: None });
    }
    let dense_att: usize = mats.iter().map(|m| m.spec.out * m.spec.inp).sum();
    let ranks = if setting.attention_keep >= 1.0 {
        vec![None; 4]
    } else {
        if opts.opts.allocation.needs_spectrum() {
            // the greedy allocations weigh every singular value up to break-even
            for m in &mut mats {
                let dec = decompose(gpu, m, m.spec.break_even(), opts.svd, built)?;
                m.spec.sigma = dec.sigma.clone();
                m.dec = Some(dec);
            }
        }
        let budget = (setting.attention_keep * dense_att as f64).round() as usize;
        let specs: Vec<MatrixSpec> = mats.iter().map(|m| m.spec.clone()).collect();
        allocate::allocate(&specs, budget, opts.opts.allocation)
    };
    for ((lin, m), r) in Linear::ATTENTION.into_iter().zip(mats).zip(&ranks) {
        let (j, out_dim, in_dim) = (lin.index(), m.spec.out, m.spec.inp);
        match r {
            // a matrix that stays dense needs no decomposition
            None => built.dense(gpu, lin, &m.w, out_dim, in_dim)?,
            Some(r) => {
                let dec = match m.dec {
                    Some(ref d) if d.rank() >= *r => d.clone(),
                    // the subspace is sized for the rank actually kept
                    _ => decompose(gpu, &m, *r, opts.svd, built)?,
                };
                let (mut a, b) = factors(&dec, *r, &m.scales);
                let mut bias = None;
                if opts.opts.attention_refit.is_some_and(|a| a.covers(lin)) {
                    let moments = stats.input_split(lin).context("the attention refit needs its inputs' moments")?;
                    let mut clock = svd::HostClock::default();
                    let fitted = clock.time(|| refit::refit(&m.w, out_dim, Features::Projected { b: &b, a0: &a, rank: *r }, moments, Solver::for_adapter(gpu))).with_context(|| format!("layer {}: {lin:?} refit", input.layer))?;
                    built.host_seconds += clock.seconds();
                    a = fitted.a;
                    built.attention_refit[j] = Some(fitted.report);
                    bias = with_own_bias(fitted.bias, input.host.biases[lin].as_deref());
                }
                let kept: f64 = dec.sigma[..*r].iter().map(|s| s * s).sum();
                let energy = m.spec.energy;
                built.errors[j] = ((energy - kept).max(0.0) / energy.max(f64::MIN_POSITIVE)).sqrt();
                built.low_rank(gpu, lin, &a, &b, *r)?;
                if let Some(bias) = bias {
                    built.bias(gpu, lin, &bias)?;
                }
                built.spectra[j] = dec.sigma;
            }
        }
    }
    Ok(())
}

/// A compensation bias added to the bias the dense linear already had.
fn with_own_bias(added: Option<Vec<f32>>, own: Option<&[f32]>) -> Option<Vec<f32>> {
    match (added, own) {
        (Some(b), Some(own)) => Some(b.iter().zip(own).map(|(x, y)| x + y).collect()),
        (b, _) => b,
    }
}

/// The top-`rank` SVD of W S, its host time added to the layer's.
fn decompose(gpu: &Gpu, m: &AttentionMatrix, rank: usize, svd_opts: svd::SvdOptions, built: &mut BuiltLayer) -> Result<svd::Svd> {
    let a = gpu.upload(&m.ws)?;
    let dec = svd::randomized_svd(gpu, &a, m.spec.out, m.spec.inp, rank, svd_opts)?;
    built.host_seconds += dec.host_seconds;
    Ok(dec)
}

fn ffn_channels(opts: &Lorap, input: &LayerInput, built: &mut BuiltLayer, progress: &mut dyn FnMut(super::Phase)) -> Result<()> {
    let LayerInput { gpu, cfg, layer: i, dense, host, stats, setting, .. } = *input;
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    progress(super::Phase::FfnScoring);
    let ones_d = vec![1f32; d];
    let ones_f = vec![1f32; f];
    let (sx, sh) = if opts.opts.ffn_activation_scores { (stats.input_scales(Linear::Gate), stats.input_scales(Linear::Down)) } else { (&ones_d[..], &ones_f[..]) };
    let (LinearKind::Dense { w: wg }, LinearKind::Dense { w: wu }, LinearKind::Dense { w: wd }) = (&dense.gate.kind, &dense.up.kind, &dense.down.kind) else {
        bail!("layer {i}: FFN is not dense");
    };
    let moments = || stats.input_split(Linear::Down).context("the FFN refit and OBS scores need the intermediate features' moments");
    // the OBS scores' and the refit's factorizations run on the host
    let mut host_clock = svd::HostClock::default();
    let scores = match opts.opts.ffn_selection {
        ChannelSelection::Wanda => ffn::channel_scores(gpu, [wg, wu, wd], &gpu.upload(sx)?, sh, d)?,
        ChannelSelection::Obs => {
            let m = moments()?;
            host_clock.time(|| ffn::obs_scores(&host.weights[Linear::Down], d, &m.fit.merged(&m.held_out)))?
        }
    };
    let remove = (((1.0 - setting.ffn_keep) * f as f64).round() as usize).min(f - 1);
    let kept = ffn::kept_channels(&scores, remove, opts.opts.reserve);
    let (gate, up) = (ffn::gather_rows(&host.weights[Linear::Gate], d, &kept), ffn::gather_rows(&host.weights[Linear::Up], d, &kept));
    let (down, bias) = if opts.opts.ffn_refit {
        let m = moments()?;
        let r = host_clock.time(|| refit::refit(&host.weights[Linear::Down], d, Features::Kept(&kept), m, Solver::for_adapter(gpu))).with_context(|| format!("layer {i}"))?;
        built.ffn_refit = Some(r.report);
        (r.a, with_own_bias(r.bias, host.biases[Linear::Down].as_deref()))
    } else {
        (ffn::gather_cols(&host.weights[Linear::Down], d, f, &kept), None)
    };
    let fk = kept.len();
    built.plan.ffn_width = fk;
    built.ffn_kept_channels = kept.clone();
    built.dense(gpu, Linear::Gate, &gate, fk, d)?;
    built.dense(gpu, Linear::Up, &up, fk, d)?;
    built.dense(gpu, Linear::Down, &down, d, fk)?;
    if let Some(b) = bias {
        built.bias(gpu, Linear::Down, &b)?;
    }
    built.host_seconds += host_clock.seconds();
    Ok(())
}

