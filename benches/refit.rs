//! Host cost of the least-squares compensations at real shapes: `methods::refit::refit` on
//! random positive-definite moments of one LLaMA-2-7B-shaped layer (the FFN refit over the
//! kept down_proj columns, the attention refit of a factored q_proj), timed alone: no GPU
//! is involved, so this is what a layer adds to a 7B compression on this host, to be
//! compared with the per-layer GPU time in the `compress` benchmark's phase table.
//!
//! `cargo bench --bench refit`; env LORAP_BENCH_SCALE (default 1: the 7B shape; N divides
//! every width by N), LORAP_BENCH_SOLVER = gpu | host (default gpu: the
//! products and k x k solves on the adapter `WGPU_BACKEND` picks, as `compress` runs them;
//! host: f64 on the host, the reference), LORAP_BENCH_REFIT = ffn | attention | both (default
//! both), LORAP_BENCH_RATIO (default 0.2: the FFN keeps 80% of 11008 channels, q_proj the
//! rank the fixed 3:1 split gives it at 7B, 1244).

use std::time::Instant;

use faer::Mat;
use lorap_gpu::calib::stats::{Moments, SplitMoments};
use lorap_gpu::gpu::{context::GpuOptions, Gpu};
use lorap_gpu::methods::refit::{refit, Features};
use lorap_gpu::methods::solve::Solver;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Moments of `tokens` tokens of width `n` with correlated columns (x = z M, z random,
/// M [r, n] random with r = n / 2 + 64) and a non-zero mean: sums as the GPU leaves them.
fn moments(n: usize, tokens: usize, seed: u64) -> Moments {
    let mut rng = StdRng::seed_from_u64(seed);
    let r = n / 2 + 64;
    let m = Mat::<f64>::from_fn(r, n, |_, _| rng.random_range(-1.0..1.0));
    let z = Mat::<f64>::from_fn(tokens, r, |_, _| rng.random_range(-1.0..1.0));
    let mut x = &z * &m;
    for t in 0..tokens {
        for j in 0..n {
            x[(t, j)] += 0.3;
        }
    }
    let g = x.transpose() * &x;
    let gram = (0..n * n).map(|k| g[(k / n, k % n)] as f32).collect();
    let sum = (0..n).map(|j| (0..tokens).map(|t| x[(t, j)]).sum::<f64>() as f32).collect();
    Moments { gram, sum, tokens }
}

fn split(n: usize, seed: u64) -> SplitMoments {
    // 3 of 4 windows fit, 1 of 4 held out (HOLD_OUT_EVERY), 512 x 128 tokens in all
    SplitMoments { dim: n, fit: moments(n, 1536, seed), held_out: moments(n, 512, seed + 1) }
}

fn main() {
    let which: String = env("LORAP_BENCH_REFIT", "both".to_string());
    let ratio: f64 = env("LORAP_BENCH_RATIO", 0.2);
    // LORAP_BENCH_SCALE divides the shape (4: a quarter-width layer, 1/64 of the k^3 work)
    // for a quick comparison of the solvers on one machine
    let scale: usize = env("LORAP_BENCH_SCALE", 1usize).max(1);
    let (d, f, q_rank) = (4096 / scale, 11008 / scale, 1244 / scale);
    let mut rng = StdRng::seed_from_u64(7);
    let on_gpu = env("LORAP_BENCH_SOLVER", "gpu".to_string()) != "host";
    let gpu = if on_gpu { Some(Gpu::new(&GpuOptions::default()).expect("a GPU adapter (or LORAP_BENCH_SOLVER=host)")) } else { None };
    let solver = gpu.as_deref().map_or(Solver::Host, Solver::Gpu);
    let on = gpu.as_ref().map_or("the host in f64".to_string(), |g| format!("{} in f32", g.info.name));
    println!("refit cost, one layer of LLaMA-2-7B widths / {scale} (d {d}, FFN {f}), ratio {ratio}, products and solves on {on}, {} host threads", rayon_threads());
    if which == "parts" {
        // the two operations the refit is made of, alone: a product and one ridge solve
        let (k, rows) = ((0.8 * f as f64) as usize, 512.min(d));
        let a = Mat::<f64>::from_fn(rows, f, |_, _| rng.random_range(-1.0..1.0));
        let b = Mat::<f64>::from_fn(f, k, |_, _| rng.random_range(-1.0..1.0));
        let t = Instant::now();
        let p = solver.product(a.as_ref(), b.as_ref()).expect("product");
        let s = t.elapsed().as_secs_f64();
        println!("product [{rows}, {f}] x [{f}, {k}]: {s:.2} s ({:.1} GFLOP/s)", 2.0 * (rows * f * k) as f64 / s / 1e9);
        let n = moments(k, k + 64, 5);
        let normal = Mat::<f64>::from_fn(k, k, |i, j| n.gram_sym(i, j) + if i == j { 1.0 } else { 0.0 });
        let t = Instant::now();
        let _ = solver.solve_right(&normal, &p).expect("solve");
        let s = t.elapsed().as_secs_f64();
        let flops = (k as f64).powi(3) / 3.0 + 2.0 * rows as f64 * (k as f64).powi(2);
        println!("ridge solve k = {k}, {rows} right-hand sides: {s:.2} s ({:.1} GFLOP/s)", flops / s / 1e9);
    }
    if which == "ffn" || which == "both" {
        let t = Instant::now();
        let m = split(f, 1);
        let gen = t.elapsed().as_secs_f64();
        let keep = ((1.0 - ratio) * f as f64).round() as usize;
        let kept: Vec<usize> = (0..f).filter(|j| j * keep / f != (j + 1) * keep / f).collect();
        let w: Vec<f32> = (0..d * f).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        let t = Instant::now();
        let r = refit(&w, d, Features::Kept(&kept), &m, solver).expect("FFN refit");
        let s = t.elapsed().as_secs_f64();
        println!("ffn refit: k = {} kept of {f}: {s:.1} s per layer (x32 layers: {:.1} min); choice {:?}; moments generated in {gen:.1} s", kept.len(), 32.0 * s / 60.0, r.report.choice);
    }
    if which == "attention" || which == "both" {
        let m = split(d, 3);
        let b: Vec<f32> = (0..q_rank * d).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        let a0: Vec<f32> = (0..d * q_rank).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        let w: Vec<f32> = (0..d * d).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        let t = Instant::now();
        let r = refit(&w, d, Features::Projected { b: &b, a0: &a0, rank: q_rank }, &m, solver).expect("attention refit");
        let s = t.elapsed().as_secs_f64();
        println!("attention refit (q_proj, rank {q_rank}): {s:.1} s per matrix (q and k factored at 7B: x2 x32 layers: {:.1} min); choice {:?}", 64.0 * s / 60.0, r.report.choice);
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
