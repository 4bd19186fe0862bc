//! Token negative log-likelihood from logits (log-softmax at the target), row by row.

use crate::gpu::context::{GpuBuf, Gpu, PipelineKey, Result, Shader};

pub mod reference;
pub use reference::nll_rows_ref;

pub(crate) const SHADER: &str = include_str!("loss.wgsl");

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
    let pipe = gpu.pipeline(PipelineKey::new(Shader::Loss, "main"));
    for (r0, r1) in gpu.row_chunks(rows, &[cols])? {
        let wl = gpu.window(logits, r0 * cols, (r1 - r0) * cols);
        let wt = gpu.window(targets, r0, r1 - r0);
        let wo = gpu.window(nll, r0, r1 - r0);
        let p = Params { rows: (r1 - r0) as u32, cols: cols as u32, l_off: wl.inner_offset, t_off: wt.inner_offset, o_off: wo.inner_offset, _p: [0; 3] };
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[wl.binding, wt.binding, wo.binding], gpu.grid_1d((r1 - r0) as u32));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::test_util::{check, gpu, gpu_with_binding, random};

    #[test]
    fn token_nll_matches_reference() {
        for (g, rows, cols) in [(gpu(), 1, 1), (gpu(), 5, 1000), (gpu(), 33, 49152), (gpu_with_binding(8192), 7, 1500)] {
            let logits: Vec<f32> = random(rows * cols, 40).iter().map(|x| 8.0 * x).collect();
            let targets: Vec<f32> = (0..rows).map(|r| ((r * 7919) % cols) as f32).collect();
            let (gl, gt, gn) = (g.upload(&logits).unwrap(), g.upload(&targets).unwrap(), g.alloc(rows).unwrap());
            let mut enc = g.encoder();
            nll_rows(&g, &mut enc, &gl, &gt, &gn, rows, cols).unwrap();
            g.submit(enc);
            check(&format!("nll {rows}x{cols}"), &g.read(&gn).unwrap(), &nll_rows_ref(&logits, &targets, rows, cols));
        }
    }

    /// A target past the vocabulary has no logit: NaN, never another row's value.
    #[test]
    fn out_of_vocabulary_target_gives_nan() {
        let g = gpu();
        let (rows, cols) = (3, 17);
        let logits = random(rows * cols, 41);
        let (gl, gt, gn) = (g.upload(&logits).unwrap(), g.upload(&[2.0, 17.0, 16.0]).unwrap(), g.alloc(rows).unwrap());
        let mut enc = g.encoder();
        nll_rows(&g, &mut enc, &gl, &gt, &gn, rows, cols).unwrap();
        g.submit(enc);
        let got = g.read(&gn).unwrap();
        assert!(got[0].is_finite() && got[1].is_nan() && got[2].is_finite(), "{got:?}");
    }
}
