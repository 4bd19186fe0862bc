//! Range checks of every command-line value, done right after parsing, before any file is
//! read or any work starts: a value out of range fails at once with the flag named (exit
//! class `BadArgument`), not after a run, and never reaches a computation that would
//! silently turn it into something else (a budget rounded to 0 bytes, a ratio of 2).
//! `tests/fuzz_cli.rs` runs parsing and these checks on arbitrary argument vectors.

use crate::error::CompressError;
use crate::format::linear::Linear;
use crate::search::LayerAllocation;

use super::{Cli, Command, CompressArgs, EvalArgs, GenerateArgs, MemArgs, PerplexityArgs, ReportArgs, SearchArgs, SynthArgs};

/// At most this many GiB for `--max-vram`: 2^34 GiB is 2^64 bytes, past which the byte
/// count would not fit the budget's integer.
const MAX_VRAM_GIB: f64 = (1u64 << 34) as f64;

/// Upper bounds of the SVD's knobs: beyond them a run only gets slower (the randomized
/// SVD's subspace has converged after a handful of power iterations, and the oversampling
/// columns are clamped to the matrix anyway) or, with absurd values, never ends.
const MAX_POWER_ITERS: usize = 32;
const MAX_OVERSAMPLE: usize = 1024;

/// Local-search evaluations at most (each is a forward pass over the search windows).
const MAX_EVALUATIONS: usize = 100_000;

/// The smallest storage binding the GPU layer accepts (it raises smaller caps to this).
const MIN_BINDING: u64 = 256;

/// The CLI spelling of a method (`lorap`, `sfsd`, `mpo`).
fn method_name(m: crate::methods::Method) -> String {
    use clap::ValueEnum;
    m.to_possible_value().map_or_else(|| format!("{m:?}"), |v| v.get_name().to_string())
}

fn bad(what: String) -> CompressError {
    CompressError::BadArgument(what)
}

/// A GiB amount as bytes: positive, finite, at least one byte once converted, at most
/// `MAX_VRAM_GIB`.
pub fn gib_to_bytes(flag: &str, gib: f64) -> Result<u64, CompressError> {
    if !(gib > 0.0 && gib <= MAX_VRAM_GIB) {
        return Err(bad(format!("{flag} must be a positive number of GiB (at most {MAX_VRAM_GIB}), got {gib}")));
    }
    let bytes = (gib * (1u64 << 30) as f64) as u64;
    if bytes == 0 {
        return Err(bad(format!("{flag} {gib} GiB is less than one byte")));
    }
    Ok(bytes)
}

/// A fraction strictly inside (0, 1).
fn open_fraction(flag: &str, x: f64) -> Result<(), CompressError> {
    if !(x > 0.0 && x < 1.0) {
        return Err(bad(format!("{flag} must be in (0, 1), got {x}")));
    }
    Ok(())
}

fn at_least(flag: &str, x: usize, min: usize) -> Result<(), CompressError> {
    if x < min {
        return Err(bad(format!("{flag} must be at least {min}, got {x}")));
    }
    Ok(())
}

fn at_most(flag: &str, x: usize, max: usize) -> Result<(), CompressError> {
    if x > max {
        return Err(bad(format!("{flag} must be at most {max}, got {x}")));
    }
    Ok(())
}

impl Cli {
    /// Checks every value of the command line (see the module's note).
    pub fn validate(&self) -> Result<(), CompressError> {
        if let Some(b) = self.max_binding {
            if b < MIN_BINDING {
                return Err(bad(format!("--max-binding must be at least {MIN_BINDING} bytes, got {b}")));
            }
        }
        // infinity is allowed: only NaN and infinite weights are refused then
        if self.max_abs_weight.is_nan() || self.max_abs_weight <= 0.0 {
            return Err(bad(format!("--max-abs-weight must be positive, got {}", self.max_abs_weight)));
        }
        match &self.command {
            Command::GpuInfo | Command::Export(_) => Ok(()),
            Command::Eval(a) => a.validate(),
            Command::Generate(a) => a.validate(),
            Command::Compress(a) => a.validate(),
            Command::Search(a) => a.validate(),
            Command::Report(a) => a.validate(),
            Command::Synth(a) => a.validate(),
        }
    }
}

