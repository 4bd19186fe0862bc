//! The seven linears of a decoder layer as one typed vocabulary: `Linear` (its checkpoint
//! name and its `--mpo-matrices` short name) and `PerLinear<T>` (one value per linear,
//! indexed by `Linear`, in the order checkpoints and reports list them).

use std::fmt;
use std::ops::{Index, IndexMut};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One of the seven linears of a LLaMA decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Linear {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Linear {
    /// The seven, in the order every per-linear list of the crate keeps them.
    pub const ALL: [Linear; 7] = [Linear::Q, Linear::K, Linear::V, Linear::O, Linear::Gate, Linear::Up, Linear::Down];
    /// The four attention linears.
    pub const ATTENTION: [Linear; 4] = [Linear::Q, Linear::K, Linear::V, Linear::O];

    /// Position in `ALL` (and in every `PerLinear`).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Name inside a layer in Hugging Face checkpoints (`self_attn.q_proj`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Linear::Q => "self_attn.q_proj",
            Linear::K => "self_attn.k_proj",
            Linear::V => "self_attn.v_proj",
            Linear::O => "self_attn.o_proj",
            Linear::Gate => "mlp.gate_proj",
            Linear::Up => "mlp.up_proj",
            Linear::Down => "mlp.down_proj",
        }
    }

    /// Short name (`--mpo-matrices`, search reports): q, k, v, o, gate, up, down.
    pub const fn short(self) -> &'static str {
        match self {
            Linear::Q => "q",
            Linear::K => "k",
            Linear::V => "v",
            Linear::O => "o",
            Linear::Gate => "gate",
            Linear::Up => "up",
            Linear::Down => "down",
        }
    }

    /// The linear with checkpoint name `name`.
    pub fn from_name(name: &str) -> Option<Linear> {
        Linear::ALL.into_iter().find(|l| l.name() == name)
    }

    /// The linear with short name `short`.
    pub fn from_short(short: &str) -> Option<Linear> {
        Linear::ALL.into_iter().find(|l| l.short() == short)
    }

    /// q, k and v: the linears Qwen2-style models give a bias.
    pub const fn is_qkv(self) -> bool {
        matches!(self, Linear::Q | Linear::K | Linear::V)
    }

    /// One of q, k, v, o.
    pub const fn is_attention(self) -> bool {
        (self as usize) < 4
    }
}

impl fmt::Display for Linear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Serialized by short name (the spelling the CLI takes).
impl Serialize for Linear {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.short())
    }
}

/// Read from a short name, a checkpoint name, or (reports of earlier versions) an index.
impl<'de> Deserialize<'de> for Linear {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Spelling {
            Name(String),
            Index(usize),
        }
        match Spelling::deserialize(d)? {
            Spelling::Name(s) => Linear::from_short(&s).or_else(|| Linear::from_name(&s)).ok_or_else(|| serde::de::Error::custom(format!("unknown linear {s:?}"))),
            Spelling::Index(j) => Linear::ALL.get(j).copied().ok_or_else(|| serde::de::Error::custom(format!("linear index {j} out of 0..7"))),
        }
    }
}

/// One value per linear of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PerLinear<T>(pub [T; 7]);

impl<T> PerLinear<T> {
    /// `f(linear)` for each of the seven, in order.
    pub fn from_fn(mut f: impl FnMut(Linear) -> T) -> Self {
        PerLinear(std::array::from_fn(|j| f(Linear::ALL[j])))
    }

    /// Each linear with its value, in order.
    pub fn iter(&self) -> impl Iterator<Item = (Linear, &T)> {
        Linear::ALL.into_iter().zip(self.0.iter())
    }

    /// The values, in order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }

    pub fn map<U>(self, f: impl FnMut(T) -> U) -> PerLinear<U> {
        PerLinear(self.0.map(f))
    }
}

impl<T: Clone> PerLinear<T> {
    /// The same value for all seven.
    pub fn splat(v: T) -> Self {
        PerLinear::from_fn(|_| v.clone())
    }
}

impl<T> Index<Linear> for PerLinear<T> {
    type Output = T;
    fn index(&self, l: Linear) -> &T {
        &self.0[l.index()]
    }
}

impl<T> IndexMut<Linear> for PerLinear<T> {
    fn index_mut(&mut self, l: Linear) -> &mut T {
        &mut self.0[l.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order_is_the_checkpoint_order() {
        for (j, l) in Linear::ALL.into_iter().enumerate() {
            assert_eq!(l.index(), j);
            assert_eq!(Linear::from_name(l.name()), Some(l));
            assert_eq!(Linear::from_short(l.short()), Some(l));
            let json = serde_json::to_string(&l).unwrap();
            assert_eq!(serde_json::from_str::<Linear>(&json).unwrap(), l);
        }
        assert_eq!(Linear::from_name("mlp.down"), None);
        assert!(serde_json::from_str::<Linear>("\"w\"").is_err());
        assert_eq!(serde_json::from_str::<Linear>("6").unwrap(), Linear::Down);
        assert!(serde_json::from_str::<Linear>("7").is_err());
        assert_eq!(Linear::ALL.iter().filter(|l| l.is_attention()).count(), 4);
        assert_eq!(Linear::ALL.iter().filter(|l| l.is_qkv()).count(), 3);
    }

    #[test]
    fn per_linear_indexes_by_linear() {
        let mut p = PerLinear::from_fn(|l| l.index() * 10);
        p[Linear::Down] += 1;
        assert_eq!(p[Linear::Down], 61);
        assert_eq!(p.iter().map(|(l, _)| l).collect::<Vec<_>>(), Linear::ALL.to_vec());
        assert_eq!(p.map(|v| v + 1)[Linear::Q], 1);
        assert_eq!(PerLinear::splat(2u8).values().sum::<u8>(), 14);
    }
}
