//! Command-line interface: argument parsing and the subcommands, thin over the library.

pub mod classify;
pub mod validate;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::eval::{perplexity, zeroshot};
use crate::gpu::{self, GpuOptions};
use crate::model::{forward::Runner, Model};

pub use classify::{classify, error_line};

#[derive(Parser, Debug)]
#[command(name = "lorap-gpu", version, about = "Compress LLaMA-family models with LoRAP on any GPU (wgpu)")]
pub struct Cli {
    /// GPU adapter: index or name substring (see `gpu-info`); env LORAP_ADAPTER.
    #[arg(long, global = true)]
    pub adapter: Option<String>,
    /// Cap the storage binding size in bytes (debugging); env LORAP_MAX_BINDING.
    #[arg(long, global = true)]
    pub max_binding: Option<u64>,
    /// No progress output (results and errors are still printed).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Largest weight magnitude accepted: a model whose weights exceed it is refused before
    /// any work as corrupt (NaN and infinities always are). Trained models stay far below
    /// the default; `inf` accepts any finite weight.
    #[arg(long, global = true, default_value_t = crate::format::weights::DEFAULT_MAX_ABS)]
    pub max_abs_weight: f64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List GPU adapters with backend, limits and features.
    GpuInfo,
    /// Perplexity of a text (and optionally zero-shot accuracy on a JSONL task).
    Eval(EvalArgs),
    /// Greedy continuation of a prompt (sanity check).
    Generate(GenerateArgs),
    /// Compress a model with LoRAP (low-rank attention, pruned FFN), calibrated on text.
    Compress(CompressArgs),
    /// Training-free search of per-layer settings (attention ranks, FFN widths, dropped
    /// layers): the Pareto front of calibration perplexity, parameters and latency, with
    /// each front point written as a plan for `compress --plan`.
    Search(SearchArgs),
    /// Write a model in a format other tools load (hf: transformers with custom code at the compressed size; gguf: llama.cpp; hf-dense: plain transformers).
    Export(ExportArgs),
    /// (Re)write the HTML/SVG report of a compressed model, with perplexity before/after.
    Report(ReportArgs),
    /// Write a model with random weights and real shapes (LLaMA-2-7B, LLaMA-3-8B, Mistral-7B)
    /// for benchmarking at scale without downloads.
    Synth(SynthArgs),
}

#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    #[arg(long, value_enum)]
    pub preset: crate::model::synthetic::Preset,
    /// Keep only this many decoder layers (quick runs).
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder (must not exist unless --force).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args, Debug)]
pub struct SearchArgs {
    /// Dense Hugging Face model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration text (UTF-8): statistics windows and, after them, the scoring windows.
    #[arg(long)]
    pub calib: PathBuf,
    /// Calibration windows in all (statistics + scoring).
    #[arg(long, default_value_t = 36)]
    pub samples: usize,
    /// Of those, windows that score candidates (never used for statistics).
    #[arg(long, default_value_t = 4)]
    pub search_windows: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Uniform plans evaluated first (decoder ratios, comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.2,0.3,0.4,0.5")]
    pub ratios: Vec<f64>,
    /// Parameter target of the local search (decoder ratio; default: the middle of --ratios).
    #[arg(long)]
    pub target_ratio: Option<f64>,
    /// Local-search candidates evaluated after the uniform plans.
    #[arg(long, default_value_t = 24)]
    pub evaluations: usize,
    /// Keep-fraction change per move.
    #[arg(long, default_value_t = 0.1)]
    pub step: f64,
    /// Never drop whole layers.
    #[arg(long)]
    pub no_drop: bool,
    /// Attention rank allocation of the candidates (use the same in `compress --plan`).
    #[arg(long, value_enum, default_value_t = crate::methods::lorap::LorapOptions::default().allocation)]
    pub allocation: crate::methods::allocate::Allocation,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output folder: search.json, front.md, front.svg, plan-best.json, plan-front-NN.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// A model folder written by `compress`.
    #[arg(long)]
    pub model: PathBuf,
    /// The dense model it came from (default: the one recorded in compression_report.json).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Held-out text (--text) for the perplexity of both models.
    #[command(flatten)]
    pub ppl: PerplexityArgs,
    /// Folder for report.html and the charts (default: the model folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub mem: MemArgs,
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A model folder written by `compress`.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum, default_value_t = crate::export::ExportFormat::HfDense)]
    pub format: crate::export::ExportFormat,
    /// Weight encoding of the GGUF's matrices (gguf only; norms stay f32).
    #[arg(long = "type", value_enum, default_value_t = crate::export::gguf::GgufType::F16)]
    pub gguf_type: crate::export::gguf::GgufType,
    /// Output folder (must not exist unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args, Debug)]
