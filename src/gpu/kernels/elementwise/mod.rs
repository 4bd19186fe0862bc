//! Elementwise kernels: SiLU-gate product (SwiGLU) and addition (residuals).

use crate::gpu::context::{GpuBuf, Gpu, PipelineKey, Result, Shader};

pub mod reference;
pub use reference::{silu_mul_ref, add_ref, add_bias_ref};

pub(crate) const SHADER: &str = include_str!("elementwise.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    a_off: u32,
    b_off: u32,
    out_off: u32,
}

fn binary(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, entry: &'static str, a: &GpuBuf, b: &GpuBuf, out: &GpuBuf, n: usize) -> Result<()> {
    let pipe = gpu.pipeline(PipelineKey::new(Shader::Elementwise, entry));
    for (i0, i1) in gpu.row_chunks(n, &[1])? {
        let (wa, wb, wo) = (gpu.window(a, i0, i1 - i0), gpu.window(b, i0, i1 - i0), gpu.window(out, i0, i1 - i0));
        let p = Params { n: (i1 - i0) as u32, a_off: wa.inner_offset, b_off: wb.inner_offset, out_off: wo.inner_offset };
        let groups = gpu.grid_1d(((i1 - i0).div_ceil(256)) as u32);
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[wa.binding, wb.binding, wo.binding], groups);
    }
    Ok(())
}

/// out = silu(gate) * up over n elements (out may not alias the inputs).
pub fn silu_mul(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, gate: &GpuBuf, up: &GpuBuf, out: &GpuBuf, n: usize) -> Result<()> {
    binary(gpu, enc, "silu_mul", gate, up, out, n)
}

/// out = a + b over n elements (out may not alias the inputs).
pub fn add(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, a: &GpuBuf, b: &GpuBuf, out: &GpuBuf, n: usize) -> Result<()> {
    binary(gpu, enc, "add", a, b, out, n)
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BiasParams {
    n: u32,
    cols: u32,
    x_off: u32,
    b_off: u32,
}

/// x[r, c] += bias[c] in place, x [rows, cols].
pub fn add_bias(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, bias: &GpuBuf, rows: usize, cols: usize) -> Result<()> {
    let pipe = gpu.pipeline(PipelineKey::new(Shader::Elementwise, "add_bias"));
    let wb = gpu.window(bias, 0, cols);
    for (r0, r1) in gpu.row_chunks(rows, &[cols])? {
        let wx = gpu.window(x, r0 * cols, (r1 - r0) * cols);
        let n = (r1 - r0) * cols;
        let p = BiasParams { n: n as u32, cols: cols as u32, x_off: wx.inner_offset, b_off: wb.inner_offset };
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[wb.binding.clone(), wx.binding], gpu.grid_1d(n.div_ceil(256) as u32));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::test_util::{check, gpu, gpu_with_binding, random};

    fn elementwise_case(g: &Gpu, n: usize) {
        let a = random(n, 13 + n as u64);
        let b = random(n, 14 + n as u64);
        let (ga, gb, go) = (g.upload(&a).unwrap(), g.upload(&b).unwrap(), g.alloc(n).unwrap());
        let mut enc = g.encoder();
        silu_mul(g, &mut enc, &ga, &gb, &go, n).unwrap();
        g.submit(enc);
        check(&format!("silu_mul {n}"), &g.read(&go).unwrap(), &silu_mul_ref(&a, &b));
        let mut enc = g.encoder();
        add(g, &mut enc, &ga, &gb, &go, n).unwrap();
        g.submit(enc);
        check(&format!("add {n}"), &g.read(&go).unwrap(), &add_ref(&a, &b));
    }

    #[test]
    fn elementwise_matches_reference() {
        let g = gpu();
        for n in [1, 255, 257, 10_001] {
            elementwise_case(&g, n);
        }
    }

    /// Tensors larger than one storage binding: a 4 KiB cap forces the chunking.
    #[test]
    fn tensors_larger_than_a_binding_are_split() {
        elementwise_case(&gpu_with_binding(4096), 5000);
    }

    #[test]
    fn row_bias_matches_reference() {
        for (g, rows, cols) in [(gpu(), 1, 1), (gpu(), 13, 77), (gpu_with_binding(4096), 40, 100)] {
            let x = random(rows * cols, 41);
            let b = random(cols, 42);
            let (gx, gb) = (g.upload(&x).unwrap(), g.upload(&b).unwrap());
            let mut enc = g.encoder();
            add_bias(&g, &mut enc, &gx, &gb, rows, cols).unwrap();
            g.submit(enc);
            check(&format!("add_bias {rows}x{cols}"), &g.read(&gx).unwrap(), &add_bias_ref(&x, &b, cols));
        }
    }
}
