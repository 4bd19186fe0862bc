//! Activation statistics of a layer's linear inputs, accumulated on the GPU over all
//! calibration tokens: per-column sums of squares (activation scales) and, for methods that
//! need them, Gram matrices (input covariances).

use anyhow::Result;

use super::states::CalibStates;
use crate::gpu::matmul;
use crate::gpu::{context::Result as GpuResult, norms, Gpu, GpuBuf};
use crate::format::linear::Linear;
use crate::model::forward::{self, LayerWeights, Observer, Site};

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

impl Observer for InputStats {
    fn see(&mut self, gpu: &Gpu, enc: &mut wgpu::CommandEncoder, site: Site, x: &GpuBuf, rows: usize, cols: usize) -> GpuResult<()> {
        let s = site.index();
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
            matmul::gemm(gpu, enc, matmul::GemmCall { shape: matmul::GemmShape { m: 1, n: cols, k: rows }, a: matmul::Operand::new(ones, rows), b: matmul::Operand::new(x, cols), c: matmul::GemmOutput::new(sum, cols), scale: matmul::Scale::ADD })?;
        }
        Ok(())
    }
}

/// What the per-layer methods get to work from.
pub struct LayerStats {
    /// Activation scales s of each input site (`Site::index` order).
    pub scales: [Vec<f32>; 4],
    /// Input covariance [cols, cols] of each site (methods that need it): the uncentred
    /// second moment by default.
    pub cov: Option<[Vec<f32>; 4]>,
}

impl LayerStats {
    /// Activation scales of the inputs at `site`.
    pub fn site_scales(&self, site: Site) -> &[f32] {
        &self.scales[site.index()]
    }

    /// Activation scales of `linear`'s input.
    pub fn input_scales(&self, linear: Linear) -> &[f32] {
        self.site_scales(Site::of(linear))
    }

    /// Covariance of `linear`'s input, when collected.
    pub fn input_cov(&self, linear: Linear) -> Option<&[f32]> {
        self.cov.as_ref().map(|c| c[Site::of(linear).index()].as_slice())
    }
}

/// s_j = sqrt(mean over windows of ||X_w[:, j]||^2), zeros replaced by 1e-4.
pub fn scales(sumsq: &[f32], windows: usize) -> Vec<f32> {
    sumsq.iter().map(|&v| (v as f64 / windows as f64).sqrt() as f32).map(|s| if s > 0.0 { s } else { 1e-4 }).collect()
}

/// The calibration states a statistics pass reads (and leaves as they were).
pub(super) struct StatesView<'a> {
    pub table: &'a crate::gpu::rope::RopeTable,
    pub states: &'a mut CalibStates,
    pub seq_len: usize,
    /// Calibration windows (the scales are means over windows).
    pub windows: usize,
}

/// The statistics a method needs beyond the activation scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsNeed {
    /// Per-column activation scales only.
    Scales,
    /// Also each input site's covariance: mean-centred, or the uncentred second moment.
    Covariance { centred: bool },
}

/// One statistics pass of the calibration states through the dense layer `dense` (the
/// walker's; its states are read, not changed).
pub(super) fn collect_stats(gpu: &Gpu, cfg: &crate::model::ModelConfig, dense: &LayerWeights, states: StatesView, need: StatsNeed) -> Result<LayerStats> {
    let StatesView { table, states: batches, seq_len, windows } = states;
    let (need_cov, centred) = match need {
        StatsNeed::Scales => (false, false),
        StatsNeed::Covariance { centred } => (true, centred),
    };
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
        // only the inputs are needed: the next layer's come from the compressed layer
        forward::observe_inputs(gpu, &mut enc, cfg, dense, table, forward::Batch { h, tokens, window: seq_len }, &mut stats)?;
        gpu.submit(enc);
        Ok(None)
    })?;
    // one readback for all four sites: every read drains the queue
    let sums = gpu.read_many(&stats.sumsq.iter().collect::<Vec<_>>())?;
    let sc: Vec<Vec<f32>> = sums.iter().map(|s| scales(s, windows)).collect();
    let cov = match &stats.gram {
        None => None,
        Some(gram) => {
            let n_tok = stats.tokens.max(1) as f64;
            let mut out: Vec<Vec<f32>> = Vec::new();
            for (s, (g, sum)) in gram.iter().enumerate() {
                let mut both = gpu.read_many(&[g, sum])?.into_iter();
                let (g, sum) = (both.next().unwrap_or_default(), both.next().unwrap_or_default());
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

