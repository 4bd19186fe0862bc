//! End-to-end benchmark: LoRAP compression of a synthetic model with real shapes (default
//! LLaMA-2-7B on a GPU at ratio 0.2 with 128 windows x 2048 tokens and an 8 GiB budget; a
//! 2-layer SmolLM2-135M shape with 4 x 128 tokens on a CPU adapter such as lavapipe), with
//! wall time, peak GPU memory, and the forward-pass FLOP rate as a fraction of the matmul
//! rate measured in the same run.
//!
//! `cargo bench --bench compress`; env LORAP_BENCH_PRESET (llama2-7b, llama3-8b,
//! mistral7b, smollm2-135m), LORAP_BENCH_LAYERS, LORAP_BENCH_WINDOWS, LORAP_BENCH_SEQ,
//! LORAP_BENCH_MAX_VRAM (GiB), LORAP_BENCH_DIR (where the synthetic model is cached).

use std::time::Instant;

use clap::ValueEnum;
use lorap_gpu::methods::LorapOptions;
use lorap_gpu::pipeline::{self, Run, RunControl};
use lorap_gpu::gpu::{matmul, Gpu, GpuOptions};
use lorap_gpu::model::synthetic::{self, Preset};
use lorap_gpu::model::Model;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Best f32 matmul rate (FLOP/s) of the NT kernel the forward pass uses, at size `s`.
fn matmul_ceiling(gpu: &Gpu, s: usize) -> f64 {
    let a = gpu.upload(&vec![0.5f32; s * s]).unwrap();
    let b = gpu.upload(&vec![0.25f32; s * s]).unwrap();
    let c = gpu.alloc(s * s).unwrap();
    let mut best = 0f64;
    for _ in 0..4 {
        let mut enc = gpu.encoder();
        matmul::linear_into(gpu, &mut enc, &a, &b, &c, s, s, s, 0.0).unwrap();
        let t = Instant::now();
        gpu.submit(enc);
        gpu.wait().unwrap();
        best = best.max(2.0 * (s as f64).powi(3) / t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let gpu = Gpu::new(&GpuOptions::default()).expect("GPU adapter");
    let cpu = gpu.info.device_type == wgpu::DeviceType::Cpu;
    let preset_name: String = env("LORAP_BENCH_PRESET", if cpu { "smollm2-135m".to_string() } else { "llama2-7b".to_string() });
    let preset = Preset::from_str(&preset_name, true).expect("LORAP_BENCH_PRESET: llama2-7b, llama3-8b, mistral7b or smollm2-135m");
    let layers: Option<usize> = std::env::var("LORAP_BENCH_LAYERS").ok().and_then(|v| v.parse().ok()).or(if cpu { Some(2) } else { None });
    let windows: usize = env("LORAP_BENCH_WINDOWS", if cpu { 4 } else { 128 });
    let seq: usize = env("LORAP_BENCH_SEQ", if cpu { 128 } else { 2048 });
    let max_vram: f64 = env("LORAP_BENCH_MAX_VRAM", 8.0);
    let root = std::path::PathBuf::from(env("LORAP_BENCH_DIR", concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-models").to_string()));
    let dir = root.join(format!("{preset_name}-{}", layers.map_or("all".into(), |l| l.to_string())));
    if !dir.join("config.json").exists() {
        eprintln!("writing synthetic {preset_name} to {}", dir.display());
        let _ = std::fs::remove_dir_all(&dir);
        synthetic::write_random_model_sharded(&dir, &preset.config(layers), 1, &mut |d, n| eprint!("\r  shard {d}/{n}")).unwrap();
        eprintln!();
    }
    let model = Model::open(&dir).unwrap();
    let cfg = &model.cfg;
    let calib: Vec<u32> = (0..windows * seq).map(|i| ((i as u64 * 2654435761) % cfg.vocab_size as u64) as u32).collect();
    let ceiling = matmul_ceiling(&gpu, if cpu { 512 } else { 4096 });
    gpu.set_budget((max_vram * (1u64 << 30) as f64) as u64);
    let out = root.join(format!("{preset_name}-out"));
    let t = Instant::now();
    let (_, rep) = pipeline::compress(&gpu, &Run::new(&model, &calib, seq, &LorapOptions { ratio: 0.2, ..Default::default() }, &out).with_control(RunControl { force: true, ..Default::default() }), &mut |d, n, what| {
        eprint!("\r  layer {d}/{n}: {what:<24}")
    })
    .unwrap();
    let secs = t.elapsed().as_secs_f64();
    eprintln!();
    // FLOPs of the calibration forward passes: statistics (dense) + propagation
    // (compressed), 2 FLOPs per weight per token, plus causal attention scores and values
    let tokens = calib.len() as f64;
    let attn = 2.0 * 2.0 * tokens * (seq as f64 / 2.0) * cfg.q_dim() as f64;
    let forward: f64 = rep.layers.iter().map(|l| 2.0 * tokens * (l.params_before + l.params_after) as f64 + 2.0 * attn).sum();
    println!("adapter: {} ({:?})", gpu.info.name, gpu.info.backend);
    println!("model: synthetic {preset_name}, {} layers, {} parameters; calibration {windows} x {seq} tokens; ratio 0.2", cfg.num_hidden_layers, cfg.total_params());
    println!("wall time {secs:.1} s ({:.2} s per layer), peak GPU memory {:.2} GiB (budget {max_vram} GiB)", secs / cfg.num_hidden_layers as f64, rep.peak_gpu_bytes as f64 / (1u64 << 30) as f64);
    println!(
        "calibration forward passes {:.1} GFLOP: {:.2} GFLOP/s over the whole run = {:.1}% of the in-run matmul ceiling ({:.2} GFLOP/s); the rest is the randomized SVD, scoring and I/O",
        forward / 1e9,
        forward / secs / 1e9,
        100.0 * forward / secs / ceiling,
        ceiling / 1e9
    );
    println!(
        "{}",
        serde_json::json!({"adapter": gpu.info.name, "preset": preset_name, "layers": cfg.num_hidden_layers, "windows": windows, "seq_len": seq,
            "seconds": secs, "peak_gpu_bytes": rep.peak_gpu_bytes, "achieved_decoder_ratio": rep.achieved_decoder_ratio,
            "forward_flops": forward, "matmul_ceiling_flops": ceiling})
    );
    let _ = std::fs::remove_dir_all(&out);
}
