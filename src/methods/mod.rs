//! Compression methods, each a small unit over one decoder layer: it gets the dense layer,
//! its activation statistics and its setting, and fills a `BuiltLayer` (the tensors to
//! write and the GPU linears calibration continues with). The pipeline names no method; it
//! calls `run_layer`.

pub mod allocate;
pub mod ffn;
pub mod lorap;
pub mod mpo;
pub mod phase;
pub mod refit;
pub mod sfsd;
pub mod solve;
pub mod svd;

use anyhow::{Context, Result};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

pub use self::phase::Phase;
use self::svd::SvdOptions;
use crate::format::dtype::{encode, round_trip};
use crate::format::output::OutTensor;
use crate::format::plan::{LayerPlan, Plan};
use crate::format::weights::WeightStore;
pub use crate::calib::stats::StatsNeed;
use crate::calib::stats::LayerStats;
use crate::gpu::Gpu;
use crate::format::linear::{Linear, PerLinear};
use crate::model::forward::{DenseHost, GpuLinear, LayerWeights};
use crate::model::ModelConfig;

/// What a method gets for one decoder layer.
pub struct LayerInput<'a> {
    pub gpu: &'a Gpu,
    pub store: &'a WeightStore,
    pub cfg: &'a ModelConfig,
    /// Index of the layer in the dense model.
    pub layer: usize,
    /// The dense layer on the GPU.
    pub dense: &'a LayerWeights,
    /// The same layer's tensors in f32 on the host (read once, ahead of time).
    pub host: &'a DenseHost,
    /// Statistics of its inputs, from states that went through the compressed layers before.
    pub stats: &'a LayerStats,
    /// The layer's share of the run's ratio or plan.
    pub setting: &'a LayerSetting,
}

/// One compression method, over one layer at a time (the seam the pipeline calls).
pub trait LayerMethod {
    /// Name written to config.json's `lorap.method` and the report.
    fn name(&self) -> &'static str;
    /// What the statistics pass must collect for `compress_layer`.
    fn stats_need(&self) -> StatsNeed {
        StatsNeed::Scales
    }
    /// Fills `built` with the seven linears of the layer, in `Linear::ALL` order.
    fn compress_layer(&self, input: &LayerInput, built: &mut BuiltLayer, progress: &mut dyn FnMut(Phase)) -> Result<()>;
    /// Tensors stored once per model, after the layers (e.g. a shared MPO centre).
    fn model_tensors(&self, _dtype: Dtype) -> Vec<OutTensor> {
        Vec::new()
    }
}

/// The method `opts` selects (done once per run: the shared MPO centres are fitted here).
pub fn for_options(opts: &CompressOptions, store: &WeightStore, cfg: &ModelConfig) -> Result<Box<dyn LayerMethod>> {
    Ok(match &opts.method {
        MethodOptions::Lorap(o) => Box::new(lorap::Lorap { opts: o.clone(), svd: opts.svd }),
        MethodOptions::Sfsd(o) => Box::new(sfsd::Sfsd { opts: o.clone(), svd: opts.svd }),
        MethodOptions::Mpo(o) => Box::new(mpo::MpoMethod::new(o, opts, store, cfg)?),
    })
}

/// The per-layer compression method (the CLI's `--method`).
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

/// The method with its own options (serialized flat, tagged by `method`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum MethodOptions {
    Lorap(lorap::LorapOptions),
    Sfsd(sfsd::SfsdOptions),
    Mpo(mpo::MpoOptions),
}

impl MethodOptions {
    /// The method's default options.
    pub fn default_for(method: Method) -> Self {
        match method {
            Method::Lorap => MethodOptions::Lorap(Default::default()),
            Method::Sfsd => MethodOptions::Sfsd(Default::default()),
            Method::Mpo => MethodOptions::Mpo(Default::default()),
        }
    }

    pub fn method(&self) -> Method {
        match self {
            MethodOptions::Lorap(_) => Method::Lorap,
            MethodOptions::Sfsd(_) => Method::Sfsd,
            MethodOptions::Mpo(_) => Method::Mpo,
        }
    }
}

impl Default for MethodOptions {
    fn default() -> Self {
        MethodOptions::Lorap(Default::default())
    }
}

