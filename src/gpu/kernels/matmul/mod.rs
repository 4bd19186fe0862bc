//! Tiled f32 matmul (optionally transposed operands, alpha/beta accumulation) and the Gram
//! matrix X^T X accumulated over row chunks; splits any problem whose operands exceed one
//! storage binding.

use crate::gpu::context::{GpuBuf, Gpu, PipelineKey, Result, Shader};

pub mod reference;
pub use reference::{transpose_ref, matmul_ref, matmul_nt_ref, gram_ref};

pub(crate) const SHADER: &str = include_str!("matmul.wgsl");
pub(crate) const SHADER_NT_VEC4: &str = include_str!("matmul_nt_vec4.wgsl");
pub(crate) const SHADER_TRANSPOSE: &str = include_str!("transpose.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct TransposeParams {
    rows: u32,
    cols: u32,
    ld_in: u32,
    in_off: u32,
    out_off: u32,
    _pad: [u32; 3],
}

/// Largest side `transpose` handles in one dispatch (16-wide workgroups, 65535 per axis).
const TRANSPOSE_MAX_SIDE: usize = 16 * 65535;

/// Records dst [cols, rows] = the [rows, cols] block of `src` at element `offset` with
/// leading dimension `ld`, transposed, into a new packed buffer. The block and the result
/// must each fit one storage binding (`transpose_fits`).
pub fn transpose(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, src: &GpuBuf, offset: usize, ld: usize, rows: usize, cols: usize) -> Result<GpuBuf> {
    let dst = gpu.alloc(rows * cols)?;
    if rows == 0 || cols == 0 {
        return Ok(dst);
    }
    let ws = gpu.window(src, offset, (rows - 1) * ld + cols);
    let wd = gpu.window(&dst, 0, rows * cols);
    let p = TransposeParams { rows: rows as u32, cols: cols as u32, ld_in: ld as u32, in_off: ws.inner_offset, out_off: wd.inner_offset, _pad: [0; 3] };
    let pipe = gpu.pipeline(PipelineKey::new(Shader::Transpose, "main"));
    gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[ws.binding, wd.binding], (cols.div_ceil(16) as u32, rows.div_ceil(16) as u32, 1));
    Ok(dst)
}

/// Whether `transpose` takes this block in one dispatch.
pub fn transpose_fits(gpu: &Gpu, ld: usize, rows: usize, cols: usize) -> bool {
    let cap = gpu.max_binding_elems();
    rows > 0 && cols > 0 && rows <= TRANSPOSE_MAX_SIDE && cols <= TRANSPOSE_MAX_SIDE && (rows - 1) * ld + cols <= cap && rows * cols <= cap
}

/// Which kernel runs A B^T products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NtKernel {
    /// 64x64 workgroup tiles through workgroup memory (GPUs).
    Tiled,
    /// Register-blocked vec4 kernel without workgroup memory (CPU drivers).
    Vec4,
}

impl NtKernel {
    /// The default for a device type: vec4 on CPU drivers, tiled elsewhere.
    pub fn for_device(device_type: wgpu::DeviceType) -> Self {
        if device_type == wgpu::DeviceType::Cpu {
            NtKernel::Vec4
        } else {
            NtKernel::Tiled
        }
    }
}

/// The kernel `gemm` uses for A B^T on this adapter (`LORAP_NT_KERNEL=tiled|vec4`, read
/// once when the `Gpu` is opened, overrides).
pub fn nt_kernel(gpu: &Gpu) -> NtKernel {
    gpu.nt_kernel()
}

/// The tiled shader's override constants for an operand layout (bools as 0/1).
fn trans_constants(trans_a: bool, trans_b: bool) -> &'static [(&'static str, u32)] {
    match (trans_a, trans_b) {
        (false, false) => &[("TRANS_A", 0), ("TRANS_B", 0)],
        (true, false) => &[("TRANS_A", 1), ("TRANS_B", 0)],
        (false, true) => &[("TRANS_A", 0), ("TRANS_B", 1)],
        (true, true) => &[("TRANS_A", 1), ("TRANS_B", 1)],
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
    alpha: f32,
    beta: f32,
    _pad: u32,
}

/// One operand: a buffer, its element offset and leading dimension.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub buf: &'a GpuBuf,
    pub offset: usize,
    pub ld: usize,
    /// Stored transposed relative to the maths (see the shader's header).
    pub trans: bool,
}

impl<'a> Operand<'a> {
    pub fn new(buf: &'a GpuBuf, ld: usize) -> Self {
        Operand { buf, offset: 0, ld, trans: false }
    }
    pub fn t(mut self) -> Self {
        self.trans = !self.trans;
        self
    }
}

