//! Tiled f32 matmul (optionally transposed operands, alpha/beta accumulation) and the Gram
//! matrix X^T X accumulated over row chunks; splits any problem whose operands exceed one
//! storage binding.

use crate::gpu::context::{GpuBuf, Gpu, PipelineKey, Result, Shader};

pub mod coop;
pub mod reference;
pub use coop::{coop_supported, linear_f16_coop, F16Weight, COOP_TOL};
pub use reference::{transpose_ref, matmul_ref, matmul_nt_ref, gram_ref};

pub(crate) const SHADER: &str = include_str!("matmul.wgsl");
pub(crate) const SHADER_NT_VEC4: &str = include_str!("matmul_nt_vec4.wgsl");
pub(crate) const SHADER_REG: &str = include_str!("matmul_reg.wgsl");
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

/// Which kernel family runs f32 products (the name is historical: it first chose only the
/// A B^T kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NtKernel {
    /// 64x64 workgroup tiles, 4x4 per invocation, through workgroup memory (the first GPU
    /// kernel; kept for comparisons and as the fallback where storage offsets are not
    /// 16-byte aligned).
    Tiled,
    /// Register-blocked vec4 kernel without workgroup memory (CPU drivers).
    Vec4,
    /// 128x128 tiles, 8x8 per invocation, vec4 loads, padded double-buffered workgroup tiles
    /// (GPUs), every layout without operand copies.
    Register,
}

impl NtKernel {
    /// The default for a device type: vec4 on CPU drivers, register-tiled elsewhere.
    pub fn for_device(device_type: wgpu::DeviceType) -> Self {
        if device_type == wgpu::DeviceType::Cpu {
            NtKernel::Vec4
        } else {
            NtKernel::Register
        }
    }

    /// Parses the `LORAP_NT_KERNEL` values `tiled`, `vec4` and `register`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "tiled" => Some(NtKernel::Tiled),
            "vec4" => Some(NtKernel::Vec4),
            "register" => Some(NtKernel::Register),
            _ => None,
        }
    }
}

/// The kernel `gemm` uses for A B^T on this adapter (`LORAP_NT_KERNEL=tiled|vec4`, read
/// once when the `Gpu` is opened, overrides).
pub fn nt_kernel(gpu: &Gpu) -> NtKernel {
    gpu.nt_kernel()
}

/// The register-tiled shader's override constants: layout and vec4 loads per operand.
fn reg_constants(trans_a: bool, trans_b: bool, vec_a: bool, vec_b: bool) -> &'static [(&'static str, u32)] {
    macro_rules! c {
        ($ta:literal, $tb:literal, $va:literal, $vb:literal) => {
            &[("TRANS_A", $ta), ("TRANS_B", $tb), ("VEC_A", $va), ("VEC_B", $vb)]
        };
    }
    // pipeline keys hold 'static slices: the 16 combinations, indexed by their bits
    const ALL: [&[(&str, u32)]; 16] = [
        c!(0, 0, 0, 0),
        c!(0, 0, 0, 1),
        c!(0, 0, 1, 0),
        c!(0, 0, 1, 1),
        c!(0, 1, 0, 0),
        c!(0, 1, 0, 1),
        c!(0, 1, 1, 0),
        c!(0, 1, 1, 1),
        c!(1, 0, 0, 0),
        c!(1, 0, 0, 1),
        c!(1, 0, 1, 0),
        c!(1, 0, 1, 1),
        c!(1, 1, 0, 0),
        c!(1, 1, 0, 1),
        c!(1, 1, 1, 0),
        c!(1, 1, 1, 1),
    ];
    ALL[(trans_a as usize) << 3 | (trans_b as usize) << 2 | (vec_a as usize) << 1 | vec_b as usize]
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

/// Where C lives: a buffer, the element offset of C[0,0] and its leading dimension.
#[derive(Clone, Copy)]
pub struct GemmOutput<'a> {
    pub buf: &'a GpuBuf,
    pub offset: usize,
    pub ld: usize,
}