impl MemArgs {
    fn validate(&self) -> Result<(), CompressError> {
        gib_to_bytes("--max-vram", self.max_vram)?;
        at_least("--batch-tokens", self.batch_tokens, 1)
    }
}

impl PerplexityArgs {
    fn validate(&self) -> Result<(), CompressError> {
        at_least("--seq-len", self.seq_len, 2)?;
        if let Some(m) = self.max_tokens {
            if m < self.seq_len {
                return Err(bad(format!("--max-tokens {m} is less than one window of --seq-len {}", self.seq_len)));
            }
        }
        Ok(())
    }
}

impl EvalArgs {
    fn validate(&self) -> Result<(), CompressError> {
        if self.ppl.text.is_none() && self.task.is_none() {
            return Err(bad("nothing to evaluate: give --text and/or --task".into()));
        }
        self.ppl.validate()?;
        self.mem.validate()
    }
}

impl ReportArgs {
    fn validate(&self) -> Result<(), CompressError> {
        self.ppl.validate()?;
        self.mem.validate()
    }
}

impl GenerateArgs {
    fn validate(&self) -> Result<(), CompressError> {
        if self.prompt.is_empty() {
            return Err(bad("--prompt is empty: give some text to continue".into()));
        }
        self.mem.validate()
    }
}

impl SynthArgs {
    fn validate(&self) -> Result<(), CompressError> {
        let most = self.preset.config(None)["num_hidden_layers"].as_u64().unwrap_or(1) as usize;
        if let Some(l) = self.layers {
            if l == 0 || l > most {
                return Err(bad(format!("--layers must be in 1..={most} (the preset's layers), got {l}")));
            }
        }
        Ok(())
    }
}

impl SearchArgs {
    fn validate(&self) -> Result<(), CompressError> {
        at_least("--seq-len", self.seq_len, 2)?;
        at_least("--search-windows", self.search_windows, 1)?;
        if self.samples <= self.search_windows {
            return Err(bad(format!("--samples ({}) must exceed --search-windows ({}): statistics need windows of their own", self.samples, self.search_windows)));
        }
        if self.ratios.is_empty() {
            return Err(bad("--ratios is empty".into()));
        }
        if let Some(r) = self.ratios.iter().find(|r| !(**r >= 0.0 && **r < 1.0)) {
            return Err(bad(format!("--ratios must be in [0, 1), got {r}")));
        }
        if let Some(t) = self.target_ratio {
            open_fraction("--target-ratio", t)?;
        }
        open_fraction("--step", self.step)?;
        at_most("--evaluations", self.evaluations, MAX_EVALUATIONS)
    }
}

