//! The kernels through their public paths (`lorap_gpu::gpu::{matmul, norms, ...}`, re-exported
//! from the rooms under `src/gpu/kernels/`), at default and split-forcing binding limits,
//! against the f64 references, with relative Frobenius error under 1e-4. Each room's own unit
//! tests (awkward shapes, both A B^T kernels, layouts, accumulation) live beside its kernel.

mod common;

use common::{gpu, gpu_with_binding, random};
use lorap_gpu::gpu::{attention, elementwise, loss, matmul, norms, rel_frobenius, rope, Gpu};

const TOL: f64 = 1e-4;

fn check(name: &str, got: &[f32], want: &[f64]) {
    let e = rel_frobenius(got, want);
    assert!(e < TOL, "{name}: relative Frobenius error {e:e} >= {TOL:e}");
}

/// One case per kernel family, all recorded into one encoder and submitted once.
fn every_family(g: &Gpu) {
    let (m, k, n) = (70, 52, 40);
    let (a, b, w) = (random(m * k, 1), random(k * n, 2), random(n * k, 3));
    let (ga, gb, gw) = (g.upload(&a).unwrap(), g.upload(&b).unwrap(), g.upload(&w).unwrap());
    let gram = g.zeros(k * k).unwrap();
    let sumsq = g.zeros(k).unwrap();
    let nw = random(k, 4);
    let gnw = g.upload(&nw).unwrap();
    let normed = g.alloc(m * k).unwrap();
    let scaled = g.alloc(m).unwrap();
    let (gate, up) = (random(m * k, 5), random(m * k, 6));
    let (ggate, gup, act, sum) = (g.upload(&gate).unwrap(), g.upload(&up).unwrap(), g.alloc(m * k).unwrap(), g.alloc(m * k).unwrap());
    let biased = g.upload(&a).unwrap();
    let (heads, hd, window) = (2, 16, 8);
    let rx = random(64 * heads * hd, 7);
    let grx = g.upload(&rx).unwrap();
    let table = rope::RopeTable::new(g, window, hd, 10000.0).unwrap();
    let s = attention::AttnShape { tokens: 24, window: 6, n_heads: 2, n_kv: 1, head_dim: 16 };
    let (q, kk, v) = (random(24 * 2 * 16, 8), random(24 * 16, 9), random(24 * 16, 10));
    let (gq, gk, gv, go) = (g.upload(&q).unwrap(), g.upload(&kk).unwrap(), g.upload(&v).unwrap(), g.alloc(q.len()).unwrap());
    let logits: Vec<f32> = random(7 * 900, 11).iter().map(|x| 8.0 * x).collect();
    let targets: Vec<f32> = (0..7).map(|r| ((r * 7919) % 900) as f32).collect();
    let (gl, gt, gn) = (g.upload(&logits).unwrap(), g.upload(&targets).unwrap(), g.alloc(7).unwrap());

    let mut enc = g.encoder();
    let c = matmul::matmul(g, &mut enc, &ga, &gb, m, k, n).unwrap();
    let y = matmul::matmul_nt(g, &mut enc, &ga, &gw, m, k, n).unwrap();
    let t = matmul::transpose(g, &mut enc, &ga, 0, k, 10, k).unwrap();
    matmul::gram_accumulate(g, &mut enc, &ga, m, k, &gram).unwrap();
    norms::col_sumsq_accumulate(g, &mut enc, &ga, m, k, &sumsq).unwrap();
    norms::rms_norm(g, &mut enc, &ga, &gnw, &normed, norms::NormShape { rows: m, cols: k, eps: 1e-5 }).unwrap();
    norms::row_scaled_norms(g, &mut enc, &ga, &gnw, &scaled, m, k).unwrap();
    elementwise::silu_mul(g, &mut enc, &ggate, &gup, &act, m * k).unwrap();
    elementwise::add(g, &mut enc, &ggate, &gup, &sum, m * k).unwrap();
    elementwise::add_bias(g, &mut enc, &biased, &gnw, m, k).unwrap();
    rope::apply(g, &mut enc, &grx, 64, heads, window, &table).unwrap();
    attention::causal_attention(g, &mut enc, s, &gq, &gk, &gv, &go).unwrap();
    loss::nll_rows(g, &mut enc, &gl, &gt, &gn, 7, 900).unwrap();
    g.submit(enc);

    let cap = g.max_binding_bytes();
    let r = |b: &lorap_gpu::gpu::GpuBuf| g.read(b).unwrap();
    check(&format!("matmul (cap {cap})"), &r(&c), &matmul::matmul_ref(&a, &b, m, k, n));
    check(&format!("matmul_nt (cap {cap})"), &r(&y), &matmul::matmul_nt_ref(&a, &w, m, k, n));
    check(&format!("transpose (cap {cap})"), &r(&t), &matmul::transpose_ref(&a, 0, k, 10, k));
    check(&format!("gram (cap {cap})"), &r(&gram), &matmul::gram_ref(&a, m, k));
    check(&format!("col_sumsq (cap {cap})"), &r(&sumsq), &norms::col_sumsq_ref(&a, m, k));
    check(&format!("rms_norm (cap {cap})"), &r(&normed), &norms::rms_norm_ref(&a, &nw, m, k, 1e-5));
    check(&format!("row_scaled_norms (cap {cap})"), &r(&scaled), &norms::row_scaled_norms_ref(&a, &nw, m, k));
    check(&format!("silu_mul (cap {cap})"), &r(&act), &elementwise::silu_mul_ref(&gate, &up));
    check(&format!("add (cap {cap})"), &r(&sum), &elementwise::add_ref(&gate, &up));
    check(&format!("add_bias (cap {cap})"), &r(&biased), &elementwise::add_bias_ref(&a, &nw, k));
    check(&format!("rope (cap {cap})"), &r(&grx), &rope::rope_ref(&rx, 64, heads, hd, window, 10000.0));
    check(&format!("attention (cap {cap})"), &r(&go), &attention::causal_attention_ref(s, &q, &kk, &v));
    check(&format!("nll (cap {cap})"), &r(&gn), &loss::nll_rows_ref(&logits, &targets, 7, 900));
}

#[test]
fn every_family_through_the_public_paths() {
    every_family(&gpu());
}

/// Tensors larger than one storage binding: a 4 KiB cap forces every op to split.
#[test]
fn tensors_larger_than_a_binding_are_split() {
    let g = gpu_with_binding(4096);
    assert_eq!(g.max_binding_bytes(), 4096);
    every_family(&g);
}
