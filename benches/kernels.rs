//! Kernel benchmarks: GFLOP/s and GB/s of each WGSL kernel on the chosen adapter (at least one
//! row per kernel room under src/gpu/kernels/), and each kernel's rate as a fraction of the
//! matmul rate measured in the same run (the ceiling).
//! Criterion cannot report FLOP/s or ratios to an in-run ceiling, so this is a plain
//! harness: warm-up, then the median of timed repetitions (submit + wait each).
//!
//! `cargo bench --bench kernels [-- --quick] [-- --peak FP32[,FP16]]`; LORAP_ADAPTER /
//! WGPU_BACKEND pick the device. Rates are also given as a share of the adapter's FP32 peak
//! (and FP16 tensor peak for f16 paths) from `KNOWN_PEAKS` or `--peak` (TFLOP/s).

use std::time::Instant;

use lorap_gpu::gpu::{attention, elementwise, loss, matmul, norms, rope, Gpu, GpuOptions};

fn time_median(gpu: &Gpu, reps: usize, mut record: impl FnMut(&mut wgpu::CommandEncoder)) -> f64 {
    let run = |record: &mut dyn FnMut(&mut wgpu::CommandEncoder)| {
        let mut enc = gpu.encoder();
        record(&mut enc);
        let t = Instant::now();
        gpu.submit(enc);
        gpu.wait().unwrap();
        t.elapsed().as_secs_f64()
    };
    run(&mut record);
    let mut ts: Vec<f64> = (0..reps).map(|_| run(&mut record)).collect();
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ts[ts.len() / 2]
}

fn filled(gpu: &Gpu, n: usize) -> lorap_gpu::gpu::GpuBuf {
    let v: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 499.5) / 1000.0).collect();
    gpu.upload(&v).unwrap()
}

/// Datasheet dense peaks in TFLOP/s (FP32 on the CUDA cores; FP16 tensor cores with FP32
/// accumulation), matched by adapter-name substring, first match wins.
const KNOWN_PEAKS: &[(&str, f64, f64)] = &[
    ("H100 PCIe", 51.2, 756.0),
    ("H100 NVL", 60.0, 835.0),
    ("H100", 66.9, 989.4), // SXM5 (the "H100 80GB HBM3" name)
    ("H200", 66.9, 989.4),
    ("A100", 19.5, 312.0),
    ("L40S", 91.6, 362.1),
    ("L4", 30.3, 121.0),
];

/// (FP32, FP16) peaks in FLOP/s: `--peak FP32[,FP16]` (TFLOP/s), else the known table.
fn peaks(adapter: &str) -> (Option<f64>, Option<f64>) {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--peak") {
        let v: Vec<f64> = args.get(i + 1).map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect()).unwrap_or_default();
        return (v.first().map(|t| t * 1e12), v.get(1).map(|t| t * 1e12));
    }
    KNOWN_PEAKS.iter().find(|(name, _, _)| adapter.contains(name)).map_or((None, None), |&(_, f32p, f16p)| (Some(f32p * 1e12), Some(f16p * 1e12)))
}

struct Row {
    name: String,
    secs: f64,
    flops: f64,
    bytes: f64,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let gpu = Gpu::new(&GpuOptions::default()).expect("GPU adapter");
    let is_cpu = gpu.info.device_type == wgpu::DeviceType::Cpu;
    let reps = if quick || is_cpu { 3 } else { 10 };
    // lavapipe runs ~2 GFLOP/s: keep its shapes at 1024; real GPUs get 4096 too.
    let mm_sizes: Vec<usize> = if is_cpu || quick { vec![512, 1024] } else { vec![1024, 2048, 4096] };
    println!("adapter: {} ({:?}, {:?})", gpu.info.name, gpu.info.backend, gpu.info.device_type);
    let mut rows = Vec::new();