/// What `compress` does: the method and its options, how much to remove (a uniform ratio or
/// a per-layer plan) and the randomized SVD's knobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompressOptions {
    #[serde(flatten)]
    pub method: MethodOptions,
    /// Fraction of decoder-layer parameters to remove, in (0, 1).
    pub ratio: f64,
    /// Per-layer settings overriding the uniform ratio (`--plan`).
    #[serde(default)]
    pub plan: Option<Plan>,
    #[serde(skip)]
    pub svd: SvdOptions,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions { method: MethodOptions::default(), ratio: 0.2, plan: None, svd: SvdOptions::default() }
    }
}

/// What one layer gets: the run's uniform ratio unless the plan says otherwise.
pub struct LayerSetting {
    pub dropped: bool,
    /// Fraction of the attention parameters kept (LoRAP).
    pub attention_keep: f64,
    /// Fraction of the FFN channels kept (LoRAP).
    pub ffn_keep: f64,
    /// Fraction of each linear's break-even rank kept (feature-space decomposition);
    /// `None` = dense.
    pub module_keep: PerLinear<Option<f64>>,
}

impl LayerSetting {
    pub fn of(opts: &CompressOptions, i: usize) -> Self {
        let keep = 1.0 - opts.ratio;
        match opts.plan.as_ref().and_then(|p| p.layers.get(i)) {
            None => LayerSetting { dropped: false, attention_keep: keep, ffn_keep: keep, module_keep: PerLinear::splat(Some(keep)) },
            Some(l) => LayerSetting {
                dropped: l.dropped,
                attention_keep: l.attention_keep.unwrap_or(keep),
                ffn_keep: l.ffn_keep.unwrap_or(keep),
                module_keep: PerLinear::from_fn(|lin| if l.module_keep.is_empty() { Some(keep) } else { l.module_keep.get(lin.name()).copied() }),
            },
        }
    }
}

/// A compressed layer as a method builds it: the tensors to write (named for the output
/// layer index), the GPU linears that calibration continues with, and what the report shows.
pub struct BuiltLayer {
    pub dtype: Dtype,
    /// Layer index in the output model (dropped layers renumber the rest).
    pub out_index: usize,
    pub tensors: Vec<OutTensor>,
    /// The seven linears in `Linear::ALL` order.
    pub linears: Vec<GpuLinear>,
    pub plan: LayerPlan,
    /// Relative (weighted where the method weights) error of q, k, v, o (`Linear::index`).
    pub errors: [f64; 4],
    pub spectra: [Vec<f64>; 4],
    /// Seconds of host-side linear algebra in the method's decompositions (the report
    /// splits decomposition time into GPU and host with it).
    pub host_seconds: f64,
    /// Input FFN channels kept, ascending, when the method prunes channels (the report
    /// lists them so a baseline can keep the very same ones).
    pub ffn_kept_channels: Vec<usize>,
    /// What the FFN compensation chose, when the method refits down_proj.
    pub ffn_refit: Option<refit::RefitReport>,
    /// What each factored attention matrix's refit chose (q, k, v, o; `Linear::index`).
    pub attention_refit: [Option<refit::RefitReport>; 4],
}

impl BuiltLayer {
    pub fn new(dtype: Dtype, out_index: usize) -> Self {
        BuiltLayer { dtype, out_index, tensors: Vec::new(), linears: Vec::new(), plan: LayerPlan::default(), errors: [0.0; 4], spectra: Default::default(), host_seconds: 0.0, ffn_kept_channels: Vec::new(), ffn_refit: None, attention_refit: Default::default() }
    }

    fn name(&self, linear: Linear, suffix: &str) -> String {
        crate::format::names::linear(self.out_index, linear, suffix)
    }

    fn push(&mut self, name: String, shape: Vec<usize>, v: &[f32]) {
        self.tensors.push(OutTensor { name, dtype: self.dtype, bytes: encode(v, self.dtype), shape });
    }

    /// Copies tensor `name` of the input (`model.layers.{i}.x`) under the output index.
    pub fn push_copy(&mut self, store: &WeightStore, name: &str) -> Result<()> {
        let mut t = OutTensor::copied(store, name)?;
        let rest = crate::format::names::within_layer(name).context("not a layer tensor")?;
        t.name = crate::format::names::layer(self.out_index, rest);
        self.tensors.push(t);
        Ok(())
    }