impl CompressArgs {
    fn validate(&self) -> Result<(), CompressError> {
        let planned = self.plan.is_some() || self.surgical;
        if let Some(r) = self.ratio {
            // a plan may leave nothing to the uniform ratio
            if planned && !(0.0..1.0).contains(&r) {
                return Err(bad(format!("--ratio with --plan must be in [0, 1), got {r}")));
            }
            if !planned && (r.is_nan() || r <= 0.0 || r >= 1.0) {
                return Err(CompressError::BadRatio(r));
            }
        }
        at_least("--samples", self.samples, 1)?;
        at_least("--seq-len", self.seq_len, 2)?;
        at_least("--batch-tokens", self.batch_tokens, 1)?;
        at_most("--power-iters", self.power_iters, MAX_POWER_ITERS)?;
        at_most("--oversample", self.oversample, MAX_OVERSAMPLE)?;
        if let Some(v) = self.max_vram {
            gib_to_bytes("--max-vram", v)?;
        }
        if self.surgical && (self.method != crate::methods::Method::Sfsd || self.plan.is_some()) {
            return Err(bad("--surgical goes with --method sfsd and no --plan".into()));
        }
        let sensitivity = self.layer_allocation == LayerAllocation::Sensitivity;
        if sensitivity && self.plan.is_some() {
            return Err(bad("--layer-allocation sensitivity makes the plan itself: give it or --plan, not both".into()));
        }
        if self.surgical || sensitivity {
            at_least("--search-windows", self.search_windows, 1)?;
            if self.samples <= self.search_windows {
                return Err(bad(format!("--samples ({}) must exceed --search-windows ({}): statistics need windows of their own", self.samples, self.search_windows)));
            }
        }
        if self.surgical_last_layers == Some(0) {
            return Err(bad("--surgical-last-layers must be at least 1".into()));
        }
        if !(self.surgical_tolerance >= 0.0 && self.surgical_tolerance.is_finite()) {
            return Err(bad(format!("--surgical-tolerance must be a finite number >= 0, got {}", self.surgical_tolerance)));
        }
        if !(2..=8).contains(&self.mpo_cores) {
            return Err(bad(format!("--mpo-cores must be in 2..=8, got {}", self.mpo_cores)));
        }
        if self.mpo_max_bond == Some(0) {
            return Err(bad("--mpo-max-bond must be at least 1".into()));
        }
        self.mpo_matrices()?;
        self.method_flags_match()
    }

    /// `--mpo-matrices` as linears (unknown or repeated names refused).
    pub fn mpo_matrices(&self) -> Result<Vec<Linear>, CompressError> {
        let mut out = Vec::new();
        for m in &self.mpo_matrices {
            let lin = Linear::from_short(m).ok_or_else(|| {
                let names: Vec<&str> = Linear::ALL.iter().map(|l| l.short()).collect();
                bad(format!("--mpo-matrices: unknown matrix {m:?} (one of {})", names.join(",")))
            })?;
            if out.contains(&lin) {
                return Err(bad(format!("--mpo-matrices: {m:?} given twice")));
            }
            out.push(lin);
        }
        Ok(out)
    }

    /// A method's own flags given with another `--method` are refused, not ignored.
    fn method_flags_match(&self) -> Result<(), CompressError> {
        use crate::methods::Method;
        let given: [(&str, bool, Method); 13] = [
            ("--layer-allocation sensitivity", self.layer_allocation == LayerAllocation::Sensitivity, Method::Lorap),
            ("--plain-svd", self.plain_svd, Method::Lorap),
            ("--ffn-refit", self.ffn_refit, Method::Lorap),
            ("--no-ffn-refit", self.no_ffn_refit, Method::Lorap),
            ("--attention-refit", self.attention_refit.is_some(), Method::Lorap),
            ("--ffn-selection", self.ffn_selection.is_some(), Method::Lorap),
            ("--no-reserve", self.no_reserve, Method::Lorap),
            ("--ffn-reserve", self.ffn_reserve != crate::methods::lorap::LorapOptions::default().reserve, Method::Lorap),
            ("--magnitude-ffn", self.magnitude_ffn, Method::Lorap),
            ("--sfsd-centred", self.sfsd_centred, Method::Sfsd),
            ("--mpo-max-bond", self.mpo_max_bond.is_some(), Method::Mpo),
            ("--mpo-share-centre", self.mpo_share_centre, Method::Mpo),
            ("--mpo-matrices", !self.mpo_matrices.is_empty(), Method::Mpo),
        ];
        match given.iter().find(|(_, on, m)| *on && *m != self.method) {
            Some((flag, _, m)) => Err(bad(format!("{flag} applies to --method {}, not {}", method_name(*m), method_name(self.method)))),
            None => Ok(()),
        }
    }
}