    for &s in &mm_sizes {
        let (a, b) = (filled(&gpu, s * s), filled(&gpu, s * s));
        let c = gpu.alloc(s * s).unwrap();
        let secs = time_median(&gpu, reps, |enc| {
            matmul::gemm(&gpu, enc, matmul::GemmCall { shape: matmul::GemmShape { m: s, n: s, k: s }, a: matmul::Operand::new(&a, s), b: matmul::Operand::new(&b, s), c: matmul::GemmOutput::new(&c, s), scale: matmul::Scale::SET }).unwrap()
        });
        rows.push(Row { name: format!("matmul {s}x{s}x{s}"), secs, flops: 2.0 * (s as f64).powi(3), bytes: 12.0 * (s * s) as f64 });
        let secs = time_median(&gpu, reps, |enc| {
            matmul::gemm_with(&gpu, enc, matmul::GemmCall { shape: matmul::GemmShape { m: s, n: s, k: s }, a: matmul::Operand::new(&a, s), b: matmul::Operand::new(&b, s), c: matmul::GemmOutput::new(&c, s), scale: matmul::Scale::SET }, matmul::NtKernel::Register).unwrap()
        });
        rows.push(Row { name: format!("matmul Register {s}x{s}x{s}"), secs, flops: 2.0 * (s as f64).powi(3), bytes: 12.0 * (s * s) as f64 });
        for nt in [matmul::NtKernel::Tiled, matmul::NtKernel::Vec4, matmul::NtKernel::Register] {
            let secs = time_median(&gpu, reps, |enc| {
                matmul::gemm_with(&gpu, enc, matmul::GemmCall { shape: matmul::GemmShape { m: s, n: s, k: s }, a: matmul::Operand::new(&a, s), b: matmul::Operand::new(&b, s).t(), c: matmul::GemmOutput::new(&c, s), scale: matmul::Scale::SET }, nt).unwrap()
            });
            rows.push(Row { name: format!("matmul_nt {nt:?} {s}x{s}x{s}"), secs, flops: 2.0 * (s as f64).powi(3), bytes: 12.0 * (s * s) as f64 });
        }
    }
    let ceiling = rows.iter().map(|r| r.flops / r.secs).fold(0.0, f64::max);
    // the f16 tensor-core path, where the adapter has it (share of the FP16 peak below)
    let mut coop_rows = Vec::new();
    if matmul::coop_supported(&gpu) {
        for &s in &mm_sizes {
            let x = filled(&gpu, s * s);
            let w16: Vec<half::f16> = (0..s * s).map(|i| half::f16::from_f32(((i * 7919 % 1000) as f32 - 499.5) / 1000.0)).collect();
            let w = matmul::F16Weight::upload(&gpu, &w16, s, s).unwrap();
            let y = gpu.alloc(s * s).unwrap();
            let secs = time_median(&gpu, reps, |enc| matmul::linear_f16_coop(&gpu, enc, &x, &w, &y, matmul::GemmShape { m: s, n: s, k: s }, 0.0).unwrap());
            coop_rows.push(Row { name: format!("linear f16 coop {s}x{s}x{s}"), secs, flops: 2.0 * (s as f64).powi(3), bytes: 10.0 * (s * s) as f64 });
        }
    }

