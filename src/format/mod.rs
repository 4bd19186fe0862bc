//! On-disk formats and output folders: the safetensors weight store (with its content
//! check and stable digest), the linears' names,
//! stored dtypes, plans and the `lorap` config section, MPO cores, and how an output folder
//! is written safely (the claim: input checks and an exclusive lock; the atomic,
//! checkpointed writer).

pub mod claim;
pub mod digest;
pub mod dtype;
pub mod gguf;
pub mod input;
pub mod linear;
pub mod mpo;
pub mod names;
pub mod output;
pub mod plan;
pub mod weights;

pub use claim::{OutputClaim, OutputError};
pub use weights::WeightStore;
