//! Rotary position embedding (Hugging Face rotate-half layout) with a host-built cos/sin
//! table, since GPU sin/cos of large arguments is not accurate enough everywhere.

use crate::gpu::context::{GpuBuf, Gpu, Result};

const SHADER: &str = include_str!("rope.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    tokens: u32,
    n_heads: u32,
    head_dim: u32,
    window: u32,
    pos0: u32,
    n_pos: u32,
    x_off: u32,
    _p: u32,
}

/// Inverse frequencies theta^(-2i/d), computed like transformers does (f32).
pub fn inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2).map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32).collect()
}

/// cos table then sin table, [n_pos, head_dim/2] each.
pub fn rope_table(n_pos: usize, head_dim: usize, theta: f64) -> Vec<f32> {
    let mut t = vec![0f32; n_pos * head_dim];
    fill_table(&mut t, n_pos, &inv_freq(head_dim, theta));
    t
}

/// Fills a cos-then-sin table from inverse frequencies (which may carry rope scaling).
pub fn fill_table(t: &mut [f32], n_pos: usize, inv_freq: &[f32]) {
    let half = inv_freq.len();
    for pos in 0..n_pos {
        for (i, &f) in inv_freq.iter().enumerate() {
            // transformers forms the angle as an f32 product, then takes cos/sin
            let ang = (pos as f32 * f) as f64;
            t[pos * half + i] = ang.cos() as f32;
            t[n_pos * half + pos * half + i] = ang.sin() as f32;
        }
    }
}

/// A cos/sin table on the GPU for positions 0..n_pos.
pub struct RopeTable {
    pub buf: GpuBuf,
    pub n_pos: usize,
    pub head_dim: usize,
}

impl RopeTable {
    pub fn new(gpu: &Gpu, n_pos: usize, head_dim: usize, theta: f64) -> Result<Self> {
        Ok(RopeTable { buf: gpu.upload(&rope_table(n_pos, head_dim, theta))?, n_pos, head_dim })
    }

    /// A table from given inverse frequencies (which may carry rope scaling).
    pub fn from_inv_freq(gpu: &Gpu, n_pos: usize, inv_freq: &[f32]) -> Result<Self> {
        let mut t = vec![0f32; 2 * n_pos * inv_freq.len()];
        fill_table(&mut t, n_pos, inv_freq);
        Ok(RopeTable { buf: gpu.upload(&t)?, n_pos, head_dim: 2 * inv_freq.len() })
    }
}

/// Rotates x [tokens, n_heads*head_dim] in place; token t is at position t % window.
pub fn apply(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, tokens: usize, n_heads: usize, window: usize, table: &RopeTable) -> Result<()> {
    assert!(window <= table.n_pos, "rope table shorter than the window");
    let pipe = gpu.pipeline("rope", SHADER, "main", &[]);
    let hd = table.head_dim;
    let wt = gpu.window(&table.buf, 0, table.buf.len);
    // chunks hold whole windows so positions stay t % window
    let per = (gpu.max_binding_elems() / (n_heads * hd) / window).max(1) * window;
    for t0 in (0..tokens).step_by(per) {
        let t1 = (t0 + per).min(tokens);
        let wx = gpu.window(x, t0 * n_heads * hd, (t1 - t0) * n_heads * hd);
        let p = Params {
            tokens: (t1 - t0) as u32,
            n_heads: n_heads as u32,
            head_dim: hd as u32,
            window: window as u32,
            pos0: 0,
            n_pos: table.n_pos as u32,
            x_off: wx.inner_offset,
            _p: 0,
        };
        let n = ((t1 - t0) * n_heads * hd / 2).div_ceil(256) as u32;
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[wx.binding, wt.binding.clone()], gpu.grid_1d(n));
    }
    Ok(())
}

/// CPU reference (f64 angles from the same f32 inverse frequencies).
pub fn rope_ref(x: &[f32], tokens: usize, n_heads: usize, head_dim: usize, window: usize, theta: f64) -> Vec<f64> {
    let f = inv_freq(head_dim, theta);
    let half = head_dim / 2;
    let mut y: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for t in 0..tokens {
        let pos = t % window;
        for h in 0..n_heads {
            let base = t * n_heads * head_dim + h * head_dim;
            for i in 0..half {
                let ang = (pos as f32 * f[i]) as f64; // the f32 product, as transformers forms it
                let (s, c) = ang.sin_cos();
                let x1 = x[base + i] as f64;
                let x2 = x[base + i + half] as f64;
                y[base + i] = x1 * c - x2 * s;
                y[base + i + half] = x2 * c + x1 * s;
            }
        }
    }
    y
}
