//! The vocab-sharded row losses' f64 reference (`docs/LOSSES.md` section 9).
//!
//! From the combined stats of a row (maxima `M_s`, `M_t`; sums `Zs`, `Zs1`, `Zt`, `Af`, `Ar`, `S`,
//! `s_y`, `t_y` relative to them, [`super::Sum`]), with `u_j = s_j - M_s`, `v_j = t_j - M_t`:
//! `log p_j = u_j / T - log Zs`, `log q_j = v_j / T - log Zt`, `log p1_j = u_j - log Zs1`,
//! `KL(q||p) = Af / (T Zt) + log Zs - log Zt`, `KL(p||q) = Ar / (T Zs) + log Zt - log Zs`,
//! `CE = log Zs1 + M_s - (1 - eps) s_y - eps S / C`.
//! A shard's part of a row's loss is the sum over its columns of the unsharded loss's terms
//! (`-target_j log p1_j`, `q_j (log q_j - log p_j)`, ...), so the parts sum to the row loss; the
//! gradients are the unsharded ones (sections 2-4) at the shard's columns, where the only global
//! quantities are the normalisers and the divergence itself.
//!
//! DKD (section 8) from its rest-of-row stats ([`RowGlobals::dkd`]): NCKD is forward KL over the
//! rest (`log p^_j`, `log q^_j` as above from the rest's sums), TCKD comes from the log-odds
//! `D = log Z_rest - x_y` of both, CE's normaliser is `logaddexp(M_s + log Zs1, s_y)`; the
//! shard holding the label takes TCKD into its part and `T w_tc (p_y - q_y)` at the label's
//! column, every other column `T (w_nc (p^_j - q^_j) - w_tc (p_y - q_y) p^_j)`.
//!
//! A teacher given as probabilities or log-probabilities (`spec.teacher`) has `m_t = 0` and
//! `v_j = T log q_j` in the stats (`Zt = sum q_j`, `Af = sum q_j (T log q_j - u_j)`,
//! `Ar = sum e^{u_j/T} (u_j - T log q_j)`); phase 2 reads `log q_j` from the input (not
//! renormalised, as the unsharded divergence), so `log Zt` is taken as 0:
//! `KL(q||p) = Af / T + Zt log Zs`, `KL(p||q) = Ar / (T Zs) - log Zs`.

use super::{Shard, ShardedSpec, Sum, JSD_TERMS, MAXIMA, STATS, SUMS};
use crate::ops::dkd::reference::softplus;
use crate::ops::{Divergence, RowLossResult, TeacherInput};

/// A given teacher's `log q` from its value (`ln q` of a probability, a log-probability as is).
pub(crate) fn given_log_q(form: TeacherInput, t: f64) -> f64 {
    match form {
        TeacherInput::Probs => t.ln(),
        _ => t,
    }
}