impl<'a> GemmOutput<'a> {
    /// C at the start of `buf`, rows `ld` apart.
    pub fn new(buf: &'a GpuBuf, ld: usize) -> Self {
        GemmOutput { buf, offset: 0, ld }
    }
}

/// C = alpha op(A) op(B) + beta C.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scale {
    pub alpha: f32,
    pub beta: f32,
}

impl Scale {
    /// C = op(A) op(B).
    pub const SET: Scale = Scale { alpha: 1.0, beta: 0.0 };
    /// C += op(A) op(B).
    pub const ADD: Scale = Scale { alpha: 1.0, beta: 1.0 };
}

/// One product C = alpha op(A) op(B) + beta C.
#[derive(Clone, Copy)]
pub struct GemmCall<'a> {
    pub shape: GemmShape,
    pub a: Operand<'a>,
    pub b: Operand<'a>,
    pub c: GemmOutput<'a>,
    pub scale: Scale,
}

/// Records `call` with this adapter's kernel.
pub fn gemm(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, call: GemmCall) -> Result<()> {
    gemm_with(gpu, enc, call, nt_kernel(gpu))
}

/// `gemm` with the kernel chosen by the caller (tests and benchmarks compare them).
pub fn gemm_with(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, call: GemmCall, nt: NtKernel) -> Result<()> {
    let GemmCall { shape, a, b, c: GemmOutput { buf: c, offset: c_off, ld: ldc }, scale: Scale { alpha, beta } } = call;
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
            return gemm_with(gpu, enc, GemmCall { a: a2, b: b2, ..call }, nt);
        }
    }
    // the register kernel binds its operands as whole vec4s, which needs 16-byte aligned windows
    let reg = nt == NtKernel::Register && gpu.limits.min_storage_buffer_offset_alignment.is_multiple_of(16);
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
    // (the register kernel's pipeline depends on each block's alignment: chosen per dispatch)
    let (pipe, tile) = if reg {
        (gpu.pipeline(PipelineKey { shader: Shader::MatmulReg, entry: "main", constants: reg_constants(a.trans, b.trans, false, false) }), 128)
    } else if vec4 {
        (gpu.pipeline(PipelineKey::new(Shader::MatmulNtVec4, "main")), 32)
    } else {
        (gpu.pipeline(PipelineKey { shader: Shader::Matmul, entry: "main", constants: trans_constants(a.trans, b.trans) }), 64)
    };
    // vec4 windows may be rounded up by 12 bytes past the span
    let cap = gpu.max_binding_elems() - if reg { 4 } else { 0 };
    // on GPUs no dispatch may run long (display GPUs reset after ~2 s): products over the
    // FLOP cap are split, output tiles first (the same sums), K last (partial sums accumulate)
    let max_flops = gpu.max_dispatch_flops() as f64;
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
        let (bm, bn, bk) = (blk.m1 - blk.m0, blk.n1 - blk.n0, blk.k1 - blk.k0);
        // Split the axis that makes the oversized operand's rows; K splits accumulate.
        let split = if a_hi - a_lo > cap {
            Some(if a.trans { 'k' } else { 'm' })
        } else if b_hi - b_lo > cap {
            Some(if b.trans { 'n' } else { 'k' })
        } else if c_hi - c_lo > cap {
            Some(if blk.m1 - blk.m0 > 1 { 'm' } else { 'n' })
        } else if max_flops > 0.0 && 2.0 * bm as f64 * bn as f64 * bk as f64 > max_flops {
            if bm.max(bn) > tile {
                Some(if bm >= bn { 'm' } else { 'n' })
            } else if bk > 1 {
                Some('k')
            } else {
                None
            }
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
            // halves in whole tiles (64 for the first kernels, as before; the register
            // kernel's 128)
            let align = tile.max(64);
            let mut mid = lo + (hi - lo) / 2;
            if mid - lo >= align {
                mid = lo + (mid - lo) / align * align;
            } else if reg && mid - lo >= 4 {
                // whole vec4s on each side keep the register kernel's vec4 loads
                mid = lo + (mid - lo) / 4 * 4;
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
        let (wa, wb) = if reg {
            (gpu.window_vec4(a.buf, a_lo, a_hi - a_lo), gpu.window_vec4(b.buf, b_lo, b_hi - b_lo))
        } else {
            (gpu.window(a.buf, a_lo, a_hi - a_lo), gpu.window(b.buf, b_lo, b_hi - b_lo))
        };
        let wc = gpu.window(c, c_lo, c_hi - c_lo);
        let params = Params {
            m: bm as u32,
            n: bn as u32,
            k: if shape.k == 0 { 0 } else { bk as u32 },
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
        let groups = (bn.div_ceil(tile) as u32, bm.div_ceil(tile) as u32, 1);
        let pipe = if reg {
            // one aligned vec4 per invocation needs the block's first element, the leading
            // dimension and the block's contiguous extent in whole vec4s (then a vec4 is inside
            // op(X) whenever its first element is)
            let vec_ok = |o: &Operand, first: usize, contiguous: usize| o.ld.is_multiple_of(4) && first.is_multiple_of(4) && contiguous.is_multiple_of(4);
            let vec_a = vec_ok(&a, a_lo, if a.trans { bm } else { bk });
            let vec_b = vec_ok(&b, b_lo, if b.trans { bk } else { bn });
            gpu.pipeline(PipelineKey { shader: Shader::MatmulReg, entry: "main", constants: reg_constants(a.trans, b.trans, vec_a, vec_b) })
        } else {
            pipe.clone()
        };
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&params), &[wa.binding, wb.binding, wc.binding], groups);
    }
    Ok(())
}