pub struct CompressArgs {
    /// Dense Hugging Face model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Fraction of decoder-layer parameters to remove, in (0, 1) (with --plan: the
    /// fallback for what the plan leaves unsaid; default 0 there).
    #[arg(long, required_unless_present_any = ["plan", "surgical"])]
    pub ratio: Option<f64>,
    /// Compression method: lorap (low-rank attention + pruned FFN), sfsd (feature-space
    /// decomposition of every linear), mpo (MPO cores of every linear).
    #[arg(long, value_enum, default_value_t = crate::methods::Method::Lorap)]
    pub method: crate::methods::Method,
    /// Per-layer plan (JSON, as `search` writes): dropped layers and keep fractions.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// sfsd ablation: eigenvectors of the mean-centred output covariance (the default uses
    /// the uncentred second moment, which also keeps the outputs' mean).
    #[arg(long)]
    pub sfsd_centred: bool,
    /// sfsd: pick which linears to decompose, and their ranks, by a surgical search on the
    /// last --search-windows calibration windows (then compress with that plan).
    #[arg(long)]
    pub surgical: bool,
    /// How the ratio is spread over the layers: uniform (every layer the same), or
    /// sensitivity (lorap: one calibration probe per layer, then the best on the scoring
    /// windows of the uniform plan and two sensitivity-guided plans at the same parameter
    /// count; writes layer_allocation.json and plan.json).
    #[arg(long, value_enum, default_value_t = crate::search::LayerAllocation::Uniform)]
    pub layer_allocation: crate::search::LayerAllocation,
    /// Surgical search and sensitivity allocation: scoring windows (the last ones of
    /// --samples; never statistics).
    #[arg(long, default_value_t = 4)]
    pub search_windows: usize,
    /// Surgical search: leading layers never decomposed.
    #[arg(long, default_value_t = 4)]
    pub surgical_skip_first: usize,
    /// Surgical search: consider only the last N layers (quick runs).
    #[arg(long)]
    pub surgical_last_layers: Option<usize>,
    /// Surgical search: allowed perplexity = base x (1 + tolerance)^(modules visited).
    #[arg(long, default_value_t = 0.005)]
    pub surgical_tolerance: f64,
    /// MPO: cores per matrix.
    #[arg(long, default_value_t = 3)]
    pub mpo_cores: usize,
    /// MPO: bond dimension cap (default: the largest that keeps 1 - ratio of each matrix).
    #[arg(long)]
    pub mpo_max_bond: Option<usize>,
    /// MPO: share one central core per linear across all layers (3 cores); each layer's
    /// outer cores are refitted to its own weights by least squares.
    #[arg(long)]
    pub mpo_share_centre: bool,
    /// MPO: linears to decompose, comma-separated among q,k,v,o,gate,up,down (default all).
    #[arg(long, value_delimiter = ',')]
    pub mpo_matrices: Vec<String>,
    /// Calibration text (UTF-8).
    #[arg(long)]
    pub calib: PathBuf,
    /// Calibration windows.
    #[arg(long, default_value_t = 128)]
    pub samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Output folder (must not exist unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
    /// Continue an interrupted run (same model, text and options) from its last finished
    /// layer; starts from the beginning when there is nothing to continue.
    #[arg(long)]
    pub resume: bool,
    /// Attention rank allocation. fixed31 is the default: on held-out perplexity it beat the
    /// greedy spectrum allocation, and the relative one at 50% (docs/results.md).
    #[arg(long, value_enum, default_value_t = crate::methods::lorap::LorapOptions::default().allocation)]
    pub allocation: crate::methods::allocate::Allocation,
    /// Ablation: plain SVD of W instead of the activation-weighted W S.
    #[arg(long)]
    pub plain_svd: bool,
    /// Fraction of the FFN's channels reserved from removal among the lowest-scored ones
    /// (the LoRAP paper reserves 1%: 0.01). None by default: with the FFN refit, no
    /// reservation was better on both held-out texts at every ratio measured
    /// (docs/results.md).
    #[arg(long, default_value_t = crate::methods::lorap::LorapOptions::default().reserve)]
    pub ffn_reserve: f64,
    /// The same as --ffn-reserve 0 (the default; kept for older command lines).
    #[arg(long, hide = true, conflicts_with = "ffn_reserve")]
    pub no_reserve: bool,
    /// Ablation: score FFN channels by weight magnitudes only.
    #[arg(long)]
    pub magnitude_ffn: bool,
    /// FFN compensation (the default for --method lorap): refit the kept down_proj columns
    /// by ridge least squares with a bias; the ridge (or no refit, or the removed channels'
    /// mean as the bias alone) is chosen per layer on every 4th calibration window, held out
    /// of the fit. By default it runs when the statistics have at least 4 windows (with
    /// fewer it is skipped, with a note); given explicitly, fewer is an error.
    #[arg(long, conflicts_with = "no_ffn_refit")]
    pub ffn_refit: bool,
    /// Ablation: no FFN compensation (the kept down_proj columns as pruned).
    #[arg(long)]
    pub no_ffn_refit: bool,
    /// Attention compensation: refit the left factor of each factored matrix (vo: v and o;
    /// qkvo: all four) against the full covariance and mean of its calibration inputs by
    /// ridge least squares with a bias; chosen per matrix on the held-out windows as for
    /// --ffn-refit.
    #[arg(long, value_enum)]
    pub attention_refit: Option<crate::methods::lorap::AttentionRefit>,
    /// How FFN channels are scored: wanda (weight norms x activation scales) or obs (the
    /// output error left when the other channels compensate; the features' covariance).
    #[arg(long, value_enum)]
    pub ffn_selection: Option<crate::methods::ffn::ChannelSelection>,
    /// Power iterations of the randomized SVD.
    #[arg(long, default_value_t = 4)]
    pub power_iters: usize,
    /// Oversampling columns of the randomized SVD.
    #[arg(long, default_value_t = 16)]
    pub oversample: usize,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// GPU memory budget in GiB: calibration states move to host memory when they would
    /// take over half of it, and the run fails cleanly rather than allocate past it.
    #[arg(long)]
    pub max_vram: Option<f64>,
    /// Calibration tokens per GPU batch (whole windows).
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
    /// Also write the calibration token ids (little-endian u32, window after window) to this
    /// file, outside --out: benches/pytorch_baseline.py calibrates on the very same tokens.
    #[arg(long)]
    pub save_calibration: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json), dense or compressed.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub ppl: PerplexityArgs,
    /// Multiple-choice task (JSONL) for zero-shot accuracy.
    #[arg(long)]
    pub task: Option<PathBuf>,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub mem: MemArgs,
}

