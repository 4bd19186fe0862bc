//! Every WGSL kernel against its CPU f64 reference on random inputs, at awkward shapes,
//! with relative Frobenius error under 1e-4 (f32 storage and arithmetic).

mod common;

use common::{gpu, gpu_with_binding, random};
use lorap_gpu::gpu::{attention, elementwise, matmul, norms, rel_frobenius, rope, Gpu};

const TOL: f64 = 1e-4;

fn check(name: &str, got: &[f32], want: &[f64]) {
    let e = rel_frobenius(got, want);
    assert!(e < TOL, "{name}: relative Frobenius error {e:e} >= {TOL:e}");
}

fn matmul_case(g: &Gpu, m: usize, k: usize, n: usize) {
    let a = random(m * k, 1 + m as u64);
    let b = random(k * n, 2 + n as u64);
    let (ga, gb) = (g.upload(&a).unwrap(), g.upload(&b).unwrap());
    let mut enc = g.encoder();
    let c = matmul::matmul(g, &mut enc, &ga, &gb, m, k, n).unwrap();
    g.submit(enc);
    check(&format!("matmul {m}x{k}x{n}"), &g.read(&c).unwrap(), &matmul::matmul_ref(&a, &b, m, k, n));
}

fn matmul_nt_case(g: &Gpu, m: usize, k: usize, n: usize) {
    let x = random(m * k, 3 + k as u64);
    let w = random(n * k, 4 + m as u64);
    let (gx, gw) = (g.upload(&x).unwrap(), g.upload(&w).unwrap());
    let mut enc = g.encoder();
    let y = matmul::matmul_nt(g, &mut enc, &gx, &gw, m, k, n).unwrap();
    g.submit(enc);
    check(&format!("matmul_nt {m}x{k}x{n}"), &g.read(&y).unwrap(), &matmul::matmul_nt_ref(&x, &w, m, k, n));
}

fn gram_case(g: &Gpu, chunks: &[usize], cols: usize) {
    let total: usize = chunks.iter().sum();
    let x = random(total * cols, 5 + cols as u64);
    let gg = g.zeros(cols * cols).unwrap();
    let mut r0 = 0;
    for &rows in chunks {
        let part = g.upload(&x[r0 * cols..(r0 + rows) * cols]).unwrap();
        let mut enc = g.encoder();
        matmul::gram_accumulate(g, &mut enc, &part, rows, cols, &gg).unwrap();
        g.submit(enc);
        r0 += rows;
    }
    check(&format!("gram {chunks:?}x{cols}"), &g.read(&gg).unwrap(), &matmul::gram_ref(&x, total, cols));
}

fn col_sumsq_case(g: &Gpu, chunks: &[usize], cols: usize) {
    let total: usize = chunks.iter().sum();
    let x = random(total * cols, 6 + cols as u64);
    let out = g.zeros(cols).unwrap();
    let mut r0 = 0;
    for &rows in chunks {
        let part = g.upload(&x[r0 * cols..(r0 + rows) * cols]).unwrap();
        let mut enc = g.encoder();
        norms::col_sumsq_accumulate(g, &mut enc, &part, rows, cols, &out).unwrap();
        g.submit(enc);
        r0 += rows;
    }
    check(&format!("col_sumsq {chunks:?}x{cols}"), &g.read(&out).unwrap(), &norms::col_sumsq_ref(&x, total, cols));
}

fn rms_norm_case(g: &Gpu, rows: usize, cols: usize) {
    let x = random(rows * cols, 7 + rows as u64);
    let w = random(cols, 8);
    let (gx, gw, gy) = (g.upload(&x).unwrap(), g.upload(&w).unwrap(), g.alloc(rows * cols).unwrap());
    let mut enc = g.encoder();
    norms::rms_norm(g, &mut enc, &gx, &gw, &gy, rows, cols, 1e-5).unwrap();
    g.submit(enc);
    check(&format!("rms_norm {rows}x{cols}"), &g.read(&gy).unwrap(), &norms::rms_norm_ref(&x, &w, rows, cols, 1e-5));
}

fn rope_case(g: &Gpu, tokens: usize, heads: usize, hd: usize, window: usize, theta: f64) {
    let x = random(tokens * heads * hd, 9 + tokens as u64);
    let gx = g.upload(&x).unwrap();
    let table = rope::RopeTable::new(g, window, hd, theta).unwrap();
    let mut enc = g.encoder();
    rope::apply(g, &mut enc, &gx, tokens, heads, window, &table).unwrap();
    g.submit(enc);
    check(&format!("rope {tokens}x{heads}x{hd} w{window}"), &g.read(&gx).unwrap(), &rope::rope_ref(&x, tokens, heads, hd, window, theta));
}

