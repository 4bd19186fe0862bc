//! Calibration hidden states between layers: kept on the GPU when they fit the memory
//! budget, otherwise kept on the host and uploaded one batch at a time, so `--max-vram`
//! bounds GPU memory by one layer, one batch and the work buffers whatever the sample count.

use anyhow::Result;

use crate::gpu::{Gpu, GpuBuf};
use crate::model::forward::Runner;

enum Batch {
    Device(GpuBuf, usize),
    Host(Vec<f32>, usize),
}

/// The calibration windows' hidden states, in batches of whole windows.
pub struct CalibStates {
    batches: Vec<Batch>,
}

impl CalibStates {
    /// Embeds `calib` (whole windows of `seq_len`) in batches of about `batch_tokens`; on
    /// the host when `on_host`.
    pub fn embed(runner: &Runner, calib: &[u32], seq_len: usize, batch_tokens: usize, on_host: bool) -> Result<Self> {
        let per_batch = (batch_tokens / seq_len).max(1) * seq_len;
        let mut batches = Vec::new();
        for chunk in calib.chunks(per_batch) {
            let h = runner.embed(chunk)?;
            batches.push(if on_host { Batch::Host(runner.gpu.read(&h)?, chunk.len()) } else { Batch::Device(h, chunk.len()) });
        }
        Ok(CalibStates { batches })
    }

    /// Calls `f(states, tokens)` on every batch, in order; when `f` returns new states they
    /// replace the batch's.
    pub fn for_each(&mut self, gpu: &Gpu, mut f: impl FnMut(&GpuBuf, usize) -> Result<Option<GpuBuf>>) -> Result<()> {
        for b in self.batches.iter_mut() {
            match b {
                Batch::Device(h, tokens) => {
                    if let Some(next) = f(h, *tokens)? {
                        *h = next;
                    }
                }
                Batch::Host(v, tokens) => {
                    let h = gpu.upload(v)?;
                    if let Some(next) = f(&h, *tokens)? {
                        *v = gpu.read(&next)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether states of `state_bytes` must stay on the host: on the GPU they would sit beside
/// `resident_bytes` (what a layer's work holds at its peak), and together they would cross
/// the GPU budget. Without a budget they stay on the GPU.
pub fn keep_on_host(gpu: &Gpu, state_bytes: u64, resident_bytes: u64) -> bool {
    let budget = gpu.budget();
    budget > 0 && state_bytes.saturating_add(resident_bytes) > budget
}
