//! A stable 128-bit content hash (for `--resume` fingerprints of weights and calibration
//! tokens). It is defined here, not taken from `std` (whose `DefaultHasher` may change
//! between Rust releases), so the same bytes give the same digest on every platform and
//! build. It guards against mixing runs by accident, not against an adversary.

use serde::{Deserialize, Serialize};

/// Odd multipliers with well spread bits (the golden ratio's and two other irrational
/// numbers' fractional parts), one per lane so lanes that see equal words still differ.
const MUL: [u64; 4] = [0x9e37_79b9_7f4a_7c15, 0xc2b2_ae3d_27d4_eb4f, 0x1656_67b1_9e37_79f9, 0x85eb_ca77_c2b2_ae63];

/// Bytes consumed per round: one little-endian word per lane.
const BLOCK: usize = 32;

/// Streaming hasher: four independent lanes (so the multiplications of a block overlap),
/// folded together with the total length at the end.
#[derive(Clone)]
pub struct StableHasher {
    lanes: [u64; 4],
    /// Bytes of an unfinished block.
    pending: [u8; BLOCK],
    pending_len: usize,
    total: u64,
}

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher { lanes: [1, 2, 3, 4], pending: [0; BLOCK], pending_len: 0, total: 0 }
    }
}

/// One lane step: xor the word in, multiply (spreads low bits upward), fold the high bits
/// back down (so the next multiplication sees them). Both steps are bijective in the lane.
#[inline(always)]
fn step(lane: u64, word: u64, mul: u64) -> u64 {
    let x = (lane ^ word).wrapping_mul(mul);
    x ^ (x >> 29)
}

/// Final avalanche of one 64-bit value (every input bit affects every output bit).
fn avalanche(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl StableHasher {
    pub fn new() -> Self {
        Self::default()
    }

    fn block(&mut self, b: &[u8]) {
        for (k, lane) in self.lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(b[k * 8..k * 8 + 8].try_into().expect("8 bytes"));
            *lane = step(*lane, w, MUL[k]);
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.total = self.total.wrapping_add(bytes.len() as u64);
        if self.pending_len > 0 {
            let take = (BLOCK - self.pending_len).min(bytes.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&bytes[..take]);
            self.pending_len += take;
            bytes = &bytes[take..];
            if self.pending_len < BLOCK {
                return;
            }
            let p = self.pending;
            self.block(&p);
            self.pending_len = 0;
        }
        let mut blocks = bytes.chunks_exact(BLOCK);
        for b in &mut blocks {
            self.block(b);
        }
        let rest = blocks.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// A length-prefixed field, so ("ab", "c") and ("a", "bc") differ.
    pub fn field(&mut self, bytes: &[u8]) {
        self.update(&(bytes.len() as u64).to_le_bytes());
        self.update(bytes);
    }

    pub fn u64(&mut self, x: u64) {
        self.update(&x.to_le_bytes());
    }

    pub fn finish(&self) -> Digest {
        let mut h = self.clone();
        // the unfinished block, zero-padded (the length below tells the padding apart)
        if h.pending_len > 0 {
            let mut b = [0u8; BLOCK];
            b[..h.pending_len].copy_from_slice(&h.pending[..h.pending_len]);
            h.block(&b);
        }
        let mut a = avalanche(h.total ^ MUL[0]);
        let mut b = avalanche(h.total ^ MUL[1]);
        for k in 0..4 {
            a = avalanche(a ^ h.lanes[k]);
            b = avalanche(b.wrapping_add(h.lanes[3 - k]).rotate_left(17));
        }
        Digest([a, b])
    }
}

/// A 128-bit digest, written as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Digest(pub [u64; 2]);

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}{:016x}", self.0[0], self.0[1])
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for Digest {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("not a 32-digit hex digest: {s:?}");
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let a = u64::from_str_radix(&s[..16], 16).map_err(|_| bad())?;
        let b = u64::from_str_radix(&s[16..], 16).map_err(|_| bad())?;
        Ok(Digest([a, b]))
    }
}

/// The digest of one byte string.
pub fn digest(bytes: &[u8]) -> Digest {
    let mut h = StableHasher::new();
    h.update(bytes);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_values_split_invariance_and_sensitivity() {
        // pinned: a change of these values breaks every saved --resume fingerprint
        assert_eq!(digest(b"").to_string(), "f8e4a41bebee241251c971a97cb2635b");
        assert_eq!(digest(b"lorap-gpu resume fingerprint, 40 bytes..").to_string(), "06cc3d54a4cdd4d47d0cd29ad4e5f75a");
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = digest(&data);
        for cut in [0, 1, 31, 32, 33, 500, 999, 1000] {
            let mut h = StableHasher::new();
            h.update(&data[..cut]);
            h.update(&data[cut..]);
            assert_eq!(h.finish(), whole, "split at {cut}");
        }
        // one flipped bit anywhere, or one more zero byte, changes it
        for i in [0, 17, 500, 999] {
            let mut d = data.clone();
            d[i] ^= 1;
            assert_ne!(digest(&d), whole, "bit at {i}");
        }
        let mut longer = data.clone();
        longer.push(0);
        assert_ne!(digest(&longer), whole);
        assert_ne!(digest(b"\0"), digest(b""));
        let s = whole.to_string();
        assert_eq!(Digest::try_from(s.clone()).unwrap(), whole);
        assert!(Digest::try_from("xyz".to_string()).is_err());
    }
}