fn attention_case(g: &Gpu, s: attention::AttnShape) {
    let q = random(s.tokens * s.n_heads * s.head_dim, 10);
    let k = random(s.tokens * s.n_kv * s.head_dim, 11);
    let v = random(s.tokens * s.n_kv * s.head_dim, 12);
    let (gq, gk, gv) = (g.upload(&q).unwrap(), g.upload(&k).unwrap(), g.upload(&v).unwrap());
    let go = g.alloc(q.len()).unwrap();
    let mut enc = g.encoder();
    attention::causal_attention(g, &mut enc, s, &gq, &gk, &gv, &go).unwrap();
    g.submit(enc);
    check(&format!("attention {s:?}"), &g.read(&go).unwrap(), &attention::causal_attention_ref(s, &q, &k, &v));
}

fn elementwise_case(g: &Gpu, n: usize) {
    let a = random(n, 13 + n as u64);
    let b = random(n, 14 + n as u64);
    let (ga, gb, go) = (g.upload(&a).unwrap(), g.upload(&b).unwrap(), g.alloc(n).unwrap());
    let mut enc = g.encoder();
    elementwise::silu_mul(g, &mut enc, &ga, &gb, &go, n).unwrap();
    g.submit(enc);
    check(&format!("silu_mul {n}"), &g.read(&go).unwrap(), &elementwise::silu_mul_ref(&a, &b));
    let mut enc = g.encoder();
    elementwise::add(g, &mut enc, &ga, &gb, &go, n).unwrap();
    g.submit(enc);
    check(&format!("add {n}"), &g.read(&go).unwrap(), &elementwise::add_ref(&a, &b));
}

#[test]
fn matmul_matches_reference() {
    let g = gpu();
    for (m, k, n) in [(1, 1, 1), (7, 13, 5), (64, 64, 64), (65, 129, 33), (130, 70, 257), (3, 500, 2)] {
        matmul_case(&g, m, k, n);
    }
}

#[test]
fn matmul_transposed_matches_reference() {
    let g = gpu();
    for (m, k, n) in [(1, 1, 1), (9, 17, 31), (100, 576, 192), (129, 65, 64)] {
        matmul_nt_case(&g, m, k, n);
    }
}

#[test]
fn matmul_alpha_beta_accumulates() {
    let g = gpu();
    let (m, k, n) = (37, 45, 29);
    let (a, b, c0) = (random(m * k, 20), random(k * n, 21), random(m * n, 22));
    let (ga, gb, gc) = (g.upload(&a).unwrap(), g.upload(&b).unwrap(), g.upload(&c0).unwrap());
    let mut enc = g.encoder();
    let shape = matmul::GemmShape { m, n, k };
    matmul::gemm(&g, &mut enc, shape, matmul::Operand::new(&ga, k), matmul::Operand::new(&gb, n), &gc, 0, n, 0.5, -2.0).unwrap();
    g.submit(enc);
    let ab = matmul::matmul_ref(&a, &b, m, k, n);
    let want: Vec<f64> = ab.iter().zip(&c0).map(|(&x, &c)| 0.5 * x - 2.0 * c as f64).collect();
    check("gemm alpha/beta", &g.read(&gc).unwrap(), &want);
}

#[test]
fn gram_accumulates_over_row_chunks() {
    let g = gpu();
    gram_case(&g, &[1], 1);
    gram_case(&g, &[50, 3, 77], 45);
    gram_case(&g, &[128, 128, 1], 200);
}

#[test]
fn col_sumsq_accumulates_over_row_chunks() {
    let g = gpu();
    col_sumsq_case(&g, &[1], 1);
    col_sumsq_case(&g, &[10, 333], 65);
    col_sumsq_case(&g, &[256, 7, 100], 576);
}

#[test]
fn rms_norm_matches_reference() {
    let g = gpu();
    for (rows, cols) in [(1, 1), (3, 100), (17, 576), (5, 1000)] {
        rms_norm_case(&g, rows, cols);
    }
}

#[test]
fn rope_matches_reference() {
    let g = gpu();
    rope_case(&g, 6, 1, 2, 3, 10000.0);
    rope_case(&g, 40, 3, 64, 20, 100000.0);
    rope_case(&g, 600, 2, 128, 600, 500000.0);
}

