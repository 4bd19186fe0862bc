//! MPO (matrix product operator) decomposition of one weight matrix by sequential truncated
//! SVDs (method.md section 3): W [I, J] with I = i1..in and J = j1..jn is reshaped to
//! (i1, j1, ..., in, jn) and split into n cores T_k [r_{k-1}, i_k, j_k, r_k]; bond dims
//! are truncated to compress, and the singular-value weight is moved into the central
//! core. CPU f64 (the matrices are attention-sized; the GPU path is future work).
//! `MpoMethod` applies it to a layer's chosen linears (`compress --method mpo`).

use nalgebra::DMatrix;

use crate::format::linear::Linear;

pub use crate::format::mpo::{Core, Mpo};

/// Splits `n` into `parts` factors (product exactly n), as balanced as its prime factors
/// allow, largest first.
pub fn factorize(n: usize, parts: usize) -> Vec<usize> {
    let mut primes = Vec::new();
    let mut m = n.max(1);
    let mut p = 2;
    while p * p <= m {
        while m.is_multiple_of(p) {
            primes.push(p);
            m /= p;
        }
        p += 1;
    }
    if m > 1 {
        primes.push(m);
    }
    let mut out = vec![1usize; parts.max(1)];
    // greedy: the largest prime goes to the currently smallest factor
    primes.sort_unstable_by(|a, b| b.cmp(a));
    for q in primes {
        let k = (0..out.len()).min_by_key(|&k| out[k]).unwrap();
        out[k] *= q;
    }
    out.sort_unstable_by(|a, b| b.cmp(a));
    out
}

/// W [rows, cols] as the tensor (i1, j1, ..., in, jn), row-major, in f64.
fn permuted(w: &[f32], rows: usize, cols: usize, row_f: &[usize], col_f: &[usize]) -> Vec<f64> {
    let n = row_f.len();
    // permute (i1..in, j1..jn) -> (i1, j1, ..., in, jn)
    let mut t = vec![0f64; rows * cols];
    let (mut ri, mut cj) = (vec![0usize; n], vec![0usize; n]);
    for r in 0..rows {
        let mut x = r;
        for k in (0..n).rev() {
            ri[k] = x % row_f[k];
            x /= row_f[k];
        }
        for c in 0..cols {
            let mut y = c;
            for k in (0..n).rev() {
                cj[k] = y % col_f[k];
                y /= col_f[k];
            }
            let mut idx = 0;
            for k in 0..n {
                idx = (idx * row_f[k] + ri[k]) * col_f[k] + cj[k];
            }
            t[idx] = w[r * cols + c] as f64;
        }
    }
    t
}

impl Mpo {
    /// Decomposes the row-major [rows, cols] `w` with rows = prod(row_f), cols = prod(col_f)
    /// (same number of factors), keeping at most `max_bond` singular values per cut.
    pub fn decompose(w: &[f32], rows: usize, cols: usize, row_f: &[usize], col_f: &[usize], max_bond: Option<usize>) -> Mpo {
        assert_eq!(row_f.len(), col_f.len(), "as many row as column factors");
        assert_eq!(row_f.iter().product::<usize>(), rows);
        assert_eq!(col_f.iter().product::<usize>(), cols);
        let n = row_f.len();
        let t = permuted(w, rows, cols, row_f, col_f);
        let mut cores = Vec::with_capacity(n);
        let mut discarded = Vec::new();
        let mut left = 1usize;
        let mut rest = t; // [left * i_k * j_k, remaining]
        let mut remaining = rows * cols;
        for k in 0..n - 1 {
            let (i, j) = (row_f[k], col_f[k]);
            remaining /= i * j;
            let m = DMatrix::<f64>::from_row_slice(left * i * j, remaining, &rest);
            let svd = m.svd(true, true);
            let (u, s, vt) = (svd.u.unwrap(), svd.singular_values, svd.v_t.unwrap());
            let mut order: Vec<usize> = (0..s.len()).collect();
            order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
            let keep = max_bond.unwrap_or(usize::MAX).min(s.len()).max(1);
            discarded.extend(order[keep..].iter().map(|&x| s[x]));
            let mut core = vec![0f64; left * i * j * keep];
            for row in 0..left * i * j {
                for (c, &o) in order[..keep].iter().enumerate() {
                    core[row * keep + c] = u[(row, o)];
                }
            }
            cores.push(Core { left, i, j, right: keep, data: core });
            let mut next = vec![0f64; keep * remaining];
            for (c, &o) in order[..keep].iter().enumerate() {
                for col in 0..remaining {
                    next[c * remaining + col] = s[o] * vt[(o, col)];
                }
            }
            rest = next;
            left = keep;
        }
        cores.push(Core { left, i: row_f[n - 1], j: col_f[n - 1], right: 1, data: rest });
        let mut mpo = Mpo { rows, cols, cores, discarded };
        mpo.move_weight_to(n / 2);
        mpo
    }

