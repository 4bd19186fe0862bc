//! Perplexity: tokenize the whole text once (no BOS), cut non-overlapping windows of L
//! tokens (a shorter tail is dropped), score every token but the first of each window,
//! ppl = exp(mean NLL).

use crate::model::forward::{Progress, Result, Runner};

#[derive(Debug, Clone, serde::Serialize)]
pub struct PerplexityReport {
    pub windows: usize,
    pub window_len: usize,
    pub scored_tokens: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Mean NLL of each window, in order (paired comparisons of two models).
    pub window_mean_nll: Vec<f64>,
}

/// The first `max_windows` (all if None) windows of `tokens`.
pub fn windows_of(tokens: &[u32], window: usize, max_tokens: Option<usize>) -> &[u32] {
    let n = max_tokens.unwrap_or(tokens.len()).min(tokens.len());
    &tokens[..n / window * window]
}

/// Perplexity of `tokens` in windows of `window`.
pub fn perplexity(runner: &mut Runner, tokens: &[u32], window: usize, progress: Progress) -> Result<PerplexityReport> {
    let t = std::time::Instant::now();
    let nll = runner.window_nll(tokens, window, progress)?;
    let secs = t.elapsed().as_secs_f64();
    let mean = nll.iter().map(|&x| x as f64).sum::<f64>() / nll.len().max(1) as f64;
    // every window scores window - 1 tokens
    let window_mean_nll = nll.chunks(window.saturating_sub(1).max(1)).map(|c| c.iter().map(|&x| x as f64).sum::<f64>() / c.len() as f64).collect();
    Ok(PerplexityReport {
        windows: tokens.len() / window,
        window_len: window,
        scored_tokens: nll.len(),
        mean_nll: mean,
        perplexity: mean.exp(),
        seconds: secs,
        tokens_per_second: tokens.len() as f64 / secs,
        window_mean_nll,
    })
}