    /// `linear` (next in order) stays a dense [out, inp] matrix.
    pub fn dense(&mut self, gpu: &Gpu, linear: Linear, w: &[f32], out: usize, inp: usize) -> Result<()> {
        debug_assert_eq!(self.linears.len(), linear.index());
        self.push(self.name(linear, "weight"), vec![out, inp], w);
        let w = round_trip(w, self.dtype);
        self.linears.push(GpuLinear::dense(gpu, out, inp, &w, None)?);
        Ok(())
    }

    /// Gives `linear` (already built) the bias `b` [out] the method computed, stored as
    /// `{linear}.bias` and listed in the plan's `biases`.
    pub fn bias(&mut self, gpu: &Gpu, linear: Linear, b: &[f32]) -> Result<()> {
        self.set_bias(gpu, linear, b)?;
        self.plan.biases.push(linear);
        Ok(())
    }

    /// Gives `linear` (already built) the model's own bias `b` (restricted to what the
    /// method kept): stored, not listed as added.
    pub fn model_bias(&mut self, gpu: &Gpu, linear: Linear, b: &[f32]) -> Result<()> {
        self.set_bias(gpu, linear, b)
    }

    fn set_bias(&mut self, gpu: &Gpu, linear: Linear, b: &[f32]) -> Result<()> {
        let b = round_trip(b, self.dtype);
        let slot = self.linears.get_mut(linear.index()).context("a bias given before its linear was built")?;
        anyhow::ensure!(slot.out == b.len() && slot.bias.is_none(), "{}: a bias of {} for {} outputs, or a second bias", linear.name(), b.len(), slot.out);
        slot.bias = Some(gpu.upload(&b)?);
        self.push(self.name(linear, "bias"), vec![b.len()], &b);
        Ok(())
    }

    /// `linear` (next in order) becomes the pair A [out, r] B [r, inp] (shapes from the
    /// lengths).
    pub fn low_rank(&mut self, gpu: &Gpu, linear: Linear, a: &[f32], b: &[f32], r: usize) -> Result<()> {
        let (out, inp) = (a.len() / r, b.len() / r);
        debug_assert_eq!(self.linears.len(), linear.index());
        // the GPU layer uses the values as stored, so calibration sees what eval will
        let (a, b) = (round_trip(a, self.dtype), round_trip(b, self.dtype));
        self.push(self.name(linear, "factor_a"), vec![out, r], &a);
        self.push(self.name(linear, "factor_b"), vec![r, inp], &b);
        self.plan.set_rank(linear, Some(r));
        self.linears.push(GpuLinear::low_rank(gpu, out, inp, &a, &b, r, None)?);
        Ok(())
    }

    /// `linear` (next in order) is stored as MPO cores; calibration continues with the
    /// matrix the stored (rounded) cores give.
    /// With `shared`, the central core is not written here (it is stored once per model).
    pub fn mpo(&mut self, gpu: &Gpu, linear: Linear, m: &crate::format::mpo::Mpo, shared: bool) -> Result<()> {
        debug_assert_eq!(self.linears.len(), linear.index());
        let mut rounded = m.clone();
        let centre = m.cores.len() / 2;
        for (k, c) in rounded.cores.iter_mut().enumerate() {
            let v: Vec<f32> = round_trip(&c.data.iter().map(|&x| x as f32).collect::<Vec<_>>(), self.dtype);
            if !(shared && k == centre) {
                self.push(self.name(linear, &format!("mpo_core_{k}")), vec![c.left, c.i, c.j, c.right], &v);
            }
            c.data = v.iter().map(|&x| x as f64).collect();
        }
        let shape = crate::format::plan::MpoShape {
            row_factors: m.cores.iter().map(|c| c.i).collect(),
            col_factors: m.cores.iter().map(|c| c.j).collect(),
            bonds: m.cores[..m.cores.len() - 1].iter().map(|c| c.right).collect(),
            shared_centre: shared,
        };
        self.plan.mpo.insert(linear.name().to_string(), shape);
        let w: Vec<f32> = rounded.reconstruct().iter().map(|&x| x as f32).collect();
        self.linears.push(GpuLinear::dense(gpu, m.rows, m.cols, &w, None)?);
        Ok(())
    }
}

