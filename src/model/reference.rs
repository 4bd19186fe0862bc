//! CPU reference forward pass in f64 (slow; for tests on tiny models): the same maths as
//! the GPU pass, from the same weight files, dense or compressed.

use super::config::ModelConfig;
use crate::format::linear::Linear;
use crate::format::plan::{LayerPlan, LinearRepr};
use crate::format::weights::{WeightError, WeightStore};

/// A linear layer as an f64 function.
struct RefLinear {
    out: usize,
    inp: usize,
    /// Dense W [out, inp] or factors A [out, r], B [r, inp].
    w: Vec<f64>,
    ab: Option<(Vec<f64>, Vec<f64>, usize)>,
    bias: Option<Vec<f64>>,
}

fn f64v(v: Vec<f32>) -> Vec<f64> {
    v.into_iter().map(|x| x as f64).collect()
}

impl RefLinear {
    /// `linear` of layer `l` as plan `p` stores it (MPO cores contracted on the CPU).
    fn load(store: &WeightStore, cfg: &ModelConfig, p: &LayerPlan, l: usize, linear: Linear) -> Result<Self, WeightError> {
        let (out, inp) = cfg.linear_shape(p, linear);
        let name = crate::format::names::linear_base(l, linear);
        let bias = if cfg.has_bias(p, linear) { Some(f64v(store.f32(&format!("{name}.bias"), &[out])?)) } else { None };
        Ok(match p.repr(linear) {
            LinearRepr::Dense => RefLinear { out, inp, w: f64v(store.f32(&format!("{name}.weight"), &[out, inp])?), ab: None, bias },
            LinearRepr::Mpo(m) => RefLinear { out, inp, w: f64v(super::forward::mpo_dense(store, l, linear, &m)?), ab: None, bias },
            LinearRepr::LowRank(r) => RefLinear {
                out,
                inp,
                w: Vec::new(),
                ab: Some((f64v(store.f32(&format!("{name}.factor_a"), &[out, r])?), f64v(store.f32(&format!("{name}.factor_b"), &[r, inp])?), r)),
                bias,
            },
        })
    }

    fn apply(&self, x: &[f64]) -> Vec<f64> {
        let mv = |w: &[f64], x: &[f64], out: usize, inp: usize| -> Vec<f64> { (0..out).map(|o| w[o * inp..(o + 1) * inp].iter().zip(x).map(|(a, b)| a * b).sum()).collect() };
        let mut y = match &self.ab {
            None => mv(&self.w, x, self.out, self.inp),
            Some((a, b, r)) => mv(a, &mv(b, x, *r, self.inp), self.out, *r),
        };
        if let Some(b) = &self.bias {
            y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
        }
        y
    }
}

fn rms(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(w).map(|(a, b)| a * inv * b).collect()
}

/// NLL of tokens[1..] given the prefix, for one window, in f64.
pub fn window_nll_ref(cfg: &ModelConfig, store: &WeightStore, tokens: &[u32]) -> Result<Vec<f64>, WeightError> {
    let (d, n, eps) = (cfg.hidden_size, tokens.len(), cfg.rms_norm_eps);
    let (nh, nkv, hd) = (cfg.n_heads(), cfg.n_kv_heads(), cfg.head_dim());
    let inv = cfg.inv_freq();
    let mut h: Vec<Vec<f64>> = tokens.iter().map(|&t| store.rows_f32(crate::format::names::EMBED, t as usize, t as usize + 1).map(f64v)).collect::<Result<_, _>>()?;
    let rope = |x: &mut [f64], heads: usize, pos: usize| {
        for hh in 0..heads {
            for (i, &f) in inv.iter().enumerate() {
                let ang = (pos as f32 * f) as f64;
                let (s, c) = ang.sin_cos();
                let (a, b) = (x[hh * hd + i], x[hh * hd + i + hd / 2]);
                x[hh * hd + i] = a * c - b * s;
                x[hh * hd + i + hd / 2] = b * c + a * s;
            }
        }
    };
    for l in 0..cfg.num_hidden_layers {
        let p = cfg.layer_plan(l);
        let nm = |s: &str| crate::format::names::layer(l, s);
        let lin = |linear: Linear| RefLinear::load(store, cfg, &p, l, linear);
        let (q, k, v, o) = (lin(Linear::Q)?, lin(Linear::K)?, lin(Linear::V)?, lin(Linear::O)?);
        let (g, u, dn) = (lin(Linear::Gate)?, lin(Linear::Up)?, lin(Linear::Down)?);
        let w_in = f64v(store.f32(&nm("input_layernorm.weight"), &[d])?);
        let w_post = f64v(store.f32(&nm("post_attention_layernorm.weight"), &[d])?);
        let xs: Vec<Vec<f64>> = h.iter().map(|x| rms(x, &w_in, eps)).collect();
        let mut qs: Vec<Vec<f64>> = xs.iter().map(|x| q.apply(x)).collect();
        let mut ks: Vec<Vec<f64>> = xs.iter().map(|x| k.apply(x)).collect();
        let vs: Vec<Vec<f64>> = xs.iter().map(|x| v.apply(x)).collect();
        for t in 0..n {
            rope(&mut qs[t], nh, t);
            rope(&mut ks[t], nkv, t);
        }
        for t in 0..n {
            let mut att = vec![0f64; cfg.q_dim()];
            for hh in 0..nh {
                let kv = hh / (nh / nkv);
                let sc: Vec<f64> = (0..=t).map(|j| (0..hd).map(|e| qs[t][hh * hd + e] * ks[j][kv * hd + e]).sum::<f64>() / (hd as f64).sqrt()).collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = ex.iter().sum();
                for e in 0..hd {
                    att[hh * hd + e] = (0..=t).map(|j| ex[j] * vs[j][kv * hd + e]).sum::<f64>() / z;
                }
            }
            let ov = o.apply(&att);
            h[t].iter_mut().zip(&ov).for_each(|(a, b)| *a += b);
        }
        for x in h.iter_mut() {
            let xn = rms(x, &w_post, eps);
            let (gv, uv) = (g.apply(&xn), u.apply(&xn));
            let a: Vec<f64> = gv.iter().zip(&uv).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            x.iter_mut().zip(dn.apply(&a)).for_each(|(a, b)| *a += b);
        }
    }
    let norm = f64v(store.f32(crate::format::names::FINAL_NORM, &[d])?);
    let head_name = if cfg.tie_word_embeddings || !store.contains(crate::format::names::LM_HEAD) { crate::format::names::EMBED } else { crate::format::names::LM_HEAD };
    let head = f64v(store.f32(head_name, &[cfg.vocab_size, d])?);
    Ok((0..n - 1)
        .map(|t| {
            let x = rms(&h[t], &norm, eps);
            let logits: Vec<f64> = (0..cfg.vocab_size).map(|r| head[r * d..(r + 1) * d].iter().zip(&x).map(|(a, b)| a * b).sum()).collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            m + z.ln() - logits[tokens[t + 1] as usize]
        })
        .collect())
}
