//! Tiled f32 matmul (optionally transposed operands, alpha/beta accumulation) and the Gram
//! matrix X^T X accumulated over row chunks; splits any problem whose operands exceed one
//! storage binding.

use crate::gpu::context::{GpuBuf, Gpu, Result};

const SHADER: &str = include_str!("matmul.wgsl");
const SHADER_NT_VEC4: &str = include_str!("matmul_nt_vec4.wgsl");
const SHADER_TRANSPOSE: &str = include_str!("transpose.wgsl");

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
    let pipe = gpu.pipeline("transpose", SHADER_TRANSPOSE, "main", &[]);
    gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[ws.binding, wd.binding], (cols.div_ceil(16) as u32, rows.div_ceil(16) as u32, 1));
    Ok(dst)
}

/// Whether `transpose` takes this block in one dispatch.
pub fn transpose_fits(gpu: &Gpu, ld: usize, rows: usize, cols: usize) -> bool {
    let cap = gpu.max_binding_elems();
    rows > 0 && cols > 0 && rows <= TRANSPOSE_MAX_SIDE && cols <= TRANSPOSE_MAX_SIDE && (rows - 1) * ld + cols <= cap && rows * cols <= cap
}

/// CPU reference of `transpose`.
pub fn transpose_ref(src: &[f32], offset: usize, ld: usize, rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0f64; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = src[offset + r * ld + c] as f64;
        }
    }
    out
}

/// Which kernel runs A B^T products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NtKernel {
    /// 64x64 workgroup tiles through workgroup memory (GPUs).
    Tiled,
    /// Register-blocked vec4 kernel without workgroup memory (CPU drivers).
    Vec4,
}

/// The kernel `gemm` uses for A B^T on this adapter (`LORAP_NT_KERNEL=tiled|vec4` overrides).
pub fn nt_kernel(gpu: &Gpu) -> NtKernel {
    match std::env::var("LORAP_NT_KERNEL").as_deref() {
        Ok("tiled") => NtKernel::Tiled,
        Ok("vec4") => NtKernel::Vec4,
        _ if gpu.info.device_type == wgpu::DeviceType::Cpu => NtKernel::Vec4,
        _ => NtKernel::Tiled,
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
    if nt == NtKernel::Vec4 && (a.trans || !b.trans) && shape.k % 4 == 0 {
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
        && shape.k % 4 == 0
        && a.ld % 4 == 0
        && b.ld % 4 == 0
        && a.offset % 4 == 0
        && b.offset % 4 == 0
        && gpu.limits.min_storage_buffer_offset_alignment % 16 == 0;
    let pipe = if vec4 {
        gpu.pipeline("matmul_nt_vec4", SHADER_NT_VEC4, "main", &[])
    } else {
        gpu.pipeline("matmul", SHADER, "main", &[("TRANS_A", a.trans as u32 as f64), ("TRANS_B", b.trans as u32 as f64)])
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

/// CPU reference: C = A B, f64 accumulation, A [m,k], B [k,n].
pub fn matmul_ref(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for p in 0..k {
            let av = a[i * k + p] as f64;
            let row = &b[p * n..(p + 1) * n];
            for (cv, &bv) in c[i * n..(i + 1) * n].iter_mut().zip(row) {
                *cv += av * bv as f64;
            }
        }
    }
    c
}

/// CPU reference: Y = X W^T, X [m,k], W [n,k].
pub fn matmul_nt_ref(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            y[i * n + j] = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
        }
    }
    y
}

/// CPU reference: X^T X for X [rows, cols].
pub fn gram_ref(x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let mut g = vec![0f64; cols * cols];
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        for i in 0..cols {
            let xi = xr[i] as f64;
            for j in 0..cols {
                g[i * cols + j] += xi * xr[j] as f64;
            }
        }
    }
    g
}
