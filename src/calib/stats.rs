//! Activation statistics of a layer's linear inputs, accumulated on the GPU over all
//! calibration tokens: per-column sums of squares (activation scales) and, for methods that
//! need them, Gram matrices (input covariances) or some sites' moments split into fitting
//! and held-out windows (the least-squares refits).

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
    /// Each site's moments, fitting and held-out windows apart, where needed.
    split: [Option<SplitAcc>; 4],
}

/// Every `HOLD_OUT_EVERY`-th calibration window (the 4th, 8th, ...) is held out of the
/// refits' fit: the ridge is chosen on those windows, then the fit uses them too.
pub const HOLD_OUT_EVERY: usize = 4;

/// GPU accumulators of one site's `SplitMoments`.
struct SplitAcc {
    /// (Gram, column sums) of the fitting and the held-out windows.
    fit: (GpuBuf, GpuBuf),
    held_out: (GpuBuf, GpuBuf),
    seq_len: usize,
    /// Windows seen so far (the batches come in window order).
    windows: usize,
    fit_tokens: usize,
    held_out_tokens: usize,
}

/// A ones vector of at least `rows` entries in `slot` (the column sums are ones^T X); a
/// function of the field alone so the other accumulators stay borrowable beside it.
fn ones_of<'a>(gpu: &Gpu, slot: &'a mut Option<GpuBuf>, rows: usize) -> GpuResult<&'a GpuBuf> {
    if slot.as_ref().is_none_or(|o| (o.bytes() / 4) < rows as u64) {
        *slot = Some(gpu.upload(&vec![1f32; rows])?);
    }
    Ok(slot.as_ref().expect("just filled"))
}

/// G += X^T X and sum += 1^T X over rows `row0..row0 + rows` of x [.., cols].
fn moments_accumulate(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, ones: &GpuBuf, x: &GpuBuf, (row0, rows): (usize, usize), cols: usize, (g, sum): (&GpuBuf, &GpuBuf)) -> GpuResult<()> {
    matmul::gram_accumulate_rows(gpu, enc, x, (row0, rows), cols, g)?;
    let xs = matmul::Operand { offset: row0 * cols, ..matmul::Operand::new(x, cols) };
    matmul::gemm(gpu, enc, matmul::GemmCall { shape: matmul::GemmShape { m: 1, n: cols, k: rows }, a: matmul::Operand::new(ones, rows), b: xs, c: matmul::GemmOutput::new(sum, cols), scale: matmul::Scale::ADD })
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
            moments_accumulate(gpu, enc, ones_of(gpu, &mut self.ones, rows)?, x, (0, rows), cols, (g, sum))?;
        }
        if let Some(acc) = &mut self.split[s] {
            let ones = ones_of(gpu, &mut self.ones, rows)?;
            let windows = rows / acc.seq_len;
            // runs of consecutive windows of one kind, one pair of products each
            let mut w = 0;
            while w < windows {
                let held = |k: usize| (acc.windows + k) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1;
                let kind = held(w);
                let end = (w..windows).find(|&k| held(k) != kind).unwrap_or(windows);
                let (target, count) = if kind { (&acc.held_out, &mut acc.held_out_tokens) } else { (&acc.fit, &mut acc.fit_tokens) };
                moments_accumulate(gpu, enc, ones, x, (w * acc.seq_len, (end - w) * acc.seq_len), cols, (&target.0, &target.1))?;
                *count += (end - w) * acc.seq_len;
                w = end;
            }
            acc.windows += windows;
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
    /// Each site's moments split into fitting and held-out windows (`StatsNeed::SplitMoments`).
    pub split: [Option<SplitMoments>; 4],
}

/// Sums over some calibration tokens of h h^T and h (h: one token's features).
#[derive(Debug, Clone)]
pub struct Moments {
    /// Sum of h h^T, [dim, dim] row-major.
    pub gram: Vec<f32>,
    /// Sum of h.
    pub sum: Vec<f32>,
    pub tokens: usize,
}

impl Moments {
    /// The mean feature vector.
    pub fn mean(&self) -> Vec<f64> {
        self.sum.iter().map(|&s| s as f64 / self.tokens as f64).collect()
    }

    /// Gram sum entry (i, j) as the symmetric mean of both triangles (a GPU Gram's halves
    /// may differ in the last bit).
    pub fn gram_sym(&self, i: usize, j: usize) -> f64 {
        let f = self.sum.len();
        0.5 * (self.gram[i * f + j] as f64 + self.gram[j * f + i] as f64)
    }