/// One shard's phase 1: each row's stats relative to the shard's own maxima, `[rows * STATS]`
/// (maxima plane, then sums plane). Masked rows get zeros. `teacher` is `None` for
/// cross-entropy (its teacher stats are then 0).
pub fn stats(spec: &ShardedSpec, s: &[f64], t: Option<&[f64]>, labels: Option<&[i32]>) -> Vec<f64> {
    let Shard { rows, width, .. } = spec.shard;
    let temp = spec.temperature as f64;
    let inv_t = 1.0 / temp;
    let given = spec.given_teacher();
    let dkd = spec.loss.is_dkd();
    let mut out = vec![0.0; rows * STATS];
    let (maxima, sums) = out.split_at_mut(rows * MAXIMA);
    for r in 0..rows {
        if spec.masked(labels, r) {
            continue;
        }
        let y = labels.and_then(|l| spec.shard.local(l[r]));
        // DKD's stats are the rest of the row's: the label's column left out (but of `S`).
        let rest = |j: usize| !(dkd && y == Some(j));
        let sr = &s[r * width..(r + 1) * width];
        let max_of = |v: &[f64]| {
            (0..width)
                .filter(|&j| rest(j))
                .map(|j| v[j])
                .fold(f64::NEG_INFINITY, f64::max)
        };
        let ms = max_of(sr);
        let tr = t.map(|t| &t[r * width..(r + 1) * width]);
        let mt = match tr {
            Some(tr) if !given => max_of(tr),
            _ => 0.0,
        };
        maxima[r * MAXIMA] = ms;
        maxima[r * MAXIMA + 1] = mt;
        let z = &mut sums[r * SUMS..(r + 1) * SUMS];
        for j in 0..width {
            if !rest(j) {
                z[Sum::LogitSum as usize] += sr[j];
                continue;
            }
            let u = sr[j] - ms;
            let eu = (u * inv_t).exp();
            z[Sum::StudentT as usize] += eu;
            z[Sum::Student1 as usize] += u.exp();
            z[Sum::LogitSum as usize] += sr[j];
            match tr {
                Some(tr) if given => {
                    // v_j = T log q_j, e^{v_j/T} = q_j; a zero q_j adds nothing to Af and makes
                    // Ar infinite (reverse KL's +inf).
                    let lq = given_log_q(spec.teacher, tr[j]);
                    let q = lq.exp();
                    z[Sum::TeacherT as usize] += q;
                    if q > 0.0 {
                        z[Sum::Forward as usize] += q * (temp * lq - u);
                    }
                    z[Sum::Reverse as usize] += if lq == f64::NEG_INFINITY {
                        f64::INFINITY
                    } else {
                        eu * (u - temp * lq)
                    };
                    z[Sum::Difference as usize] += eu - q;
                }
                Some(tr) => {
                    let v = tr[j] - mt;
                    let ev = (v * inv_t).exp();
                    z[Sum::TeacherT as usize] += ev;
                    z[Sum::Forward as usize] += ev * (v - u);
                    if !dkd {
                        z[Sum::Reverse as usize] += eu * (u - v);
                    }
                    z[Sum::Difference as usize] += eu - ev;
                }
                None => {}
            }
        }
        if let Some(y) = y {
            z[Sum::StudentLabel as usize] = sr[y];
            z[Sum::TeacherLabel as usize] = tr.map_or(0.0, |tr| tr[y]);
        }
    }
    out
}

/// A row's global quantities from the combined stats.
pub(crate) struct RowGlobals {
    /// How the teacher is given (`logs` reads a given teacher's `log q` from its value).
    pub form: TeacherInput,
    pub ms: f64,
    pub mt: f64,
    pub log_zs: f64,
    pub log_zs1: f64,
    /// `log Zs - log Zt` (`log Zs` for a given teacher: its `log Zt` is 0)
    pub log_ratio: f64,
    /// `KL(q || p)`
    pub forward: f64,
    /// `KL(p || q)`
    pub reverse: f64,
    /// DKD's `TCKD` (0 for the other losses)
    pub tckd: f64,
    /// DKD's `p_g - q_g` (0 for the other losses)
    pub gap: f64,
}

