//! f16-input, f32-accumulate GEMM on cooperative matrices (tensor cores) for the forward
//! linears, Y = X W^T with W kept in f16 on the GPU. It runs only where the adapter advertises
//! a 16x16x16 f16 -> f32 configuration and a subgroup size fixed at 32 (`Gpu::coop_f16`);
//! elsewhere (lavapipe, most of CI) `linear_f16_coop` refuses and the f32 kernels run. The f32
//! kernels also stay for the statistics and the SVD products, which need f32 accuracy.
//! Error bound: X is rounded to f16 (unit roundoff 2^-11) as W already is, products are exact
//! in the f32 accumulator: relative Frobenius error against the f64 product of the f32 inputs
//! stays near 1e-3 (`COOP_TOL`).

use crate::gpu::context::{GpuBuf, GpuError, Gpu, PipelineKey, Result, Shader};

use super::GemmShape;

pub(crate) const SHADER_COOP_F16: &str = include_str!("matmul_coop_f16.wgsl");

/// Relative Frobenius error the f16 path is held to (f16 inputs, f32 accumulation).
pub const COOP_TOL: f64 = 3e-3;

/// Output tile of one workgroup (the shader's BM).
const COOP_TILE: usize = 64;

/// A weight matrix [rows, cols] stored as f16 on the GPU (half the memory of f32).
pub struct F16Weight {
    /// The halves, two per f32 slot of the pooled buffer.
    pub buf: GpuBuf,
    pub rows: usize,
    pub cols: usize,
}

