//! Causal softmax attention with grouped KV heads over independent windows (calibration
//! and evaluation windows never attend across each other). head_dim must be a multiple of 4.

use crate::gpu::context::{GpuBuf, Gpu, Result};

const SHADER: &str = include_str!("attention.wgsl");
/// Largest head dimension the shader's per-invocation accumulators cover.
pub const MAX_HEAD_DIM: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    tokens: u32,
    window: u32,
    n_heads: u32,
    n_kv: u32,
    head_dim: u32,
    scale: f32,
    q_off: u32,
    k_off: u32,
    v_off: u32,
    o_off: u32,
    _p: [u32; 2],
}

/// Head layout of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub tokens: usize,
    pub window: usize,
    pub n_heads: usize,
    pub n_kv: usize,
    pub head_dim: usize,
}

/// o = softmax(q k^T / sqrt(head_dim), causal within each window) v.
pub fn causal_attention(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, s: AttnShape, q: &GpuBuf, k: &GpuBuf, v: &GpuBuf, o: &GpuBuf) -> Result<()> {
    assert!(s.head_dim <= MAX_HEAD_DIM && s.head_dim % 4 == 0 && s.n_heads % s.n_kv == 0 && s.tokens % s.window == 0);
    let pipe = gpu.pipeline("attention", SHADER, "main", &[]);
    let qd = s.n_heads * s.head_dim;
    let kd = s.n_kv * s.head_dim;
    // whole windows per chunk, so every key a query needs is bound
    let windows = (gpu.max_binding_elems() / (qd.max(kd) * s.window)).max(1);
    let per = windows * s.window;
    if per * qd > gpu.max_binding_elems() {
        return Err(crate::gpu::context::GpuError::RowTooLarge { row_bytes: (s.window * qd * 4) as u64, limit: gpu.max_binding_bytes() });
    }
    for t0 in (0..s.tokens).step_by(per) {
        let t1 = (t0 + per).min(s.tokens);
        let n = t1 - t0;
        let wq = gpu.window(q, t0 * qd, n * qd);
        let wk = gpu.window(k, t0 * kd, n * kd);
        let wv = gpu.window(v, t0 * kd, n * kd);
        let wo = gpu.window(o, t0 * qd, n * qd);
        let p = Params {
            tokens: n as u32,
            window: s.window as u32,
            n_heads: s.n_heads as u32,
            n_kv: s.n_kv as u32,
            head_dim: s.head_dim as u32,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
            q_off: wq.inner_offset,
            k_off: wk.inner_offset,
            v_off: wv.inner_offset,
            o_off: wo.inner_offset,
            _p: [0; 2],
        };
        let groups = gpu.grid_1d((n * s.n_heads) as u32);
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[wq.binding, wk.binding, wv.binding, wo.binding], groups);
    }
    Ok(())
}

/// CPU reference in f64.
pub fn causal_attention_ref(s: AttnShape, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
    let (hd, nh, nkv) = (s.head_dim, s.n_heads, s.n_kv);
    let group = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut o = vec![0f64; s.tokens * nh * hd];
    for t in 0..s.tokens {
        let w0 = t / s.window * s.window;
        for h in 0..nh {
            let kvh = h / group;
            let qv = &q[t * nh * hd + h * hd..][..hd];
            let scores: Vec<f64> = (w0..=t)
                .map(|j| {
                    let kv = &k[j * nkv * hd + kvh * hd..][..hd];
                    qv.iter().zip(kv).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|&x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                o[t * nh * hd + h * hd + d] = (w0..=t).zip(&e).map(|(j, &p)| p * v[j * nkv * hd + kvh * hd + d] as f64).sum::<f64>() / z;
            }
        }
    }
    o
}