    /// Covariance entry (i, j) given the mean `mu`: the symmetric Gram entry over the
    /// tokens, minus mu_i mu_j.
    pub fn covariance(&self, mu: &[f64], i: usize, j: usize) -> f64 {
        self.gram_sym(i, j) / self.tokens as f64 - mu[i] * mu[j]
    }

    /// The moments of tokens `tokens` of h [.., dim] row-major, summed in f32 as the GPU
    /// does (tests' inputs).
    #[cfg(test)]
    pub(crate) fn of_tokens(h: &[f64], dim: usize, tokens: std::ops::Range<usize>) -> Moments {
        let mut gram = vec![0f32; dim * dim];
        let mut sum = vec![0f32; dim];
        for t in tokens.clone() {
            let row = &h[t * dim..(t + 1) * dim];
            for i in 0..dim {
                sum[i] += row[i] as f32;
                for j in 0..dim {
                    gram[i * dim + j] += (row[i] * row[j]) as f32;
                }
            }
        }
        Moments { gram, sum, tokens: tokens.len() }
    }

    /// Both sets' sums together.
    pub fn merged(&self, other: &Moments) -> Moments {
        let add = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x + y).collect();
        Moments { gram: add(&self.gram, &other.gram), sum: add(&self.sum, &other.sum), tokens: self.tokens + other.tokens }
    }
}

/// One input site's moments over the fitting windows and over the held-out ones (every
/// `HOLD_OUT_EVERY`-th window).
#[derive(Debug, Clone)]
pub struct SplitMoments {
    pub dim: usize,
    pub fit: Moments,
    pub held_out: Moments,
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

    /// The split moments of `linear`'s input, when collected.
    pub fn input_split(&self, linear: Linear) -> Option<&SplitMoments> {
        self.split[Site::of(linear).index()].as_ref()
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
    /// Also some sites' moments, fitting and held-out windows apart (the least-squares
    /// refits and the OBS channel selection).
    SplitMoments(SplitSites),
}

/// The input sites whose moments a method needs split into fitting and held-out windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SplitSites {
    /// The q/k/v input and the o_proj input (the attention factor refit).
    pub attention: bool,
    /// The down_proj input (the FFN refit, OBS scores).
    pub ffn: bool,
}

impl SplitSites {
    pub fn has(self, site: Site) -> bool {
        match site {
            Site::AttnInput | Site::OInput => self.attention,
            Site::FfnInput => false,
            Site::DownInput => self.ffn,
        }
    }

    /// The sites' widths (`dims`: each site's input width).
    pub fn widths(self, dims: [usize; 4]) -> impl Iterator<Item = usize> {
        Site::ALL.into_iter().filter(move |&s| self.has(s)).map(move |s| dims[s.index()])
    }
}

/// One statistics pass of the calibration states through the dense layer `dense` (the
/// walker's; its states are read, not changed).
pub(super) fn collect_stats(gpu: &Gpu, cfg: &crate::model::ModelConfig, dense: &LayerWeights, states: StatesView, need: StatsNeed) -> Result<LayerStats> {
    let StatesView { table, states: batches, seq_len, windows } = states;
    let (need_cov, centred) = match need {
        StatsNeed::Scales | StatsNeed::SplitMoments(_) => (false, false),
        StatsNeed::Covariance { centred } => (true, centred),
    };
    let dims = site_dims(cfg, dense.gate.out);
    let gram = if need_cov {
        let mk = |n: usize| -> GpuResult<(GpuBuf, GpuBuf)> { Ok((gpu.zeros(n * n)?, gpu.zeros(n)?)) };
        Some([mk(dims[0])?, mk(dims[1])?, mk(dims[2])?, mk(dims[3])?])
    } else {
        None
    };
    let sites = match need {
        StatsNeed::SplitMoments(sites) => sites,
        _ => SplitSites::default(),
    };
    let mut split: [Option<SplitAcc>; 4] = Default::default();
    for site in Site::ALL.into_iter().filter(|&s| sites.has(s)) {
        let n = dims[site.index()];
        let pair = || -> GpuResult<(GpuBuf, GpuBuf)> { Ok((gpu.zeros(n * n)?, gpu.zeros(n)?)) };
        split[site.index()] = Some(SplitAcc { fit: pair()?, held_out: pair()?, seq_len, windows: 0, fit_tokens: 0, held_out_tokens: 0 });
    }
    let mut stats = InputStats { sumsq: [gpu.zeros(dims[0])?, gpu.zeros(dims[1])?, gpu.zeros(dims[2])?, gpu.zeros(dims[3])?], gram, ones: None, tokens: 0, split };
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
    let mut split: [Option<SplitMoments>; 4] = Default::default();
    for (s, acc) in stats.split.iter().enumerate() {
        if let Some(acc) = acc {
            let mut v = gpu.read_many(&[&acc.fit.0, &acc.fit.1, &acc.held_out.0, &acc.held_out.1])?.into_iter();
            let mut next = || v.next().unwrap_or_default();
            let fit = Moments { gram: next(), sum: next(), tokens: acc.fit_tokens };
            let held_out = Moments { gram: next(), sum: next(), tokens: acc.held_out_tokens };
            split[s] = Some(SplitMoments { dim: dims[s], fit, held_out });
        }
    }
    let mut it = sc.into_iter();
    Ok(LayerStats { scales: std::array::from_fn(|_| it.next().unwrap()), cov, split })
}