#[test]
fn attention_matches_reference() {
    let g = gpu();
    use attention::AttnShape;
    attention_case(&g, AttnShape { tokens: 1, window: 1, n_heads: 1, n_kv: 1, head_dim: 4 });
    attention_case(&g, AttnShape { tokens: 12, window: 4, n_heads: 6, n_kv: 2, head_dim: 80 });
    attention_case(&g, AttnShape { tokens: 30, window: 10, n_heads: 9, n_kv: 3, head_dim: 64 });
    // windows longer than a key block (256) exercise the online softmax
    attention_case(&g, AttnShape { tokens: 600, window: 300, n_heads: 4, n_kv: 2, head_dim: 24 });
    attention_case(&g, AttnShape { tokens: 20, window: 20, n_heads: 2, n_kv: 2, head_dim: 200 });
}

#[test]
fn elementwise_matches_reference() {
    let g = gpu();
    for n in [1, 255, 257, 10_001] {
        elementwise_case(&g, n);
    }
}

/// Tensors larger than one storage binding: a 4 KiB cap forces every op to split.
#[test]
fn tensors_larger_than_a_binding_are_split() {
    let g = gpu_with_binding(4096);
    assert_eq!(g.max_binding_bytes(), 4096);
    matmul_case(&g, 70, 50, 40);
    matmul_nt_case(&g, 33, 100, 70);
    gram_case(&g, &[60, 41], 30);
    col_sumsq_case(&g, &[90], 33);
    rms_norm_case(&g, 40, 100);
    rope_case(&g, 64, 2, 16, 8, 10000.0);
    attention_case(&g, attention::AttnShape { tokens: 24, window: 6, n_heads: 2, n_kv: 1, head_dim: 16 });
    elementwise_case(&g, 5000);
}

#[test]
fn f16_and_bf16_uploads_convert_to_f32() {
    let g = gpu();
    let x = random(1000, 30);
    let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    let b: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let gh = g.read(&g.upload_f16(&h).unwrap()).unwrap();
    let gb = g.read(&g.upload_bf16(&b).unwrap()).unwrap();
    assert!(gh.iter().zip(&h).all(|(a, b)| *a == b.to_f32()));
    assert!(gb.iter().zip(&b).all(|(a, b)| *a == b.to_f32()));
}

#[test]
fn token_nll_matches_reference() {
    for (g, rows, cols) in [(gpu(), 1, 1), (gpu(), 5, 1000), (gpu(), 33, 49152), (gpu_with_binding(8192), 7, 1500)] {
        let logits: Vec<f32> = random(rows * cols, 40).iter().map(|x| 8.0 * x).collect();
        let targets: Vec<f32> = (0..rows).map(|r| ((r * 7919) % cols) as f32).collect();
        let (gl, gt, gn) = (g.upload(&logits).unwrap(), g.upload(&targets).unwrap(), g.alloc(rows).unwrap());
        let mut enc = g.encoder();
        lorap_gpu::gpu::loss::nll_rows(&g, &mut enc, &gl, &gt, &gn, rows, cols).unwrap();
        g.submit(enc);
        check(&format!("nll {rows}x{cols}"), &g.read(&gn).unwrap(), &lorap_gpu::gpu::loss::nll_rows_ref(&logits, &targets, rows, cols));
    }
}

#[test]
fn row_bias_matches_reference() {
    for (g, rows, cols) in [(gpu(), 1, 1), (gpu(), 13, 77), (gpu_with_binding(4096), 40, 100)] {
        let x = random(rows * cols, 41);
        let b = random(cols, 42);
        let (gx, gb) = (g.upload(&x).unwrap(), g.upload(&b).unwrap());
        let mut enc = g.encoder();
        elementwise::add_bias(&g, &mut enc, &gx, &gb, rows, cols).unwrap();
        g.submit(enc);
        check(&format!("add_bias {rows}x{cols}"), &g.read(&gx).unwrap(), &elementwise::add_bias_ref(&x, &b, cols));
    }
}

