//! The kernel rooms: one folder per kernel family holding its Rust wrapper (`mod.rs`), its
//! WGSL, its f64 CPU reference (`reference.rs`) and its unit tests; plus [`Shader`], the
//! typed name of every WGSL module that pipeline keys use.

pub mod attention;
pub mod elementwise;
pub mod loss;
pub mod matmul;
pub mod norms;
pub mod rope;

#[cfg(test)]
pub(crate) mod test_util;

/// One WGSL module (one `.wgsl` file in a room).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shader {
    Attention,
    /// Flash-style attention (K/V tiles in workgroup memory).
    AttentionFlash,
    Elementwise,
    Loss,
    /// Tiled matmul, TRANS_A / TRANS_B overridable.
    Matmul,
    /// Register-blocked vec4 A B^T matmul (CPU drivers).
    MatmulNtVec4,
    /// Register-tiled 128x128 matmul, every layout (GPUs).
    MatmulReg,
    /// f16 x f16 -> f32 cooperative-matrix (tensor core) X W^T (adapters that advertise it).
    MatmulCoopF16,
    /// The matmul room's transpose copy.
    Transpose,
    Norms,
    Rope,
}

impl Shader {
    /// The module's name (its file stem), for labels.
    pub fn name(self) -> &'static str {
        match self {
            Shader::Attention => "attention",
            Shader::AttentionFlash => "flash",
            Shader::Elementwise => "elementwise",
            Shader::Loss => "loss",
            Shader::Matmul => "matmul",
            Shader::MatmulNtVec4 => "matmul_nt_vec4",
            Shader::MatmulReg => "matmul_reg",
            Shader::MatmulCoopF16 => "matmul_coop_f16",
            Shader::Transpose => "transpose",
            Shader::Norms => "norms",
            Shader::Rope => "rope",
        }
    }

    /// The WGSL source, compiled into the binary from the room's folder.
    pub fn source(self) -> &'static str {
        match self {
            Shader::Attention => attention::SHADER,
            Shader::AttentionFlash => attention::SHADER_FLASH,
            Shader::Elementwise => elementwise::SHADER,
            Shader::Loss => loss::SHADER,
            Shader::Matmul => matmul::SHADER,
            Shader::MatmulNtVec4 => matmul::SHADER_NT_VEC4,
            Shader::MatmulReg => matmul::SHADER_REG,
            Shader::MatmulCoopF16 => matmul::coop::SHADER_COOP_F16,
            Shader::Transpose => matmul::SHADER_TRANSPOSE,
            Shader::Norms => norms::SHADER,
            Shader::Rope => rope::SHADER,
        }
    }
}