/// The perplexity protocol's inputs.
#[derive(clap::Args, Debug)]
pub struct PerplexityArgs {
    /// UTF-8 text for perplexity.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Window length L of the perplexity protocol.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Use only the first N tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
}

#[derive(clap::Args, Debug)]
pub struct MemArgs {
    /// GPU memory budget in GiB: layers stay resident when the whole model fits in half of
    /// it, otherwise they are streamed one at a time.
    #[arg(long, default_value_t = 8.0)]
    pub max_vram: f64,
    /// Tokens per GPU batch.
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 24)]
    pub max_new: usize,
    #[command(flatten)]
    pub mem: MemArgs,
}

impl Cli {
    pub fn gpu_options(&self) -> GpuOptions {
        GpuOptions { adapter: self.adapter.clone(), max_binding: self.max_binding, backends: None, shader_checks: None, max_dispatch_flops: None, cooperative_matrix: None }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    // every value range-checked before any file is read
    cli.validate()?;
    match &cli.command {
        Command::GpuInfo => gpu_info(&cli),
        Command::Eval(a) => eval(&cli, a),
        Command::Generate(a) => generate(&cli, a),
        Command::Compress(a) => compress(&cli, a),
        Command::Export(a) => export(&cli, a),
        Command::Report(a) => report(&cli, a),
        Command::Synth(a) => synth(&cli, a),
        Command::Search(a) => search(&cli, a),
    }
}

fn compress(cli: &Cli, a: &CompressArgs) -> Result<()> {
    use crate::error::CompressError;
    use crate::methods::lorap::LorapOptions;
    use crate::methods::mpo::MpoOptions;
    use crate::methods::sfsd::SfsdOptions;
    use crate::methods::{svd::SvdOptions, CompressOptions, Method, MethodOptions};
    use crate::pipeline::{self, Run, RunControl};
    let model = Model::open(&a.model)?;
    // the output before the text is tokenized (minutes for a long one)
    let mut inputs = vec![a.model.as_path(), a.calib.as_path()];
    inputs.extend(a.plan.as_deref());
    crate::format::claim::check_target(&a.out, &inputs, a.force)?;
    let n_layers = model.cfg.num_hidden_layers;
    let plan = match a.plan.as_deref() {
        Some(path) => {
            let plan = crate::format::plan::Plan::load(path)?;
            plan.validate(n_layers).map_err(|e| CompressError::BadArgument(format!("{}: {e}", path.display())))?;
            Some(plan)
        }
        None => None,
    };
    model.cfg.check_window(a.seq_len, "per calibration window (--seq-len)")?;
    if a.surgical && a.surgical_skip_first >= n_layers {
        return Err(CompressError::BadArgument(format!("--surgical-skip-first {} leaves no layer to decompose: the model has {n_layers}", a.surgical_skip_first)).into());
    }
    let tok = model.tokenizer()?;
    let calib = calibration_windows(&tok, &a.calib, a.samples, a.seq_len)?;
    if let Some(path) = &a.save_calibration {
        let bytes: Vec<u8> = calib.iter().flat_map(|t| t.to_le_bytes()).collect();
        std::fs::write(path, bytes).with_context(|| format!("cannot write the calibration tokens to {}", path.display()))?;
    }
    let method = match a.method {
        Method::Lorap => MethodOptions::Lorap(LorapOptions {
            allocation: a.allocation,
            weighted_svd: !a.plain_svd,
            reserve: if a.no_reserve { 0.0 } else { a.ffn_reserve },
            ffn_activation_scores: !a.magnitude_ffn,
            ffn_selection: a.ffn_selection.unwrap_or_default(),
            ffn_refit: ffn_refit_wanted(a, calib.len() / a.seq_len.max(1), cli.quiet),
            attention_refit: a.attention_refit,
        }),
        Method::Sfsd => MethodOptions::Sfsd(SfsdOptions { centred: a.sfsd_centred }),
        Method::Mpo => MethodOptions::Mpo(MpoOptions { cores: a.mpo_cores, max_bond: a.mpo_max_bond, share_centre: a.mpo_share_centre, matrices: a.mpo_matrices()? }),
    };
    let opts = CompressOptions {
        method,
        ratio: a.ratio.unwrap_or(0.0),
        plan,
        svd: SvdOptions { power_iters: a.power_iters, oversample: a.oversample, ..Default::default() },
    };
    let mut opts = opts;
    if a.surgical {
        opts.plan = Some(crate::format::plan::Plan::uniform(model.cfg.num_hidden_layers, 1.0));
    }
    pipeline::validate(&model, &calib, a.seq_len, &opts)?;
    check_weights(cli, &model)?;
    let gpu = gpu::Gpu::new(&cli.gpu_options())?;
    if let Some(v) = a.max_vram {
        gpu.set_budget(validate::gib_to_bytes("--max-vram", v)?);
    }
    // what a search before the compression decided: its report's file name and text
    let mut search_report: Option<(&str, String)> = None;
    let mut calib = calib;
    if a.surgical {
        let sopts = crate::search::surgical::SurgicalOptions {
            skip_first: a.surgical_skip_first,
            last_layers: a.surgical_last_layers,
            tolerance: a.surgical_tolerance,
            svd: opts.svd,
            ..Default::default()
        };
        let mut pb = Progress::new(model.cfg.num_hidden_layers, "surgical search", cli.quiet);
        let (plan, rep) = crate::search::surgical::surgical(&gpu, &model, &calib, a.seq_len, a.search_windows, &sopts, &mut |d, t, what| {
            pb.set_total(t);
            pb.update(d, what)
        })?;
        pb.finish();
        if !cli.quiet {
            eprintln!("surgical search: search-window perplexity {:.3} -> {:.3}, {} of {} linears decomposed", rep.base_ppl, rep.final_ppl, rep.steps.iter().filter(|s| s.keep.is_some()).count(), rep.steps.len());
        }
        opts.plan = Some(plan);
        search_report = Some(("surgical_search.json", serde_json::to_string_pretty(&rep)?));
    }
    if a.layer_allocation == crate::search::LayerAllocation::Sensitivity {
        let MethodOptions::Lorap(lorap) = &opts.method else { return Err(CompressError::BadArgument("--layer-allocation sensitivity applies to --method lorap".into()).into()) };
        let sopts = crate::search::SensitivityOptions { ratio: opts.ratio, allocation: lorap.allocation, reserve: lorap.reserve, svd: opts.svd };
        let mut pb = Progress::new(model.cfg.num_hidden_layers, "layer allocation", cli.quiet);
        let (plan, rep) = crate::search::sensitivity_plan(&gpu, &model, &calib, a.seq_len, a.search_windows, &sopts, &mut |d, t, what| {
            pb.set_total(t);
            pb.update(d, what)
        })?;
        pb.finish();
        if !cli.quiet {
            let (u, p) = (&rep.candidates[0], &rep.candidates[rep.picked]);
            eprintln!("layer allocation: {} (scoring-window perplexity {:.3}, uniform {:.3}), {} decoder parameters, {:.0} s", p.origin, p.calib_ppl, u.calib_ppl, p.decoder_params, rep.seconds);
        }
        opts.plan = Some(plan);
        search_report = Some(("layer_allocation.json", serde_json::to_string_pretty(&rep)?));
    }
    if a.searches_first() {
        // the compression's statistics use the windows the search did not score on
        calib.truncate(a.statistics_windows(calib.len() / a.seq_len) * a.seq_len);
    }
    let control = RunControl { force: a.force, resume: a.resume, batch_tokens: Some(a.batch_tokens), report_files: Some(crate::report::compress_files) , ..Default::default() };
    let mut pb = Progress::new(model.cfg.num_hidden_layers, "compress: layers", cli.quiet);
    let (path, rep) = pipeline::compress(&gpu, &Run::new(&model, &calib, a.seq_len, &opts, &a.out).with_control(control), &mut |done, _, what| pb.update(done, what.label()))?;
    pb.finish();
    if let (Some((file, text)), Some(plan)) = (&search_report, &opts.plan) {
        // beside the finished model: what the search decided, and the plan to re-apply it
        write_output(&path.join(file), text.as_bytes())?;
        write_output(&path.join("plan.json"), serde_json::to_string_pretty(plan)?.as_bytes())?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "wrote {}: decoder parameters {} -> {} (removed {:.2}%), whole model {} -> {} (removed {:.2}%), {:.1} s, peak GPU memory {:.1} MiB on {}",
            path.display(), rep.decoder_params_before, rep.decoder_params_after, 100.0 * rep.achieved_decoder_ratio,
            rep.total_params_before, rep.total_params_after, 100.0 * rep.achieved_total_ratio, rep.seconds,
            rep.peak_gpu_bytes as f64 / (1u64 << 20) as f64, rep.adapter
        );
        let total = rep.phases.total().max(f64::MIN_POSITIVE);
        let shares: Vec<String> = rep.phases.rows().iter().filter(|r| r.1 > 0.0).map(|(name, secs)| format!("{name} {secs:.1} s ({:.0}%)", 100.0 * secs / total)).collect();
        let busy = rep.phases.gpu_busy.map_or(String::new(), |b| format!("; the GPU computed {b:.1} s ({:.0}%)", 100.0 * b / total));
        println!("time: {}; the host waited on the GPU {:.1} s{busy}", shares.join(", "), rep.phases.blocked_on_gpu);
    }
    Ok(())
}

