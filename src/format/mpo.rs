//! MPO (matrix product operator) cores as stored: a matrix as a chain of 4-way cores and
//! their contraction back into the dense matrix (CPU f64). Decomposition lives in
//! `methods::mpo`.

/// One core: [left bond, row factor, column factor, right bond], row-major.
#[derive(Debug, Clone)]
pub struct Core {
    pub left: usize,
    pub i: usize,
    pub j: usize,
    pub right: usize,
    pub data: Vec<f64>,
}

/// A matrix as a chain of cores.
#[derive(Debug, Clone)]
pub struct Mpo {
    pub rows: usize,
    pub cols: usize,
    pub cores: Vec<Core>,
    /// Singular values discarded at each cut (their root-sum-square bounds the error).
    pub discarded: Vec<f64>,
}

impl Mpo {
    /// Parameters stored in the cores.
    pub fn params(&self) -> usize {
        self.cores.iter().map(|c| c.data.len()).sum()
    }

    /// The dense [rows, cols] matrix the cores represent.
    pub fn reconstruct(&self) -> Vec<f64> {
        // contract left to right: acc [(i1 j1 .. ik jk), r_k]
        let mut acc = vec![1f64];
        let mut acc_rows = 1usize;
        for c in &self.cores {
            let next_rows = acc_rows * c.i * c.j;
            let mut next = vec![0f64; next_rows * c.right];
            for a in 0..acc_rows {
                for l in 0..c.left {
                    let av = acc[a * c.left + l];
                    if av == 0.0 {
                        continue;
                    }
                    for ij in 0..c.i * c.j {
                        let src = &c.data[(l * c.i * c.j + ij) * c.right..(l * c.i * c.j + ij + 1) * c.right];
                        let dst = &mut next[(a * c.i * c.j + ij) * c.right..(a * c.i * c.j + ij + 1) * c.right];
                        for (d, s) in dst.iter_mut().zip(src) {
                            *d += av * s;
                        }
                    }
                }
            }
            acc = next;
            acc_rows = next_rows;
        }
        // un-permute (i1, j1, ..., in, jn) -> [rows, cols]
        let n = self.cores.len();
        let row_f: Vec<usize> = self.cores.iter().map(|c| c.i).collect();
        let col_f: Vec<usize> = self.cores.iter().map(|c| c.j).collect();
        let mut w = vec![0f64; self.rows * self.cols];
        for (idx, &v) in acc.iter().enumerate() {
            let mut x = idx;
            let (mut r, mut c, mut rm, mut cm) = (0usize, 0usize, 1usize, 1usize);
            for k in (0..n).rev() {
                let j = x % col_f[k];
                x /= col_f[k];
                let i = x % row_f[k];
                x /= row_f[k];
                r += i * rm;
                c += j * cm;
                rm *= row_f[k];
                cm *= col_f[k];
            }
            w[r * self.cols + c] = v;
        }
        w
    }
}
