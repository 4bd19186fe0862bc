//! Compression methods. `lorap` is the main one; `svd`, `allocate`, `ffn` and `output` are
//! the pieces it (and the related methods) share.

pub mod allocate;
pub mod ffn;
pub mod lorap;
pub mod output;
pub mod svd;