/// Whether LoRAP refits the FFN: asked for (`--ffn-refit`; too few windows is then the
/// pipeline's error), turned off (`--no-ffn-refit`), or by default when the statistics
/// windows (those a search before the compression does not score on) allow a held-out
/// choice.
impl CompressArgs {
    /// Whether a search (surgical, or the sensitivity allocation) runs before the
    /// compression and scores on the last --search-windows calibration windows.
    fn searches_first(&self) -> bool {
        self.surgical || self.layer_allocation == crate::search::LayerAllocation::Sensitivity
    }

    /// The calibration windows the compression's statistics use, of `windows`: all, or
    /// those a search before it does not score on.
    fn statistics_windows(&self, windows: usize) -> usize {
        if self.searches_first() {
            windows.saturating_sub(self.search_windows)
        } else {
            windows
        }
    }
}

fn ffn_refit_wanted(a: &CompressArgs, windows: usize, quiet: bool) -> bool {
    use crate::calib::stats::HOLD_OUT_EVERY;
    if a.ffn_refit || a.no_ffn_refit {
        return a.ffn_refit;
    }
    let statistics = a.statistics_windows(windows);
    if statistics < HOLD_OUT_EVERY && !quiet {
        eprintln!("note: the FFN refit is skipped: it holds out every {HOLD_OUT_EVERY}th calibration window to choose its ridge and the statistics have {statistics} (raise --samples, or pass --no-ffn-refit to silence this)");
    }
    statistics >= HOLD_OUT_EVERY
}