#[test]
fn row_scaled_norms_match_reference() {
    for (g, rows, cols) in [(gpu(), 1, 1), (gpu(), 300, 97), (gpu(), 7, 1536), (gpu_with_binding(4096), 50, 130)] {
        let w = random(rows * cols, 50);
        let s: Vec<f32> = random(cols, 51).iter().map(|x| x.abs()).collect();
        let (gw, gs, go) = (g.upload(&w).unwrap(), g.upload(&s).unwrap(), g.alloc(rows).unwrap());
        let mut enc = g.encoder();
        norms::row_scaled_norms(&g, &mut enc, &gw, &gs, &go, rows, cols).unwrap();
        g.submit(enc);
        check(&format!("row_scaled_norms {rows}x{cols}"), &g.read(&go).unwrap(), &norms::row_scaled_norms_ref(&w, &s, rows, cols));
    }
}

/// Both A B^T kernels (tiled for GPUs, vec4 for CPU drivers), including shapes where the
/// vec4 kernel must fall back (K not a multiple of 4) and offsets inside a buffer.
#[test]
fn both_nt_kernels_match_reference() {
    for g in [gpu(), gpu_with_binding(8192)] {
        for nt in [matmul::NtKernel::Tiled, matmul::NtKernel::Vec4] {
            for (m, k, n) in [(1, 4, 1), (5, 8, 3), (37, 64, 29), (70, 576, 33), (9, 13, 7), (130, 100, 65)] {
                let x = random(m * k + 8, 60 + k as u64);
                let w = random(n * k, 61 + n as u64);
                let (gx, gw, gy) = (g.upload(&x).unwrap(), g.upload(&w).unwrap(), g.alloc(m * n).unwrap());
                let mut enc = g.encoder();
                // A starts 8 elements into its buffer
                let a = matmul::Operand { buf: &gx, offset: 8, ld: k, trans: false };
                matmul::gemm_with(&g, &mut enc, matmul::GemmShape { m, n, k }, a, matmul::Operand::new(&gw, k).t(), &gy, 0, n, 1.0, 0.0, nt).unwrap();
                g.submit(enc);
                check(&format!("{nt:?} {m}x{k}x{n}"), &g.read(&gy).unwrap(), &matmul::matmul_nt_ref(&x[8..], &w, m, k, n));
            }
        }
    }
}

/// Transpose against its reference, and every operand layout through the vec4 path (which
/// transposes NN / TN / NT-less operands first), at awkward shapes, with offsets, and with
/// a small binding cap (where the copies do not fit and the tiled kernel takes over).
#[test]
fn transpose_and_vec4_layouts_match_reference() {
    for g in [gpu(), gpu_with_binding(8192)] {
        for (rows, cols, ld) in [(1, 1, 1), (3, 17, 20), (64, 48, 48), (100, 7, 9)] {
            let src = random(5 + rows * ld, 90 + rows as u64);
            let gs = g.upload(&src).unwrap();
            let mut enc = g.encoder();
            if matmul::transpose_fits(&g, ld, rows, cols) {
                let t = matmul::transpose(&g, &mut enc, &gs, 5, ld, rows, cols).unwrap();
                g.submit(enc);
                check(&format!("transpose {rows}x{cols} ld {ld}"), &g.read(&t).unwrap(), &matmul::transpose_ref(&src, 5, ld, rows, cols));
            }
        }
        for (m, k, n) in [(5, 8, 3), (37, 64, 29), (70, 96, 33), (9, 13, 7)] {
            for (ta, tb) in [(false, false), (true, false), (true, true), (false, true)] {
                let a = random(m * k, 70 + m as u64);
                let b = random(k * n, 71 + n as u64);
                // store each operand as the layout says: transposed means [cols, rows] in memory
                let store = |v: &[f32], r: usize, c: usize, t: bool| if t { matmul::transpose_ref(v, 0, c, r, c).iter().map(|&x| x as f32).collect() } else { v.to_vec() };
                let (ga, gb) = (g.upload(&store(&a, m, k, ta)).unwrap(), g.upload(&store(&b, k, n, tb)).unwrap());
                let gc = g.alloc(m * n).unwrap();
                let mut enc = g.encoder();
                let oa = matmul::Operand { buf: &ga, offset: 0, ld: if ta { m } else { k }, trans: ta };
                let ob = matmul::Operand { buf: &gb, offset: 0, ld: if tb { k } else { n }, trans: tb };
                matmul::gemm_with(&g, &mut enc, matmul::GemmShape { m, n, k }, oa, ob, &gc, 0, n, 1.0, 0.0, matmul::NtKernel::Vec4).unwrap();
                g.submit(enc);
                check(&format!("vec4 path {m}x{k}x{n} trans ({ta},{tb})"), &g.read(&gc).unwrap(), &matmul::matmul_ref(&a, &b, m, k, n));
            }
        }
    }
}
