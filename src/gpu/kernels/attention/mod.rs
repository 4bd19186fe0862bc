//! Causal softmax attention with grouped KV heads over independent windows (calibration
//! and evaluation windows never attend across each other), and the same attention of new
//! tokens against a KV cache (generation). head_dim must be a multiple of 4. Two kernels:
//! one workgroup per (token, head) (`attention.wgsl`, CPU drivers and head_dim > 128) and a
//! flash-style one per (block of 16 queries, head) with K/V tiles in workgroup memory
//! (`flash.wgsl`, GPUs).

use crate::gpu::context::{GpuBuf, Gpu, PipelineKey, Result, Shader};

pub mod reference;
pub use reference::{cached_attention_ref, causal_attention_ref};

pub(crate) const SHADER: &str = include_str!("attention.wgsl");
pub(crate) const SHADER_FLASH: &str = include_str!("flash.wgsl");
/// Largest head dimension the shader's per-invocation accumulators cover.
pub const MAX_HEAD_DIM: usize = 256;
/// Largest head dimension of the flash kernel (its workgroup tiles hold 128 floats a row).
pub const FLASH_MAX_HEAD_DIM: usize = 128;
/// Queries per flash workgroup (flash.wgsl's BQ).
const FLASH_QUERIES: usize = 16;

/// Which attention kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// One workgroup per (token, head), keys in blocks of 256 (CPU drivers, any head_dim).
    Rows,
    /// Flash-style: 16 queries per workgroup, K/V tiles through workgroup memory, online
    /// softmax (GPUs; head_dim <= 128, else `Rows` runs).
    Flash,
}

impl AttnKernel {
    /// The default for a device type: rows on CPU drivers (workgroup memory and barriers are
    /// emulated there), flash elsewhere.
    pub fn for_device(device_type: wgpu::DeviceType) -> Self {
        if device_type == wgpu::DeviceType::Cpu {
            AttnKernel::Rows
        } else {
            AttnKernel::Flash
        }
    }

    /// Parses the `LORAP_ATTENTION_KERNEL` values `rows` and `flash`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "rows" => Some(AttnKernel::Rows),
            "flash" => Some(AttnKernel::Flash),
            _ => None,
        }
    }

    /// The kernel that runs for `head_dim` (flash only up to `FLASH_MAX_HEAD_DIM`).
    fn effective(self, head_dim: usize) -> Self {
        if self == AttnKernel::Flash && head_dim <= FLASH_MAX_HEAD_DIM {
            AttnKernel::Flash
        } else {
            AttnKernel::Rows
        }
    }

    fn pipeline(self, gpu: &Gpu, cached: bool) -> std::sync::Arc<crate::gpu::context::Pipeline> {
        let shader = if self == AttnKernel::Flash { Shader::AttentionFlash } else { Shader::Attention };
        gpu.pipeline(PipelineKey { shader, entry: "main", constants: if cached { &[("CACHED", 1)] } else { &[] } })
    }

    /// Workgroups for `tokens` queries in windows of `window` over `n_heads` heads.
    fn groups(self, gpu: &Gpu, tokens: usize, window: usize, n_heads: usize) -> (u32, u32, u32) {
        let n = match self {
            AttnKernel::Rows => tokens * n_heads,
            AttnKernel::Flash => tokens / window * window.div_ceil(FLASH_QUERIES) * n_heads,
        };
        gpu.grid_1d(n as u32)
    }
}

/// FLOPs of `queries` query rows of one head that each see at most `keys` keys (scores and
/// values), for the dispatch cap.
fn attention_flops(queries: usize, keys: usize, n_heads: usize, head_dim: usize) -> f64 {
    4.0 * queries as f64 * keys as f64 * (n_heads * head_dim) as f64
}

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
    causal_attention_with(gpu, enc, s, [q, k, v, o], gpu.attn_kernel())
}