impl RowGlobals {
    pub(crate) fn of(stats: &[f64], r: usize, temperature: f64, form: TeacherInput) -> Self {
        let rows = stats.len() / STATS;
        let m = &stats[r * MAXIMA..(r + 1) * MAXIMA];
        let z = &stats[rows * MAXIMA + r * SUMS..rows * MAXIMA + (r + 1) * SUMS];
        let (zs, zt) = (z[Sum::StudentT as usize], z[Sum::TeacherT as usize]);
        if form != TeacherInput::Logits {
            // A given teacher is not renormalised: KL = sum q (log q - log p) with
            // log p = u / T - log Zs.
            let log_zs = zs.ln();
            return RowGlobals {
                form,
                ms: m[0],
                mt: 0.0,
                log_zs,
                log_zs1: z[Sum::Student1 as usize].ln(),
                log_ratio: log_zs,
                forward: z[Sum::Forward as usize] / temperature + zt * log_zs,
                reverse: z[Sum::Reverse as usize] / (temperature * zs) - log_zs,
                tckd: 0.0,
                gap: 0.0,
            };
        }
        // log Zs - log Zt without the cancellation of two logs near log C at high T.
        let log_ratio = (z[Sum::Difference as usize] / zt).ln_1p();
        RowGlobals {
            form,
            ms: m[0],
            mt: m[1],
            log_zs: zs.ln(),
            log_zs1: z[Sum::Student1 as usize].ln(),
            log_ratio,
            forward: z[Sum::Forward as usize] / (temperature * zt) + log_ratio,
            reverse: z[Sum::Reverse as usize] / (temperature * zs) - log_ratio,
            tckd: 0.0,
            gap: 0.0,
        }
    }

    /// DKD's row globals from its rest-of-row stats ([`super::Sum`]): `ms`, `mt`, `log_zs`,
    /// `log_ratio`, `forward` (= NCKD) of the rest, so that [`RowGlobals::logs`] gives
    /// `log p^_j`, `log q^_j`; `log_zs1` of the whole row at T = 1 relative to the rest's `ms`,
    /// `log(Zs1 + e^{s_y - ms})`; and TCKD with `p_g - q_g` from the log-odds of the rest
    /// `D = log Z_rest - x_g` ([`tckd`]).
    pub(crate) fn dkd(stats: &[f64], r: usize, temperature: f64) -> Self {
        let mut g = Self::of(stats, r, temperature, TeacherInput::Logits);
        let rows = stats.len() / STATS;
        let z = &stats[rows * MAXIMA + r * SUMS..rows * MAXIMA + (r + 1) * SUMS];
        let (sy, ty) = (z[Sum::StudentLabel as usize], z[Sum::TeacherLabel as usize]);
        let (xs, xt) = ((g.ms - sy) / temperature, (g.mt - ty) / temperature);
        g.log_zs1 = log_add_exp(g.log_zs1, sy - g.ms);
        let d_s = g.log_zs + xs;
        let d_t = z[Sum::TeacherT as usize].ln() + xt;
        let e = g.log_ratio + ((g.ms - sy) - (g.mt - ty)) / temperature;
        (g.tckd, g.gap) = tckd(d_s, d_t, e);
        g
    }
}

/// `log(e^a + e^b)`.
fn log_add_exp(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    m + (-(a - b).abs()).exp().ln_1p()
}