/// Shape of C = alpha op(A) op(B) + beta C: op(A) is [m,k], op(B) is [k,n], C is [m,n].
#[derive(Clone, Copy, Debug)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Element span [first, last+1) that rows r0..r1 x cols c0..c1 of a row-major operand touch.
fn span(offset: usize, ld: usize, r0: usize, r1: usize, c0: usize, c1: usize) -> (usize, usize) {
    (offset + r0 * ld + c0, offset + (r1 - 1) * ld + c1)
}

#[derive(Clone, Copy, Debug)]
struct Block {
    m0: usize,
    m1: usize,
    n0: usize,
    n1: usize,
    k0: usize,
    k1: usize,
}

/// Records C = alpha op(A) op(B) + beta C. C has leading dimension `ldc`, offset `c_off`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    gpu: &Gpu,
    enc: &mut wgpu::CommandEncoder,
    shape: GemmShape,
    a: Operand,
    b: Operand,
    c: &GpuBuf,
    c_off: usize,
    ldc: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    gemm_with(gpu, enc, shape, a, b, c, c_off, ldc, alpha, beta, nt_kernel(gpu))
}

/// `gemm` with the A B^T kernel chosen by the caller (tests and benchmarks compare both).
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(
    gpu: &Gpu,
    enc: &mut wgpu::CommandEncoder,
    shape: GemmShape,
    a: Operand,
    b: Operand,
    c: &GpuBuf,
    c_off: usize,
    ldc: usize,
    alpha: f32,
    beta: f32,
    nt: NtKernel,
) -> Result<()> {
    if shape.m == 0 || shape.n == 0 {
        return Ok(());
    }
    // On CPU adapters the A B^T kernel is ~4x faster than the tiled one: other layouts
    // get their transposed operand copied once (O(size), cheap next to the product).
    if nt == NtKernel::Vec4 && (a.trans || !b.trans) && shape.k.is_multiple_of(4) {
        let (k, m, n) = (shape.k, shape.m, shape.n);
        let same = a.trans && !b.trans && std::ptr::eq(a.buf, b.buf) && a.offset == b.offset && a.ld == b.ld && m == n;
        let a_ok = !a.trans || transpose_fits(gpu, a.ld, k, m);
        let b_ok = b.trans || transpose_fits(gpu, b.ld, k, n);
        if a_ok && b_ok {
            let at = if a.trans { Some(transpose(gpu, enc, a.buf, a.offset, a.ld, k, m)?) } else { None };
            // X^T X (the Gram matrix) needs the one copy for both sides
            let bt = if b.trans || same { None } else { Some(transpose(gpu, enc, b.buf, b.offset, b.ld, k, n)?) };
            let a2 = at.as_ref().map_or(a, |t| Operand::new(t, k));
            let b2 = match (&bt, same) {
                (Some(t), _) => Operand::new(t, k).t(),
                (None, true) => Operand::new(at.as_ref().unwrap(), k).t(),
                (None, false) => b,
            };
            return gemm_with(gpu, enc, shape, a2, b2, c, c_off, ldc, alpha, beta, nt);
        }
    }
    // vec4 loads need K, leading dimensions and offsets in whole vec4s
    let vec4 = nt == NtKernel::Vec4
        && !a.trans
        && b.trans
        && shape.k.is_multiple_of(4)
        && a.ld.is_multiple_of(4)
        && b.ld.is_multiple_of(4)
        && a.offset.is_multiple_of(4)
        && b.offset.is_multiple_of(4)
        && gpu.limits.min_storage_buffer_offset_alignment.is_multiple_of(16);
    let pipe = if vec4 {
        gpu.pipeline(PipelineKey::new(Shader::MatmulNtVec4, "main"))
    } else {
        gpu.pipeline(PipelineKey { shader: Shader::Matmul, entry: "main", constants: trans_constants(a.trans, b.trans) })
    };
    let cap = gpu.max_binding_elems();
    let mut stack = vec![(Block { m0: 0, m1: shape.m, n0: 0, n1: shape.n, k0: 0, k1: shape.k.max(1) }, beta)];
    while let Some((blk, beta)) = stack.pop() {
        let (a_lo, a_hi) = if a.trans {
            span(a.offset, a.ld, blk.k0, blk.k1, blk.m0, blk.m1)
        } else {
            span(a.offset, a.ld, blk.m0, blk.m1, blk.k0, blk.k1)
        };
        let (b_lo, b_hi) = if b.trans {
            span(b.offset, b.ld, blk.n0, blk.n1, blk.k0, blk.k1)
        } else {
            span(b.offset, b.ld, blk.k0, blk.k1, blk.n0, blk.n1)
        };
        let (c_lo, c_hi) = span(c_off, ldc, blk.m0, blk.m1, blk.n0, blk.n1);
        // Split the axis that makes the oversized operand's rows; K splits accumulate.
        let split = if a_hi - a_lo > cap {
            Some(if a.trans { 'k' } else { 'm' })
        } else if b_hi - b_lo > cap {
            Some(if b.trans { 'n' } else { 'k' })
        } else if c_hi - c_lo > cap {
            Some(if blk.m1 - blk.m0 > 1 { 'm' } else { 'n' })
        } else {
            None
        };
        if let Some(axis) = split {
            let (lo, hi) = match axis {
                'm' => (blk.m0, blk.m1),
                'n' => (blk.n0, blk.n1),
                _ => (blk.k0, blk.k1),
            };
            if hi - lo < 2 {
                return Err(crate::gpu::context::GpuError::RowTooLarge {
                    row_bytes: (a_hi - a_lo).max(b_hi - b_lo).max(c_hi - c_lo) as u64 * 4,
                    limit: gpu.max_binding_bytes(),
                });
            }
            let mut mid = lo + (hi - lo) / 2;
            if mid - lo >= 64 {
                mid = lo + (mid - lo) / 64 * 64;
            }
            let (first, second) = match axis {
                'm' => (Block { m1: mid, ..blk }, Block { m0: mid, ..blk }),
                'n' => (Block { n1: mid, ..blk }, Block { n0: mid, ..blk }),
                _ => (Block { k1: mid, ..blk }, Block { k0: mid, ..blk }),
            };
            // K halves: the first applies beta, the second accumulates onto it.
            let second_beta = if axis == 'k' { 1.0 } else { beta };
            stack.push((second, second_beta));
            stack.push((first, beta));
            continue;
        }
        let wa = gpu.window(a.buf, a_lo, a_hi - a_lo);
        let wb = gpu.window(b.buf, b_lo, b_hi - b_lo);
        let wc = gpu.window(c, c_lo, c_hi - c_lo);
        let params = Params {
            m: (blk.m1 - blk.m0) as u32,
            n: (blk.n1 - blk.n0) as u32,
            k: if shape.k == 0 { 0 } else { (blk.k1 - blk.k0) as u32 },
            lda: a.ld as u32,
            ldb: b.ld as u32,
            ldc: ldc as u32,
            a_off: wa.inner_offset,
            b_off: wb.inner_offset,
            c_off: wc.inner_offset,
            alpha,
            beta,
            _pad: 0,
        };
        let tile = if vec4 { 32 } else { 64 };
        let groups = ((blk.n1 - blk.n0).div_ceil(tile) as u32, (blk.m1 - blk.m0).div_ceil(tile) as u32, 1);
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&params), &[wa.binding, wb.binding, wc.binding], groups);
    }
    Ok(())
}