    let (tok, d) = if is_cpu || quick { (2048, 576) } else { (16384, 4096) };
    let x = filled(&gpu, tok * d);
    let g = gpu.zeros(d * d).unwrap();
    let secs = time_median(&gpu, reps, |enc| matmul::gram_accumulate(&gpu, enc, &x, tok, d, &g).unwrap());
    rows.push(Row { name: format!("gram {tok}x{d}"), secs, flops: 2.0 * tok as f64 * (d * d) as f64, bytes: 4.0 * (tok * d + 2 * d * d) as f64 });
    let secs = time_median(&gpu, reps, |enc| {
        let shape = matmul::GemmShape { m: d, n: d, k: tok };
        matmul::gemm_with(&gpu, enc, matmul::GemmCall { shape, a: matmul::Operand::new(&x, d).t(), b: matmul::Operand::new(&x, d), c: matmul::GemmOutput::new(&g, d), scale: matmul::Scale::ADD }, matmul::NtKernel::Register).unwrap()
    });
    rows.push(Row { name: format!("gram Register {tok}x{d}"), secs, flops: 2.0 * tok as f64 * (d * d) as f64, bytes: 4.0 * (tok * d + 2 * d * d) as f64 });
    let out = gpu.zeros(d).unwrap();
    let secs = time_median(&gpu, reps, |enc| norms::col_sumsq_accumulate(&gpu, enc, &x, tok, d, &out).unwrap());
    rows.push(Row { name: format!("col_sumsq {tok}x{d}"), secs, flops: 2.0 * (tok * d) as f64, bytes: 4.0 * (tok * d) as f64 });
    let w = filled(&gpu, d);
    let y = gpu.alloc(tok * d).unwrap();
    let secs = time_median(&gpu, reps, |enc| norms::rms_norm(&gpu, enc, &x, &w, &y, norms::NormShape { rows: tok, cols: d, eps: 1e-5 }).unwrap());
    rows.push(Row { name: format!("rms_norm {tok}x{d}"), secs, flops: 4.0 * (tok * d) as f64, bytes: 8.0 * (tok * d) as f64 });
    let z = gpu.alloc(tok * d).unwrap();
    let secs = time_median(&gpu, reps, |enc| elementwise::silu_mul(&gpu, enc, &x, &y, &z, tok * d).unwrap());
    rows.push(Row { name: format!("silu_mul {}", tok * d), secs, flops: 6.0 * (tok * d) as f64, bytes: 12.0 * (tok * d) as f64 });
    let sum = gpu.alloc(tok * d).unwrap();
    let secs = time_median(&gpu, reps, |enc| elementwise::add(&gpu, enc, &x, &y, &sum, tok * d).unwrap());
    rows.push(Row { name: format!("add {}", tok * d), secs, flops: (tok * d) as f64, bytes: 12.0 * (tok * d) as f64 });
    let secs = time_median(&gpu, reps, |enc| elementwise::add_bias(&gpu, enc, &sum, &w, tok, d).unwrap());
    rows.push(Row { name: format!("add_bias {tok}x{d}"), secs, flops: (tok * d) as f64, bytes: 4.0 * (2 * tok * d + d) as f64 });
    let scores = gpu.alloc(tok).unwrap();
    let secs = time_median(&gpu, reps, |enc| norms::row_scaled_norms(&gpu, enc, &x, &w, &scores, tok, d).unwrap());
    rows.push(Row { name: format!("row_scaled_norms {tok}x{d}"), secs, flops: 3.0 * (tok * d) as f64, bytes: 4.0 * (tok * d + d + tok) as f64 });
    // the vec4 path's operand copy (a pure copy: GB/s only), as many rows as one binding takes
    let t_rows = tok.min(gpu.max_binding_elems() / d);
    if matmul::transpose_fits(&gpu, d, t_rows, d) {
        let secs = time_median(&gpu, reps, |enc| drop(matmul::transpose(&gpu, enc, &x, 0, d, t_rows, d).unwrap()));
        rows.push(Row { name: format!("transpose {t_rows}x{d}"), secs, flops: 0.0, bytes: 8.0 * (t_rows * d) as f64 });
    }
    // rotary embedding in place over [tok, heads x hd], positions t % window
    let rope_hd = if is_cpu || quick { 64 } else { 128 };
    let rope_window = tok.min(2048);
    let table = rope::RopeTable::new(&gpu, rope_window, rope_hd, 10000.0).unwrap();
    let rx = filled(&gpu, tok * d);
    let secs = time_median(&gpu, reps, |enc| rope::apply(&gpu, enc, &rx, tok, d / rope_hd, rope_window, &table).unwrap());
    rows.push(Row { name: format!("rope {tok} tok x {} heads x {rope_hd}", d / rope_hd), secs, flops: 3.0 * (tok * d) as f64, bytes: 8.0 * (tok * d) as f64 + 4.0 * table.buf.len as f64 });
    // token NLL over a vocabulary-wide logits matrix
    let (nll_rows, vocab) = if is_cpu || quick { (256, 49152) } else { (2048, 32000) };
    let logits = filled(&gpu, nll_rows * vocab);
    let targets: Vec<f32> = (0..nll_rows).map(|r| ((r * 7919) % vocab) as f32).collect();
    let (targets, nll) = (gpu.upload(&targets).unwrap(), gpu.alloc(nll_rows).unwrap());
    let secs = time_median(&gpu, reps, |enc| loss::nll_rows(&gpu, enc, &logits, &targets, &nll, nll_rows, vocab).unwrap());
    rows.push(Row { name: format!("nll_rows {nll_rows}x{vocab}"), secs, flops: 4.0 * (nll_rows * vocab) as f64, bytes: 4.0 * (nll_rows * vocab + 2 * nll_rows) as f64 });

    let (window, nh, nkv, hd) = if is_cpu || quick { (256, 9, 3, 64) } else { (2048, 32, 8, 128) };
    let t = window * 2;
    let (q, k, v) = (filled(&gpu, t * nh * hd), filled(&gpu, t * nkv * hd), filled(&gpu, t * nkv * hd));
    let o = gpu.alloc(t * nh * hd).unwrap();
    let s = attention::AttnShape { tokens: t, window, n_heads: nh, n_kv: nkv, head_dim: hd };
    let pairs = (t / window) as f64 * (window * (window + 1) / 2) as f64 * nh as f64;
    for kernel in [attention::AttnKernel::Rows, attention::AttnKernel::Flash] {
        let secs = time_median(&gpu, reps, |enc| attention::causal_attention_with(&gpu, enc, s, [&q, &k, &v, &o], kernel).unwrap());
        rows.push(Row { name: format!("attention {kernel:?} {t} tok, window {window}, {nh}/{nkv} heads x {hd}"), secs, flops: 4.0 * pairs * hd as f64, bytes: 4.0 * (2 * t * nh * hd + 2 * t * nkv * hd) as f64 });
    }

