//! End-to-end benchmark: LoRAP compression (ratio 0.2) of a synthetic model with real
//! shapes, with the per-phase table from the run's own report, peak GPU memory against the
//! `--max-vram` budget, and GEMM rates as fractions of the matmul rate measured in the same
//! run.
//!
//! `cargo bench --bench compress`; env LORAP_BENCH_PRESET:
//! - `llama2-7b-layer` (default on CPU adapters such as lavapipe): ONE LLaMA-2-7B-shaped
//!   layer (4096 wide, 11008-wide FFN) with 4 x 128 calibration tokens;
//! - `llama3-8b-layer`: one LLaMA-3-8B-shaped layer (GQA 32/8 heads, 14336-wide FFN);
//! - `llama2-7b` (default on GPUs), `llama3-8b`, `mistral7b`, `smollm2-135m`: whole models
//!   with 128 x 2048 tokens on a GPU (4 x 128 on a CPU adapter).
//!
//! LORAP_BENCH_LAYERS, LORAP_BENCH_WINDOWS, LORAP_BENCH_SEQ and LORAP_BENCH_MAX_VRAM (GiB,
//! default 8) override; LORAP_BENCH_DIR is where the synthetic models are cached.

use std::time::Instant;

use clap::ValueEnum;
use lorap_gpu::gpu::{matmul, Gpu, GpuOptions};
use lorap_gpu::methods::{svd, CompressOptions};
use lorap_gpu::model::synthetic::{self, Preset};
use lorap_gpu::model::{Model, ModelConfig};
use lorap_gpu::pipeline::{self, CompressionReport, Run, RunControl};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Best f32 rate (FLOP/s) of the A B^T matmul the forward pass and the SVD use, at size `s`.
fn matmul_ceiling(gpu: &Gpu, s: usize) -> f64 {
    let a = gpu.upload(&vec![0.5f32; s * s]).unwrap();
    let b = gpu.upload(&vec![0.25f32; s * s]).unwrap();
    let c = gpu.alloc(s * s).unwrap();
    let mut best = 0f64;
    for _ in 0..4 {
        let mut enc = gpu.encoder();
        matmul::linear_into(gpu, &mut enc, &a, &b, &c, matmul::GemmShape { m: s, n: s, k: s }, 0.0).unwrap();
        let t = Instant::now();
        gpu.submit(enc);
        gpu.wait().unwrap();
        best = best.max(2.0 * (s as f64).powi(3) / t.elapsed().as_secs_f64());
    }
    best
}

/// GEMM FLOPs of the run, by phase: (statistics forward, SVD, FFN scoring, propagation).
struct Flops {
    statistics: f64,
    svd: f64,
    ffn: f64,
    propagation: f64,
}

impl Flops {
    fn of(cfg: &ModelConfig, rep: &CompressionReport, tokens: f64, seq: usize, svd_opts: svd::SvdOptions) -> Flops {
        let (d, f, q, kv) = (cfg.hidden_size as f64, cfg.intermediate_size as f64, cfg.q_dim() as f64, cfg.kv_dim() as f64);
        // causal attention: scores and values, about half a window per token
        let attention = 2.0 * 2.0 * tokens * (seq as f64 / 2.0) * q;
        let shapes = [(q, d), (kv, d), (kv, d), (d, q)];
        let mut flops = Flops { statistics: 0.0, svd: 0.0, ffn: 0.0, propagation: 0.0 };
        for l in &rep.layers {
            // the statistics pass stops at down_proj's input
            flops.statistics += 2.0 * tokens * (d * (2.0 * q + 2.0 * kv) + 2.0 * d * f) + attention;
            flops.propagation += 2.0 * tokens * l.params_after as f64 + attention;
            for (r, &(m, n)) in l.ranks.iter().zip(&shapes) {
                if let Some(r) = r {
                    flops.svd += svd::gemm_flops(m as usize, n as usize, *r, svd_opts);
                }
            }
            // channel scores: a multiply-add per weight of gate, up and down
            flops.ffn += 2.0 * 3.0 * d * f;
        }
        flops
    }
    fn total(&self) -> f64 {
        self.statistics + self.svd + self.ffn + self.propagation
    }
}