fn search(cli: &Cli, a: &SearchArgs) -> Result<()> {
    use crate::report::search::{front_table, render};
    use crate::search;
    let model = Model::open(&a.model)?;
    model.cfg.check_window(a.seq_len, "per calibration window (--seq-len)")?;
    // held from here: a second search on the same --out fails now, not after the search
    let claim = crate::format::OutputClaim::take(&a.out, &[a.model.as_path(), a.calib.as_path()], a.force)?;
    let tok = model.tokenizer()?;
    let calib = calibration_windows(&tok, &a.calib, a.samples, a.seq_len)?;
    check_weights(cli, &model)?;
    let opts = search::SearchOptions {
        uniform_ratios: a.ratios.clone(),
        evaluations: a.evaluations,
        target_ratio: a.target_ratio,
        allow_drop: !a.no_drop,
        step: a.step,
        allocation: a.allocation,
        seed: a.seed,
        ..Default::default()
    };
    let gpu = gpu::Gpu::new(&cli.gpu_options())?;
    let mut pb = Progress::new(model.cfg.num_hidden_layers, "search", cli.quiet);
    let res = search::search(&gpu, &model, &calib, a.seq_len, a.search_windows, &opts, &mut |done, total, what| {
        pb.set_total(total);
        pb.update(done, what)
    })?;
    pb.finish();
    claim.fresh_partial()?;
    for (file, text) in render(&res) {
        if let Err(e) = write_output(&claim.partial().join(&file), text.as_bytes()) {
            let _ = std::fs::remove_dir_all(claim.partial());
            return Err(e);
        }
    }
    claim.move_into_place()?;
    print!("{}", front_table(&res));
    println!("wrote {} ({} candidates in {:.0} s on {})", a.out.display(), res.candidates.len(), res.seconds, res.adapter);
    Ok(())
}

fn report(cli: &Cli, a: &ReportArgs) -> Result<()> {
    use crate::pipeline::CompressionReport;
    let path = a.model.join("compression_report.json");
    let text = crate::format::input::read_text(&path, crate::format::input::InputKind::Report)?;
    let rep: CompressionReport = serde_json::from_str(&text).with_context(|| format!("{}: not a compression report", path.display()))?;
    let base = a.base.clone().unwrap_or_else(|| PathBuf::from(&rep.source_model));
    let out = a.out.clone().unwrap_or_else(|| a.model.clone());
    // the report goes beside the compressed model by default, never into what it reads;
    // checked before the perplexities are measured, not after
    let mut inputs = vec![base.as_path()];
    inputs.extend(a.ppl.text.as_deref());
    crate::format::claim::check_no_overlap(&out, &inputs)?;
    if std::fs::symlink_metadata(&out).is_ok() && !out.is_dir() {
        return Err(crate::format::OutputError::NotAFolder(out.display().to_string()).into());
    }
    let ppl = match &a.ppl.text {
        None => None,
        Some(text_path) => {
            let measure = |dir: &std::path::Path, what: &str| -> Result<perplexity::PerplexityReport> {
                let model = Model::open(dir)?;
                model.cfg.check_window(a.ppl.seq_len, "per window (--seq-len)")?;
                check_weights(cli, &model)?;
                let mut r = runner(cli, &model, &a.mem)?;
                measure_perplexity(cli, &model, &mut r, &a.ppl, what)
            };
            let dense = measure(&base, "perplexity (dense): layers")?;
            let compressed = measure(&a.model, "perplexity (compressed): layers")?;
            let name = text_path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            Some(crate::report::Perplexities { text: name, tokens: dense.windows * dense.window_len, seq_len: a.ppl.seq_len, dense: dense.perplexity, compressed: compressed.perplexity })
        }
    };
    std::fs::create_dir_all(&out).map_err(|source| crate::format::OutputError::Io { path: out.display().to_string(), what: "cannot create", source })?;
    let name = base.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    for (file, body) in crate::report::render(&rep, &name, ppl.as_ref()) {
        write_output(&out.join(&file), body.as_bytes())?;
    }
    if let Some(p) = &ppl {
        println!("perplexity dense {:.4} -> compressed {:.4}", p.dense, p.compressed);
    }
    println!("wrote {}", out.join("report.html").display());
    Ok(())
}

