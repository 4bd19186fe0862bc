//! Column sums of squares (activation statistics, accumulated over row chunks) and
//! row-wise RMSNorm.

use crate::gpu::context::{GpuBuf, Gpu, Result};

const SHADER: &str = include_str!("norms.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ColParams {
    rows: u32,
    cols: u32,
    ld: u32,
    x_off: u32,
    out_off: u32,
    _p: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    rows: u32,
    cols: u32,
    x_off: u32,
    w_off: u32,
    y_off: u32,
    eps: f32,
    _p: [u32; 2],
}

/// out[j] += sum_i x[i,j]^2 for X [rows, cols] row-major.
pub fn col_sumsq_accumulate(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, rows: usize, cols: usize, out: &GpuBuf) -> Result<()> {
    let pipe = gpu.pipeline("norms", SHADER, "col_sumsq", &[]);
    let wo = gpu.window(out, 0, cols);
    for (r0, r1) in gpu.row_chunks(rows, &[cols])? {
        let wx = gpu.window(x, r0 * cols, (r1 - r0) * cols);
        let p = ColParams {
            rows: (r1 - r0) as u32,
            cols: cols as u32,
            ld: cols as u32,
            x_off: wx.inner_offset,
            out_off: wo.inner_offset,
            _p: [0; 3],
        };
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[wx.binding, wo.binding.clone()], (cols.div_ceil(64) as u32, 1, 1));
    }
    Ok(())
}

/// y = rmsnorm(x) * w, row-wise, X [rows, cols].
pub fn rms_norm(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, w: &GpuBuf, y: &GpuBuf, rows: usize, cols: usize, eps: f32) -> Result<()> {
    let pipe = gpu.pipeline("norms", SHADER, "rms_norm", &[]);
    let ww = gpu.window(w, 0, cols);
    for (r0, r1) in gpu.row_chunks(rows, &[cols])? {
        let wx = gpu.window(x, r0 * cols, (r1 - r0) * cols);
        let wy = gpu.window(y, r0 * cols, (r1 - r0) * cols);
        let p = NormParams {
            rows: (r1 - r0) as u32,
            cols: cols as u32,
            x_off: wx.inner_offset,
            w_off: ww.inner_offset,
            y_off: wy.inner_offset,
            eps,
            _p: [0; 2],
        };
        let groups = gpu.grid_1d((r1 - r0) as u32);
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[wx.binding, ww.binding.clone(), wy.binding], groups);
    }
    Ok(())
}

/// CPU reference of `col_sumsq_accumulate` (from zero).
pub fn col_sumsq_ref(x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0f64; cols];
    for r in 0..rows {
        for (o, &v) in out.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
            *o += v as f64 * v as f64;
        }
    }
    out
}

/// CPU reference of `rms_norm`.
pub fn rms_norm_ref(x: &[f32], w: &[f32], rows: usize, cols: usize, eps: f64) -> Vec<f64> {
    let mut y = vec![0f64; rows * cols];
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / cols as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for c in 0..cols {
            y[r * cols + c] = xr[c] as f64 * inv * w[c] as f64;
        }
    }
    y
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RowParams {
    rows: u32,
    cols: u32,
    w_off: u32,
    s_off: u32,
    o_off: u32,
    _p: [u32; 3],
}

/// out[r] = ||W[r,:] * s||_2 for W [rows, cols] (channel scoring).
pub fn row_scaled_norms(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, w: &GpuBuf, s: &GpuBuf, out: &GpuBuf, rows: usize, cols: usize) -> Result<()> {
    let pipe = gpu.pipeline("norms", SHADER, "row_scaled_norm", &[]);
    let ws = gpu.window(s, 0, cols);
    for (r0, r1) in gpu.row_chunks(rows, &[cols])? {
        let ww = gpu.window(w, r0 * cols, (r1 - r0) * cols);
        let wo = gpu.window(out, r0, r1 - r0);
        let p = RowParams { rows: (r1 - r0) as u32, cols: cols as u32, w_off: ww.inner_offset, s_off: ws.inner_offset, o_off: wo.inner_offset, _p: [0; 3] };
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[ww.binding, ws.binding.clone(), wo.binding], gpu.grid_1d((r1 - r0) as u32));
    }
    Ok(())
}

/// CPU reference of `row_scaled_norms`.
pub fn row_scaled_norms_ref(w: &[f32], s: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    (0..rows).map(|r| (0..cols).map(|c| (w[r * cols + c] as f64 * s[c] as f64).powi(2)).sum::<f64>().sqrt()).collect()
}
