//! Elementwise kernels: SiLU-gate product (SwiGLU) and addition (residuals).

use crate::gpu::context::{GpuBuf, Gpu, Result};

const SHADER: &str = include_str!("elementwise.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    a_off: u32,
    b_off: u32,
    out_off: u32,
}

fn binary(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, entry: &str, a: &GpuBuf, b: &GpuBuf, out: &GpuBuf, n: usize) -> Result<()> {
    let pipe = gpu.pipeline("elementwise", SHADER, entry, &[]);
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

/// CPU reference of `silu_mul`.
pub fn silu_mul_ref(gate: &[f32], up: &[f32]) -> Vec<f64> {
    gate.iter().zip(up).map(|(&g, &u)| (g as f64 / (1.0 + (-(g as f64)).exp())) * u as f64).collect()
}

/// CPU reference of `add`.
pub fn add_ref(a: &[f32], b: &[f32]) -> Vec<f64> {
    a.iter().zip(b).map(|(&x, &y)| x as f64 + y as f64).collect()
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
    let pipe = gpu.pipeline("elementwise", SHADER, "add_bias", &[]);
    let wb = gpu.window(bias, 0, cols);
    for (r0, r1) in gpu.row_chunks(rows, &[cols])? {
        let wx = gpu.window(x, r0 * cols, (r1 - r0) * cols);
        let n = (r1 - r0) * cols;
        let p = BiasParams { n: n as u32, cols: cols as u32, x_off: wx.inner_offset, b_off: wb.inner_offset };
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[wb.binding.clone(), wx.binding], gpu.grid_1d(n.div_ceil(256) as u32));
    }
    Ok(())
}

/// CPU reference of `add_bias`.
pub fn add_bias_ref(x: &[f32], bias: &[f32], cols: usize) -> Vec<f64> {
    x.iter().enumerate().map(|(i, &v)| v as f64 + bias[i % cols] as f64).collect()
}
