//! Dense-network ops for the autograd tape: matmul with optional transposes, bias add and its
//! gradient (column sums), ReLU, and `y += alpha x`. CPU references here (f64 accumulation);
//! WGSL in `shaders/dense.wgsl`.
//!
//! Matmul: `C[m, n] (+)= op(A)[m, k] op(B)[k, n]`, `op(A) = A` stored `[m, k]` or, transposed,
//! `A^T` with `A` stored `[k, m]`; likewise `B` stored `[k, n]` or `[n, k]`.

use crate::error::{Error, Result};

/// Shape and layout of a matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulSpec {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// Add into C instead of overwriting it.
    pub accumulate: bool,
}

impl MatmulSpec {
    pub fn new(m: usize, k: usize, n: usize) -> Self {
        MatmulSpec {
            m,
            k,
            n,
            trans_a: false,
            trans_b: false,
            accumulate: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.m == 0 || self.k == 0 || self.n == 0 {
            return Err(Error::Unsupported(format!(
                "matmul [{}, {}] x [{}, {}]: every dimension must be at least 1",
                self.m, self.k, self.k, self.n
            )));
        }
        let biggest = (self.m * self.k).max(self.k * self.n).max(self.m * self.n);
        if biggest > u32::MAX as usize {
            return Err(Error::Limit("matmul operand over 2^32 elements".into()));
        }
        Ok(())
    }
}

/// `C (+)= op(A) op(B)`: the operands are laid out row-major as `op(A)` `[m, k]` and `op(B)`
/// `[k, n]` first, then each row of C accumulates `A[i, p] * B[p, :]` in f64 (an order that reads
/// memory contiguously, so the reference is usable as the CPU backend's training path).
pub fn matmul_reference(spec: &MatmulSpec, a: &[f64], b: &[f64], c: &mut [f64]) {
    let MatmulSpec {
        m,
        k,
        n,
        trans_a,
        trans_b,
        accumulate,
    } = *spec;
    let transpose = |x: &[f64], rows: usize, cols: usize| -> Vec<f64> {
        // x is [rows, cols]; returns [cols, rows].
        let mut t = vec![0.0; rows * cols];
        for r in 0..rows {
            for q in 0..cols {
                t[q * rows + r] = x[r * cols + q];
            }
        }
        t
    };
    let a_rows = if trans_a {
        transpose(a, k, m)
    } else {
        a.to_vec()
    };
    let b_rows = if trans_b {
        transpose(b, n, k)
    } else {
        b.to_vec()
    };
    let mut acc = vec![0.0; n];
    for i in 0..m {
        acc.fill(0.0);
        for p in 0..k {
            let aip = a_rows[i * k + p];
            for (o, &bv) in acc.iter_mut().zip(&b_rows[p * n..(p + 1) * n]) {
                *o += aip * bv;
            }
        }
        for (cij, &v) in c[i * n..(i + 1) * n].iter_mut().zip(&acc) {
            *cij = if accumulate { *cij + v } else { v };
        }
    }
}

/// `y[i, j] = x[i, j] + bias[j]`.
pub fn bias_add_reference(x: &[f64], bias: &[f64]) -> Vec<f64> {
    let cols = bias.len();
    x.iter()
        .enumerate()
        .map(|(i, v)| v + bias[i % cols])
        .collect()
}

/// `out[j] (+)= sum_i x[i, j]` (the bias gradient).
pub fn sum_rows_reference(x: &[f64], cols: usize, out: &mut [f64], accumulate: bool) {
    for (j, o) in out.iter_mut().enumerate().take(cols) {
        let s: f64 = x.iter().skip(j).step_by(cols).sum();
        *o = if accumulate { *o + s } else { s };
    }
}

/// `y = max(x, 0)`.
pub fn relu_reference(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| if v > 0.0 { v } else { 0.0 }).collect()
}

/// `dx = dy` where the forward output `y > 0`, else 0.
pub fn relu_backward_reference(y: &[f64], dy: &[f64]) -> Vec<f64> {
    y.iter()
        .zip(dy)
        .map(|(&y, &d)| if y > 0.0 { d } else { 0.0 })
        .collect()
}