/// `causal_attention` with the kernel chosen by the caller (tests and benchmarks compare them).
pub fn causal_attention_with(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, s: AttnShape, [q, k, v, o]: [&GpuBuf; 4], kernel: AttnKernel) -> Result<()> {
    assert!(s.head_dim <= MAX_HEAD_DIM && s.head_dim.is_multiple_of(4) && s.n_kv > 0 && s.n_heads.is_multiple_of(s.n_kv) && s.window > 0 && s.tokens.is_multiple_of(s.window));
    let kernel = kernel.effective(s.head_dim);
    let pipe = kernel.pipeline(gpu, false);
    let qd = s.n_heads * s.head_dim;
    let kd = s.n_kv * s.head_dim;
    // whole windows per chunk, so every key a query needs is bound
    let mut windows = (gpu.max_binding_elems() / (qd.max(kd) * s.window)).max(1);
    // and no dispatch over the FLOP cap (display GPUs reset a device busy for ~2 s)
    let cap = gpu.max_dispatch_flops() as f64;
    if cap > 0.0 {
        let per_window = attention_flops(s.window, s.window.div_ceil(2), s.n_heads, s.head_dim);
        windows = windows.min(((cap / per_window) as usize).max(1));
    }
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
        let groups = kernel.groups(gpu, n, s.window, s.n_heads);
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
    cached_attention_with(gpu, enc, s, [q, k_cache, v_cache, o], gpu.attn_kernel())
}

