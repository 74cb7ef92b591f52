//! The f64 CPU references of [`super`]'s ops, written to be read.

use super::{CopySpec, MatmulSpec};

/// `C (+)= op(A) op(B)`: the operands are laid out row-major as `op(A)` `[m, k]` and `op(B)`
/// `[k, n]` first, then each row of C accumulates `A[i, p] * B[p, :]` in f64 (an order that reads
/// memory contiguously, so the reference is usable as the CPU backend's training path).
pub fn matmul(spec: &MatmulSpec, a: &[f64], b: &[f64], c: &mut [f64]) {
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
pub fn bias_add(x: &[f64], bias: &[f64]) -> Vec<f64> {
    let cols = bias.len();
    x.iter()
        .enumerate()
        .map(|(i, v)| v + bias[i % cols])
        .collect()
}

/// `out[j] (+)= sum_i x[i, j]` (the bias gradient).
pub fn sum_rows(x: &[f64], cols: usize, out: &mut [f64], accumulate: bool) {
    for (j, o) in out.iter_mut().enumerate().take(cols) {
        let s: f64 = x.iter().skip(j).step_by(cols).sum();
        *o = if accumulate { *o + s } else { s };
    }
}

/// `y = max(x, 0)`.
pub fn relu(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| if v > 0.0 { v } else { 0.0 }).collect()
}

/// `dx = dy` where the forward output `y > 0`, else 0.
pub fn relu_backward(y: &[f64], dy: &[f64]) -> Vec<f64> {
    y.iter()
        .zip(dy)
        .map(|(&y, &d)| if y > 0.0 { d } else { 0.0 })
        .collect()
}

/// `dst[dst_offset + r dst_stride + c] = src[src_offset + r src_stride + c]` (see [`CopySpec`]);
/// the rounding to a half `dst` happens when the caller stores the result.
pub fn copy_rows(spec: &CopySpec, src: &[f64], dst: &mut [f64]) {
    for r in 0..spec.rows {
        let s = spec.src_offset + r * spec.src_stride;
        let d = spec.dst_offset + r * spec.dst_stride;
        dst[d..d + spec.cols].copy_from_slice(&src[s..s + spec.cols]);
    }
}
