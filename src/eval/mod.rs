//! Evaluation: perplexity by the windowed protocol and zero-shot multiple-choice accuracy.

pub mod perplexity;
pub mod zeroshot;
