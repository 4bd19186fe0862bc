//! Plans on disk: what a compressed model's config.json says of each layer (`LayerPlan`,
//! the `lorap` section: ranks, FFN widths, MPO shapes) and the per-layer compression plans
//! `compress --plan FILE` applies (which layers are dropped and how much of each layer's
//! attention, FFN or individual linears is kept; `search` and the surgical search write
//! them).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::linear::Linear;
use crate::error::CompressError;

/// Settings of one decoder layer; a missing field falls back to the run's uniform ratio.
/// Unknown keys are refused (a misspelled `ffn_kep` would otherwise fall back silently).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct PlanLayer {
    /// Remove the whole layer (the residual stream passes through unchanged).
    #[serde(default)]
    pub dropped: bool,
    /// LoRAP: fraction of the layer's attention parameters kept, in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_keep: Option<f64>,
    /// LoRAP: fraction of the FFN channels kept, in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_keep: Option<f64>,
    /// Feature-space decomposition: fraction of each linear's break-even rank kept, by
    /// linear name ("self_attn.q_proj", ...); a linear not listed stays dense.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub module_keep: BTreeMap<String, f64>,
}

/// A whole-model plan: one entry per decoder layer of the dense model (unknown keys refused).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub layers: Vec<PlanLayer>,
    /// Where the plan came from (free text).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl Plan {
    /// The same `attention_keep` and `ffn_keep` in every layer.
    pub fn uniform(n_layers: usize, keep: f64) -> Self {
        Plan { layers: vec![PlanLayer { attention_keep: Some(keep), ffn_keep: Some(keep), ..Default::default() }; n_layers], note: String::new() }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = super::input::read_text(path, super::input::InputKind::Plan)?;
        Ok(Self::parse(&text, path)?)
    }

    /// A plan from the text of the file `path` (named in the error).
    pub fn parse(text: &str, path: &Path) -> Result<Self, CompressError> {
        serde_json::from_str(text).map_err(|e| CompressError::BadArgument(format!("{}: not a plan: {e}", path.display())))
    }

    /// Checks the plan against a model of `n_layers` decoder layers.
    pub fn validate(&self, n_layers: usize) -> Result<(), CompressError> {
        let bad = |what: String| Err(CompressError::BadArgument(format!("plan: {what}")));
        if self.layers.len() != n_layers {
            return bad(format!("{} layers listed, the model has {n_layers}", self.layers.len()));
        }
        if self.layers.iter().all(|l| l.dropped) {
            return bad("every layer is dropped".into());
        }
        let ok = |k: f64| k > 0.0 && k <= 1.0;
        for (i, l) in self.layers.iter().enumerate() {
            if l.attention_keep.is_some_and(|k| !ok(k)) || l.ffn_keep.is_some_and(|k| !ok(k)) || l.module_keep.values().any(|&k| !ok(k)) {
                return bad(format!("layer {i}: keep fractions must be in (0, 1]"));
            }
            if let Some(name) = l.module_keep.keys().find(|k| Linear::from_name(k).is_none()) {
                let names: Vec<&str> = Linear::ALL.iter().map(|l| l.name()).collect();
                return bad(format!("layer {i}: unknown linear {name:?} (one of {})", names.join(", ")));
            }
        }
        Ok(())
    }
}

/// Shapes of one compressed decoder layer. A rank of `None` means the matrix is dense
/// (unless it is listed in `mpo`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct LayerPlan {
    pub q_rank: Option<usize>,
    pub k_rank: Option<usize>,
    pub v_rank: Option<usize>,
    pub o_rank: Option<usize>,
    /// Factor-pair ranks of the FFN matrices (feature-space decomposition factors them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_rank: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_rank: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_rank: Option<usize>,
    /// Kept FFN intermediate channels.
    pub ffn_width: usize,
    /// Matrices stored as MPO cores, by linear name ("self_attn.q_proj", "mlp.up_proj", ...).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub mpo: std::collections::BTreeMap<String, MpoShape>,
    /// Linears the method gave a bias (`{linear}.bias`, [out]): compensation of what was
    /// removed (e.g. down_proj after the FFN refit). The model's own q/k/v biases (qwen2)
    /// are not listed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub biases: Vec<Linear>,
}

/// Shape of an MPO-stored matrix: rows = prod(row_factors), cols = prod(col_factors), core k
/// is [bond k-1, row_factors[k], col_factors[k], bond k] (outer bonds 1), stored as
/// `{linear}.mpo_core_{k}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MpoShape {
    pub row_factors: Vec<usize>,
    pub col_factors: Vec<usize>,
    /// The n-1 inner bond dimensions.
    pub bonds: Vec<usize>,
    /// The central core (index n/2) is shared by every layer and stored once as
    /// `model.mpo_shared.{linear}.mpo_core_{n/2}`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_centre: bool,
}