/// `1 / (1 + e^-x)` without overflow.
fn sigmoid(x: f64) -> f64 {
    let e = (-x.abs()).exp();
    if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// `q phi(u)`, `phi(u) = e^u - 1 - u`, with `u = log p - log q` (`(p - q) - q u` where
/// `|u| >= 1`, so that `q = 0` gives `p`): a KL term, non-negative, second order in `u`.
pub(crate) fn kl_term(q: f64, p: f64, u: f64) -> f64 {
    if q == 0.0 {
        p
    } else if u.abs() < 1.0 {
        q * (u.exp_m1() - u)
    } else {
        (p - q) - q * u
    }
}

/// DKD's `(TCKD, p_g - q_g)` from the log-odds of the rest `d_s`, `d_t` (`D = log Z_rest - x_g`,
/// section 8) and `e = d_s - d_t` formed without their cancellation: `q_g = sigmoid(-d_t)`, the
/// bins' `u = log p - log q` as `-log1p((1 - q_g) expm1(e))`, `-log1p(q_g expm1(-e))` where
/// `|e| < 1/2` (softplus differences beyond), `p_g - q_g` from the bin with the smaller teacher
/// probability.
pub(crate) fn tckd(d_s: f64, d_t: f64, e: f64) -> (f64, f64) {
    let (qg, qr, pg, pr) = (sigmoid(-d_t), sigmoid(d_t), sigmoid(-d_s), sigmoid(d_s));
    let (ug, ur) = if e.abs() < 0.5 {
        (-(qr * e.exp_m1()).ln_1p(), -(qg * (-e).exp_m1()).ln_1p())
    } else {
        (
            softplus(d_t) - softplus(d_s),
            softplus(-d_t) - softplus(-d_s),
        )
    };
    // p - q from q expm1(u) where they are close (a teacher probability of 0 gives p)
    let gap_pq = |q: f64, p: f64, u: f64| {
        if q == 0.0 || u.abs() >= 0.5 {
            p - q
        } else {
            q * u.exp_m1()
        }
    };
    let gap = if qg <= qr {
        gap_pq(qg, pg, ug)
    } else {
        -gap_pq(qr, pr, ur)
    };
    (kl_term(qg, pg, ug) + kl_term(qr, pr, ur), gap)
}

impl RowGlobals {
    /// `(log p_j, log q_j)` of one element, `log q_j` as `log p_j + (v_j - u_j)/T + log Zs -
    /// log Zt`: the difference that the divergences weigh keeps the digits of `log1p(D / Zt)`
    /// rather than those of two rounded logs near `log C`.
    /// A given teacher's `log q_j` is its value's.
    pub(crate) fn logs(&self, s: f64, t: f64, temperature: f64) -> (f64, f64) {
        let (u, v) = (s - self.ms, t - self.mt);
        let lp = u / temperature - self.log_zs;
        if self.form != TeacherInput::Logits {
            return (lp, given_log_q(self.form, t));
        }
        (lp, lp + (v - u) / temperature + self.log_ratio)
    }
}

/// `log(beta q + (1 - beta) p)` from the logs, without underflow.
fn log_mix(beta: f64, lq: f64, lp: f64) -> f64 {
    let (a, b) = (beta.ln() + lq, (1.0 - beta).ln() + lp);
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + ((a - m).exp() + (b - m).exp()).ln()
}

/// One shard's JSD round (JSD only): per row `[sum q (log q - log M), sum p (log p - log M)]` over
/// the shard's columns, from the combined `global` stats; all-reduced SUM they are
/// `KL(q || M)`, `KL(p || M)`.
pub fn jsd_terms(
    spec: &ShardedSpec,
    s: &[f64],
    t: &[f64],
    labels: Option<&[i32]>,
    global: &[f64],
) -> Vec<f64> {
    let Shard { rows, width, .. } = spec.shard;
    let temp = spec.temperature as f64;
    let beta = match spec.loss.weights().2 {
        Divergence::Jsd { beta } => beta as f64,
        _ => 0.5,
    };
    let mut out = vec![0.0; rows * JSD_TERMS];
    for r in 0..rows {
        if spec.masked(labels, r) {
            continue;
        }
        let g = RowGlobals::of(global, r, temp, spec.teacher);
        for j in 0..width {
            let (lp, lq) = g.logs(s[r * width + j], t[r * width + j], temp);
            let lm = log_mix(beta, lq, lp);
            // a given probability of 0: no term (0 log 0 = 0)
            if lq > f64::NEG_INFINITY {
                out[r * JSD_TERMS] += lq.exp() * (lq - lm);
            }
            out[r * JSD_TERMS + 1] += lp.exp() * (lp - lm);
        }
    }
    out
}

/// One shard's phase 2 from the combined `global` stats (and, for JSD, the all-reduced
/// [`jsd_terms`]): `loss` is the shard's part of the reduced loss, `row_loss` each row's part,
/// `grad_student` (`[rows, width]`) the shard's gradient columns, `grad_teacher` the teacher's
/// (empty for cross-entropy). The parts and the columns over every shard are the unsharded
/// loss's.
pub fn loss_and_grad(
    spec: &ShardedSpec,
    s: &[f64],
    t: Option<&[f64]>,
    labels: Option<&[i32]>,
    global: &[f64],
    jsd: Option<&[f64]>,
) -> RowLossResult {
    let Shard {
        rows,
        width,
        classes,
        ..
    } = spec.shard;
    let temp = spec.temperature as f64;
    let eps = spec.label_smoothing as f64;
    let (w_ce, w_div, div) = spec.loss.weights();
    let scale = spec.scale(labels);
    let k = spec.grad_scale as f64 * scale;
    let mut out = RowLossResult {
        row_loss: vec![0.0; rows],
        grad_student: vec![0.0; rows * width],
        grad_teacher: vec![0.0; if t.is_some() { rows * width } else { 0 }],
        ..Default::default()
    };
    for r in 0..rows {
        if spec.masked(labels, r) {
            continue;
        }
        let dkd = spec.loss.is_dkd();
        let g = if dkd {
            RowGlobals::dkd(global, r, temp)
        } else {
            RowGlobals::of(global, r, temp, spec.teacher)
        };
        let y = labels.and_then(|l| spec.shard.local(l[r]));
        let (kl_q, kl_p) = jsd.map_or((0.0, 0.0), |j| (j[r * JSD_TERMS], j[r * JSD_TERMS + 1]));
        let w_tc = spec.loss.tckd_weight();
        let mut part = 0.0;
        for j in 0..width {
            let i = r * width + j;
            let u = s[i] - g.ms;
            let mut gs = 0.0;
            if w_ce != 0.0 {
                let lp1 = u - g.log_zs1;
                let target = if y == Some(j) { 1.0 - eps } else { 0.0 } + eps / classes as f64;
                part -= w_ce * target * lp1;
                gs += w_ce * (lp1.exp() - target);
            }
            if let (true, Some(t)) = (dkd, t) {
                // TCKD at the label's column; NCKD's forward-KL terms over the rest.
                if y == Some(j) {
                    part += temp * temp * w_tc * g.tckd;
                    gs += temp * w_tc * g.gap;
                } else {
                    let (lp, lq) = g.logs(s[i], t[i], temp);
                    let (p, q) = (lp.exp(), lq.exp());
                    part += temp * temp * w_div * kl_term(q, p, lp - lq);
                    gs += temp * (w_div * (p - q) - w_tc * g.gap * p);
                }
            } else if let (true, Some(t)) = (w_div != 0.0, t) {
                let (lp, lq) = g.logs(s[i], t[i], temp);
                let (p, q) = (lp.exp(), lq.exp());
                let (d, ds, dt) = match div {
                    Divergence::ForwardKl => (
                        if q == 0.0 { 0.0 } else { q * (lq - lp) },
                        p - q,
                        if q == 0.0 {
                            0.0
                        } else {
                            q * (lq - lp - g.forward)
                        },
                    ),
                    Divergence::ReverseKl => (
                        p * (lp - lq),
                        if p == 0.0 {
                            0.0
                        } else {
                            p * (lp - lq - g.reverse)
                        },
                        q - p,
                    ),
                    Divergence::Jsd { beta } => {
                        let beta = beta as f64;
                        let lm = log_mix(beta, lq, lp);
                        let q_term = if q == 0.0 { 0.0 } else { q * (lq - lm) };
                        (
                            beta * q_term + (1.0 - beta) * p * (lp - lm),
                            if p == 0.0 {
                                0.0
                            } else {
                                (1.0 - beta) * p * (lp - lm - kl_p)
                            },
                            if q == 0.0 {
                                0.0
                            } else {
                                beta * q * (lq - lm - kl_q)
                            },
                        )
                    }
                };
                part += w_div * temp * temp * d;
                gs += w_div * temp * ds;
                out.grad_teacher[i] = k * w_div * temp * dt;
            }
            out.grad_student[i] = k * gs;
        }
        out.row_loss[r] = part;
    }
    out.loss = out.row_loss.iter().sum::<f64>() * scale;
    out
}