fn synth(cli: &Cli, a: &SynthArgs) -> Result<()> {
    use crate::model::synthetic;
    // built beside the target and renamed when complete, like compress
    let claim = crate::format::OutputClaim::take(&a.out, &[], a.force)?;
    claim.fresh_partial()?;
    let partial = claim.partial().to_path_buf();
    let cfg = a.preset.config(a.layers);
    let layers = cfg["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    let mut pb = Progress::new(layers + 1, "synth: shards", cli.quiet);
    let written = synthetic::write_random_model_sharded(&partial, &cfg, a.seed, &mut |d, _| pb.update(d, "writing"))
        .and_then(|_| synthetic::write_word_tokenizer(&partial, cfg["vocab_size"].as_u64().unwrap_or(2) as usize));
    pb.finish();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&partial);
        // an I/O failure here is on the output side, whatever its kind
        return Err(match e.downcast::<std::io::Error>() {
            Ok(source) => crate::format::OutputError::Io { path: a.out.display().to_string(), what: "cannot write the synthetic model", source }.into(),
            Err(e) => e.context(format!("{}: cannot write the synthetic model", a.out.display())),
        });
    }
    claim.move_into_place()?;
    drop(claim);
    let m = Model::open(&a.out)?;
    println!("wrote {}: {:?}, {} layers, {} parameters (random f16 weights)", a.out.display(), a.preset, m.cfg.num_hidden_layers, m.cfg.total_params());
    Ok(())
}

fn export(cli: &Cli, a: &ExportArgs) -> Result<()> {
    let model = Model::open(&a.model)?;
    check_weights(cli, &model)?;
    let gpu = gpu::Gpu::new(&cli.gpu_options())?;
    let mut pb = Progress::new(model.cfg.num_hidden_layers, "export: layers", cli.quiet);
    match a.format {
        crate::export::ExportFormat::HfDense => {
            let path = crate::export::export_hf_dense(&gpu, &model, &a.out, a.force, &mut |d, _| pb.update(d, "multiplying factors"))?;
            pb.finish();
            println!("wrote {} (hf-dense: {} parameters, loads in Hugging Face transformers)", path.display(), Model::open(&path)?.cfg.total_params());
        }
        crate::export::ExportFormat::Hf => {
            let path = crate::export::hf::export_hf(&model, &a.out, a.force, &mut |d, _| pb.update(d, "copying tensors"))?;
            pb.finish();
            println!(
                "wrote {} (hf: {} parameters; AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) builds the factored layers)",
                path.display(),
                model.cfg.total_params()
            );
        }
        crate::export::ExportFormat::Gguf => {
            let s = crate::export::gguf::export_gguf(&gpu, &model, a.gguf_type, &a.out, a.force, &mut |d, _| pb.update(d, "writing tensors"))?;
            pb.finish();
            println!(
                "wrote {} (gguf {}, llama.cpp architecture {}, {} tensors, {} bytes): {} parameters stored; the folder holds {} ({:+} from multiplying factor pairs and MPO cores back into dense matrices)",
                s.path.display(),
                a.gguf_type.name(),
                s.arch.name(),
                s.tensors,
                s.bytes,
                s.params,
                s.folder_params,
                s.params as i64 - s.folder_params as i64
            );
            if let Some(w) = s.window_as_context {
                println!("note: the model's sliding attention window ({w} tokens) is written as its context length: llama.cpp attends over the whole context, the same function up to {w} tokens (as this tool runs it); llama.cpp warns past it");
            }
        }
    }
    Ok(())
}

/// Progress of a long job: a bar on a terminal, a plain line per step (at most one every
/// few seconds) otherwise, nothing with `--quiet`.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    what: String,
    total: usize,
    start: std::time::Instant,
    last_line: Option<std::time::Instant>,
    last_done: usize,
}

impl Progress {
    pub fn new(total: usize, what: &str, quiet: bool) -> Self {
        use std::io::IsTerminal;
        let terminal = std::io::stderr().is_terminal();
        let bar = (!quiet && terminal).then(|| {
            let pb = indicatif::ProgressBar::new(total as u64);
            pb.set_style(indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}").unwrap().progress_chars("=> "));
            pb.set_message(what.to_string());
            pb
        });
        Progress { bar, plain: !quiet && !terminal, what: what.into(), total, start: std::time::Instant::now(), last_line: None, last_done: usize::MAX }
    }

