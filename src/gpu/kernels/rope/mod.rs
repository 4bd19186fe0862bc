//! Rotary position embedding (Hugging Face rotate-half layout) with a host-built cos/sin
//! table, since GPU sin/cos of large arguments is not accurate enough everywhere.

use crate::gpu::context::{GpuBuf, Gpu, PipelineKey, Result, Shader};

pub mod reference;
pub use reference::rope_ref;

pub(crate) const SHADER: &str = include_str!("rope.wgsl");

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
    // chunks hold whole windows so positions stay t % window
    let per = (gpu.max_binding_elems() / (n_heads * table.head_dim) / window).max(1) * window;
    for t0 in (0..tokens).step_by(per) {
        rotate_rows(gpu, enc, x, (t0, (t0 + per).min(tokens)), n_heads, (window, 0), table);
    }
    Ok(())
}

/// Rotates x [tokens, n_heads*head_dim] in place for tokens at positions pos0, pos0 + 1,
/// ... (generation with a KV cache: the new tokens follow those already cached).
pub fn apply_at(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, tokens: usize, n_heads: usize, pos0: usize, table: &RopeTable) -> Result<()> {
    assert!(pos0 + tokens <= table.n_pos, "rope table shorter than the positions");
    let per = (gpu.max_binding_elems() / (n_heads * table.head_dim)).max(1);
    for t0 in (0..tokens).step_by(per) {
        let t1 = (t0 + per).min(tokens);
        // one window as long as the chunk: row t of it sits at pos0 + t0 + t
        rotate_rows(gpu, enc, x, (t0, t1), n_heads, (t1 - t0, pos0 + t0), table);
    }
    Ok(())
}

/// One dispatch over rows [t0, t1) of x; the shader puts row t at position pos0 + t % window.
fn rotate_rows(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, (t0, t1): (usize, usize), n_heads: usize, (window, pos0): (usize, usize), table: &RopeTable) {
    let pipe = gpu.pipeline(PipelineKey::new(Shader::Rope, "main"));
    let hd = table.head_dim;
    let wt = gpu.window(&table.buf, 0, table.buf.len);
    let wx = gpu.window(x, t0 * n_heads * hd, (t1 - t0) * n_heads * hd);
    let p = Params {
        tokens: (t1 - t0) as u32,
        n_heads: n_heads as u32,
        head_dim: hd as u32,
        window: window as u32,
        pos0: pos0 as u32,
        n_pos: table.n_pos as u32,
        x_off: wx.inner_offset,
        _p: 0,
    };
    let n = ((t1 - t0) * n_heads * hd / 2).div_ceil(256) as u32;
    gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[wx.binding, wt.binding], gpu.grid_1d(n));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::test_util::{check, gpu, gpu_with_binding, random};

    fn rope_case(g: &Gpu, tokens: usize, heads: usize, hd: usize, window: usize, theta: f64) {
        let x = random(tokens * heads * hd, 9 + tokens as u64);
        let gx = g.upload(&x).unwrap();
        let table = RopeTable::new(g, window, hd, theta).unwrap();
        let mut enc = g.encoder();
        apply(g, &mut enc, &gx, tokens, heads, window, &table).unwrap();
        g.submit(enc);
        check(&format!("rope {tokens}x{heads}x{hd} w{window}"), &g.read(&gx).unwrap(), &rope_ref(&x, tokens, heads, hd, window, theta));
    }

    #[test]
    fn rope_matches_reference() {
        let g = gpu();
        rope_case(&g, 6, 1, 2, 3, 10000.0);
        rope_case(&g, 40, 3, 64, 20, 100000.0);
        rope_case(&g, 600, 2, 128, 600, 500000.0);
    }

    /// Tensors larger than one storage binding: a 4 KiB cap forces chunks of whole windows.
    #[test]
    fn tensors_larger_than_a_binding_are_split() {
        rope_case(&gpu_with_binding(4096), 64, 2, 16, 8, 10000.0);
        rope_at_case(&gpu_with_binding(4096), 70, 2, 16, 9);
    }

    /// Rows at positions pos0.. rotate as the last rows of one window from position 0.
    fn rope_at_case(g: &Gpu, tokens: usize, heads: usize, hd: usize, pos0: usize) {
        let row = heads * hd;
        let x = random((pos0 + tokens) * row, 40 + tokens as u64);
        let gx = g.upload(&x[pos0 * row..]).unwrap();
        let table = RopeTable::new(g, pos0 + tokens, hd, 10000.0).unwrap();
        let mut enc = g.encoder();
        apply_at(g, &mut enc, &gx, tokens, heads, pos0, &table).unwrap();
        g.submit(enc);
        let want = rope_ref(&x, pos0 + tokens, heads, hd, pos0 + tokens, 10000.0);
        check(&format!("rope at {pos0}: {tokens}x{heads}x{hd}"), &g.read(&gx).unwrap(), &want[pos0 * row..]);
    }

    #[test]
    fn rope_at_positions_matches_reference() {
        let g = gpu();
        rope_at_case(&g, 1, 3, 64, 0);
        rope_at_case(&g, 1, 3, 64, 517);
        rope_at_case(&g, 12, 2, 32, 40);
    }
}
