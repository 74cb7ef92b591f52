//! Decoupled knowledge distillation (`docs/LOSSES.md` section 8), the f64 reference.
//!
//! Per valid row with label `g`, at temperature T: the binary distributions
//! `b(p) = [p_g, 1 - p_g]`, `b(q) = [q_g, 1 - q_g]`, and the non-target ones
//! `p^_j = p_j / (1 - p_g)`, `q^_j = q_j / (1 - q_g)` (`j != g`):
//! `TCKD_r = KL(b(q) || b(p))`, `NCKD_r = KL(q^ || p^)`, and
//! `L_r = w_ce CE_r + T^2 (w_tc TCKD_r + w_nc NCKD_r)`.
//!
//! Gradients. TCKD is the KL of two 2-class softmaxes whose logits are `x_g = s_g / T` and
//! `r = log sum_{j != g} e^(s_j / T)`, so `dTCKD/dx_g = p_g - q_g` and `dTCKD/dr = -(p_g - q_g)`,
//! with `dx_g/ds_g = 1/T` and `dr/ds_j = p^_j / T`:
//! `d(T^2 TCKD)/ds_g = T (p_g - q_g)`, `d(T^2 TCKD)/ds_j = -T (p_g - q_g) p^_j`.
//! NCKD is forward KL over the non-target classes (section 2):
//! `d(T^2 NCKD)/ds_j = T (p^_j - q^_j)` for `j != g`, 0 at `g`. CE as in section 3. The teacher
//! is detached (no teacher gradient). Checked by finite differences in `tests/suite/reference.rs`.
//!
//! The binary log-probabilities come from `D = log sum_{j != g} e^(z_j / T) - z_g / T` (the
//! log-odds of the rest) as `log p_g = -softplus(D)`, `log(1 - p_g) = -softplus(-D)`: the
//! non-target mass is never formed as `1 - p_g`. Both divergences are summed as
//! `KL(q || p) = sum q phi(log p - log q)`, `phi(u) = e^u - 1 - u` (equal to `sum q log(q / p)`
//! because `sum q e^u = sum p = 1`): at high T, or with a teacher close to the student, the
//! terms of `sum q log(q / p)` are first order and cancel to a second-order sum, which f64 would
//! resolve only to ~1e-17 absolute (1e-4 of TCKD at T = 1e4 with logits 1e-2 apart); the terms
//! `q phi(u)` are second order and non-negative, and a common rounding of the log-normalisers
//! (a shift of every `u`) changes their sum only to second order.

use super::DkdSpec;
use crate::ops::cross_entropy::reference::smoothed_ce_row;
use crate::ops::softmax::reference::{all_finite, log_softmax_row};
use crate::ops::{masked, reduction_factor, RowLossResult};

/// `log(1 + e^x)` without overflow or cancellation.
pub(crate) fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `q phi(log p - log q)`, forward KL's term, from the two log-probabilities (written out as
/// `p - q - q u` where `|u| >= 1`, so that `q = 0`, `p > 0` gives `p`, not `0 * inf`).
fn kl_term(lq: f64, lp: f64) -> f64 {
    let (u, q) = (lp - lq, lq.exp());
    if u.abs() < 1.0 {
        q * (u.exp_m1() - u)
    } else {
        (lp.exp() - q) - q * u
    }
}

/// A row's quantities at temperature `t` for label `g`: `(log p_g, log(1 - p_g), log p^)`, with
/// `log p^` over the non-target classes in their order.
fn split(z: &[f64], g: usize, t: f64) -> (f64, f64, Vec<f64>) {
    let rest: Vec<f64> = z
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != g)
        .map(|(_, &v)| v)
        .collect();
    let m = rest.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lz_rest = rest.iter().map(|&v| ((v - m) / t).exp()).sum::<f64>().ln();
    // D = log sum_{j != g} e^(z_j / T) - z_g / T, with the max taken out before dividing by T.
    let d = lz_rest + (m - z[g]) / t;
    (-softplus(d), -softplus(-d), log_softmax_row(&rest, t))
}

/// The CPU reference. Labels must already be checked (`0..C` or `ignore_index`), `C >= 2`.
pub fn dkd(spec: &DkdSpec, s: &[f64], t: &[f64], labels: &[i32]) -> RowLossResult {
    let (n, c) = (spec.shape.rows, spec.shape.cols);
    let temp = spec.temperature as f64;
    let (w_ce, w_tc, w_nc) = (
        spec.ce_weight as f64,
        spec.tckd_weight as f64,
        spec.nckd_weight as f64,
    );
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
        let (sr, tr) = (&s[r * c..(r + 1) * c], &t[r * c..(r + 1) * c]);
        let gs = &mut out.grad_student[r * c..(r + 1) * c];
        if !all_finite(sr) || !all_finite(tr) {
            out.row_loss[r] = f64::NAN;
            gs.fill(f64::NAN);
            continue;
        }
        let g = labels[r] as usize;
        let (ce, ce_grad) = smoothed_ce_row(sr, g, spec.label_smoothing as f64);
        let (lpg, lpr, lph) = split(sr, g, temp);
        let (lqg, lqr, lqh) = split(tr, g, temp);
        let tckd = kl_term(lqg, lpg) + kl_term(lqr, lpr);
        let nckd: f64 = lqh.iter().zip(&lph).map(|(&lq, &lp)| kl_term(lq, lp)).sum();
        out.row_loss[r] = w_ce * ce + temp * temp * (w_tc * tckd + w_nc * nckd);
        // p_g - q_g, from whichever side of the binary distributions is the smaller (so that a
        // confident row keeps the digits f64 has for 1 - p_g).
        let gap = if lpg.max(lqg) > -std::f64::consts::LN_2 {
            lqr.exp() - lpr.exp()
        } else {
            lpg.exp() - lqg.exp()
        };
        let mut h = 0;
        for (j, (gj, ceg)) in gs.iter_mut().zip(&ce_grad).enumerate() {
            let kd = if j == g {
                w_tc * gap
            } else {
                let (ph, qh) = (lph[h].exp(), lqh[h].exp());
                h += 1;
                w_nc * (ph - qh) - w_tc * gap * ph
            };
            *gj = k * (w_ce * ceg + temp * kd);
        }
    }
    out.loss = out.row_loss.iter().sum::<f64>() * scale;
    out
}
