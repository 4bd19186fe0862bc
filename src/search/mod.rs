//! Training-free searches over per-layer settings, on one evaluator: the architecture
//! search (LoRAP keep fractions and dropped layers, Pareto front) and the surgical
//! feature-space search.

pub mod architecture;
pub mod evaluator;
pub mod surgical;

pub use architecture::{search, Candidate, SearchOptions, SearchResult};
