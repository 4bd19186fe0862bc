//! On-disk formats and output folders: what a written model looks like and how it is
//! written safely (the claim on an output folder: input checks and an exclusive lock).

pub mod claim;

pub use claim::{OutputClaim, OutputError};