    /// A new total (a job whose phases count different things).
    pub fn set_total(&mut self, total: usize) {
        if total != self.total {
            self.total = total;
            if let Some(pb) = &self.bar {
                pb.set_length(total as u64);
            }
        }
    }

    pub fn update(&mut self, done: usize, msg: &str) {
        if let Some(pb) = &self.bar {
            pb.set_position(done as u64);
            pb.set_message(format!("{}: {msg}", self.what));
        } else if self.plain {
            let due = self.last_line.is_none_or(|t| t.elapsed().as_secs_f64() >= 5.0);
            if done != self.last_done || due {
                let el = self.start.elapsed().as_secs_f64();
                let eta = if done > 0 { format!(", eta {:.0} s", el / done as f64 * (self.total - done.min(self.total)) as f64) } else { String::new() };
                eprintln!("{} {done}/{}: {msg} ({el:.0} s{eta})", self.what, self.total);
                self.last_line = Some(std::time::Instant::now());
                self.last_done = done;
            }
        }
    }

    pub fn finish(&self) {
        if let Some(pb) = &self.bar {
            pb.finish_and_clear();
        }
    }
}

fn runner(cli: &Cli, model: &Model, mem: &MemArgs) -> Result<Runner> {
    let budget = validate::gib_to_bytes("--max-vram", mem.max_vram)?;
    let gpu = gpu::Gpu::new(&cli.gpu_options())?;
    let mut r = Runner::with_budget(gpu, model.cfg.clone(), model.store.clone(), budget);
    r.batch_tokens = mem.batch_tokens.max(1);
    Ok(r)
}

/// The calibration windows of a text file, tokenized in pieces (bounded memory).
fn calibration_windows(tok: &tokenizers::Tokenizer, path: &std::path::Path, samples: usize, seq_len: usize) -> Result<Vec<u32>> {
    use crate::model::tokens::TextFile;
    crate::calib::calibration_windows_of(TextFile::new(tok, path), samples, seq_len, crate::calib::KEEP_TOKENS)
}

/// Reads the model's weights once before any work, with progress: NaN, infinite or
/// absurdly large values are refused here, naming the tensor (see `Model::check_weights`).
fn check_weights(cli: &Cli, model: &Model) -> Result<()> {
    // tenths of the bytes: a few lines at most in a log, whatever the model's size
    let mut pb = Progress::new(10, "checking weights (tenths)", cli.quiet);
    model.check_weights(cli.max_abs_weight, &mut |done, total| pb.update((done * 10).checked_div(total).unwrap_or(10) as usize, "reading"))?;
    pb.finish();
    Ok(())
}

/// Writes a file of the output (after the output folder was claimed); a failure is an
/// output-side one (`OutputError::Io`), never read as a missing input.
fn write_output(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| crate::format::OutputError::Io { path: path.display().to_string(), what: "cannot write", source })?;
    Ok(())
}

/// Perplexity of `model` on the text of `p` (which must name one), with progress.
fn measure_perplexity(cli: &Cli, model: &Model, r: &mut Runner, p: &PerplexityArgs, label: &str) -> Result<perplexity::PerplexityReport> {
    let text_path = p.text.as_ref().context("no --text given")?;
    let tok = model.tokenizer()?;
    // read only as far as --max-tokens needs
    let ids = crate::model::tokens::TextFile::new(&tok, text_path).first_tokens(p.max_tokens)?;
    let toks = perplexity::windows_of(&ids, p.seq_len, p.max_tokens);
    if toks.is_empty() {
        return Err(crate::error::CompressError::TextTooShort { path: text_path.display().to_string(), tokens: ids.len(), seq_len: p.seq_len }.into());
    }
    let mut pb = Progress::new(model.cfg.num_hidden_layers, label, cli.quiet);
    let rep = perplexity::perplexity(r, toks, p.seq_len, &mut |d, _| pb.update(d, "running"))?;
    pb.finish();
    Ok(rep)
}

