//! The kernel rooms: one folder per kernel family holding its Rust wrapper, its WGSL, its
//! f64 CPU reference and its unit tests.

pub mod attention;
pub mod elementwise;
pub mod loss;
pub mod matmul;
pub mod norms;
pub mod rope;
