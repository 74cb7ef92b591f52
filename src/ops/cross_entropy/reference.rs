//! Cross-entropy with hard labels and label smoothing (`docs/LOSSES.md` section 3).
//!
//! `CE_r = -sum_j target_j log p_j` with `p = softmax(s)`, `target = (1-eps) onehot(y) + eps/C`;
//! `dCE_r/ds_j = p_j - target_j`. Masked rows (`y = ignore_index`) give 0; the batchmean over no
//! valid row is 0 (PyTorch gives NaN there).

use super::CrossEntropySpec;
use crate::ops::softmax::reference::{all_finite, log_softmax_row};
use crate::ops::{masked, reduction_factor, RowLossResult};

/// The CPU reference. Labels must already be checked (`0..C` or `ignore_index`).
pub fn cross_entropy(spec: &CrossEntropySpec, s: &[f64], labels: &[i32]) -> RowLossResult {
    let (n, c) = (spec.shape.rows, spec.shape.cols);
    let eps = spec.label_smoothing as f64;
    let valid = (0..n)
        .filter(|&r| !masked(Some(labels), r, spec.ignore_index))
        .count();
    let scale = reduction_factor(spec.reduction, valid);
    let k = spec.grad_scale as f64 * scale;
    let mut out = RowLossResult {
        row_loss: vec![0.0; n],
        grad_student: vec![0.0; n * c],
        ..Default::default()
    };
    for r in 0..n {
        if masked(Some(labels), r, spec.ignore_index) {
            continue;
        }
        let sr = &s[r * c..(r + 1) * c];
        let gs = &mut out.grad_student[r * c..(r + 1) * c];
        if !all_finite(sr) {
            out.row_loss[r] = f64::NAN;
            gs.fill(f64::NAN);
            continue;
        }
        let (loss, grad) = smoothed_ce_row(sr, labels[r] as usize, eps);
        out.row_loss[r] = loss;
        for (g, d) in gs.iter_mut().zip(grad) {
            *g = k * d;
        }
    }
    out.loss = out.row_loss.iter().sum::<f64>() * scale;
    out
}

/// One row's smoothed cross-entropy and its gradient `p - target`.
pub(crate) fn smoothed_ce_row(s: &[f64], y: usize, eps: f64) -> (f64, Vec<f64>) {
    let c = s.len() as f64;
    let lp = log_softmax_row(s, 1.0);
    let target = |j: usize| (if j == y { 1.0 - eps } else { 0.0 }) + eps / c;
    let loss = -(0..s.len()).map(|j| target(j) * lp[j]).sum::<f64>();
    let grad = (0..s.len()).map(|j| lp[j].exp() - target(j)).collect();
    (loss, grad)
}
