//! The Hinton distillation loss, fused (`docs/LOSSES.md` section 4).
//!
//! `L_r = alpha CE_r(s, y) + (1 - alpha) T^2 KL_r(q^T || p^T)`;
//! `dL_r/ds_j = alpha (p^1_j - target_j) + (1 - alpha) T (p^T_j - q^T_j)`,
//! `dL_r/dt_j = (1 - alpha) T q_j (log q_j - log p_j - KL_r)`.
//! Both terms are means over the same valid rows.

use super::HintonSpec;
use crate::ops::cross_entropy::reference::smoothed_ce_row;
use crate::ops::divergence::{reference::divergence, DivergenceSpec};
use crate::ops::{masked, reduction_factor, RowLossResult, RowShape};

/// The CPU reference. Labels must already be checked.
pub fn hinton(spec: &HintonSpec, s: &[f64], t: &[f64], labels: &[i32]) -> RowLossResult {
    let (n, c) = (spec.shape.rows, spec.shape.cols);
    let alpha = spec.alpha as f64;
    // The KL half: the divergence reference on the same rows, unscaled sum per row.
    let kl = divergence(
        &DivergenceSpec {
            reduction: spec.reduction,
            grad_scale: spec.grad_scale,
            ignore_index: spec.ignore_index,
            ..DivergenceSpec::new(RowShape::new(n, c), spec.temperature)
        },
        s,
        t,
        Some(labels),
    );
    let valid = (0..n)
        .filter(|&r| !masked(Some(labels), r, spec.ignore_index))
        .count();
    let k = spec.grad_scale as f64 * reduction_factor(spec.reduction, valid);
    let mut out = RowLossResult {
        row_loss: vec![0.0; n],
        grad_student: vec![0.0; n * c],
        grad_teacher: kl.grad_teacher.iter().map(|g| (1.0 - alpha) * g).collect(),
        ..Default::default()
    };
    for r in 0..n {
        if masked(Some(labels), r, spec.ignore_index) {
            continue;
        }
        let sr = &s[r * c..(r + 1) * c];
        let (ce, ce_grad) = smoothed_ce_row(sr, labels[r] as usize, spec.label_smoothing as f64);
        out.row_loss[r] = alpha * ce + (1.0 - alpha) * kl.row_loss[r];
        let row = r * c..(r + 1) * c;
        for ((g, ce), kd) in out.grad_student[row.clone()]
            .iter_mut()
            .zip(&ce_grad)
            .zip(&kl.grad_student[row])
        {
            *g = alpha * k * ce + (1.0 - alpha) * kd;
        }
    }
    out.loss = out.row_loss.iter().sum::<f64>() * reduction_factor(spec.reduction, valid);
    out
}
