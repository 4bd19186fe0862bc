//! The calibration walker: hidden states of the calibration windows walking through a
//! model's decoder layers, one at a time (statistics of the layer at hand, then on through
//! it). The compression pipeline and both searches walk with it.

use std::sync::Arc;

use anyhow::Result;

use super::states::CalibStates;
use super::stats::{collect_stats, LayerStats, StatesView, StatsNeed};
use crate::gpu::rope::RopeTable;
use crate::gpu::Gpu;
use crate::model::forward::{self, LayerWeights, Runner};
use crate::model::{Model, ModelConfig};

/// Calibration states between two decoder layers, and what running a layer on them needs.
pub struct Walker<'a> {
    gpu: &'a Gpu,
    cfg: &'a ModelConfig,
    table: RopeTable,
    states: CalibStates,
    seq_len: usize,
    windows: usize,
}

impl<'a> Walker<'a> {
    /// Embeds `calib` (whole windows of `seq_len`) in batches of about `batch_tokens`
    /// tokens (the runner's default when `None`); the states live on the host when `on_host`.
    pub fn start(gpu: &'a Arc<Gpu>, model: &'a Model, calib: &[u32], seq_len: usize, batch_tokens: Option<usize>, on_host: bool) -> Result<Self> {
        // the walk attends over whole windows: a model with a shorter sliding window is refused
        model.cfg.check_window(seq_len, "per calibration window (--seq-len)")?;
        let runner = Runner::new(gpu.clone(), model.cfg.clone(), model.store.clone(), false);
        let batch_tokens = batch_tokens.unwrap_or(runner.batch_tokens).max(1);
        let states = CalibStates::embed(&runner, calib, seq_len, batch_tokens, on_host)?;
        let table = RopeTable::from_inv_freq(gpu, seq_len.next_power_of_two(), &model.cfg.inv_freq())?;
        Ok(Walker { gpu, cfg: &model.cfg, table, states, seq_len, windows: calib.len() / seq_len })
    }

    /// The rope table for the windows' positions.
    pub fn table(&self) -> &RopeTable {
        &self.table
    }

    /// Statistics of `layer`'s linear inputs over every calibration token (the states stay).
    pub fn stats(&mut self, layer: &LayerWeights, need: StatsNeed) -> Result<LayerStats> {
        collect_stats(self.gpu, self.cfg, layer, StatesView { table: &self.table, states: &mut self.states, seq_len: self.seq_len, windows: self.windows }, need)
    }

    /// Drops the states, keeping the rope table (for scoring after the walk).
    pub fn finish(self) -> RopeTable {
        self.table
    }

    /// Runs the states through `layer`, in place: they now enter the next layer.
    pub fn advance(&mut self, layer: &LayerWeights) -> Result<()> {
        let (gpu, cfg, table, seq_len) = (self.gpu, self.cfg, &self.table, self.seq_len);
        self.states.for_each(gpu, |h, tokens| {
            let mut enc = gpu.encoder();
            let next = forward::layer_forward(gpu, &mut enc, cfg, layer, table, forward::Batch { h, tokens, window: seq_len }, None)?;
            gpu.submit(enc);
            Ok(Some(next))
        })?;
        gpu.wait()?;
        Ok(())
    }
}
