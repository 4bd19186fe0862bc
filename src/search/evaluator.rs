//! The one evaluator both searches score candidates with: mean NLL on the scoring windows
//! from cached hidden states entering a layer, with that layer and the ones after it given
//! by the candidate.

use std::time::Instant;

use anyhow::Result;

use crate::gpu::GpuBuf;
use crate::model::forward::{self, LayerWeights, Runner};

/// Mean NLL from hidden states `h` entering layer `from`, with layers `from..` given by
/// `layer(i)` (`None` = dropped), and the forward time.
pub(crate) fn nll_from(
    runner: &mut Runner,
    table: &crate::gpu::rope::RopeTable,
    h: &GpuBuf,
    from: usize,
    layer: &mut dyn FnMut(usize) -> Result<Option<LayerWeights>>,
    tokens: &[u32],
    window: usize,
) -> Result<(f64, f64)> {
    let gpu = runner.gpu.clone();
    let cfg = runner.cfg.clone();
    let n = tokens.len();
    // a copy: the cached states stay as they are
    let mut cur = gpu.alloc(n * cfg.hidden_size)?;
    let mut enc = gpu.encoder();
    enc.copy_buffer_to_buffer(h.raw(), 0, cur.raw(), 0, (n * cfg.hidden_size * 4) as u64);
    gpu.submit(enc);
    let mut seconds = 0.0;
    for i in from..cfg.num_hidden_layers {
        let Some(lw) = layer(i)? else { continue };
        gpu.wait()?;
        let t = Instant::now();
        let mut enc = gpu.encoder();
        cur = forward::layer_forward(&gpu, &mut enc, &cfg, &lw, table, forward::Batch { h: &cur, tokens: n, window }, None)?;
        gpu.submit(enc);
        gpu.wait()?;
        seconds += t.elapsed().as_secs_f64();
    }
    let t = Instant::now();
    let nll = runner.head_nll(vec![(cur, n)], tokens, window)?;
    seconds += t.elapsed().as_secs_f64();
    Ok((nll.iter().map(|&x| x as f64).sum::<f64>() / nll.len().max(1) as f64, seconds))
}

