//! Causal softmax attention with grouped KV heads over independent windows (calibration
//! and evaluation windows never attend across each other), and the same attention of new
//! tokens against a KV cache (generation). head_dim must be a multiple of 4.

use crate::gpu::context::{GpuBuf, Gpu, PipelineKey, Result, Shader};

pub mod reference;
pub use reference::{cached_attention_ref, causal_attention_ref};

pub(crate) const SHADER: &str = include_str!("attention.wgsl");
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
    /// Position of the first query (cached attention only).
    pos0: u32,
    _p: u32,
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
    assert!(s.head_dim <= MAX_HEAD_DIM && s.head_dim.is_multiple_of(4) && s.n_kv > 0 && s.n_heads.is_multiple_of(s.n_kv) && s.window > 0 && s.tokens.is_multiple_of(s.window));
    let pipe = gpu.pipeline(PipelineKey::new(Shader::Attention, "main"));
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
            pos0: 0,
            _p: 0,
        };
        let groups = gpu.grid_1d((n * s.n_heads) as u32);
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[wq.binding, wk.binding, wv.binding, wo.binding], groups);
    }
    Ok(())
}

/// Layout of an attention call against a KV cache: `tokens` new queries at positions
/// `pos0..pos0 + tokens`.
#[derive(Clone, Copy, Debug)]
pub struct CachedShape {
    pub tokens: usize,
    pub pos0: usize,
    pub n_heads: usize,
    pub n_kv: usize,
    pub head_dim: usize,
}

