//! Sparse top-k teachers (`docs/LOSSES.md` section 10), the f64 reference.
//!
//! Per valid row: the student's `log p = log_softmax(s / T)` over all `C` classes; the teacher's
//! `log Q_i` on the support and its tail mass `m` ([`super::teacher_row`]); then the events the
//! divergence runs over: each support class; each other class (renormalize: `Q = 0`, uniform:
//! `Q = m / (C - k)`), or one tail event (bucket: `Q = m`, `P = sum_{j not in S} p_j`, taken as
//! a log-sum-exp of the `log p_j`). `D = sum_e f_e` with [`super::event_terms`]' terms, and with
//! `G_e = P_e dD/dP_e`:
//! `dD/ds_j = (1/T) [ (p_j / P_e(j)) G_e(j) - p_j sum_e G_e ]` (`p_j / P_e = 1` for a class of
//! its own; `p_j / P_tail` in the bucket), because `dP_e/ds_j = P_e (1[j in e] - p_j) / T`.
//! `L_r = alpha CE_r + (1 - alpha) T^2 D_r`; `dL_r/ds_j = alpha (p^1_j - target_j) +
//! (1 - alpha) T^2 dD/ds_j`. Checked by finite differences in `tests/suite/sparse.rs`.

use super::{event_terms, logaddexp, teacher_row, SparseSpec, SparseTail};
use crate::ops::cross_entropy::reference::smoothed_ce_row;
use crate::ops::softmax::reference::{all_finite, log_softmax_row};
use crate::ops::{masked, reduction_factor, RowLossResult};

/// The CPU reference. `indices` must already be checked ([`super::check_sparse_teacher`]);
/// `labels` are needed when `alpha > 0` (and checked: a class or `ignore_index`).
pub fn sparse_kd(
    spec: &SparseSpec,
    s: &[f64],
    indices: &[i32],
    values: &[f64],
    labels: Option<&[i32]>,
) -> RowLossResult {
    let (n, c, k) = (spec.shape.rows, spec.shape.cols, spec.k);
    let temp = spec.temperature as f64;
    let alpha = spec.alpha as f64;
    let valid = (0..n)
        .filter(|&r| !masked(labels, r, spec.ignore_index))
        .count();
    let scale = reduction_factor(spec.reduction, valid);
    let kk = spec.grad_scale as f64 * scale;
    let mut out = RowLossResult {
        row_loss: vec![0.0; n],
        grad_student: vec![0.0; n * c],
        ..Default::default()
    };
    let mut member = vec![usize::MAX; c];
    for r in 0..n {
        if masked(labels, r, spec.ignore_index) {
            continue;
        }
        let sr = &s[r * c..(r + 1) * c];
        let idx = &indices[r * k..(r + 1) * k];
        let gs = &mut out.grad_student[r * c..(r + 1) * c];
        let teacher = teacher_row(spec, &values[r * k..(r + 1) * k]);
        let (lq, m) = match teacher {
            Some(t) if all_finite(sr) => t,
            _ => {
                out.row_loss[r] = f64::NAN;
                gs.fill(f64::NAN);
                continue;
            }
        };
        let lp = log_softmax_row(sr, temp);
        for (i, &j) in idx.iter().enumerate() {
            member[j as usize] = i;
        }
        // The off-support classes' log Q (as classes of their own) and the tail event.
        let off = c - k;
        let lq_off = match spec.tail {
            SparseTail::Uniform if off > 0 => (m / off as f64).ln(),
            _ => f64::NEG_INFINITY,
        };
        let bucket = spec.tail == SparseTail::Bucket && spec.has_tail();
        let mut d = 0.0;
        let mut g_sum = 0.0;
        // The tail event's log P and G (its members' `(p_j / P_tail) G_tail`).
        let (mut lp_tail, mut g_tail) = (0.0, 0.0);
        if bucket {
            lp_tail = (0..c)
                .filter(|&j| member[j] == usize::MAX)
                .map(|j| lp[j])
                .fold(f64::NEG_INFINITY, logaddexp);
            let (f, _, g) = event_terms(spec.divergence, m.ln(), lp_tail);
            d += f;
            g_sum += g;
            g_tail = g;
        }
        // Each class's own G (none for the bucket's members, which use `bucket_a`).
        let mut g_own = vec![None; c];
        for j in 0..c {
            let lqj = match member[j] {
                usize::MAX if bucket => continue,
                usize::MAX => lq_off,
                i => lq[i],
            };
            let (f, _, g) = event_terms(spec.divergence, lqj, lp[j]);
            d += f;
            g_sum += g;
            g_own[j] = Some(g);
        }
        let ce = match (labels, alpha > 0.0) {
            (Some(l), true) => Some(smoothed_ce_row(
                sr,
                l[r] as usize,
                spec.label_smoothing as f64,
            )),
            _ => None,
        };
        out.row_loss[r] =
            (1.0 - alpha) * temp * temp * d + ce.as_ref().map_or(0.0, |c| alpha * c.0);
        for j in 0..c {
            let pj = lp[j].exp();
            let own = g_own[j].unwrap_or_else(|| (lp[j] - lp_tail).exp() * g_tail);
            let dd = (own - pj * g_sum) / temp;
            let ce_g = ce.as_ref().map_or(0.0, |c| alpha * c.1[j]);
            gs[j] = kk * ((1.0 - alpha) * temp * temp * dd + ce_g);
        }
        for &j in idx {
            member[j as usize] = usize::MAX;
        }
    }
    out.loss = out.row_loss.iter().sum::<f64>() * scale;
    out
}