/// C[m,n] = A[m,k] B[k,n] (all row-major), into a new buffer.
pub fn matmul(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, a: &GpuBuf, b: &GpuBuf, m: usize, k: usize, n: usize) -> Result<GpuBuf> {
    let c = gpu.alloc(m * n)?;
    gemm(gpu, enc, GemmShape { m, n, k }, Operand::new(a, k), Operand::new(b, n), &c, 0, n, 1.0, 0.0)?;
    Ok(c)
}

/// Y[m,n] = X[m,k] W^T with W stored [n,k] (a linear layer's weight).
pub fn matmul_nt(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, w: &GpuBuf, m: usize, k: usize, n: usize) -> Result<GpuBuf> {
    let y = gpu.alloc(m * n)?;
    linear_into(gpu, enc, x, w, &y, m, k, n, 0.0)?;
    Ok(y)
}

/// Y = X W^T + beta Y, into an existing buffer.
#[allow(clippy::too_many_arguments)]
pub fn linear_into(
    gpu: &Gpu,
    enc: &mut wgpu::CommandEncoder,
    x: &GpuBuf,
    w: &GpuBuf,
    y: &GpuBuf,
    m: usize,
    k: usize,
    n: usize,
    beta: f32,
) -> Result<()> {
    gemm(gpu, enc, GemmShape { m, n, k }, Operand::new(x, k), Operand::new(w, k).t(), y, 0, n, 1.0, beta)
}