/// `cached_attention` with the kernel chosen by the caller.
pub fn cached_attention_with(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, s: CachedShape, [q, k_cache, v_cache, o]: [&GpuBuf; 4], kernel: AttnKernel) -> Result<()> {
    let qd = s.n_heads * s.head_dim;
    let kd = s.n_kv * s.head_dim;
    let keys = s.pos0 + s.tokens;
    assert!(s.head_dim <= MAX_HEAD_DIM && s.head_dim.is_multiple_of(4) && s.n_kv > 0 && s.n_heads.is_multiple_of(s.n_kv));
    assert!(q.len >= s.tokens * qd && o.len >= s.tokens * qd && k_cache.len >= keys * kd && v_cache.len >= keys * kd, "cached attention: buffers shorter than {s:?}");
    // every query binds the whole cache prefix it may see
    if keys * kd > gpu.max_binding_elems() || qd > gpu.max_binding_elems() {
        return Err(crate::gpu::context::GpuError::RowTooLarge { row_bytes: (keys * kd).max(qd) as u64 * 4, limit: gpu.max_binding_bytes() });
    }
    let kernel = kernel.effective(s.head_dim);
    let pipe = kernel.pipeline(gpu, true);
    let mut per = gpu.max_binding_elems() / qd;
    let cap = gpu.max_dispatch_flops() as f64;
    if cap > 0.0 {
        per = per.min(((cap / attention_flops(1, keys, s.n_heads, s.head_dim)) as usize).max(1));
    }
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
        // one window as long as the chunk: its queries' keys start at cache row 0
        let groups = kernel.groups(gpu, n, n, s.n_heads);
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
        let want = causal_attention_ref(s, &q, &k, &v);
        both_kernels_match(g, &format!("attention {s:?}"), [&q, &k, &v], &want, |enc, bufs, kernel| causal_attention_with(g, enc, s, bufs, kernel));
    }

    /// Runs `attend` with each attention kernel on q, k, v (uploaded once) and checks its
    /// output against `want`.
    fn both_kernels_match(g: &Gpu, what: &str, [q, k, v]: [&[f32]; 3], want: &[f64], attend: impl Fn(&mut wgpu::CommandEncoder, [&GpuBuf; 4], AttnKernel) -> Result<()>) {
        let (gq, gk, gv) = (g.upload(q).unwrap(), g.upload(k).unwrap(), g.upload(v).unwrap());
        for kernel in [AttnKernel::Rows, AttnKernel::Flash] {
            let go = g.alloc(q.len()).unwrap();
            let mut enc = g.encoder();
            attend(&mut enc, [&gq, &gk, &gv, &go], kernel).unwrap();
            g.submit(enc);
            check(&format!("{what} {kernel:?}"), &g.read(&go).unwrap(), want);
        }
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
        // flash: windows that are no multiple of its 16-query blocks or 16-key tiles (1, primes,
        // one past a block), GQA groups of 1, 3 and 4, head_dim 4 and the largest, 128
        attention_case(&g, AttnShape { tokens: 51, window: 17, n_heads: 8, n_kv: 2, head_dim: 128 });
        attention_case(&g, AttnShape { tokens: 74, window: 37, n_heads: 3, n_kv: 1, head_dim: 12 });
        attention_case(&g, AttnShape { tokens: 7, window: 1, n_heads: 3, n_kv: 3, head_dim: 4 });
        attention_case(&g, AttnShape { tokens: 131, window: 131, n_heads: 2, n_kv: 1, head_dim: 36 });
    }

    /// The dispatch FLOP cap splits a call into chunks of whole windows (both kernels).
    #[test]
    fn flop_capped_dispatches_match_reference() {
        let g = Gpu::new(&crate::gpu::GpuOptions { max_dispatch_flops: Some(40_000), ..crate::gpu::kernels::test_util::options() }).unwrap();
        attention_case(&g, AttnShape { tokens: 60, window: 20, n_heads: 4, n_kv: 2, head_dim: 16 });
        cached_case(&g, CachedShape { tokens: 9, pos0: 30, n_heads: 4, n_kv: 2, head_dim: 16 }, 40);
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
        let want = cached_attention_ref(s, &q, &k, &v);
        both_kernels_match(g, &format!("cached attention {s:?}"), [&q, &k, &v], &want, |enc, bufs, kernel| cached_attention_with(g, enc, s, bufs, kernel));
    }

    #[test]
    fn cached_attention_matches_reference() {
        let g = gpu();
        cached_case(&g, CachedShape { tokens: 1, pos0: 0, n_heads: 1, n_kv: 1, head_dim: 4 }, 1);
        cached_case(&g, CachedShape { tokens: 1, pos0: 9, n_heads: 6, n_kv: 2, head_dim: 80 }, 16);
        cached_case(&g, CachedShape { tokens: 7, pos0: 3, n_heads: 9, n_kv: 3, head_dim: 64 }, 12);
        // past one key block (256): the online softmax across blocks
        cached_case(&g, CachedShape { tokens: 2, pos0: 300, n_heads: 4, n_kv: 2, head_dim: 24 }, 400);
        // flash: more queries than one block, keys past several tiles, GQA 4
        cached_case(&g, CachedShape { tokens: 19, pos0: 23, n_heads: 8, n_kv: 2, head_dim: 128 }, 50);
    }

    /// The last token's cached attention is bit for bit the full causal pass's last row
    /// (the same shader, the same order of sums): what makes cached generation reproduce
    /// the full recomputation.
    #[test]
    fn cached_attention_of_the_last_token_is_the_full_pass_last_row() {
        for kernel in [AttnKernel::Rows, AttnKernel::Flash] {
            last_token_case(kernel);
        }
    }

    fn last_token_case(kernel: AttnKernel) {
        let g = gpu();
        let (n, nh, nkv, hd) = (37, 4, 2, 16);
        let (qd, kd) = (nh * hd, nkv * hd);
        let q = random(n * qd, 30);
        let (k, v) = (random(n * kd, 31), random(n * kd, 32));
        let (gq, gk, gv) = (g.upload(&q).unwrap(), g.upload(&k).unwrap(), g.upload(&v).unwrap());
        let full = g.alloc(n * qd).unwrap();
        let mut enc = g.encoder();
        causal_attention_with(&g, &mut enc, AttnShape { tokens: n, window: n, n_heads: nh, n_kv: nkv, head_dim: hd }, [&gq, &gk, &gv, &full], kernel).unwrap();
        let last_q = g.upload(&q[(n - 1) * qd..]).unwrap();
        let last = g.alloc(qd).unwrap();
        cached_attention_with(&g, &mut enc, CachedShape { tokens: 1, pos0: n - 1, n_heads: nh, n_kv: nkv, head_dim: hd }, [&last_q, &gk, &gv, &last], kernel).unwrap();
        g.submit(enc);
        assert_eq!(g.read(&last).unwrap(), g.read(&full).unwrap()[(n - 1) * qd..]);
    }
}
