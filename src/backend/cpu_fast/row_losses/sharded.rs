//! The vocab-sharded row losses in f32 (`docs/LOSSES.md` section 9; the f64 reference and the
//! stats layout are `ops/sharded/`). Each element is computed in f32 with `vmath`'s `exp` and
//! `ln`; every sum over a row is accumulated in f64 in column order, and the per-row constants
//! (`log Z`, `log Zs - log Zt = log1p(D / Zt)`, the divergences) are f64, rounded once to f32
//! for the element loop. `e^{u/T} - e^{v/T}` is formed as `e^{max/T} (-expm1(-|u - v|/T))`
//! (no cancellation, no overflow). Rows are independent: they are shared among scoped threads
//! in contiguous ranges, so the bits do not depend on the thread count.
//!
//! A teacher given as probabilities or log-probabilities (stats with `m_t = 0`, `v_j = T log q_j`;
//! `ops/sharded/mod.rs`) has its `log q_j` and the stats' terms formed in f64, and phase 2's
//! `log q - log p` in f64 (at high T a small difference of two numbers near `-log C`), as the
//! unsharded fast divergence does.
//!
//! These are scalar loops over a row (the compiler vectorises what it can), not the block driver
//! of `rows.rs`: the sharded losses read each element once per phase and write per-row stats.

use super::super::vmath::{self, select};
use crate::error::Result;
use crate::ops::sharded::reference::RowGlobals;
use crate::ops::sharded::{
    check_host_call, Phase, Shard, ShardedSpec, Sum, JSD_TERMS, MAXIMA, STATS, SUMS,
};
use crate::ops::{Divergence, TeacherInput};
use crate::sharded::{check_out, ShardedOut};

/// Below this many elements a call runs on the calling thread.
const PARALLEL_ELEMENTS: usize = 1 << 17;