fn main() {
    let gpu = Gpu::new(&GpuOptions::default()).expect("GPU adapter");
    let cpu = gpu.info.device_type == wgpu::DeviceType::Cpu;
    let preset_name: String = env("LORAP_BENCH_PRESET", if cpu { "llama2-7b-layer".to_string() } else { "llama2-7b".to_string() });
    let (base, one_layer) = match preset_name.strip_suffix("-layer") {
        Some(b) => (b.to_string(), true),
        None => (preset_name.clone(), false),
    };
    let preset = Preset::from_str(&base, true).expect("LORAP_BENCH_PRESET: llama2-7b-layer, llama3-8b-layer, llama2-7b, llama3-8b, mistral7b or smollm2-135m");
    let small_run = cpu || one_layer;
    let layers: Option<usize> = std::env::var("LORAP_BENCH_LAYERS").ok().and_then(|v| v.parse().ok()).or(if one_layer { Some(1) } else if cpu { Some(2) } else { None });
    let windows: usize = env("LORAP_BENCH_WINDOWS", if small_run { 4 } else { 128 });
    let seq: usize = env("LORAP_BENCH_SEQ", if small_run { 128 } else { 2048 });
    let max_vram: f64 = env("LORAP_BENCH_MAX_VRAM", 8.0);
    let root = std::path::PathBuf::from(env("LORAP_BENCH_DIR", concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-models").to_string()));
    let dir = root.join(format!("{base}-{}", layers.map_or("all".into(), |l| l.to_string())));
    if !dir.join("config.json").exists() {
        eprintln!("writing synthetic {base} to {}", dir.display());
        let _ = std::fs::remove_dir_all(&dir);
        synthetic::write_random_model_sharded(&dir, &preset.config(layers), 1, &mut |d, n| eprint!("\r  shard {d}/{n}")).unwrap();
        eprintln!();
    }
    let model = Model::open(&dir).unwrap();
    let cfg = &model.cfg;
    let calib: Vec<u32> = (0..windows * seq).map(|i| ((i as u64 * 2654435761) % cfg.vocab_size as u64) as u32).collect();
    let ceiling = matmul_ceiling(&gpu, if cpu { 1024 } else { 4096 });
    let budget = (max_vram * (1u64 << 30) as f64) as u64;
    gpu.set_budget(budget);
    let out = root.join(format!("{preset_name}-out"));
    let opts = CompressOptions { ratio: 0.2, ..Default::default() };
    let t = Instant::now();
    let (_, rep) = pipeline::compress(&gpu, &Run::new(&model, &calib, seq, &opts, &out).with_control(RunControl { force: true, ..Default::default() }), &mut |d, n, what| {
        eprint!("\r  layer {d}/{n}: {:<24}", what.label())
    })
    .unwrap();
    let secs = t.elapsed().as_secs_f64();
    eprintln!();
    let _ = std::fs::remove_dir_all(&out);

    let flops = Flops::of(cfg, &rep, calib.len() as f64, seq, opts.svd);
    let p = &rep.phases;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("adapter: {} ({:?}); in-run matmul ceiling {:.2} GFLOP/s", gpu.info.name, gpu.info.backend, ceiling / 1e9);
    println!("model: synthetic {preset_name}, {} layer(s), {} parameters; calibration {windows} x {seq} tokens; ratio 0.2", cfg.num_hidden_layers, cfg.total_params());
    println!("ranks (q, k, v, o) of layer 0: {:?}; FFN kept {} of {}", rep.layers[0].ranks, rep.layers[0].ffn_kept, rep.layers[0].ffn_total);
    println!("wall time {secs:.1} s; peak GPU memory {:.2} GiB of a {max_vram} GiB budget", gib(rep.peak_gpu_bytes));
    println!();
    println!("| phase | seconds | share |");
    println!("| --- | ---: | ---: |");
    let total = p.total().max(f64::MIN_POSITIVE);
    for (name, s) in p.rows() {
        println!("| {name} | {s:.2} | {:.1}% |", 100.0 * s / total);
    }
    println!("| (host waiting on the GPU, within the above) | {:.2} | {:.1}% |", p.blocked_on_gpu, 100.0 * p.blocked_on_gpu / total);
    if let Some(busy) = p.gpu_busy {
        println!("| (the GPU computing, timestamp queries) | {busy:.2} | {:.1}% |", 100.0 * busy / total);
    }
    println!();
    let rate = |f: f64, s: f64| if s > 0.0 { f / s } else { 0.0 };
    let svd_rate = rate(flops.svd, p.decomposition_gpu);
    println!(
        "SVD GPU products: {:.1} GFLOP in {:.2} s = {:.2} GFLOP/s = {:.0}% of the ceiling",
        flops.svd / 1e9,
        p.decomposition_gpu,
        svd_rate / 1e9,
        100.0 * svd_rate / ceiling
    );
    println!(
        "statistics forward: {:.0}% of the ceiling; propagation: {:.0}% of the ceiling",
        100.0 * rate(flops.statistics, p.statistics) / ceiling,
        100.0 * rate(flops.propagation, p.propagation) / ceiling
    );
    let ideal = flops.total() / ceiling;
    println!(
        "host-side linear algebra: {:.2} s = {:.1}% of the wall time; whole run {:.1} s = {:.2}x its GEMM FLOPs ({:.1} GFLOP) at the ceiling ({:.1} s)",
        p.decomposition_host,
        100.0 * p.decomposition_host / secs,
        secs,
        secs / ideal,
        flops.total() / 1e9,
        ideal
    );
    println!(
        "{}",
        serde_json::json!({"adapter": gpu.info.name, "preset": preset_name, "layers": cfg.num_hidden_layers, "windows": windows, "seq_len": seq,
            "seconds": secs, "phases": rep.phases, "peak_gpu_bytes": rep.peak_gpu_bytes, "budget_bytes": budget,
            "achieved_decoder_ratio": rep.achieved_decoder_ratio, "gemm_flops": flops.total(), "svd_flops": flops.svd,
            "matmul_ceiling_flops": ceiling})
    );
}