/// C[m,n] = A[m,k] B[k,n] (all row-major), into a new buffer.
pub fn matmul(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, a: &GpuBuf, b: &GpuBuf, m: usize, k: usize, n: usize) -> Result<GpuBuf> {
    let c = gpu.alloc(m * n)?;
    gemm(gpu, enc, GemmCall { shape: GemmShape { m, n, k }, a: Operand::new(a, k), b: Operand::new(b, n), c: GemmOutput::new(&c, n), scale: Scale::SET })?;
    Ok(c)
}

/// Y[m,n] = X[m,k] W^T with W stored [n,k] (a linear layer's weight).
pub fn matmul_nt(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, w: &GpuBuf, m: usize, k: usize, n: usize) -> Result<GpuBuf> {
    let y = gpu.alloc(m * n)?;
    linear_into(gpu, enc, x, w, &y, GemmShape { m, n, k }, 0.0)?;
    Ok(y)
}

/// Y[m,n] = X[m,k] W^T + beta Y with W stored [n,k], into an existing buffer.
pub fn linear_into(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, w: &GpuBuf, y: &GpuBuf, shape: GemmShape, beta: f32) -> Result<()> {
    let GemmShape { m: _, n, k } = shape;
    gemm(gpu, enc, GemmCall { shape, a: Operand::new(x, k), b: Operand::new(w, k).t(), c: GemmOutput::new(y, n), scale: Scale { alpha: 1.0, beta } })
}

/// G[cols,cols] += X^T X for X [rows, cols] row-major (one chunk of calibration rows).
pub fn gram_accumulate(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, rows: usize, cols: usize, g: &GpuBuf) -> Result<()> {
    gram_accumulate_rows(gpu, enc, x, (0, rows), cols, g)
}

