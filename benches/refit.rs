//! Host cost of the least-squares compensations at real shapes: `methods::refit::refit` on
//! random positive-definite moments of one LLaMA-2-7B-shaped layer (the FFN refit over the
//! kept down_proj columns, the attention refit of a factored q_proj), timed alone: no GPU
//! is involved, so this is what a layer adds to a 7B compression on this host, to be
//! compared with the per-layer GPU time in the `compress` benchmark's phase table.
//!
//! `cargo bench --bench refit`; env LORAP_BENCH_REFIT = ffn | attention | both (default
//! both), LORAP_BENCH_RATIO (default 0.2: the FFN keeps 80% of 11008 channels, q_proj the
//! rank the fixed 3:1 split gives it at 7B, 1244).

use std::time::Instant;

use faer::Mat;
use lorap_gpu::calib::stats::{Moments, SplitMoments};
use lorap_gpu::methods::refit::{refit, Features};
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
    let (d, f, q_rank) = (4096usize, 11008usize, 1244usize);
    let mut rng = StdRng::seed_from_u64(7);
    println!("refit host cost, one LLaMA-2-7B-shaped layer (d {d}, FFN {f}), ratio {ratio}, {} threads", rayon_threads());
    if which == "ffn" || which == "both" {
        let t = Instant::now();
        let m = split(f, 1);
        let gen = t.elapsed().as_secs_f64();
        let keep = ((1.0 - ratio) * f as f64).round() as usize;
        let kept: Vec<usize> = (0..f).filter(|j| j * keep / f != (j + 1) * keep / f).collect();
        let w: Vec<f32> = (0..d * f).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        let t = Instant::now();
        let r = refit(&w, d, Features::Kept(&kept), &m).expect("FFN refit");
        let s = t.elapsed().as_secs_f64();
        println!("ffn refit: k = {} kept of {f}: {s:.1} s per layer (x32 layers: {:.1} min); choice {:?}; moments generated in {gen:.1} s", kept.len(), 32.0 * s / 60.0, r.report.choice);
    }
    if which == "attention" || which == "both" {
        let m = split(d, 3);
        let b: Vec<f32> = (0..q_rank * d).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        let a0: Vec<f32> = (0..d * q_rank).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        let w: Vec<f32> = (0..d * d).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        let t = Instant::now();
        let r = refit(&w, d, Features::Projected { b: &b, a0: &a0, rank: q_rank }, &m).expect("attention refit");
        let s = t.elapsed().as_secs_f64();
        println!("attention refit (q_proj, rank {q_rank}): {s:.1} s per matrix (q and k factored at 7B: x2 x32 layers: {:.1} min); choice {:?}", 64.0 * s / 60.0, r.report.choice);
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
