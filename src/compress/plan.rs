//! Per-layer compression plans (`compress --plan FILE`): which layers are dropped and how
//! much of each layer's attention, FFN or individual linears is kept. `search` and the
//! surgical feature-space search write them; `compress` applies one.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::CompressError;
use crate::model::forward::LINEARS;

/// Settings of one decoder layer; a missing field falls back to the run's uniform ratio.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
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

/// A whole-model plan: one entry per decoder layer of the dense model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
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
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read plan", path.display()))?;
        serde_json::from_str(&text).map_err(|e| CompressError::BadArgument(format!("{}: not a plan: {e}", path.display())).into())
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
            if let Some(name) = l.module_keep.keys().find(|k| !LINEARS.contains(&k.as_str())) {
                return bad(format!("layer {i}: unknown linear {name:?} (one of {})", LINEARS.join(", ")));
            }
        }
        Ok(())
    }
}
