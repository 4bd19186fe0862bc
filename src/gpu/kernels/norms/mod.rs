//! Column sums of squares (activation statistics, accumulated over row chunks) and
//! row-wise RMSNorm.

use crate::gpu::context::{GpuBuf, Gpu, PipelineKey, Result, Shader};

pub mod reference;
pub use reference::{col_sumsq_ref, rms_norm_ref, row_scaled_norms_ref};

pub(crate) const SHADER: &str = include_str!("norms.wgsl");

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
    let pipe = gpu.pipeline(PipelineKey::new(Shader::Norms, "col_sumsq"));
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

/// Rows, width and epsilon of one RMSNorm.
#[derive(Clone, Copy, Debug)]
pub struct NormShape {
    pub rows: usize,
    pub cols: usize,
    pub eps: f32,
}

/// y = rmsnorm(x) * w, row-wise, X [rows, cols].
pub fn rms_norm(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, w: &GpuBuf, y: &GpuBuf, shape: NormShape) -> Result<()> {
    let NormShape { rows, cols, eps } = shape;
    let pipe = gpu.pipeline(PipelineKey::new(Shader::Norms, "rms_norm"));
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
    let pipe = gpu.pipeline(PipelineKey::new(Shader::Norms, "row_scaled_norm"));
    let ws = gpu.window(s, 0, cols);
    for (r0, r1) in gpu.row_chunks(rows, &[cols])? {
        let ww = gpu.window(w, r0 * cols, (r1 - r0) * cols);
        let wo = gpu.window(out, r0, r1 - r0);
        let p = RowParams { rows: (r1 - r0) as u32, cols: cols as u32, w_off: ww.inner_offset, s_off: ws.inner_offset, o_off: wo.inner_offset, _p: [0; 3] };
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[ww.binding, ws.binding.clone(), wo.binding], gpu.grid_1d((r1 - r0) as u32));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::test_util::{check, gpu, gpu_with_binding, random};

    fn col_sumsq_case(g: &Gpu, chunks: &[usize], cols: usize) {
        let total: usize = chunks.iter().sum();
        let x = random(total * cols, 6 + cols as u64);
        let out = g.zeros(cols).unwrap();
        let mut r0 = 0;
        for &rows in chunks {
            let part = g.upload(&x[r0 * cols..(r0 + rows) * cols]).unwrap();
            let mut enc = g.encoder();
            col_sumsq_accumulate(g, &mut enc, &part, rows, cols, &out).unwrap();
            g.submit(enc);
            r0 += rows;
        }
        check(&format!("col_sumsq {chunks:?}x{cols}"), &g.read(&out).unwrap(), &col_sumsq_ref(&x, total, cols));
    }

    fn rms_norm_case(g: &Gpu, rows: usize, cols: usize) {
        let x = random(rows * cols, 7 + rows as u64);
        let w = random(cols, 8);
        let (gx, gw, gy) = (g.upload(&x).unwrap(), g.upload(&w).unwrap(), g.alloc(rows * cols).unwrap());
        let mut enc = g.encoder();
        rms_norm(g, &mut enc, &gx, &gw, &gy, NormShape { rows, cols, eps: 1e-5 }).unwrap();
        g.submit(enc);
        check(&format!("rms_norm {rows}x{cols}"), &g.read(&gy).unwrap(), &rms_norm_ref(&x, &w, rows, cols, 1e-5));
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

    /// Tensors larger than one storage binding: a 4 KiB cap forces the row chunking.
    #[test]
    fn tensors_larger_than_a_binding_are_split() {
        let g = gpu_with_binding(4096);
        col_sumsq_case(&g, &[90], 33);
        rms_norm_case(&g, 40, 100);
    }

    #[test]
    fn row_scaled_norms_match_reference() {
        for (g, rows, cols) in [(gpu(), 1, 1), (gpu(), 300, 97), (gpu(), 7, 1536), (gpu_with_binding(4096), 50, 130)] {
            let w = random(rows * cols, 50);
            let s: Vec<f32> = random(cols, 51).iter().map(|x| x.abs()).collect();
            let (gw, gs, go) = (g.upload(&w).unwrap(), g.upload(&s).unwrap(), g.alloc(rows).unwrap());
            let mut enc = g.encoder();
            row_scaled_norms(&g, &mut enc, &gw, &gs, &go, rows, cols).unwrap();
            g.submit(enc);
            check(&format!("row_scaled_norms {rows}x{cols}"), &g.read(&go).unwrap(), &row_scaled_norms_ref(&w, &s, rows, cols));
        }
    }
}