/// o = softmax(q k^T / sqrt(head_dim)) v where query t (at position pos0 + t) sees cache
/// rows 0 ..= pos0 + t. q, o: [tokens, n_heads * head_dim]; k_cache, v_cache: [capacity,
/// n_kv * head_dim] with rows up to pos0 + tokens filled (the new tokens' own included).
/// The same shader as `causal_attention` (same blocks, same order of sums), so a cached
/// step gives what a full pass over the sequence gives for its last tokens.
pub fn cached_attention(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, s: CachedShape, q: &GpuBuf, k_cache: &GpuBuf, v_cache: &GpuBuf, o: &GpuBuf) -> Result<()> {
    let qd = s.n_heads * s.head_dim;
    let kd = s.n_kv * s.head_dim;
    let keys = s.pos0 + s.tokens;
    assert!(s.head_dim <= MAX_HEAD_DIM && s.head_dim.is_multiple_of(4) && s.n_kv > 0 && s.n_heads.is_multiple_of(s.n_kv));
    assert!(q.len >= s.tokens * qd && o.len >= s.tokens * qd && k_cache.len >= keys * kd && v_cache.len >= keys * kd, "cached attention: buffers shorter than {s:?}");
    // every query binds the whole cache prefix it may see
    if keys * kd > gpu.max_binding_elems() || qd > gpu.max_binding_elems() {
        return Err(crate::gpu::context::GpuError::RowTooLarge { row_bytes: (keys * kd).max(qd) as u64 * 4, limit: gpu.max_binding_bytes() });
    }
    let pipe = gpu.pipeline(PipelineKey { shader: Shader::Attention, entry: "main", constants: &[("CACHED", 1)] });
    let per = gpu.max_binding_elems() / qd;
    for t0 in (0..s.tokens).step_by(per) {
        let t1 = (t0 + per).min(s.tokens);
        let n = t1 - t0;
        let wq = gpu.window(q, t0 * qd, n * qd);
        let wk = gpu.window(k_cache, 0, (s.pos0 + t1) * kd);
        let wv = gpu.window(v_cache, 0, (s.pos0 + t1) * kd);
        let wo = gpu.window(o, t0 * qd, n * qd);
        let p = Params {
            tokens: n as u32,
            window: n as u32,
            n_heads: s.n_heads as u32,
            n_kv: s.n_kv as u32,
            head_dim: s.head_dim as u32,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
            q_off: wq.inner_offset,
            k_off: wk.inner_offset,
            v_off: wv.inner_offset,
            o_off: wo.inner_offset,
            pos0: (s.pos0 + t0) as u32,
            _p: 0,
        };
        let groups = gpu.grid_1d((n * s.n_heads) as u32);
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[wq.binding, wk.binding, wv.binding, wo.binding], groups);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::test_util::{check, gpu, gpu_with_binding, random};

    fn attention_case(g: &Gpu, s: AttnShape) {
        let q = random(s.tokens * s.n_heads * s.head_dim, 10);
        let k = random(s.tokens * s.n_kv * s.head_dim, 11);
        let v = random(s.tokens * s.n_kv * s.head_dim, 12);
        let (gq, gk, gv) = (g.upload(&q).unwrap(), g.upload(&k).unwrap(), g.upload(&v).unwrap());
        let go = g.alloc(q.len()).unwrap();
        let mut enc = g.encoder();
        causal_attention(g, &mut enc, s, &gq, &gk, &gv, &go).unwrap();
        g.submit(enc);
        check(&format!("attention {s:?}"), &g.read(&go).unwrap(), &causal_attention_ref(s, &q, &k, &v));
    }

    #[test]
    fn attention_matches_reference() {
        let g = gpu();
        attention_case(&g, AttnShape { tokens: 1, window: 1, n_heads: 1, n_kv: 1, head_dim: 4 });
        attention_case(&g, AttnShape { tokens: 12, window: 4, n_heads: 6, n_kv: 2, head_dim: 80 });
        attention_case(&g, AttnShape { tokens: 30, window: 10, n_heads: 9, n_kv: 3, head_dim: 64 });
        // windows longer than a key block (256) exercise the online softmax
        attention_case(&g, AttnShape { tokens: 600, window: 300, n_heads: 4, n_kv: 2, head_dim: 24 });
        attention_case(&g, AttnShape { tokens: 20, window: 20, n_heads: 2, n_kv: 2, head_dim: 200 });
    }

    /// Tensors larger than one storage binding: a 4 KiB cap forces chunks of whole windows.
    #[test]
    fn tensors_larger_than_a_binding_are_split() {
        attention_case(&gpu_with_binding(4096), AttnShape { tokens: 24, window: 6, n_heads: 2, n_kv: 1, head_dim: 16 });
        cached_case(&gpu_with_binding(4096), CachedShape { tokens: 40, pos0: 5, n_heads: 2, n_kv: 1, head_dim: 16 }, 50);
    }

    /// Queries against a cache of `capacity` rows (the rows past pos0 + tokens hold garbage
    /// the kernel must not read).
    fn cached_case(g: &Gpu, s: CachedShape, capacity: usize) {
        let kd = s.n_kv * s.head_dim;
        let q = random(s.tokens * s.n_heads * s.head_dim, 20);
        let mut k = random(capacity * kd, 21);
        let mut v = random(capacity * kd, 22);
        for x in k[(s.pos0 + s.tokens) * kd..].iter_mut().chain(v[(s.pos0 + s.tokens) * kd..].iter_mut()) {
            *x = f32::NAN;
        }
        let (gq, gk, gv) = (g.upload(&q).unwrap(), g.upload(&k).unwrap(), g.upload(&v).unwrap());
        let go = g.alloc(q.len()).unwrap();
        let mut enc = g.encoder();
        cached_attention(g, &mut enc, s, &gq, &gk, &gv, &go).unwrap();
        g.submit(enc);
        check(&format!("cached attention {s:?}"), &g.read(&go).unwrap(), &cached_attention_ref(s, &q, &k, &v));
    }

    #[test]
    fn cached_attention_matches_reference() {
        let g = gpu();
        cached_case(&g, CachedShape { tokens: 1, pos0: 0, n_heads: 1, n_kv: 1, head_dim: 4 }, 1);
        cached_case(&g, CachedShape { tokens: 1, pos0: 9, n_heads: 6, n_kv: 2, head_dim: 80 }, 16);
        cached_case(&g, CachedShape { tokens: 7, pos0: 3, n_heads: 9, n_kv: 3, head_dim: 64 }, 12);
        // past one key block (256): the online softmax across blocks
        cached_case(&g, CachedShape { tokens: 2, pos0: 300, n_heads: 4, n_kv: 2, head_dim: 24 }, 400);
    }

    /// The last token's cached attention is bit for bit the full causal pass's last row
    /// (the same shader, the same order of sums): what makes cached generation reproduce
    /// the full recomputation.
    #[test]
    fn cached_attention_of_the_last_token_is_the_full_pass_last_row() {
        let g = gpu();
        let (n, nh, nkv, hd) = (37, 4, 2, 16);
        let (qd, kd) = (nh * hd, nkv * hd);
        let q = random(n * qd, 30);
        let (k, v) = (random(n * kd, 31), random(n * kd, 32));
        let (gq, gk, gv) = (g.upload(&q).unwrap(), g.upload(&k).unwrap(), g.upload(&v).unwrap());
        let full = g.alloc(n * qd).unwrap();
        let mut enc = g.encoder();
        causal_attention(&g, &mut enc, AttnShape { tokens: n, window: n, n_heads: nh, n_kv: nkv, head_dim: hd }, &gq, &gk, &gv, &full).unwrap();
        let last_q = g.upload(&q[(n - 1) * qd..]).unwrap();
        let last = g.alloc(qd).unwrap();
        cached_attention(&g, &mut enc, CachedShape { tokens: 1, pos0: n - 1, n_heads: nh, n_kv: nkv, head_dim: hd }, &last_q, &gk, &gv, &last).unwrap();
        g.submit(enc);
        assert_eq!(g.read(&last).unwrap(), g.read(&full).unwrap()[(n - 1) * qd..]);
    }
}