/// G[cols,cols] += X^T X over rows `row0..row0 + rows` of x [.., cols] row-major.
pub fn gram_accumulate_rows(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, (row0, rows): (usize, usize), cols: usize, g: &GpuBuf) -> Result<()> {
    let xs = Operand { offset: row0 * cols, ..Operand::new(x, cols) };
    gemm(gpu, enc, GemmCall { shape: GemmShape { m: cols, n: cols, k: rows }, a: xs.t(), b: xs, c: GemmOutput::new(g, cols), scale: Scale::ADD })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::test_util::{check, fenced, gpu, gpu_with_binding, options, random, unfence};
    use crate::gpu::GpuOptions;

    /// C = alpha op(A) op(B) + beta C with every operand stored in its layout inside NaN
    /// fences: rows padded by `pad` (ld = contiguous extent + pad), the block starting `off`
    /// elements into its buffer. Any read outside op(A), op(B) (or of C when beta = 0, where C
    /// holds NaN) or any write outside C's block shows.
    fn fenced_case(g: &Gpu, nt: NtKernel, (m, k, n): (usize, usize, usize), (ta, tb): (bool, bool), pad: usize, off: usize, beta: f32) {
        let name = format!("{nt:?} {m}x{k}x{n} trans ({ta},{tb}) pad {pad} offset {off} beta {beta}");
        let a = random(m * k, 80 + m as u64);
        let b = random(k * n, 81 + n as u64);
        // a transposed operand is stored [cols, rows]
        let stored = |v: &[f32], r: usize, c: usize, t: bool| -> (Vec<f32>, usize, usize) {
            if t {
                (transpose_ref(v, 0, c, r, c).iter().map(|&x| x as f32).collect(), c, r)
            } else {
                (v.to_vec(), r, c)
            }
        };
        let (sa, ra, ca) = stored(&a, m, k, ta);
        let (sb, rb, cb) = stored(&b, k, n, tb);
        let (ga, gb) = (fenced(g, &sa, ra, ca, ca + pad, off), fenced(g, &sb, rb, cb, cb + pad, off + 3));
        let c0 = if beta == 0.0 { vec![f32::NAN; m * n] } else { random(m * n, 82) };
        let ldc = n + pad;
        let gc = fenced(g, &c0, m, n, ldc, off);
        let mut enc = g.encoder();
        let oa = Operand { buf: &ga, offset: off, ld: ca + pad, trans: ta };
        let ob = Operand { buf: &gb, offset: off + 3, ld: cb + pad, trans: tb };
        gemm_with(g, &mut enc, GemmCall { shape: GemmShape { m, n, k }, a: oa, b: ob, c: GemmOutput { buf: &gc, offset: off, ld: ldc }, scale: Scale { alpha: 1.5, beta } }, nt).unwrap();
        g.submit(enc);
        let got = unfence(&name, &g.read(&gc).unwrap(), m, n, ldc, off);
        let ab = matmul_ref(&a, &b, m, k, n);
        let want: Vec<f64> = ab.iter().zip(&c0).map(|(&x, &c)| 1.5 * x + if beta == 0.0 { 0.0 } else { beta as f64 * c as f64 }).collect();
        check(&name, &got, &want);
    }

    /// Exact guards (the modules run without wgpu's clamps): every kernel, every layout, at
    /// sizes that are no multiple of any tile (1, primes, one past a tile), with padded rows,
    /// unaligned and aligned offsets, beta = 0 over a NaN C and beta != 0.
    #[test]
    fn kernels_have_exact_guards() {
        let g = gpu();
        let shapes = [(1, 1, 1), (3, 5, 2), (7, 13, 5), (65, 31, 67), (131, 9, 129), (4, 8, 4), (132, 24, 68)];
        for nt in [NtKernel::Register, NtKernel::Tiled, NtKernel::Vec4] {
            for (i, &shape) in shapes.iter().enumerate() {
                for layout in [(false, false), (true, false), (false, true), (true, true)] {
                    // aligned (vec4 loads possible) and unaligned padding and offsets
                    let (pad, off) = if i % 2 == 0 { (4, 8) } else { (3, 5) };
                    fenced_case(&g, nt, shape, layout, pad, off, if i % 3 == 0 { 0.0 } else { 0.5 });
                }
            }
        }
    }

    /// The register kernel against the f64 reference at larger awkward shapes, through
    /// binding splits (a 64 KiB cap) and FLOP-capped dispatches (split by output tiles, then
    /// by K for a tall-skinny Gram).
    #[test]
    fn register_kernel_splits_match_reference() {
        let capped = Gpu::new(&GpuOptions { max_dispatch_flops: Some(2 * 128 * 128 * 64), ..options() }).unwrap();
        for g in [gpu(), gpu_with_binding(64 << 10), capped] {
            for (shape, layout) in [((257, 300, 131), (false, true)), ((200, 129, 260), (false, false)), ((190, 517, 190), (true, false)), ((129, 64, 255), (true, true))] {
                fenced_case(&g, NtKernel::Register, shape, layout, 4, 8, 0.0);
            }
        }
        // X^T X of 1000 x 36 rows: one output tile, so the FLOP cap splits K
        let g = Gpu::new(&GpuOptions { max_dispatch_flops: Some(2 * 36 * 36 * 100), ..options() }).unwrap();
        assert_eq!(g.max_dispatch_flops(), 2 * 36 * 36 * 100);
        fenced_case(&g, NtKernel::Register, (36, 1000, 36), (true, false), 0, 0, 1.0);
    }

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
        // the same chunks as row ranges of one buffer
        let whole = g.upload(&x).unwrap();
        let gr = g.zeros(cols * cols).unwrap();
        let mut r0 = 0;
        for &rows in chunks {
            let mut enc = g.encoder();
            gram_accumulate_rows(g, &mut enc, &whole, (r0, rows), cols, &gr).unwrap();
            g.submit(enc);
            r0 += rows;
        }
        check(&format!("gram rows {chunks:?}x{cols}"), &g.read(&gr).unwrap(), &gram_ref(&x, total, cols));
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
        gemm(&g, &mut enc, GemmCall { shape: GemmShape { m, n, k }, a: Operand::new(&ga, k), b: Operand::new(&gb, n), c: GemmOutput::new(&gc, n), scale: Scale { alpha: 0.5, beta: -2.0 } }).unwrap();
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
            for nt in [NtKernel::Tiled, NtKernel::Vec4, NtKernel::Register] {
                for (m, k, n) in [(1, 4, 1), (5, 8, 3), (37, 64, 29), (70, 576, 33), (9, 13, 7), (130, 100, 65)] {
                    let x = random(m * k + 8, 60 + k as u64);
                    let w = random(n * k, 61 + n as u64);
                    let (gx, gw, gy) = (g.upload(&x).unwrap(), g.upload(&w).unwrap(), g.alloc(m * n).unwrap());
                    let mut enc = g.encoder();
                    // A starts 8 elements into its buffer
                    let a = Operand { buf: &gx, offset: 8, ld: k, trans: false };
                    gemm_with(&g, &mut enc, GemmCall { shape: GemmShape { m, n, k }, a, b: Operand::new(&gw, k).t(), c: GemmOutput::new(&gy, n), scale: Scale::SET }, nt).unwrap();
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
                    gemm_with(&g, &mut enc, GemmCall { shape: GemmShape { m, n, k }, a: oa, b: ob, c: GemmOutput::new(&gc, n), scale: Scale::SET }, NtKernel::Vec4).unwrap();
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
                gemm_with(&g, &mut enc, GemmCall { shape: GemmShape { m: 8, n: 8, k: 8 }, a: oa, b: ob, c: GemmOutput::new(&c, 8), scale: Scale::SET }, NtKernel::Tiled).unwrap();
            }
            g.submit(enc);
            counts.push(g.pipeline_count());
        }
        assert_eq!(counts, [4, 4]);
    }
}