/// Runs `body(r0, r1)` over contiguous row ranges on up to `threads` scoped threads (0: one per
/// core), or on the calling thread for small calls. `body` returns its rows' results.
fn par_rows<R: Send>(
    rows: usize,
    elements: usize,
    threads: usize,
    body: impl Fn(usize, usize) -> R + Sync,
) -> Vec<R> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if threads == 0 { cores } else { threads }.min(rows).max(1);
    if threads == 1 || elements < PARALLEL_ELEMENTS {
        return vec![body(0, rows)];
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..rows)
            .step_by(per)
            .map(|r0| {
                let body = &body;
                scope.spawn(move || body(r0, (r0 + per).min(rows)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a sharded-loss thread panicked"))
            .collect()
    })
}

/// `e^{a} - e^{b}` for `a, b <= 0` (scaled logits), without cancellation or overflow.
#[inline(always)]
fn exp_diff(a: f32, b: f32) -> f32 {
    let hi = vmath::max(a, b);
    let mag = vmath::exp(hi) * -vmath::expm1(-(a - b).abs());
    select(a >= b, mag, -mag)
}

/// One shard's phase 1 (see [`crate::ops::sharded::reference::stats`]): `out` is `[rows * STATS]`.
pub fn stats(
    spec: &ShardedSpec,
    s: &[f32],
    t: Option<&[f32]>,
    labels: Option<&[i32]>,
    out: &mut [f32],
    threads: usize,
) {
    let Shard { rows, width, .. } = spec.shard;
    let inv_t = 1.0 / spec.temperature;
    let (given, probs) = (spec.given_teacher(), spec.teacher == TeacherInput::Probs);
    let dkd = spec.loss.is_dkd();
    let temp = spec.temperature as f64;
    let parts = par_rows(rows, rows * width, threads, |r0, r1| {
        let mut part = vec![0.0f32; (r1 - r0) * STATS];
        let (maxima, sums) = part.split_at_mut((r1 - r0) * MAXIMA);
        for r in r0..r1 {
            if spec.masked(labels, r) {
                continue;
            }
            let y = labels.and_then(|l| spec.shard.local(l[r]));
            // DKD's stats are the rest of the row's: the label's column left out (but of `S`).
            let skip = if dkd { y } else { None };
            let sr = &s[r * width..(r + 1) * width];
            let max_of = |v: &[f32]| {
                v.iter()
                    .enumerate()
                    .filter(|&(j, _)| Some(j) != skip)
                    .fold(f32::NEG_INFINITY, |a, (_, &b)| a.max(b))
            };
            let ms = max_of(sr);
            let tr = t.map(|t| &t[r * width..(r + 1) * width]);
            let mt = match tr {
                Some(tr) if !given => max_of(tr),
                _ => 0.0,
            };
            let mut z = [0.0f64; SUMS];
            for j in 0..width {
                if Some(j) == skip {
                    z[Sum::LogitSum as usize] += sr[j] as f64;
                    continue;
                }
                let u = sr[j] - ms;
                let us = u * inv_t;
                let eu = vmath::exp(us);
                z[Sum::StudentT as usize] += eu as f64;
                z[Sum::Student1 as usize] += vmath::exp(u) as f64;
                z[Sum::LogitSum as usize] += sr[j] as f64;
                if let (Some(tr), true) = (tr, given) {
                    // v_j = T log q_j: e^{v_j/T} = q_j; a zero q_j adds nothing to Af and makes
                    // Ar infinite.
                    let tv = tr[j] as f64;
                    let (lq, q) = if probs { (tv.ln(), tv) } else { (tv, tv.exp()) };
                    let (u64, eu64) = (u as f64, eu as f64);
                    z[Sum::TeacherT as usize] += q;
                    z[Sum::Forward as usize] +=
                        vmath::select64(q > 0.0, q * (temp * lq - u64), 0.0);
                    z[Sum::Reverse as usize] += vmath::select64(
                        lq == f64::NEG_INFINITY,
                        f64::INFINITY,
                        eu64 * (u64 - temp * lq),
                    );
                    z[Sum::Difference as usize] += eu64 - q;
                } else if let Some(tr) = tr {
                    let v = tr[j] - mt;
                    let vs = v * inv_t;
                    let ev = vmath::exp(vs);
                    z[Sum::TeacherT as usize] += ev as f64;
                    z[Sum::Forward as usize] += (ev * (v - u)) as f64;
                    if !dkd {
                        z[Sum::Reverse as usize] += (eu * (u - v)) as f64;
                    }
                    z[Sum::Difference as usize] += exp_diff(us, vs) as f64;
                }
            }
            if let Some(y) = y {
                z[Sum::StudentLabel as usize] = sr[y] as f64;
                z[Sum::TeacherLabel as usize] = tr.map_or(0.0, |tr| tr[y] as f64);
            }
            let i = r - r0;
            maxima[i * MAXIMA] = ms;
            maxima[i * MAXIMA + 1] = mt;
            for (d, v) in sums[i * SUMS..(i + 1) * SUMS].iter_mut().zip(z) {
                *d = v as f32;
            }
        }
        (r0, r1, part)
    });
    let (maxima, sums) = out.split_at_mut(rows * MAXIMA);
    for (r0, r1, part) in parts {
        let n = r1 - r0;
        maxima[r0 * MAXIMA..r1 * MAXIMA].copy_from_slice(&part[..n * MAXIMA]);
        sums[r0 * SUMS..r1 * SUMS].copy_from_slice(&part[n * MAXIMA..]);
    }
}

/// A row's globals from f32 stats (widened to f64); DKD's from its rest-of-row stats.
fn globals(stats: &[f32], r: usize, temperature: f64, spec: &ShardedSpec) -> RowGlobals {
    let rows = stats.len() / STATS;
    let mut row = [0.0f64; STATS];
    for (d, &v) in row[..MAXIMA]
        .iter_mut()
        .zip(&stats[r * MAXIMA..(r + 1) * MAXIMA])
    {
        *d = v as f64;
    }
    let sums = &stats[rows * MAXIMA + r * SUMS..rows * MAXIMA + (r + 1) * SUMS];
    for (d, &v) in row[MAXIMA..].iter_mut().zip(sums) {
        *d = v as f64;
    }
    if spec.loss.is_dkd() {
        RowGlobals::dkd(&row, 0, temperature)
    } else {
        RowGlobals::of(&row, 0, temperature, spec.teacher)
    }
}

/// The per-element values of a row, f32, from its globals.
#[derive(Clone, Copy)]
struct Consts {
    /// A teacher given as probabilities or log-probabilities (`Some(probs)`), or logits (`None`).
    given: Option<bool>,
    /// `1 / T` and `log Zs` in f64, for a given teacher's `log q - log p`.
    inv_t64: f64,
    log_zs64: f64,
    ms: f32,
    mt: f32,
    inv_t: f32,
    log_zs: f32,
    /// `log Zt = log Zs - (log Zs - log Zt)`
    log_zt: f32,
    log_zs1: f32,
    /// `log Zs - log Zt`
    ratio: f32,
    forward: f32,
    reverse: f32,
    /// DKD's `TCKD` and `p_g - q_g` (0 for the other losses).
    tckd: f32,
    gap: f32,
    beta: f32,
    log_beta: f32,
    log_1m_beta: f32,
    /// JSD's series coefficients `c2..c6` (`jsd`).
    series: [f32; 5],
}

impl Consts {
    fn of(g: &RowGlobals, spec: &ShardedSpec) -> Self {
        let beta = match spec.loss.weights().2 {
            Divergence::Jsd { beta } => beta,
            _ => 0.5,
        };
        Consts {
            given: (spec.teacher != TeacherInput::Logits)
                .then_some(spec.teacher == TeacherInput::Probs),
            inv_t64: 1.0 / spec.temperature as f64,
            log_zs64: g.log_zs,
            ms: g.ms as f32,
            mt: g.mt as f32,
            inv_t: 1.0 / spec.temperature,
            log_zs: g.log_zs as f32,
            log_zt: (g.log_zs - g.log_ratio) as f32,
            log_zs1: g.log_zs1 as f32,
            ratio: g.log_ratio as f32,
            forward: g.forward as f32,
            reverse: g.reverse as f32,
            tckd: g.tckd as f32,
            gap: g.gap as f32,
            beta,
            log_beta: beta.ln(),
            log_1m_beta: (1.0 - beta).ln(),
            series: [
                0.5 * beta * (1.0 - beta),
                (1.0 + beta) / 6.0,
                (2.0 * beta * beta + 1.0) / 24.0,
                (3.0 * beta + 1.0) * (2.0 * beta * beta - 2.0 * beta + 1.0) / 120.0,
                (((24.0 * beta - 30.0) * beta + 10.0) * beta * beta + 1.0) / 720.0,
            ],
        }
    }

    /// `q` of one element, from its own logit (not `exp(log p + dq)`, which would carry the rounding
    /// of `log p` where both are large and cancel).
    #[inline(always)]
    fn q(&self, t: f32) -> f32 {
        match self.given {
            Some(true) => t,
            Some(false) => vmath::exp(t),
            None => vmath::exp((t - self.mt) * self.inv_t - self.log_zt),
        }
    }

    /// `(log p, log q - log p)` of one element; a given teacher's difference formed in f64.
    #[inline(always)]
    fn logs(&self, s: f32, t: f32) -> (f32, f32) {
        if let Some(probs) = self.given {
            let lq = if probs {
                vmath::ln_f64(t as f64)
            } else {
                t as f64
            };
            let lp = (s as f64 - self.ms as f64) * self.inv_t64 - self.log_zs64;
            return (lp as f32, (lq - lp) as f32);
        }
        let (u, v) = (s - self.ms, t - self.mt);
        (
            u * self.inv_t - self.log_zs,
            (v - u) * self.inv_t + self.ratio,
        )
    }

    /// JSD's per-element `(log q - log M, log p - log M, c)` from `dq = log q - log p` (as
    /// `divergence.cu`'s `jsd_logs`): `-log1p((1-beta) expm1(dl))`, `-log1p(beta expm1(-dl))` with
    /// `dl = -dq` (softplus forms where the argument is below -1/2), and the divergence's term
    /// `c = beta q lq_m + (1-beta) p lp_m`, from its series `q f(dl)` where `|dl| < 0.1` (two
    /// first-order halves that cancel to second order where p ~ q).
    #[inline(always)]
    fn jsd(&self, dq: f32, p: f32, q: f32) -> (f32, f32, f32) {
        let dl = -dq;
        let (b, b1) = (self.beta, 1.0 - self.beta);
        let log_rho = self.log_beta - self.log_1m_beta;
        let softplus = |z: f32| vmath::max(z, 0.0) + vmath::log1p(vmath::exp(-z.abs()));
        let (arg_q, arg_p) = (b1 * vmath::expm1(dl), b * vmath::expm1(-dl));
        let ok = |a: f32| (-0.5..=3.0e38).contains(&a);
        let lq_m = if ok(arg_q) {
            -vmath::log1p(arg_q)
        } else {
            -softplus(dl - log_rho) - self.log_beta
        };
        let lp_m = if ok(arg_p) {
            -vmath::log1p(arg_p)
        } else {
            -softplus(log_rho - dl) - self.log_1m_beta
        };
        let c = if dl.abs() < 0.1 {
            let x = dl;
            let f = &self.series;
            q * (f[0] * x * x * (1.0 + 2.0 * x * (f[1] + x * (f[2] + x * (f[3] + x * f[4])))))
        } else {
            // a given probability of 0: its half is 0 (0 log 0), not 0 * -inf
            select(q > 0.0, b * q * lq_m, 0.0) + b1 * p * lp_m
        };
        (lq_m, lp_m, c)
    }
}

/// `q phi(u)`, `phi(u) = e^u - 1 - u`, `u = log p - log q` (`(p - q) - q u` where `|u| >= 1`): a
/// forward-KL term, non-negative and second order in `u`.
#[inline(always)]
fn kl_term(q: f32, p: f32, u: f32) -> f32 {
    select(u.abs() < 1.0, q * (vmath::expm1(u) - u), (p - q) - q * u)
}

/// One shard's JSD round (see [`crate::ops::sharded::reference::jsd_terms`]): `out` `[rows * 2]`.
pub fn jsd_terms(
    spec: &ShardedSpec,
    s: &[f32],
    t: &[f32],
    labels: Option<&[i32]>,
    global: &[f32],
    out: &mut [f32],
    threads: usize,
) {
    let Shard { rows, width, .. } = spec.shard;
    let temp = spec.temperature as f64;
    let parts = par_rows(rows, rows * width, threads, |r0, r1| {
        let mut part = vec![0.0f32; (r1 - r0) * JSD_TERMS];
        for r in r0..r1 {
            if spec.masked(labels, r) {
                continue;
            }
            let c = Consts::of(&globals(global, r, temp, spec), spec);
            let (mut kq, mut kp) = (0.0f64, 0.0f64);
            for j in 0..width {
                let (lp, dq) = c.logs(s[r * width + j], t[r * width + j]);
                let (p, q) = (vmath::exp(lp), c.q(t[r * width + j]));
                let (lq_m, lp_m, _) = c.jsd(dq, p, q);
                kq += select(q > 0.0, q * lq_m, 0.0) as f64;
                kp += (p * lp_m) as f64;
            }
            part[(r - r0) * JSD_TERMS] = kq as f32;
            part[(r - r0) * JSD_TERMS + 1] = kp as f32;
        }
        (r0, part)
    });
    for (r0, part) in parts {
        out[r0 * JSD_TERMS..r0 * JSD_TERMS + part.len()].copy_from_slice(&part);
    }
}

/// One shard's phase 2 (see [`crate::ops::sharded::reference::loss_and_grad`]): writes
/// `grad_student` (`[rows, width]`), `grad_teacher` where given, and returns each row's part of
/// the loss (unscaled) and the reduction's factor.
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grad(
    spec: &ShardedSpec,
    s: &[f32],
    t: Option<&[f32]>,
    labels: Option<&[i32]>,
    global: &[f32],
    jsd: Option<&[f32]>,
    grad_student: &mut [f32],
    mut grad_teacher: Option<&mut [f32]>,
    threads: usize,
) -> (Vec<f64>, f64) {
    let Shard {
        rows,
        width,
        classes,
        ..
    } = spec.shard;
    let temp = spec.temperature as f64;
    let eps = spec.label_smoothing;
    let (w_ce, w_div, div) = spec.loss.weights();
    let scale = spec.scale(labels);
    let k = spec.grad_scale as f64 * scale;
    // The element loop's constant factors, f32.
    let (k_ce, k_div) = ((k * w_ce) as f32, (k * w_div * temp) as f32);
    let (w_ce32, w_div_t2) = (w_ce as f32, (w_div * temp * temp) as f32);
    let smooth = eps / classes as f32;
    let dkd = spec.loss.is_dkd();
    let w_tc = spec.loss.tckd_weight();
    let (k_tc, t2_tc) = ((k * w_tc * temp) as f32, (w_tc * temp * temp) as f32);
    let beta = match div {
        Divergence::Jsd { beta } => beta,
        _ => 0.5,
    };
    let parts = par_rows(rows, rows * width, threads, |r0, r1| {
        let n = r1 - r0;
        let mut gs_part = vec![0.0f32; n * width];
        let mut gt_part = vec![0.0f32; if t.is_some() { n * width } else { 0 }];
        let mut losses = vec![0.0f64; n];
        for r in r0..r1 {
            if spec.masked(labels, r) {
                continue;
            }
            let c = Consts::of(&globals(global, r, temp, spec), spec);
            let y = labels.and_then(|l| spec.shard.local(l[r]));
            let (kl_q, kl_p) = jsd.map_or((0.0, 0.0), |j| (j[r * JSD_TERMS], j[r * JSD_TERMS + 1]));
            let mut part = 0.0f64;
            let i0 = (r - r0) * width;
            for j in 0..width {
                let sv = s[r * width + j];
                let mut g = 0.0f32;
                if w_ce != 0.0 {
                    let lp1 = sv - c.ms - c.log_zs1;
                    let target = select(y == Some(j), 1.0 - eps, 0.0) + smooth;
                    part -= (w_ce32 * target * lp1) as f64;
                    g += k_ce * (vmath::exp(lp1) - target);
                }
                if let (true, Some(t)) = (dkd, t) {
                    // TCKD at the label's column; NCKD's forward-KL terms over the rest.
                    if y == Some(j) {
                        part += (t2_tc * c.tckd) as f64;
                        g += k_tc * c.gap;
                    } else {
                        let (lp, dq) = c.logs(sv, t[r * width + j]);
                        let (p, q) = (vmath::exp(lp), c.q(t[r * width + j]));
                        part += (w_div_t2 * kl_term(q, p, -dq)) as f64;
                        g += k_div * (p - q) - k_tc * c.gap * p;
                    }
                } else if let (true, Some(t)) = (w_div != 0.0, t) {
                    let (lp, dq) = c.logs(sv, t[r * width + j]);
                    let (p, q) = (vmath::exp(lp), c.q(t[r * width + j]));
                    let (d, ds, dt) = match div {
                        Divergence::ForwardKl => {
                            (select(q > 0.0, q * dq, 0.0), p - q, q * (dq - c.forward))
                        }
                        Divergence::ReverseKl => (-p * dq, p * (-dq - c.reverse), q - p),
                        Divergence::Jsd { .. } => {
                            let (lq_m, lp_m, term) = c.jsd(dq, p, q);
                            (
                                term,
                                (1.0 - beta) * p * (lp_m - kl_p),
                                beta * q * (lq_m - kl_q),
                            )
                        }
                    };
                    part += (w_div_t2 * d) as f64;
                    g += k_div * ds;
                    gt_part[i0 + j] = k_div * dt;
                }
                gs_part[i0 + j] = g;
            }
            losses[r - r0] = part;
        }
        (r0, gs_part, gt_part, losses)
    });
    let mut row_loss = vec![0.0; rows];
    for (r0, gs, gt, losses) in parts {
        grad_student[r0 * width..r0 * width + gs.len()].copy_from_slice(&gs);
        if let Some(out) = grad_teacher.as_deref_mut() {
            out[r0 * width..r0 * width + gt.len()].copy_from_slice(&gt);
        }
        row_loss[r0..r0 + losses.len()].copy_from_slice(&losses);
    }
    (row_loss, scale)
}

impl crate::sharded::ShardedBackend for super::super::FastCpuBackend {
    fn sharded_stats(
        &self,
        spec: &ShardedSpec,
        student: &[f32],
        teacher: Option<&[f32]>,
        labels: Option<&[i32]>,
        out: &mut [f32],
    ) -> Result<()> {
        check_host_call(spec, Phase::Stats, student, teacher, labels, None, None)?;
        spec.shard.check("stats", out.len(), STATS)?;
        stats(spec, student, teacher, labels, out, self.threads);
        Ok(())
    }

    fn sharded_jsd_terms(
        &self,
        spec: &ShardedSpec,
        student: &[f32],
        teacher: &[f32],
        labels: Option<&[i32]>,
        global: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        check_host_call(
            spec,
            Phase::JsdTerms,
            student,
            Some(teacher),
            labels,
            Some(global),
            None,
        )?;
        spec.shard.check("JSD terms", out.len(), JSD_TERMS)?;
        jsd_terms(spec, student, teacher, labels, global, out, self.threads);
        Ok(())
    }

    fn sharded_loss_and_grad(
        &self,
        spec: &ShardedSpec,
        student: &[f32],
        teacher: Option<&[f32]>,
        labels: Option<&[i32]>,
        global: &[f32],
        jsd: Option<&[f32]>,
        out: ShardedOut<'_>,
    ) -> Result<f32> {
        check_host_call(
            spec,
            Phase::LossAndGrad,
            student,
            teacher,
            labels,
            Some(global),
            jsd,
        )?;
        check_out(spec, teacher.is_some(), &out)?;
        let (losses, scale) = loss_and_grad(
            spec,
            student,
            teacher,
            labels,
            global,
            jsd,
            out.grad_student,
            out.grad_teacher,
            self.threads,
        );
        if let Some(r) = out.row_loss {
            for (d, &v) in r.iter_mut().zip(&losses) {
                *d = v as f32;
            }
        }
        Ok((losses.iter().sum::<f64>() * scale) as f32)
    }
}