    /// Right-to-left sweep that leaves cores after `center` right-orthonormal, so the
    /// singular-value weight (now in the last core) sits in core `center`.
    fn move_weight_to(&mut self, center: usize) {
        for k in (center + 1..self.cores.len()).rev() {
            let c = &self.cores[k];
            let (l, cols) = (c.left, c.i * c.j * c.right);
            let m = DMatrix::<f64>::from_row_slice(l, cols, &c.data);
            // M = L Q with Q row-orthonormal: from the SVD, Q = V^T, L = U S
            let svd = m.svd(true, true);
            let (u, s, vt) = (svd.u.unwrap(), svd.singular_values, svd.v_t.unwrap());
            let r = s.len();
            let q: Vec<f64> = (0..r).flat_map(|a| (0..cols).map(move |b| (a, b))).map(|(a, b)| vt[(a, b)]).collect();
            let lmat = &u * DMatrix::from_diagonal(&s); // [l, r]
            self.cores[k].data = q;
            self.cores[k].left = r;
            // absorb L into the previous core's right bond
            let p = &self.cores[k - 1];
            let prow = p.left * p.i * p.j;
            let pm = DMatrix::<f64>::from_row_slice(prow, p.right, &p.data) * lmat;
            self.cores[k - 1].data = (0..prow).flat_map(|a| (0..r).map(move |b| (a, b))).map(|(a, b)| pm[(a, b)]).collect();
            self.cores[k - 1].right = r;
        }
    }

}

/// Least-squares fit of the two outer cores of a 3-core MPO to `w` with the central core
/// fixed to `shared.cores[1]` (alternating least squares, `sweeps` rounds, starting from
/// the shared decomposition's right core): the per-layer auxiliary tensors around a centre
/// shared by all layers.
pub fn refit_outer(w: &[f32], shared: &Mpo, sweeps: usize) -> Mpo {
    assert_eq!(shared.cores.len(), 3, "refit_outer works on 3-core MPOs");
    let (rows, cols) = (shared.rows, shared.cols);
    let row_f: Vec<usize> = shared.cores.iter().map(|c| c.i).collect();
    let col_f: Vec<usize> = shared.cores.iter().map(|c| c.j).collect();
    let t = permuted(w, rows, cols, &row_f, &col_f);
    let c = &shared.cores[1];
    let (s0, s1, s2) = (row_f[0] * col_f[0], row_f[1] * col_f[1], row_f[2] * col_f[2]);
    let (a, b) = (c.left, c.right);
    let centre = &c.data; // [a, s1, b]
    let mut r = DMatrix::<f64>::from_row_slice(b, s2, &shared.cores[2].data);
    let mut l = DMatrix::<f64>::zeros(s0, a);
    let solve = |g: DMatrix<f64>, rhs: DMatrix<f64>| -> DMatrix<f64> {
        // (G + ridge) X = rhs, ridge for rank-deficient Gram matrices
        let ridge = 1e-12 * g.trace().abs().max(f64::MIN_POSITIVE);
        let n = g.nrows();
        let h = g + DMatrix::<f64>::identity(n, n) * ridge;
        match h.clone().cholesky() {
            Some(ch) => ch.solve(&rhs),
            None => h.pseudo_inverse(1e-12).map(|p| p * rhs).unwrap_or_else(|_| DMatrix::zeros(n, 1)),
        }
    };
    let t_x = DMatrix::<f64>::from_row_slice(s0, s1 * s2, &t); // [s0, (s1 s2)]
    let t_z = DMatrix::<f64>::from_row_slice(s0 * s1, s2, &t); // [(s0 s1), s2]
    for _ in 0..sweeps.max(1) {
        // M [a, (s1 s2)] = S x R; L = T_x M^T (M M^T)^-1
        let mut m = DMatrix::<f64>::zeros(a, s1 * s2);
        for al in 0..a {
            for y in 0..s1 {
                for be in 0..b {
                    let sv = centre[(al * s1 + y) * b + be];
                    if sv != 0.0 {
                        for z in 0..s2 {
                            m[(al, y * s2 + z)] += sv * r[(be, z)];
                        }
                    }
                }
            }
        }
        let lt = solve(&m * m.transpose(), &m * t_x.transpose()); // [a, s0]
        l = lt.transpose();
        // N [(s0 s1), b] = L x S; R = (N^T N)^-1 N^T T_z
        let mut nmat = DMatrix::<f64>::zeros(s0 * s1, b);
        for x in 0..s0 {
            for al in 0..a {
                let lv = l[(x, al)];
                if lv == 0.0 {
                    continue;
                }
                for y in 0..s1 {
                    for be in 0..b {
                        nmat[(x * s1 + y, be)] += lv * centre[(al * s1 + y) * b + be];
                    }
                }
            }
        }
        r = solve(nmat.transpose() * &nmat, nmat.transpose() * &t_z);
    }
    let row_major = |m: &DMatrix<f64>| (0..m.nrows()).flat_map(|i| (0..m.ncols()).map(move |j| (i, j))).map(|(i, j)| m[(i, j)]).collect::<Vec<f64>>();
    let cores = vec![
        Core { left: 1, i: row_f[0], j: col_f[0], right: a, data: row_major(&l) },
        c.clone(),
        Core { left: b, i: row_f[2], j: col_f[2], right: 1, data: row_major(&r) },
    ];
    Mpo { rows, cols, cores, discarded: Vec::new() }
}

