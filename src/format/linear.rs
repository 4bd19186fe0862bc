//! The seven linears of a decoder layer: their names in checkpoints, in the order every
//! per-linear array of the crate keeps them.

/// Names of the seven linears of a decoder layer, in the order `LayerWeights` keeps them.
pub const LINEARS: [&str; 7] = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

/// Short names (`--mpo-matrices`), in the same order.
pub const SHORT_NAMES: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];
