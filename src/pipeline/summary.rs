//! What a compression run reports: per layer and in total (compression_report.json, the
//! `--json` output, the HTML report's data).

use serde::{Deserialize, Serialize};

use crate::methods::phase::PhaseSeconds;
use crate::methods::CompressOptions;

/// Per-layer outcome, as written to compression_report.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerReport {
    pub layer: usize,
    /// q, k, v, o ranks (null = dense).
    pub ranks: [Option<usize>; 4],
    pub ffn_kept: usize,
    pub ffn_total: usize,
    /// The FFN channels kept (ascending indices into the dense layer's), where the method
    /// prunes channels: what a baseline needs to keep the same ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ffn_kept_channels: Vec<usize>,
    /// The FFN compensation's choice and its candidates' held-out errors (`--ffn-refit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_refit: Option<crate::methods::refit::RefitReport>,
    /// Each factored q/k/v/o's refit choice and candidates (`--attention-refit`).
    #[serde(default, skip_serializing_if = "no_refit")]
    pub attention_refit: [Option<crate::methods::refit::RefitReport>; 4],
    /// Relative weighted reconstruction error ||(W - AB) S||_F / ||W S||_F of q, k, v, o.
    pub weighted_rel_error: [f64; 4],
    /// Weighted singular values of q, k, v, o (as many as were computed).
    pub spectra: [Vec<f64>; 4],
    pub params_before: usize,
    pub params_after: usize,
    pub seconds: f64,
    /// Where the layer's time went.
    #[serde(default)]
    pub phases: PhaseSeconds,
}

fn no_refit(r: &[Option<crate::methods::refit::RefitReport>; 4]) -> bool {
    r.iter().all(Option::is_none)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompressionReport {
    pub method: String,
    /// The dense model folder it was made from.
    #[serde(default)]
    pub source_model: String,
    pub options: CompressOptions,
    pub calibration_windows: usize,
    pub calibration_seq_len: usize,
    pub decoder_params_before: usize,
    pub decoder_params_after: usize,
    /// 1 - after/before over all decoder layers (norms included).
    pub achieved_decoder_ratio: f64,
    pub total_params_before: usize,
    pub total_params_after: usize,
    pub achieved_total_ratio: f64,
    /// Most GPU memory held at once (everything the tool allocates: buffers in use, pooled
    /// idle ones, readback staging, uniform chunks).
    pub peak_gpu_bytes: u64,
    /// Whether the calibration states lived on the host (with a layer's work they would
    /// have crossed the `--max-vram` budget on the GPU).
    #[serde(default)]
    pub states_on_host: bool,
    pub seconds: f64,
    pub adapter: String,
    /// Where the run's time went (the layers' phases plus embedding, replaying and the
    /// final shard).
    #[serde(default)]
    pub phases: PhaseSeconds,
    pub layers: Vec<LayerReport>,
}

