//! Token negative log-likelihood from logits (log-softmax at the target), row by row.

use crate::gpu::context::{GpuBuf, Gpu, Result};

const SHADER: &str = include_str!("loss.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    l_off: u32,
    t_off: u32,
    o_off: u32,
    _p: [u32; 3],
}

/// nll[r] = logsumexp(logits[r]) - logits[r, targets[r]] for logits [rows, cols].
pub fn nll_rows(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, logits: &GpuBuf, targets: &GpuBuf, nll: &GpuBuf, rows: usize, cols: usize) -> Result<()> {
    let pipe = gpu.pipeline("loss", SHADER, "main", &[]);
    for (r0, r1) in gpu.row_chunks(rows, &[cols])? {
        let wl = gpu.window(logits, r0 * cols, (r1 - r0) * cols);
        let wt = gpu.window(targets, r0, r1 - r0);
        let wo = gpu.window(nll, r0, r1 - r0);
        let p = Params { rows: (r1 - r0) as u32, cols: cols as u32, l_off: wl.inner_offset, t_off: wt.inner_offset, o_off: wo.inner_offset, _p: [0; 3] };
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[wl.binding, wt.binding, wo.binding], gpu.grid_1d((r1 - r0) as u32));
    }
    Ok(())
}

/// CPU reference.
pub fn nll_rows_ref(logits: &[f32], targets: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    (0..rows)
        .map(|r| {
            let row = &logits[r * cols..(r + 1) * cols];
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
            m + z.ln() - row[targets[r] as usize] as f64
        })
        .collect()
}