impl MpoShape {
    /// [left, i, j, right] of every core.
    pub fn core_shapes(&self) -> Vec<[usize; 4]> {
        let n = self.row_factors.len();
        (0..n)
            .map(|k| {
                let left = if k == 0 { 1 } else { self.bonds[k - 1] };
                let right = if k + 1 == n { 1 } else { self.bonds[k] };
                [left, self.row_factors[k], self.col_factors[k], right]
            })
            .collect()
    }

    /// Parameters stored with the layer (a shared centre is counted once per model).
    pub fn params(&self) -> usize {
        self.core_shapes().iter().enumerate().filter(|(k, _)| !self.is_shared(*k)).map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// Index of the central core.
    pub fn centre(&self) -> usize {
        self.row_factors.len() / 2
    }

    /// Whether core `k` is the shared centre.
    pub fn is_shared(&self, k: usize) -> bool {
        self.shared_centre && k == self.centre()
    }

    /// Tensor name of core `k` of linear `linear` in layer `layer`.
    pub fn core_name(&self, layer: usize, linear: Linear, k: usize) -> String {
        if self.is_shared(k) {
            super::names::shared_mpo_core(linear, k)
        } else {
            super::names::mpo_core(&super::names::linear_base(layer, linear), k)
        }
    }

    pub fn check(&self, rows: usize, cols: usize) -> Result<(), String> {
        let n = self.row_factors.len();
        if n < 2 || self.col_factors.len() != n || self.bonds.len() != n - 1 {
            return Err("an MPO needs at least 2 cores, as many column as row factors and n-1 bonds".into());
        }
        if self.row_factors.iter().product::<usize>() != rows || self.col_factors.iter().product::<usize>() != cols {
            return Err(format!("MPO factors do not multiply to the matrix shape {rows}x{cols}"));
        }
        if self.bonds.iter().any(|&b| b == 0 || b > 1 << 16) || self.row_factors.iter().chain(&self.col_factors).any(|&f| f == 0) {
            return Err("MPO bonds must be in 1..=65536 and factors positive".into());
        }
        Ok(())
    }
}

/// How one linear of a layer is stored.
#[derive(Debug, Clone, PartialEq)]
pub enum LinearRepr {
    Dense,
    /// Factor pair A [out, r], B [r, in].
    LowRank(usize),
    Mpo(MpoShape),
}

impl LayerPlan {
    /// Whether the method gave `linear` a bias.
    pub fn has_added_bias(&self, linear: Linear) -> bool {
        self.biases.contains(&linear)
    }

    fn rank_slot(&mut self, linear: Linear) -> &mut Option<usize> {
        match linear {
            Linear::Q => &mut self.q_rank,
            Linear::K => &mut self.k_rank,
            Linear::V => &mut self.v_rank,
            Linear::O => &mut self.o_rank,
            Linear::Gate => &mut self.gate_rank,
            Linear::Up => &mut self.up_rank,
            Linear::Down => &mut self.down_rank,
        }
    }

    /// Factor-pair rank of `linear` (`None`: not a factor pair).
    pub fn rank(&self, linear: Linear) -> Option<usize> {
        [self.q_rank, self.k_rank, self.v_rank, self.o_rank, self.gate_rank, self.up_rank, self.down_rank][linear.index()]
    }

    pub fn set_rank(&mut self, linear: Linear, r: Option<usize>) {
        *self.rank_slot(linear) = r;
    }

    /// MPO shape of `linear`, if it is stored as MPO cores.
    pub fn mpo_shape(&self, linear: Linear) -> Option<&MpoShape> {
        self.mpo.get(linear.name())
    }

    /// How `linear` is stored.
    pub fn repr(&self, linear: Linear) -> LinearRepr {
        if let Some(m) = self.mpo_shape(linear) {
            return LinearRepr::Mpo(m.clone());
        }
        self.rank(linear).map_or(LinearRepr::Dense, LinearRepr::LowRank)
    }
}

/// The `lorap` section of a compressed model's config.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompressionSection {
    pub format_version: u32,
    pub method: String,
    pub ratio: f64,
    pub layers: Vec<LayerPlan>,
    /// Decoder layers of the original model that were removed (original indices); the
    /// layers kept are renumbered from 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped_layers: Vec<usize>,
}

