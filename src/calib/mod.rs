//! Calibration: the token windows, the hidden states between layers, the activation
//! statistics observed at each linear's input, and the walker that runs the states through
//! a model layer by layer for the pipeline and both searches.

pub mod states;
pub mod stats;
pub mod walker;

use anyhow::{Context, Result};

use crate::error::CompressError;
use crate::model::tokens::{TextError, TextFile};

/// Tokens of a calibration text kept in memory while it is first read (64 MiB of ids):
/// a longer text is read twice, once to count its tokens and once to copy the windows.
pub const KEEP_TOKENS: usize = 16 << 20;

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

/// `calibration_windows` of a text file, tokenized in pieces: the same windows as those of
/// the whole text's tokens, with at most `keep_tokens` token ids and one piece of text in
/// memory. The windows are spread over the whole text, so its token count is needed first:
/// a text of up to `keep_tokens` tokens is kept from the one pass, a longer one is counted,
/// then read again for the windows' tokens only.
pub fn calibration_windows_of(text: TextFile, samples: usize, seq_len: usize, keep_tokens: usize) -> Result<Vec<u32>> {
    if samples == 0 || seq_len < 2 {
        // the argument error, before the text is read
        return calibration_windows(&[], samples, seq_len);
    }
    let path = || text.path.display().to_string();
    let mut kept = Vec::new();
    let mut total = 0usize;
    let mut stream = text.stream()?;
    while let Some(piece) = stream.next_piece()? {
        total += piece.len();
        if total <= keep_tokens {
            kept.extend(piece);
        } else {
            kept = Vec::new();
        }
    }
    if total <= keep_tokens {
        return calibration_windows(&kept, samples, seq_len).with_context(path);
    }
    let avail = total / seq_len;
    if avail < samples {
        return Err(anyhow::Error::new(CompressError::CalibrationTooShort { tokens: total, samples, seq_len }).context(path()));
    }
    // the same window starts as `calibration_windows`, in increasing order
    let starts: Vec<usize> = (0..samples).map(|i| i * avail / samples * seq_len).collect();
    let mut out = Vec::with_capacity(samples * seq_len);
    let (mut at, mut next) = (0usize, 0usize);
    let mut stream = text.stream()?;
    while let Some(piece) = stream.next_piece()? {
        let end = at + piece.len();
        // the parts of windows in this piece; window `next` may have begun in an earlier one
        while next < samples && starts[next] < end {
            let lo = (starts[next] + out.len() - next * seq_len).max(at);
            let hi = (starts[next] + seq_len).min(end);
            out.extend_from_slice(&piece[lo - at..hi - at]);
            if hi < starts[next] + seq_len {
                break;
            }
            next += 1;
        }
        at = end;
    }
    if at != total {
        return Err(TextError::Changed { path: path(), first: total, second: at }.into());
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

