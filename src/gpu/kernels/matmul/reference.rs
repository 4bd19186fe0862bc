//! f64 CPU references of the matmul room: transpose, C = A B, Y = X W^T and the Gram matrix X^T X.

/// CPU reference of `transpose`.
pub fn transpose_ref(src: &[f32], offset: usize, ld: usize, rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0f64; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = src[offset + r * ld + c] as f64;
        }
    }
    out
}

/// CPU reference: C = A B, f64 accumulation, A [m,k], B [k,n].
pub fn matmul_ref(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for p in 0..k {
            let av = a[i * k + p] as f64;
            let row = &b[p * n..(p + 1) * n];
            for (cv, &bv) in c[i * n..(i + 1) * n].iter_mut().zip(row) {
                *cv += av * bv as f64;
            }
        }
    }
    c
}

/// CPU reference: Y = X W^T, X [m,k], W [n,k].
pub fn matmul_nt_ref(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            y[i * n + j] = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
        }
    }
    y
}

/// CPU reference: X^T X for X [rows, cols].
pub fn gram_ref(x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let mut g = vec![0f64; cols * cols];
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        for i in 0..cols {
            let xi = xr[i] as f64;
            for j in 0..cols {
                g[i * cols + j] += xi * xr[j] as f64;
            }
        }
    }
    g
}