    // randomized SVD as compress runs it (default settings), timed end to end including
    // its small CPU steps; FLOPs count the tall matrix products only
    let (m, n) = if is_cpu || quick { (576, 576) } else { (4096, 4096) };
    let k = m * n / (m + n) / 2;
    let a = filled(&gpu, m * n);
    let opts = lorap_gpu::methods::svd::SvdOptions::default();
    let l = k + opts.oversample;
    let t = Instant::now();
    let reps_svd = if is_cpu { 1 } else { 3 };
    for _ in 0..reps_svd {
        lorap_gpu::methods::svd::randomized_svd(&gpu, &a, m, n, k, opts).unwrap();
    }
    let secs = t.elapsed().as_secs_f64() / reps_svd as f64;
    let products = (2 + 2 * opts.power_iters) as f64 * 2.0 * (m * n * l) as f64 + (2 * opts.power_iters + 1) as f64 * 2.0 * 2.0 * ((m + n) / 2 * l * l) as f64 * 2.0;
    rows.push(Row { name: format!("randomized SVD {m}x{n} rank {k} (q={})", opts.power_iters), secs, flops: products, bytes: 4.0 * (m * n) as f64 * (2 + 2 * opts.power_iters) as f64 });

    let (peak32, peak16) = peaks(&gpu.info.name);
    let pct = |rate: f64, peak: Option<f64>| peak.map_or("-".to_string(), |p| format!("{:.2}%", 100.0 * rate / p));
    println!("| kernel | ms | GFLOP/s | GB/s | of ceiling | of FP32 peak |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        let rate = r.flops / r.secs;
        println!("| {} | {:.3} | {:.2} | {:.2} | {:.1}% | {} |", r.name, r.secs * 1e3, rate / 1e9, r.bytes / r.secs / 1e9, 100.0 * rate / ceiling, pct(rate, peak32));
    }
    for r in &coop_rows {
        let rate = r.flops / r.secs;
        println!("| {} | {:.3} | {:.2} | {:.2} | {:.1}% | {} of FP16 peak |", r.name, r.secs * 1e3, rate / 1e9, r.bytes / r.secs / 1e9, 100.0 * rate / ceiling, pct(rate, peak16));
    }
    if coop_rows.is_empty() {
        println!("| linear f16 coop | - | - | - | - | not run: no 16x16x16 f16 -> f32 cooperative matrices here |");
    }
    println!();
    println!("ceiling = best f32 matmul rate in this run: {:.2} GFLOP/s", ceiling / 1e9);
    match (peak32, peak16) {
        (Some(p32), p16) => println!("peaks: FP32 {:.1} TFLOP/s, FP16 tensor {} (datasheet or --peak)", p32 / 1e12, p16.map_or("unknown".into(), |p| format!("{:.1} TFLOP/s", p / 1e12))),
        _ => println!("peaks: unknown for {:?} (pass --peak FP32[,FP16] in TFLOP/s)", gpu.info.name),
    }

    // feature-space pair (sfsd): exact small eigenproblem vs the randomized SVD, same inputs
    let (out, inp) = if is_cpu || quick { (576, 576) } else { (2048, 2048) };
    let r = 2 * (out * inp / (out + inp)) / 5;
    let w: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 1000) as f32 / 1000.0) - 0.5).collect();
    let sigma: Vec<f32> = (0..inp * inp).map(|i| if i / inp == i % inp { 1.0 } else { 0.01 }).collect();
    let sg = gpu.upload(&sigma).unwrap();
    let mut pair_secs = [0f64; 2];
    for (slot, exact_max) in [(0, usize::MAX), (1, 0)] {
        let t = Instant::now();
        lorap_gpu::methods::sfsd::feature_pair_with(&gpu, &w, &sg, inp, r, opts, exact_max).unwrap();
        pair_secs[slot] = t.elapsed().as_secs_f64();
    }
    println!(
        "feature pair {out}x{inp} rank {r}: exact eigen {:.2} s, randomized SVD {:.2} s (exact {:.1}x faster)",
        pair_secs[0], pair_secs[1], pair_secs[1] / pair_secs[0]
    );
}