/// Each input site's width (`Site::index` order) for an FFN of width `ffn_width`.
pub fn site_dims(cfg: &crate::model::ModelConfig, ffn_width: usize) -> [usize; 4] {
    [cfg.hidden_size, cfg.q_dim(), cfg.hidden_size, ffn_width]
}

/// GPU bytes the split-moment accumulators of `need` take (two [n, n] Grams per site).
pub fn split_bytes(cfg: &crate::model::ModelConfig, need: StatsNeed) -> u64 {
    match need {
        StatsNeed::SplitMoments(sites) => sites.widths(site_dims(cfg, cfg.intermediate_size)).map(|n| 2 * (n as u64).pow(2) * 4).sum(),
        _ => 0,
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::test_util::{gpu, random};

    /// The split moments against f64 sums over the same windows: every 4th window (counted
    /// across batches) held out, windows of 7 tokens, 13 awkward columns, batches of 3 and
    /// then 6 windows (so the held-out runs cross the batch boundary). f32 GEMM sums of a
    /// few dozen products: bound 1e-5 relative.
    #[test]
    fn split_moments_hold_out_windows_as_the_reference_does() {
        let g = gpu();
        let (seq, cols) = (7usize, 13usize);
        let pair = || (g.zeros(cols * cols).unwrap(), g.zeros(cols).unwrap());
        let acc = SplitAcc { fit: pair(), held_out: pair(), seq_len: seq, windows: 0, fit_tokens: 0, held_out_tokens: 0 };
        let mut split: [Option<SplitAcc>; 4] = Default::default();
        split[Site::DownInput.index()] = Some(acc);
        let mut st = InputStats { sumsq: std::array::from_fn(|_| g.zeros(cols).unwrap()), gram: None, ones: None, tokens: 0, split };
        let batches = [random(3 * seq * cols, 41), random(6 * seq * cols, 42)];
        for x in &batches {
            let buf = g.upload(x).unwrap();
            let mut enc = g.encoder();
            st.see(&g, &mut enc, Site::DownInput, &buf, x.len() / cols, cols).unwrap();
            g.submit(enc);
        }
        let acc = st.split[Site::DownInput.index()].as_ref().unwrap();
        assert_eq!((acc.fit_tokens, acc.held_out_tokens, acc.windows), (7 * seq, 2 * seq, 9));
        let rows: Vec<&[f32]> = batches.iter().flat_map(|b| b.chunks(cols)).collect();
        for (held, (gb, sb)) in [(false, &acc.fit), (true, &acc.held_out)] {
            let (gram, sum) = (g.read(gb).unwrap(), g.read(sb).unwrap());
            let mine: Vec<&[f32]> = rows.iter().enumerate().filter(|(t, _)| ((t / seq) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1) == held).map(|(_, r)| *r).collect();
            for i in 0..cols {
                let s: f64 = mine.iter().map(|r| r[i] as f64).sum();
                assert!((sum[i] as f64 - s).abs() <= 1e-5 * (1.0 + s.abs()), "held {held} sum {i}");
                for j in 0..cols {
                    let want: f64 = mine.iter().map(|r| r[i] as f64 * r[j] as f64).sum();
                    assert!((gram[i * cols + j] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "held {held} gram ({i}, {j}): {} vs {want}", gram[i * cols + j]);
                }
            }
        }
    }
}
