//! Calibration: the token windows, the hidden states between layers, the activation
//! statistics observed at each linear's input, and the walker that runs the states through
//! a model layer by layer for the pipeline and both searches.

pub mod states;
pub mod stats;
pub mod walker;

use anyhow::Result;

use crate::error::CompressError;

/// Calibration windows: `samples` non-overlapping windows of `seq_len` tokens spread evenly
/// over the text's tokens.
pub fn calibration_windows(tokens: &[u32], samples: usize, seq_len: usize) -> Result<Vec<u32>> {
    if samples == 0 || seq_len < 2 {
        return Err(CompressError::BadArgument("need at least one calibration window (--samples) of at least 2 tokens (--seq-len)".into()).into());
    }
    let avail = tokens.len() / seq_len;
    if avail < samples {
        return Err(CompressError::CalibrationTooShort { tokens: tokens.len(), samples, seq_len }.into());
    }
    let mut out = Vec::with_capacity(samples * seq_len);
    for i in 0..samples {
        let w = i * avail / samples;
        out.extend_from_slice(&tokens[w * seq_len..(w + 1) * seq_len]);
    }
    Ok(out)
}


/// Splits calibration windows of `seq_len` into statistics windows and the last
/// `search_windows` scoring windows (never used for statistics).
pub(crate) fn split_search_windows(calib: &[u32], seq_len: usize, search_windows: usize) -> Result<(&[u32], &[u32]), CompressError> {
    let windows = calib.len() / seq_len;
    if search_windows == 0 || windows <= search_windows {
        return Err(CompressError::BadArgument(format!("need more calibration windows ({windows}) than search windows ({search_windows}), and at least one of each")));
    }
    Ok(calib.split_at((windows - search_windows) * seq_len))
}

