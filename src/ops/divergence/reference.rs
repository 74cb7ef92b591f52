//! Soft-target divergences (`docs/LOSSES.md` section 2): forward KL, reverse KL and JSD(beta).
//!
//! With `q = p^T(t)` (teacher) and `p = p^T(s)` (student), per row:
//! - forward KL `KL_r = sum_j q_j (log q_j - log p_j)`;
//!   `d(T^2 KL_r)/ds_j = T (p_j - q_j)`, `d(T^2 KL_r)/dt_j = T q_j (log q_j - log p_j - KL_r)`;
//! - reverse KL `RKL_r = sum_j p_j (log p_j - log q_j)`;
//!   `d(T^2 RKL_r)/ds_j = T p_j (log p_j - log q_j - RKL_r)`, `d(T^2 RKL_r)/dt_j = T (q_j - p_j)`;
//! - JSD with `M = beta q + (1-beta) p`: `JSD_r = beta KL(q||M) + (1-beta) KL(p||M)`
//!   `= beta sum q log q + (1-beta) sum p log p - sum M log M`, so
//!   `dJSD/dp_j = (1-beta)(log p_j - log M_j)` and through `dp_j/ds_k = p_j (delta_jk - p_k)/T`:
//!   `d(T^2 JSD_r)/ds_k = T (1-beta) p_k (log p_k - log M_k - KL(p||M))`,
//!   `d(T^2 JSD_r)/dt_k = T beta q_k (log q_k - log M_k - KL(q||M))`
//!   (checked by finite differences in `tests/suite/reference.rs`).
//!
//! The row losses are `T^2 D_r`; the reduction and the upstream gradient `g` scale them
//! ([`crate::ops::Reduction`]).

use super::DivergenceSpec;
use crate::ops::softmax::reference::{all_finite, log_softmax_row};
use crate::ops::{masked, reduction_factor, Divergence, RowLossResult, TeacherInput};

/// The teacher's `log q` for one row.
pub(crate) fn teacher_log_probs(t: &[f64], form: TeacherInput, temperature: f64) -> Vec<f64> {
    match form {
        TeacherInput::Logits => log_softmax_row(t, temperature),
        TeacherInput::LogProbs => t.to_vec(),
        TeacherInput::Probs => t.iter().map(|&q| q.ln()).collect(),
    }
}

/// Whether a teacher row is a valid input for its form: logits finite; probabilities finite
/// (0 allowed); log-probabilities finite or `-inf` (a probability of 0).
pub(crate) fn teacher_valid(t: &[f64], form: TeacherInput) -> bool {
    match form {
        TeacherInput::LogProbs => t.iter().all(|v| v.is_finite() || *v == f64::NEG_INFINITY),
        _ => all_finite(t),
    }
}

/// `sum_j a_j (log a_j - log b_j)`. A term with `a_j = 0` exactly (`log a_j = -inf`, a given
/// probability of 0) is 0; a term with `b_j = 0` exactly and `a_j > 0` is `+inf`. A probability
/// computed by a softmax of finite logits is never exactly 0, even where `exp` underflows: its term
/// is then `0 * finite = 0` in every precision, so f32 and f64 agree.
fn kl(log_a: &[f64], log_b: &[f64]) -> f64 {
    log_a
        .iter()
        .zip(log_b)
        .map(|(&la, &lb)| {
            if la == f64::NEG_INFINITY {
                0.0
            } else if lb == f64::NEG_INFINITY {
                f64::INFINITY
            } else {
                la.exp() * (la - lb)
            }
        })
        .sum()
}

/// `log(exp(x) + exp(y))` without underflow.
fn log_add_exp(x: f64, y: f64) -> f64 {
    let m = x.max(y);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + ((x - m).exp() + (y - m).exp()).ln()
}

/// The CPU reference: loss, per-row losses and gradients (teacher gradient only for logits).
pub fn divergence(
    spec: &DivergenceSpec,
    s: &[f64],
    t: &[f64],
    labels: Option<&[i32]>,
) -> RowLossResult {
    let (n, c) = (spec.shape.rows, spec.shape.cols);
    let temp = spec.temperature as f64;
    let valid = (0..n)
        .filter(|&r| !masked(labels, r, spec.ignore_index))
        .count();
    let scale = reduction_factor(spec.reduction, valid);
    let g = spec.grad_scale as f64;
    let mut out = RowLossResult {
        row_loss: vec![0.0; n],
        grad_student: vec![0.0; n * c],
        grad_teacher: vec![0.0; n * c],
        ..Default::default()
    };
    for r in 0..n {
        if masked(labels, r, spec.ignore_index) {
            continue;
        }
        let (sr, tr) = (&s[r * c..(r + 1) * c], &t[r * c..(r + 1) * c]);
        let gs = &mut out.grad_student[r * c..(r + 1) * c];
        let gt = &mut out.grad_teacher[r * c..(r + 1) * c];
        if !all_finite(sr) || !teacher_valid(tr, spec.teacher) {
            out.row_loss[r] = f64::NAN;
            gs.fill(f64::NAN);
            gt.fill(f64::NAN);
            continue;
        }
        let lp = log_softmax_row(sr, temp);
        let mut lq = teacher_log_probs(tr, spec.teacher, temp);
        let k = g * scale * temp; // d(T^2 D)/dz carries one factor T
        let d = match spec.divergence {
            Divergence::ForwardKl => {
                let d = kl(&lq, &lp);
                for j in 0..c {
                    let (p, q) = (lp[j].exp(), lq[j].exp());
                    gs[j] = k * (p - q);
                    gt[j] = if q == 0.0 {
                        0.0
                    } else {
                        k * q * (lq[j] - lp[j] - d)
                    };
                }
                d
            }
            Divergence::ReverseKl => {
                // The optional floor: log max(q, eps) (given teachers only; see DivergenceSpec).
                if spec.teacher_eps > 0.0 {
                    let floor = (spec.teacher_eps as f64).ln();
                    lq.iter_mut().for_each(|l| *l = l.max(floor));
                }
                let d = kl(&lp, &lq);
                for j in 0..c {
                    let (p, q) = (lp[j].exp(), lq[j].exp());
                    gs[j] = if p == 0.0 {
                        0.0
                    } else {
                        k * p * (lp[j] - lq[j] - d)
                    };
                    gt[j] = k * (q - p);
                }
                d
            }
            Divergence::Jsd { beta } => {
                let beta = beta as f64;
                let lm: Vec<f64> = (0..c)
                    .map(|j| log_add_exp(beta.ln() + lq[j], (1.0 - beta).ln() + lp[j]))
                    .collect();
                let (kl_q, kl_p) = (kl(&lq, &lm), kl(&lp, &lm));
                for j in 0..c {
                    let (p, q) = (lp[j].exp(), lq[j].exp());
                    gs[j] = if p == 0.0 {
                        0.0
                    } else {
                        k * (1.0 - beta) * p * (lp[j] - lm[j] - kl_p)
                    };
                    gt[j] = if q == 0.0 {
                        0.0
                    } else {
                        k * beta * q * (lq[j] - lm[j] - kl_q)
                    };
                }
                beta * kl_q + (1.0 - beta) * kl_p
            }
        };
        out.row_loss[r] = temp * temp * d;
    }
    out.loss = out.row_loss.iter().sum::<f64>() * scale;
    out
}
