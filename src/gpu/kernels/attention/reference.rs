//! f64 CPU reference of causal grouped-KV attention over independent windows.

use super::{AttnShape, CachedShape};

/// CPU reference of attention against a KV cache: query t sees cache rows 0 ..= pos0 + t.
pub fn cached_attention_ref(s: CachedShape, q: &[f32], k_cache: &[f32], v_cache: &[f32]) -> Vec<f64> {
    let (hd, nh, nkv) = (s.head_dim, s.n_heads, s.n_kv);
    let group = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut o = vec![0f64; s.tokens * nh * hd];
    for t in 0..s.tokens {
        let last = s.pos0 + t;
        for h in 0..nh {
            let kvh = h / group;
            let qv = &q[t * nh * hd + h * hd..][..hd];
            let scores: Vec<f64> = (0..=last)
                .map(|j| qv.iter().zip(&k_cache[j * nkv * hd + kvh * hd..][..hd]).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale)
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|&x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                o[t * nh * hd + h * hd + d] = e.iter().enumerate().map(|(j, &p)| p * v_cache[j * nkv * hd + kvh * hd + d] as f64).sum::<f64>() / z;
            }
        }
    }
    o
}

/// CPU reference in f64.
pub fn causal_attention_ref(s: AttnShape, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
    let (hd, nh, nkv) = (s.head_dim, s.n_heads, s.n_kv);
    let group = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut o = vec![0f64; s.tokens * nh * hd];
    for t in 0..s.tokens {
        let w0 = t / s.window * s.window;
        for h in 0..nh {
            let kvh = h / group;
            let qv = &q[t * nh * hd + h * hd..][..hd];
            let scores: Vec<f64> = (w0..=t)
                .map(|j| {
                    let kv = &k[j * nkv * hd + kvh * hd..][..hd];
                    qv.iter().zip(kv).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|&x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                o[t * nh * hd + h * hd + d] = (w0..=t).zip(&e).map(|(j, &p)| p * v[j * nkv * hd + kvh * hd + d] as f64).sum::<f64>() / z;
            }
        }
    }
    o
}
