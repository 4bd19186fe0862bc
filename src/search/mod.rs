//! Training-free searches over per-layer settings, on one evaluator: the architecture
//! search (LoRAP keep fractions and dropped layers, Pareto front), its cheap part as
//! `compress`'s sensitivity-driven layer allocation, and the surgical feature-space search.

pub mod architecture;
pub mod evaluator;
pub mod sensitivity;
pub mod surgical;

pub use architecture::{search, Candidate, SearchOptions, SearchResult};
pub use sensitivity::{sensitivity_plan, LayerAllocation, SensitivityOptions, SensitivityReport};