/// The shared decompositions for `--mpo-share-centre`: per chosen linear, the MPO of the
/// mean of that linear's weights over all layers (its centre is the shared core).
pub(crate) fn shared_decompositions(store: &crate::format::WeightStore, cfg: &crate::model::ModelConfig, mpo: &MpoOptions, run: &super::CompressOptions) -> anyhow::Result<std::collections::BTreeMap<Linear, Mpo>> {
    let mut out = std::collections::BTreeMap::new();
    if !mpo.share_centre {
        return Ok(out);
    }
    let full = crate::format::plan::LayerPlan { ffn_width: cfg.intermediate_size, ..Default::default() };
    let layers: Vec<usize> = (0..cfg.num_hidden_layers).filter(|&i| !super::LayerSetting::of(run, i).dropped).collect();
    let chosen: Vec<Linear> = Linear::ALL.into_iter().filter(|&l| mpo.chooses(l)).collect();
    // the centre is paid once, the outer cores once per layer
    let total = |row_f: &[usize], col_f: &[usize], cap: usize| {
        let b = bonds_for_cap(row_f, col_f, cap);
        layers.len() * (row_f[0] * col_f[0] * b[0] + b[1] * row_f[2] * col_f[2]) + b[0] * row_f[1] * col_f[1] * b[1]
    };
    let shape = |lin: Linear| {
        let (rows, cols) = cfg.linear_shape(&full, lin);
        let (row_f, col_f) = (factorize(rows, 3), factorize(cols, 3));
        let full_cap = *bonds_for_cap(&row_f, &col_f, usize::MAX).iter().max().unwrap_or(&1);
        (rows, cols, row_f, col_f, full_cap)
    };
    if mpo.max_bond.is_none() {
        // sharing caps what can be kept: even at full bonds all layers keep one centre, so a
        // smaller ratio than that cannot be honoured (checked before any work is done)
        let least_removed = chosen
            .iter()
            .map(|&lin| {
                let (rows, cols, row_f, col_f, full_cap) = shape(lin);
                1.0 - total(&row_f, &col_f, full_cap) as f64 / (layers.len() * rows * cols) as f64
            })
            .fold(0.0f64, f64::max);
        if run.ratio + 0.01 < least_removed {
            return Err(crate::error::CompressError::BadArgument(format!(
                "a centre shared by {} layers removes at least {:.1}% of the chosen matrices' parameters even at full bonds, more than the {:.1}% asked: use --ratio {:.2} or more, or give --mpo-max-bond",
                layers.len(),
                100.0 * least_removed,
                100.0 * run.ratio,
                (least_removed * 100.0).floor() / 100.0
            ))
            .into());
        }
    }
    for &lin in &chosen {
        let (rows, cols, row_f, col_f, full_cap) = shape(lin);
        let mut mean = vec![0f64; rows * cols];
        for &i in &layers {
            let w = store.f32(&crate::format::names::linear(i, lin, "weight"), &[rows, cols])?;
            mean.iter_mut().zip(&w).for_each(|(m, &x)| *m += x as f64 / layers.len() as f64);
        }
        let mean: Vec<f32> = mean.iter().map(|&x| x as f32).collect();
        // the largest bond whose total over all layers fits this matrix's budget
        let budget = ((1.0 - run.ratio) * (layers.len() * rows * cols) as f64) as usize;
        let cap = mpo.max_bond.unwrap_or_else(|| (1..=full_cap).take_while(|&c| total(&row_f, &col_f, c) <= budget).last().unwrap_or(1));
        out.insert(lin, Mpo::decompose(&mean, rows, cols, &row_f, &col_f, Some(cap)));
    }
    Ok(out)
}

