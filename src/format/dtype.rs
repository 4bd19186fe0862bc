//! Stored element types: f32 values encoded as the safetensors dtype a model keeps (f16,
//! bf16 or f32), and the values as they read back from it.

use safetensors::Dtype;

/// Stored element type of written tensors.
pub fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        Dtype::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Values as they will be read back from the stored dtype.
pub(crate) fn round_trip(v: &[f32], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F16 => v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect(),
        Dtype::BF16 => v.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect(),
        _ => v.to_vec(),
    }
}