fn eval(cli: &Cli, a: &EvalArgs) -> Result<()> {
    let model = Model::open(&a.model)?;
    if a.ppl.text.is_some() {
        model.cfg.check_window(a.ppl.seq_len, "per window (--seq-len)")?;
    }
    let tok = model.tokenizer()?;
    // the task file is read before the weights check, the GPU and the perplexity run, so a
    // bad one fails at once
    let examples = a.task.as_deref().map(zeroshot::load_task).transpose()?;
    check_weights(cli, &model)?;
    let mut r = runner(cli, &model, &a.mem)?;
    let mut out = serde_json::Map::new();
    out.insert("model".into(), a.model.display().to_string().into());
    out.insert("adapter".into(), r.gpu.info.name.clone().into());
    // what other runtimes loading the same model must count (tools/interop compares them)
    out.insert("parameters".into(), model.cfg.total_params().into());
    if a.ppl.text.is_some() {
        let rep = measure_perplexity(cli, &model, &mut r, &a.ppl, "perplexity: layers")?;
        if !a.json {
            println!(
                "perplexity {:.4} (mean NLL {:.5}) over {} windows of {} tokens, {} scored; {:.0} tokens/s on {}",
                rep.perplexity, rep.mean_nll, rep.windows, rep.window_len, rep.scored_tokens, rep.tokens_per_second, r.gpu.info.name
            );
        }
        out.insert("perplexity".into(), serde_json::to_value(&rep)?);
    }
    if let (Some(task), Some(examples)) = (&a.task, examples) {
        let mut pb = Progress::new(examples.len(), "zero-shot: examples", cli.quiet);
        let rep = zeroshot::evaluate(&mut r, &tok, &examples, &mut |d, _| pb.update(d, "scoring"))?;
        pb.finish();
        if !a.json {
            println!("zero-shot {}: accuracy {:.4}, length-normalized {:.4} over {} examples", task.display(), rep.accuracy, rep.accuracy_norm, rep.examples);
        }
        out.insert("zero_shot".into(), serde_json::to_value(&rep)?);
    }
    let (_, peak) = r.gpu.memory_stats();
    out.insert("peak_gpu_bytes".into(), peak.into());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("peak GPU memory {:.1} MiB", peak as f64 / (1u64 << 20) as f64);
    }
    Ok(())
}

fn generate(cli: &Cli, a: &GenerateArgs) -> Result<()> {
    use crate::model::decode;
    use std::io::Write;
    let model = Model::open(&a.model)?;
    let tok = model.tokenizer()?;
    let ids = tok.encode(a.prompt.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?.get_ids().to_vec();
    if ids.is_empty() {
        return Err(crate::error::CompressError::BadArgument(format!("--prompt {:?} tokenizes to nothing", a.prompt)).into());
    }
    // the prompt and --max-new against the model's positions, before any GPU work
    decode::check_request(&model.cfg, ids.len(), a.max_new)?;
    model.cfg.check_window(ids.len() + a.max_new, "of the prompt and --max-new")?;
    check_weights(cli, &model)?;
    let mut r = runner(cli, &model, &a.mem)?;
    let eos = model.cfg.eos_token_id.as_ref().and_then(|e| e.first());
    // each token's text is printed as soon as it is chosen
    let mut out = std::io::stdout().lock();
    write!(out, "{}", a.prompt).and_then(|_| out.flush()).map_err(decode::DecodeError::Output)?;
    let mut streamer = crate::model::tokens::TextStreamer::new(&tok);
    let text_of = |e: tokenizers::Error| std::io::Error::other(format!("tokenizer: {e}"));
    decode::generate(&mut r, &ids, a.max_new, eos, &mut |id| {
        let piece = streamer.push(id).map_err(text_of)?;
        write!(out, "{piece}")?;
        out.flush()
    })?;
    let rest = streamer.finish().map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    writeln!(out, "{rest}").map_err(decode::DecodeError::Output)?;
    Ok(())
}

fn gpu_info(cli: &Cli) -> Result<()> {
    let backends = gpu::context::backends_from_env();
    let adapters = gpu::list_adapters(backends);
    if adapters.is_empty() {
        return Err(gpu::GpuError::NoAdapter { backends }.into());
    }
    for a in &adapters {
        let l = &a.limits;
        println!("[{}] {} ({:?}, {:?}, driver {} {})", a.index, a.info.name, a.info.backend, a.info.device_type, a.info.driver, a.info.driver_info);
        println!("    max storage binding {} B, max buffer {} B, workgroup storage {} B, invocations {}", l.max_storage_buffer_binding_size, l.max_buffer_size, l.max_compute_workgroup_storage_size, l.max_compute_invocations_per_workgroup);
        println!("    storage buffers per stage {}, storage offset alignment {}, subgroup size {}..{}", l.max_storage_buffers_per_shader_stage, l.min_storage_buffer_offset_alignment, a.info.subgroup_min_size, a.info.subgroup_max_size);
        let f = a.features;
        let has = |x: wgpu::Features| if f.contains(x) { "yes" } else { "no" };
        println!("    f16 {}, subgroups {}, f64 {}, timestamps {}", has(wgpu::Features::SHADER_F16), has(wgpu::Features::SUBGROUP), has(wgpu::Features::SHADER_F64), has(wgpu::Features::TIMESTAMP_QUERY));
        if a.cooperative_matrix.is_empty() {
            println!("    cooperative matrices: none (the adapter does not advertise EXPERIMENTAL_COOPERATIVE_MATRIX configurations; f32 kernels only)");
        } else {
            println!("    cooperative matrices (M x N x K, A/B type -> C type):");
            for c in &a.cooperative_matrix {
                let sat = if c.saturating_accumulation { ", saturating" } else { "" };
                println!("      {} x {} x {}, {:?} -> {:?}{sat}", c.m_size, c.n_size, c.k_size, c.ab_type, c.cr_type);
            }
        }
    }
    let chosen = gpu::Gpu::new(&cli.gpu_options())?;
    println!("selected: {} ({:?}), effective storage binding {} B", chosen.info.name, chosen.info.backend, chosen.max_binding_bytes());
    Ok(())
}