/// ||W - reconstruction|| / ||W||.
pub fn relative_error(m: &Mpo, w: &[f32]) -> f64 {
    let approx = m.reconstruct();
    let num: f64 = approx.iter().zip(w).map(|(a, &b)| (a - b as f64).powi(2)).sum();
    let den: f64 = w.iter().map(|&b| (b as f64).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Inner bond dimensions for a bond cap: bond k is at most `cap` and at most the rank the
/// cut can have (the smaller side's size).
pub fn bonds_for_cap(row_f: &[usize], col_f: &[usize], cap: usize) -> Vec<usize> {
    let sizes: Vec<usize> = row_f.iter().zip(col_f).map(|(i, j)| i * j).collect();
    (0..sizes.len() - 1)
        .map(|k| {
            let left: usize = sizes[..=k].iter().product();
            let right: usize = sizes[k + 1..].iter().product();
            cap.min(left).min(right)
        })
        .collect()
}

/// Parameters of the cores with these factors and bonds.
pub fn params_for(row_f: &[usize], col_f: &[usize], bonds: &[usize]) -> usize {
    let n = row_f.len();
    (0..n).map(|k| (if k == 0 { 1 } else { bonds[k - 1] }) * row_f[k] * col_f[k] * (if k + 1 == n { 1 } else { bonds[k] })).sum()
}

/// The largest bond cap whose cores take at most `budget` parameters (at least 1).
pub fn cap_for_budget(row_f: &[usize], col_f: &[usize], budget: usize) -> usize {
    let full = *bonds_for_cap(row_f, col_f, usize::MAX).iter().max().unwrap_or(&1);
    let (mut lo, mut hi) = (1usize, full.max(1));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if params_for(row_f, col_f, &bonds_for_cap(row_f, col_f, mid)) <= budget {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// MPO decomposition of one layer: every chosen linear (all seven by default) is split into
/// `mpo_cores` cores with the largest bond keeping its share of parameters (or the given
/// bond); with a bond derived from the ratio, a linear whose cores would not be smaller stays dense. Plain (unweighted) weights,
/// as the MPO paper decomposes them.
pub struct MpoMethod {
    pub opts: MpoOptions,
    /// The shared decompositions per linear (`--mpo-share-centre`), fitted once per run.
    pub shared: std::collections::BTreeMap<Linear, Mpo>,
}

/// The MPO decomposition's options.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MpoOptions {
    /// Cores per matrix (2..=8).
    #[serde(default = "default_cores", alias = "mpo_cores")]
    pub cores: usize,
    /// Largest bond dimension (default: the largest that keeps 1 - ratio of each matrix's
    /// parameters).
    #[serde(default, alias = "mpo_max_bond")]
    pub max_bond: Option<usize>,
    /// One central core shared by all layers per linear (3 cores), each layer's outer cores
    /// refitted to its own weights by least squares.
    #[serde(default, alias = "mpo_share_centre")]
    pub share_centre: bool,
    /// The linears decomposed (empty: all seven).
    #[serde(default, alias = "mpo_matrices")]
    pub matrices: Vec<Linear>,
}

fn default_cores() -> usize {
    3
}

impl Default for MpoOptions {
    fn default() -> Self {
        MpoOptions { cores: default_cores(), max_bond: None, share_centre: false, matrices: Vec::new() }
    }
}

impl MpoOptions {
    /// Whether `linear` is one of the linears decomposed.
    pub fn chooses(&self, linear: Linear) -> bool {
        self.matrices.is_empty() || self.matrices.contains(&linear)
    }
}

impl MpoMethod {
    /// Fits the shared centres (if asked) for the run `run`.
    pub fn new(opts: &MpoOptions, run: &super::CompressOptions, store: &crate::format::WeightStore, cfg: &crate::model::ModelConfig) -> anyhow::Result<Self> {
        Ok(MpoMethod { opts: opts.clone(), shared: shared_decompositions(store, cfg, opts, run)? })
    }
}

impl super::LayerMethod for MpoMethod {
    fn name(&self) -> &'static str {
        "mpo"
    }

    fn compress_layer(&self, input: &super::LayerInput, built: &mut super::BuiltLayer, progress: &mut dyn FnMut(super::Phase)) -> anyhow::Result<()> {
        mpo_layer(self, input, built, progress)
    }

    /// The shared centres, rounded as the layers used them.
    fn model_tensors(&self, dtype: safetensors::Dtype) -> Vec<crate::format::output::OutTensor> {
        use crate::format::dtype::{encode, round_trip};
        self.shared
            .iter()
            .map(|(&lin, m)| {
                let c = &m.cores[m.cores.len() / 2];
                let v: Vec<f32> = round_trip(&c.data.iter().map(|&x| x as f32).collect::<Vec<_>>(), dtype);
                let name = crate::format::names::shared_mpo_core(lin, m.cores.len() / 2);
                crate::format::output::OutTensor { name, dtype, bytes: encode(&v, dtype), shape: vec![c.left, c.i, c.j, c.right] }
            })
            .collect()
    }
}

fn mpo_layer(method: &MpoMethod, input: &super::LayerInput, built: &mut super::BuiltLayer, progress: &mut dyn FnMut(super::Phase)) -> anyhow::Result<()> {
    // the cores are fitted on the host in f64: all of it is host linear algebra
    let mut host = super::svd::HostClock::default();
    let super::LayerInput { gpu, store, cfg, layer: i, setting, .. } = *input;
    let shared = &method.shared;
    progress(super::Phase::Decomposition);
    let full = crate::format::plan::LayerPlan { ffn_width: cfg.intermediate_size, ..Default::default() };
    built.plan.ffn_width = full.ffn_width;
    let opts = &method.opts;
    for lin in Linear::ALL {
        let (out, inp) = cfg.linear_shape(&full, lin);
        let w = store.f32(&crate::format::names::linear(i, lin, "weight"), &[out, inp])?;
        let keep = setting.module_keep[lin].filter(|&k| opts.chooses(lin) && k < 1.0);
        let Some(keep) = keep else {
            built.dense(gpu, lin, &w, out, inp)?;
            continue;
        };
        if let Some(sh) = shared.get(&lin) {
            let m = host.time(|| refit_outer(&w, sh, 20));
            if lin.is_attention() {
                built.errors[lin.index()] = relative_error(&m, &w);
            }
            built.mpo(gpu, lin, &m, true)?;
            continue;
        }
        let (row_f, col_f) = (factorize(out, opts.cores), factorize(inp, opts.cores));
        let cap = opts.max_bond.unwrap_or_else(|| cap_for_budget(&row_f, &col_f, (keep * (out * inp) as f64) as usize));
        // bonds derived from the ratio: cores that would not be smaller are pointless; a
        // bond the user gave is honoured as given
        if opts.max_bond.is_none() && params_for(&row_f, &col_f, &bonds_for_cap(&row_f, &col_f, cap)) >= out * inp {
            built.dense(gpu, lin, &w, out, inp)?;
            continue;
        }
        let m = host.time(|| Mpo::decompose(&w, out, inp, &row_f, &col_f, Some(cap)));
        if lin.is_attention() {
            built.errors[lin.index()] = relative_error(&m, &w);
        }
        built.mpo(gpu, lin, &m, false)?;
    }
    built.host_seconds += host.seconds();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = StdRng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-1.0f32..1.0)).map(|v| if v.abs() < 1e-3 { 0.5 } else { v }).collect()
    }

    fn rel(a: &[f64], w: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(w).map(|(x, &y)| (x - y as f64).powi(2)).sum();
        let den: f64 = w.iter().map(|&y| (y as f64).powi(2)).sum();
        (num / den).sqrt()
    }

    #[test]
    fn factorize_multiplies_back_and_balances() {
        for (n, k) in [(576, 4), (4096, 5), (1536, 3), (97, 2), (1, 3)] {
            let f = factorize(n, k);
            assert_eq!(f.len(), k);
            assert_eq!(f.iter().product::<usize>(), n, "{n}: {f:?}");
        }
        assert_eq!(factorize(4096, 4), vec![8, 8, 8, 8]);
    }

    #[test]
    fn full_bonds_reconstruct_exactly_at_awkward_shapes() {
        for (rows, cols, rf, cf) in [(24, 30, vec![2, 3, 4], vec![5, 3, 2]), (12, 20, vec![3, 4], vec![4, 5]), (7, 9, vec![7, 1], vec![3, 3])] {
            let w = random(rows * cols, rows as u64);
            let m = Mpo::decompose(&w, rows, cols, &rf, &cf, None);
            let e = rel(&m.reconstruct(), &w);
            assert!(e < 1e-12, "{rows}x{cols}: {e:e}");
            assert!(m.discarded.iter().all(|&s| s < 1e-9));
        }
    }

    #[test]
    fn truncation_error_is_bounded_by_discarded_values_and_shrinks_with_the_bond() {
        let (rows, cols) = (36, 48);
        let w = random(rows * cols, 7);
        let norm = w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let mut last = f64::INFINITY;
        for bond in [2, 6, 12, 24] {
            let m = Mpo::decompose(&w, rows, cols, &[3, 3, 4], &[4, 3, 4], Some(bond));
            let e = rel(&m.reconstruct(), &w) * norm;
            let bound = m.discarded.iter().map(|s| s * s).sum::<f64>().sqrt();
            assert!(e <= bound * (1.0 + 1e-9) + 1e-9, "bond {bond}: error {e} above bound {bound}");
            assert!(e < last, "bond {bond}: error did not shrink");
            last = e;
        }
        // two cores: exactly the optimal truncated SVD of the permuted matrix
        let m = Mpo::decompose(&w, rows, cols, &[6, 6], &[6, 8], Some(5));
        let e = rel(&m.reconstruct(), &w) * norm;
        let opt = m.discarded.iter().map(|s| s * s).sum::<f64>().sqrt();
        assert!((e - opt).abs() <= 1e-9 * opt.max(1.0), "{e} vs optimal {opt}");
    }

    #[test]
    fn weight_sits_in_the_central_core() {
        let w = random(16 * 16, 3);
        let m = Mpo::decompose(&w, 16, 16, &[2, 2, 2, 2], &[2, 2, 2, 2], None);
        // cores after the centre are right-orthonormal: Q Q^T = I over (i, j, right)
        for c in &m.cores[3..] {
            let cols = c.i * c.j * c.right;
            let q = DMatrix::<f64>::from_row_slice(c.left, cols, &c.data);
            let g = &q * q.transpose();
            assert!((g - DMatrix::<f64>::identity(c.left, c.left)).norm() < 1e-10);
        }
        assert!(rel(&m.reconstruct(), &w) < 1e-12);
    }

    #[test]
    fn refit_recovers_layers_that_share_a_centre_exactly() {
        // layers built as L_i S R_i with one S: the refit with S fixed reproduces each layer
        let (rf, cf) = ([3usize, 4, 2], [2usize, 3, 4]);
        let (rows, cols) = (24, 24);
        let mean_like = random(rows * cols, 11);
        let shared = Mpo::decompose(&mean_like, rows, cols, &rf, &cf, Some(4));
        for seed in [1u64, 2] {
            let mut layer = shared.clone();
            let l = random(layer.cores[0].data.len(), 100 + seed);
            let r = random(layer.cores[2].data.len(), 200 + seed);
            layer.cores[0].data = l.iter().map(|&x| x as f64).collect();
            layer.cores[2].data = r.iter().map(|&x| x as f64).collect();
            let w: Vec<f32> = layer.reconstruct().iter().map(|&x| x as f32).collect();
            let fit = refit_outer(&w, &shared, 20);
            assert_eq!(fit.cores[1].data, shared.cores[1].data, "the centre stays shared");
            let e = relative_error(&fit, &w);
            assert!(e < 1e-5, "seed {seed}: {e:e}");
        }
        // and on a layer that does not share it, the refit beats keeping the shared outer cores
        let other = random(rows * cols, 12);
        let fit = refit_outer(&other, &shared, 8);
        assert!(relative_error(&fit, &other) < relative_error(&shared, &other));
    }
}
