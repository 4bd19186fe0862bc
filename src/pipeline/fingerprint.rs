//! The `--resume` fingerprint: what makes an interrupted run the same run as the one asked
//! for now (the tool's version, config.json, the weights' content, the options, the
//! calibration tokens), kept in the partial folder's checkpoint and compared part by part,
//! so a refusal says which part differs. Hashes are `format::digest`'s (stable across
//! builds), never `std`'s `DefaultHasher`.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::format::digest::{Digest, StableHasher};
use crate::methods::CompressOptions;
use crate::model::Model;

/// The calibration tokens a run uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub tokens: usize,
    pub seq_len: usize,
    pub digest: Digest,
}

/// Identifies a compression run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// `CARGO_PKG_VERSION` of the tool that made it: another version may compute other bytes.
    pub version: String,
    pub config: serde_json::Value,
    /// Content digest of every tensor the model uses (`Model::weights_digest`).
    pub weights: Digest,
    /// The run's options, the SVD's included.
    pub options: serde_json::Value,
    pub calibration: Calibration,
}

/// A part of a fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Version,
    Config,
    Weights,
    Options,
    Calibration,
}

impl Fingerprint {
    /// The fingerprint of compressing `model` on `calib` (windows of `seq_len`) with `opts`;
    /// reads the weights unless `Model::check_weights` already did.
    pub fn of(model: &Model, calib: &[u32], seq_len: usize, opts: &CompressOptions) -> Result<Self> {
        let mut h = StableHasher::new();
        for t in calib {
            h.update(&t.to_le_bytes());
        }
        Ok(Fingerprint {
            version: env!("CARGO_PKG_VERSION").to_string(),
            config: serde_json::Value::Object(model.cfg.raw.clone()),
            weights: model.weights_digest()?,
            options: serde_json::json!({ "run": opts, "svd": [opts.svd.power_iters as u64, opts.svd.oversample as u64, opts.svd.seed] }),
            calibration: Calibration { tokens: calib.len(), seq_len, digest: h.finish() },
        })
    }

    /// The parts in which `self` (the saved run) differs from `now`.
    pub fn differences(&self, now: &Fingerprint) -> Vec<Part> {
        let mut out = Vec::new();
        if self.version != now.version {
            out.push(Part::Version);
        }
        if self.config != now.config {
            out.push(Part::Config);
        }
        if self.weights != now.weights {
            out.push(Part::Weights);
        }
        if self.options != now.options {
            out.push(Part::Options);
        }
        if self.calibration != now.calibration {
            out.push(Part::Calibration);
        }
        out
    }

    /// Why a run saved with `self` cannot continue as `now` (None: it can).
    pub fn mismatch(&self, now: &Fingerprint) -> Option<String> {
        let parts = self.differences(now);
        if parts.is_empty() {
            return None;
        }
        let said: Vec<String> = parts
            .iter()
            .map(|p| match p {
                Part::Version => format!("it was made by lorap-gpu {}, this is {}", self.version, now.version),
                Part::Config => "the model's config.json is not the one it was made from".into(),
                Part::Weights => "the model's weights are not the ones it was made from (their content differs)".into(),
                Part::Options => "the options are not the ones it was made with".into(),
                Part::Calibration => "the calibration text or window length is not the one it was made with".into(),
            })
            .collect();
        Some(said.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_differing_part_is_named() {
        let d = |x: u64| Digest([x, x]);
        let saved = Fingerprint {
            version: "0.1.0".into(),
            config: serde_json::json!({"hidden_size": 64}),
            weights: d(1),
            options: serde_json::json!({"ratio": 0.2}),
            calibration: Calibration { tokens: 10, seq_len: 5, digest: d(2) },
        };
        assert_eq!(saved.mismatch(&saved.clone()), None);
        let mut now = saved.clone();
        now.weights = d(3);
        assert_eq!(saved.differences(&now), vec![Part::Weights]);
        assert!(saved.mismatch(&now).unwrap().contains("weights are not the ones"));
        now.version = "0.2.0".into();
        now.calibration.seq_len = 6;
        assert_eq!(saved.differences(&now), vec![Part::Version, Part::Weights, Part::Calibration]);
        assert!(saved.mismatch(&now).unwrap().starts_with("it was made by lorap-gpu 0.1.0, this is 0.2.0; "));
        // it survives the checkpoint's JSON
        let back: Fingerprint = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        assert_eq!(back, saved);
    }
}