impl F16Weight {
    /// Uploads `data` ([rows, cols] row-major) as f16.
    pub fn upload(gpu: &Gpu, data: &[half::f16], rows: usize, cols: usize) -> Result<Self> {
        assert_eq!(data.len(), rows * cols, "f16 weight: {} values for [{rows}, {cols}]", data.len());
        let buf = gpu.alloc(data.len().div_ceil(2))?;
        // write_buffer takes whole 4-byte words: an odd count gets one zero half
        let mut bytes: Vec<u8> = bytemuck::cast_slice(data).to_vec();
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        if !bytes.is_empty() {
            gpu.queue.write_buffer(buf.raw(), 0, &bytes);
        }
        Ok(F16Weight { buf, rows, cols })
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    lda: u32,
    ldw: u32,
    ldc: u32,
    a_off: u32,
    w_off: u32,
    c_off: u32,
    alpha: f32,
    beta: f32,
    _pad: u32,
}

/// Whether `gpu` runs the cooperative-matrix path (the adapter's configuration list holds
/// 16x16x16 f16 -> f32 and its subgroups are exactly 32 wide; chosen at `Gpu::new`).
pub fn coop_supported(gpu: &Gpu) -> bool {
    gpu.coop_f16()
}

/// Whether an adapter's cooperative-matrix configurations and subgroup sizes suit the shader.
pub fn coop_config_matches(configs: &[wgpu::CooperativeMatrixProperties], subgroup_min: u32, subgroup_max: u32) -> bool {
    use wgpu::CooperativeScalarType as T;
    subgroup_min == 32 && subgroup_max == 32 && configs.iter().any(|c| (c.m_size, c.n_size, c.k_size) == (16, 16, 16) && c.ab_type == T::F16 && c.cr_type == T::F32)
}

/// Y[m,n] = X[m,k] W^T + beta Y on the cooperative-matrix kernel; X and Y are f32 and packed
/// (leading dimensions k and n). Fails with `GpuError::Device` where the adapter lacks the
/// path: callers check `coop_supported` first.
pub fn linear_f16_coop(gpu: &Gpu, enc: &mut wgpu::CommandEncoder, x: &GpuBuf, w: &F16Weight, y: &GpuBuf, shape: GemmShape, beta: f32) -> Result<()> {
    let GemmShape { m, n, k } = shape;
    if !coop_supported(gpu) {
        return Err(GpuError::Device("the cooperative-matrix f16 GEMM needs an adapter with a 16x16x16 f16 -> f32 configuration and 32-wide subgroups".into()));
    }
    assert!(w.rows == n && w.cols == k && x.len >= m * k && y.len >= m * n, "linear_f16_coop: operands shorter than {shape:?}");
    if m == 0 || n == 0 {
        return Ok(());
    }
    // the whole weight in one binding (f16: 2 GiB holds a billion values), X and Y by rows
    let w_bytes = ((n * k * 2) as u64).next_multiple_of(4);
    if w_bytes > gpu.max_binding_bytes() {
        return Err(GpuError::RowTooLarge { row_bytes: w_bytes, limit: gpu.max_binding_bytes() });
    }
    let pipe = gpu.pipeline(PipelineKey::new(Shader::MatmulCoopF16, "main"));
    let ww = wgpu::BufferBinding { buffer: w.buf.raw(), offset: 0, size: std::num::NonZeroU64::new(w_bytes) };
    let mut chunks = gpu.row_chunks(m, &[k, n])?;
    // and no dispatch over the FLOP cap (rows in whole tiles)
    let cap = gpu.max_dispatch_flops() as f64;
    if cap > 0.0 {
        let rows = (((cap / (2.0 * n as f64 * k as f64)) as usize) / COOP_TILE * COOP_TILE).max(COOP_TILE);
        chunks = chunks.into_iter().flat_map(|(r0, r1)| (r0..r1).step_by(rows).map(move |s| (s, (s + rows).min(r1)))).collect();
    }
    for (r0, r1) in chunks {
        let rows = r1 - r0;
        let wx = gpu.window(x, r0 * k, rows * k);
        let wy = gpu.window(y, r0 * n, rows * n);
        let p = Params {
            m: rows as u32,
            n: n as u32,
            k: k as u32,
            lda: k as u32,
            ldw: k as u32,
            ldc: n as u32,
            a_off: wx.inner_offset,
            w_off: 0,
            c_off: wy.inner_offset,
            alpha: 1.0,
            beta,
            _pad: 0,
        };
        let groups = (n.div_ceil(COOP_TILE) as u32, rows.div_ceil(COOP_TILE) as u32, 1);
        gpu.dispatch(enc, &pipe, bytemuck::bytes_of(&p), &[wx.binding, ww.clone(), wy.binding], groups);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::matmul::reference::matmul_nt_ref;
    use crate::gpu::kernels::test_util::{options, random};
    use crate::gpu::GpuOptions;
    use crate::gpu::rel_frobenius;

    /// The shader is valid WGSL for naga (the compiler wgpu uses) with the capabilities the
    /// path requests, on every machine: lavapipe cannot run it, so this is what CI can check.
    #[test]
    fn coop_shader_validates_with_naga() {
        use wgpu::naga;
        let module = naga::front::wgsl::parse_str(SHADER_COOP_F16).unwrap_or_else(|e| panic!("{}", e.emit_to_string(SHADER_COOP_F16)));
        let caps = naga::valid::Capabilities::COOPERATIVE_MATRIX | naga::valid::Capabilities::SHADER_FLOAT16 | naga::valid::Capabilities::SUBGROUP;
        let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
            .subgroup_operations(naga::valid::SubgroupOperationSet::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}", e.emit_to_string(SHADER_COOP_F16)));
        // and the SPIR-V the Vulkan backend would hand to the driver can be written
        let opts = naga::back::spv::Options { lang_version: (1, 6), ..Default::default() };
        let words = naga::back::spv::write_vec(&module, &info, &opts, None).expect("SPIR-V of the cooperative-matrix kernel");
        assert!(words.len() > 100);
    }

    #[test]
    fn configuration_gate() {
        use wgpu::{CooperativeMatrixProperties as P, CooperativeScalarType as T};
        let c = |m, ab, cr| P { m_size: m, n_size: m, k_size: m, ab_type: ab, cr_type: cr, saturating_accumulation: false };
        assert!(coop_config_matches(&[c(8, T::F32, T::F32), c(16, T::F16, T::F32)], 32, 32));
        assert!(!coop_config_matches(&[c(16, T::F16, T::F16)], 32, 32));
        assert!(!coop_config_matches(&[c(16, T::F16, T::F32)], 32, 64));
        assert!(!coop_config_matches(&[], 32, 32));
    }

    /// Against the f64 product at awkward shapes where the adapter has the path; on lavapipe
    /// (no cooperative matrices) the path must be off and refuse to run.
    #[test]
    fn coop_gemm_matches_reference_or_is_refused() {
        let g = Gpu::new(&GpuOptions { cooperative_matrix: Some(true), ..options() }).unwrap();
        if g.info.device_type == wgpu::DeviceType::Cpu {
            assert!(!coop_supported(&g), "CPU drivers have no tensor cores");
        }
        for (m, k, n) in [(1, 16, 1), (37, 100, 70), (130, 64, 129), (64, 4096, 64)] {
            let x = random(m * k, 90);
            let w = random(n * k, 91);
            let w16: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            let (gx, gy) = (g.upload(&x).unwrap(), g.alloc(m * n).unwrap());
            let gw = F16Weight::upload(&g, &w16, n, k).unwrap();
            let mut enc = g.encoder();
            let r = linear_f16_coop(&g, &mut enc, &gx, &gw, &gy, GemmShape { m, n, k }, 0.0);
            if !coop_supported(&g) {
                assert!(r.is_err(), "the cooperative-matrix path ran on an adapter without it");
                continue;
            }
            r.unwrap();
            g.submit(enc);
            let e = rel_frobenius(&g.read(&gy).unwrap(), &matmul_nt_ref(&x, &w, m, k, n));
            assert!(e < COOP_TOL, "coop f16 {m}x{k}x{n}: relative error {e:e} >= {COOP_TOL:e}");
        }
    }
}