/// G[cols,cols] += X^T X for X [rows, cols] row-major (one chunk of calibration rows).
pub fn gram_accumulate(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, rows: usize, cols: usize, g: &GpuBuf) -> Result<()> {
    gemm(
        gpu,
        enc,
        GemmShape { m: cols, n: cols, k: rows },
        Operand::new(x, cols).t(),
        Operand::new(x, cols),
        g,
        0,
        cols,
        1.0,
        1.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::test_util::{check, gpu, gpu_with_binding, random};

    fn matmul_case(g: &Gpu, m: usize, k: usize, n: usize) {
        let a = random(m * k, 1 + m as u64);
        let b = random(k * n, 2 + n as u64);
        let (ga, gb) = (g.upload(&a).unwrap(), g.upload(&b).unwrap());
        let mut enc = g.encoder();
        let c = matmul(g, &mut enc, &ga, &gb, m, k, n).unwrap();
        g.submit(enc);
        check(&format!("matmul {m}x{k}x{n}"), &g.read(&c).unwrap(), &matmul_ref(&a, &b, m, k, n));
    }

    fn matmul_nt_case(g: &Gpu, m: usize, k: usize, n: usize) {
        let x = random(m * k, 3 + k as u64);
        let w = random(n * k, 4 + m as u64);
        let (gx, gw) = (g.upload(&x).unwrap(), g.upload(&w).unwrap());
        let mut enc = g.encoder();
        let y = matmul_nt(g, &mut enc, &gx, &gw, m, k, n).unwrap();
        g.submit(enc);
        check(&format!("matmul_nt {m}x{k}x{n}"), &g.read(&y).unwrap(), &matmul_nt_ref(&x, &w, m, k, n));
    }

    fn gram_case(g: &Gpu, chunks: &[usize], cols: usize) {
        let total: usize = chunks.iter().sum();
        let x = random(total * cols, 5 + cols as u64);
        let gg = g.zeros(cols * cols).unwrap();
        let mut r0 = 0;
        for &rows in chunks {
            let part = g.upload(&x[r0 * cols..(r0 + rows) * cols]).unwrap();
            let mut enc = g.encoder();
            gram_accumulate(g, &mut enc, &part, rows, cols, &gg).unwrap();
            g.submit(enc);
            r0 += rows;
        }
        check(&format!("gram {chunks:?}x{cols}"), &g.read(&gg).unwrap(), &gram_ref(&x, total, cols));
    }

    #[test]
    fn matmul_matches_reference() {
        let g = gpu();
        for (m, k, n) in [(1, 1, 1), (7, 13, 5), (64, 64, 64), (65, 129, 33), (130, 70, 257), (3, 500, 2)] {
            matmul_case(&g, m, k, n);
        }
    }

    #[test]
    fn matmul_transposed_matches_reference() {
        let g = gpu();
        for (m, k, n) in [(1, 1, 1), (9, 17, 31), (100, 576, 192), (129, 65, 64)] {
            matmul_nt_case(&g, m, k, n);
        }
    }

    #[test]
    fn matmul_alpha_beta_accumulates() {
        let g = gpu();
        let (m, k, n) = (37, 45, 29);
        let (a, b, c0) = (random(m * k, 20), random(k * n, 21), random(m * n, 22));
        let (ga, gb, gc) = (g.upload(&a).unwrap(), g.upload(&b).unwrap(), g.upload(&c0).unwrap());
        let mut enc = g.encoder();
        gemm(&g, &mut enc, GemmShape { m, n, k }, Operand::new(&ga, k), Operand::new(&gb, n), &gc, 0, n, 0.5, -2.0).unwrap();
        g.submit(enc);
        let ab = matmul_ref(&a, &b, m, k, n);
        let want: Vec<f64> = ab.iter().zip(&c0).map(|(&x, &c)| 0.5 * x - 2.0 * c as f64).collect();
        check("gemm alpha/beta", &g.read(&gc).unwrap(), &want);
    }

    #[test]
    fn gram_accumulates_over_row_chunks() {
        let g = gpu();
        gram_case(&g, &[1], 1);
        gram_case(&g, &[50, 3, 77], 45);
        gram_case(&g, &[128, 128, 1], 200);
    }

    /// Operands larger than one storage binding: a 4 KiB cap forces every product to split.
    #[test]
    fn products_larger_than_a_binding_are_split() {
        let g = gpu_with_binding(4096);
        assert_eq!(g.max_binding_bytes(), 4096);
        matmul_case(&g, 70, 50, 40);
        matmul_nt_case(&g, 33, 100, 70);
        gram_case(&g, &[60, 41], 30);
    }

    /// Both A B^T kernels (tiled for GPUs, vec4 for CPU drivers), including shapes where the
    /// vec4 kernel must fall back (K not a multiple of 4) and offsets inside a buffer.
    #[test]
    fn both_nt_kernels_match_reference() {
        for g in [gpu(), gpu_with_binding(8192)] {
            for nt in [NtKernel::Tiled, NtKernel::Vec4] {
                for (m, k, n) in [(1, 4, 1), (5, 8, 3), (37, 64, 29), (70, 576, 33), (9, 13, 7), (130, 100, 65)] {
                    let x = random(m * k + 8, 60 + k as u64);
                    let w = random(n * k, 61 + n as u64);
                    let (gx, gw, gy) = (g.upload(&x).unwrap(), g.upload(&w).unwrap(), g.alloc(m * n).unwrap());
                    let mut enc = g.encoder();
                    // A starts 8 elements into its buffer
                    let a = Operand { buf: &gx, offset: 8, ld: k, trans: false };
                    gemm_with(&g, &mut enc, GemmShape { m, n, k }, a, Operand::new(&gw, k).t(), &gy, 0, n, 1.0, 0.0, nt).unwrap();
                    g.submit(enc);
                    check(&format!("{nt:?} {m}x{k}x{n}"), &g.read(&gy).unwrap(), &matmul_nt_ref(&x[8..], &w, m, k, n));
                }
            }
        }
    }

    /// Transpose against its reference, and every operand layout through the vec4 path (which
    /// transposes NN / TN / NT-less operands first), at awkward shapes, with offsets, and with
    /// a small binding cap (where the copies do not fit and the tiled kernel takes over).
    #[test]
    fn transpose_and_vec4_layouts_match_reference() {
        for g in [gpu(), gpu_with_binding(8192)] {
            for (rows, cols, ld) in [(1, 1, 1), (3, 17, 20), (64, 48, 48), (100, 7, 9)] {
                let src = random(5 + rows * ld, 90 + rows as u64);
                let gs = g.upload(&src).unwrap();
                let mut enc = g.encoder();
                if transpose_fits(&g, ld, rows, cols) {
                    let t = transpose(&g, &mut enc, &gs, 5, ld, rows, cols).unwrap();
                    g.submit(enc);
                    check(&format!("transpose {rows}x{cols} ld {ld}"), &g.read(&t).unwrap(), &transpose_ref(&src, 5, ld, rows, cols));
                }
            }
            for (m, k, n) in [(5, 8, 3), (37, 64, 29), (70, 96, 33), (9, 13, 7)] {
                for (ta, tb) in [(false, false), (true, false), (true, true), (false, true)] {
                    let a = random(m * k, 70 + m as u64);
                    let b = random(k * n, 71 + n as u64);
                    // store each operand as the layout says: transposed means [cols, rows] in memory
                    let store = |v: &[f32], r: usize, c: usize, t: bool| if t { transpose_ref(v, 0, c, r, c).iter().map(|&x| x as f32).collect() } else { v.to_vec() };
                    let (ga, gb) = (g.upload(&store(&a, m, k, ta)).unwrap(), g.upload(&store(&b, k, n, tb)).unwrap());
                    let gc = g.alloc(m * n).unwrap();
                    let mut enc = g.encoder();
                    let oa = Operand { buf: &ga, offset: 0, ld: if ta { m } else { k }, trans: ta };
                    let ob = Operand { buf: &gb, offset: 0, ld: if tb { k } else { n }, trans: tb };
                    gemm_with(&g, &mut enc, GemmShape { m, n, k }, oa, ob, &gc, 0, n, 1.0, 0.0, NtKernel::Vec4).unwrap();
                    g.submit(enc);
                    check(&format!("vec4 path {m}x{k}x{n} trans ({ta},{tb})"), &g.read(&gc).unwrap(), &matmul_ref(&a, &b, m, k, n));
                }
            }
        }
    }

    /// The tiled kernel's four layouts are four pipelines, each compiled once.
    #[test]
    fn layouts_compile_once() {
        let g = gpu_with_binding(1 << 20);
        let (a, b) = (g.upload(&random(64, 1)).unwrap(), g.upload(&random(64, 2)).unwrap());
        let c = g.alloc(64).unwrap();
        let mut counts = Vec::new();
        for _ in 0..2 {
            let mut enc = g.encoder();
            for (ta, tb) in [(false, false), (true, false), (true, true), (false, true)] {
                let (oa, ob) = (Operand { buf: &a, offset: 0, ld: 8, trans: ta }, Operand { buf: &b, offset: 0, ld: 8, trans: tb });
                gemm_with(&g, &mut enc, GemmShape { m: 8, n: 8, k: 8 }, oa, ob, &c, 0, 8, 1.0, 0.0, NtKernel::Tiled).unwrap();
            }
            g.submit(enc);
            counts.push(g.pipeline_count());
        }
        assert_eq!(counts, [4, 4]);
    }
}
