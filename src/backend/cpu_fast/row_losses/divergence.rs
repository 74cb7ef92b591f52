//! Forward KL, reverse KL and JSD with the teacher as logits, probabilities or log-probabilities
//! (`docs/LOSSES.md` section 2).

use super::cross_entropy::Student;
use super::soft_targets::*;
use super::softmax::{merge_max_sum, sum_exp, MaxSum};
use super::*;
use crate::ops::{Divergence, TeacherInput};

pub struct DivergenceRows<'a> {
    pub rows: Rows<'a>,
    pub student: Student,
    pub teacher: In,
    pub grad_teacher: Option<Out>,
    pub divergence: Divergence,
    pub form: TeacherInput,
    pub temperature: f32,
    pub teacher_eps: f32,
    /// `grad_scale` times the reduction's factor times T (`d(T^2 D)/dz` carries one T).
    pub k: f32,
}

/// A block's pass-1 result: the soft-target statistics (teacher logits), or the student's
/// `(ms, Zs)` and the given teacher's `Q = sum q` (`kd.zt` holds `Q`).
#[derive(Clone, Copy, Default)]
pub struct DivStats {
    pub(super) kd: KdStats,
}

#[derive(Clone, Copy, Default)]
pub struct DivRow {
    pub(super) live: bool,
    pub(super) kd: KdRow,
    /// A given teacher's `Q - 1`.
    pub(super) q_minus_1: f64,
    pub(super) d: f64,
    pub(super) kl_qm: f64,
    pub(super) kl_pm: f64,
}

#[derive(Clone, Copy, Default)]
pub struct DivSums {
    pub(super) x: f64,
    pub(super) y: f64,
    pub(super) q: f64,
}

/// What an element step needs besides its inputs: the block constants; for a given teacher
/// `c = log Zs - os` (f64), so that `log p_j = xs_j - c`.
#[derive(Clone, Copy)]
pub(super) struct DivBlock {
    pub(super) kb: KdBlock,
    pub(super) c: f64,
}

impl DivergenceRows<'_> {
    pub(super) fn inv_t(&self) -> f32 {
        1.0 / self.temperature
    }

    pub(super) fn logits(&self) -> bool {
        self.form == TeacherInput::Logits
    }

    /// The floor of a given teacher's `log q` (`-inf`: none).
    pub(super) fn log_floor(&self) -> f64 {
        if self.teacher_eps > 0.0 {
            (self.teacher_eps as f64).ln()
        } else {
            f64::NEG_INFINITY
        }
    }

    pub(super) fn block_consts(&self, row: &DivRow, b: &DivStats) -> DivBlock {
        let inv_t = self.inv_t() as f64;
        if self.logits() {
            return DivBlock {
                kb: kd_block(&row.kd, &b.kd, inv_t),
                c: 0.0,
            };
        }
        let os = (b.kd.ms as f64 - row.kd.ms as f64) * inv_t;
        DivBlock {
            kb: KdBlock {
                ms: b.kd.ms,
                mt: 0.0,
                ps: (os - row.kd.lzs).exp() as f32,
                pt: 1.0,
                w: 0.0,
                w64: 0.0,
            },
            c: row.kd.lzs - os,
        }
    }

    /// `(p, q, u)` for a step. A given teacher's `u = log p - log q` is formed in f64: at high T
    /// it is a small difference of two numbers near `-log C`.
    #[inline(always)]
    pub(super) fn elems<const LOGITS: bool>(
        &self,
        (sv, tv): (&Lanes, &Lanes),
        (es, eq): (&[f32], &[f32]),
        blk: &DivBlock,
    ) -> (Lanes, Lanes, Lanes) {
        let inv_t = self.inv_t();
        if LOGITS {
            return kd_elems(sv, tv, es, eq, &blk.kb, inv_t);
        }
        let (es, eq) = (lanes(es), lanes(eq));
        let (mut p, mut q, mut u) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
        let (inv_t64, floor, ms) = (inv_t as f64, self.log_floor(), blk.kb.ms as f64);
        let (probs, floored) = (self.form == TeacherInput::Probs, self.teacher_eps > 0.0);
        for l in 0..LANES {
            p[l] = es[l] * blk.kb.ps;
            q[l] = eq[l];
            let t = tv[l] as f64;
            let lq = vmath::select64(probs, vmath::ln_f64(t), t);
            // max(log q, log eps), a NaN (a negative probability) floored too, as f64::max.
            let lq = vmath::select64(floored & (lq.is_nan() | (lq < floor)), floor, lq);
            u[l] = (((sv[l] as f64 - ms) * inv_t64 - blk.c) - lq) as f32;
        }
        (p, q, u)
    }

    /// `u_j - d` in f64 for a step (see [`u_minus`]).
    #[inline(always)]
    pub(super) fn u_minus<const LOGITS: bool>(
        &self,
        (sv, tv): (&Lanes, &Lanes),
        blk: &DivBlock,
        d: f64,
    ) -> Lanes {
        let inv_t = self.inv_t() as f64;
        if LOGITS {
            return u_minus(sv, tv, &blk.kb, inv_t, d);
        }
        let mut out = [0.0f32; LANES];
        let (floor, ms) = (self.log_floor(), blk.kb.ms as f64);
        let (probs, floored) = (self.form == TeacherInput::Probs, self.teacher_eps > 0.0);
        for l in 0..LANES {
            let t = tv[l] as f64;
            let lq = vmath::select64(probs, vmath::ln_f64(t), t);
            let lq = vmath::select64(floored & (lq.is_nan() | (lq < floor)), floor, lq);
            out[l] = ((((sv[l] as f64 - ms) * inv_t - blk.c) - lq) - d) as f32;
        }
        out
    }

    /// The divergence sums of a block (pass 2); writes forward KL's student gradient when
    /// `early`.
    #[inline(always)]
    pub(super) fn block_sums<const LOGITS: bool>(
        &self,
        r: usize,
        (j0, j1): (usize, usize),
        blk: &DivBlock,
        keep: &[f32],
        early: Option<Out>,
    ) -> DivSums {
        let base = r * self.rows.cols;
        let len = j1 - j0;
        let (es, eq) = keep.split_at(len);
        let beta = self.divergence.beta();
        let jb = (beta, beta.ln(), (-beta).ln_1p());
        let k = self.k;
        let (mut x, mut y, mut qs) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
        for_steps!(j0, j1, |j, n| {
            let i = j - j0;
            // SAFETY: in bounds; in place, each element is read before its gradient is written.
            let (sv, tv) = unsafe {
                (
                    self.student.s.load(base + j, n),
                    self.teacher.load(base + j, n),
                )
            };
            let (p, q, u) = self.elems::<LOGITS>((&sv, &tv), (&es[i..i + n], &eq[i..i + n]), blk);
            let (mut a, mut b) = ([0.0f32; LANES], [0.0f32; LANES]);
            match self.divergence {
                Divergence::ForwardKl => {
                    let mut g = [0.0f32; LANES];
                    for l in 0..LANES {
                        let (term, gap) = kl_and_gap(q[l], p[l], u[l]);
                        a[l] = term;
                        g[l] = k * gap;
                    }
                    if let Some(o) = early {
                        // SAFETY: this thread's block; in bounds.
                        unsafe { o.store(base + j, &g, n) };
                    }
                }
                Divergence::ReverseKl => {
                    for l in 0..LANES {
                        a[l] = rkl_term(p[l], q[l], -u[l]);
                    }
                }
                Divergence::Jsd { .. } => {
                    for l in 0..LANES {
                        let diff = -u[l];
                        let m = beta * q[l] + (1.0 - beta) * p[l];
                        a[l] = phi_term(q[l], -jsd_q_minus_m(diff, jb), m);
                        b[l] = phi_term(p[l], -jsd_p_minus_m(diff, jb), m);
                    }
                }
            }
            add(&mut x, &a, n);
            add(&mut y, &b, n);
            if !LOGITS {
                add(&mut qs, &q, n);
            }
        });
        DivSums {
            x: total(&x),
            y: total(&y),
            q: total(&qs),
        }
    }

    /// The gradients that need the row's divergence (pass 3).
    #[inline(always)]
    pub(super) fn block_grads<const LOGITS: bool>(
        &self,
        r: usize,
        (j0, j1): (usize, usize),
        row: &DivRow,
        blk: &DivBlock,
        keep: &[f32],
    ) {
        let base = r * self.rows.cols;
        let len = j1 - j0;
        let (es, eq) = keep.split_at(len);
        let beta = self.divergence.beta();
        let jb = (beta, beta.ln(), (-beta).ln_1p());
        let k = self.k;
        let (kl_qm, kl_pm) = (row.kl_qm as f32, row.kl_pm as f32);
        let infinite = row.d == f64::INFINITY;
        for_steps!(j0, j1, |j, n| {
            let i = j - j0;
            // SAFETY: in bounds; in place, each element is read before its gradient is written.
            let (sv, tv) = unsafe {
                (
                    self.student.s.load(base + j, n),
                    self.teacher.load(base + j, n),
                )
            };
            let (p, q, u) = self.elems::<LOGITS>((&sv, &tv), (&es[i..i + n], &eq[i..i + n]), blk);
            let (mut gs, mut gt) = ([0.0f32; LANES], [0.0f32; LANES]);
            // u + D (forward KL's teacher gradient) or u - D (reverse KL's student gradient), in
            // f64: they nearly cancel at a dominant class.
            let u_d = match self.divergence {
                Divergence::ForwardKl => self.u_minus::<LOGITS>((&sv, &tv), blk, -row.d),
                Divergence::ReverseKl => self.u_minus::<LOGITS>((&sv, &tv), blk, row.d),
                Divergence::Jsd { .. } => [0.0; LANES],
            };
            match self.divergence {
                Divergence::ForwardKl => {
                    for l in 0..LANES {
                        let (_, gap) = kl_and_gap(q[l], p[l], u[l]);
                        gs[l] = k * gap;
                        gt[l] = select(q[l] == 0.0, 0.0, -k * q[l] * u_d[l]);
                    }
                }
                Divergence::ReverseKl => {
                    for l in 0..LANES {
                        let (_, gap) = kl_and_gap(q[l], p[l], u[l]);
                        let g = select(p[l] == 0.0, 0.0, k * p[l] * u_d[l]);
                        // An infinite divergence has no gradient.
                        gs[l] = select(infinite, f32::NAN, g);
                        gt[l] = -k * gap;
                    }
                }
                Divergence::Jsd { .. } => {
                    for l in 0..LANES {
                        let diff = -u[l];
                        let pm = jsd_p_minus_m(diff, jb);
                        let qm = jsd_q_minus_m(diff, jb);
                        gs[l] = select(p[l] == 0.0, 0.0, k * (1.0 - beta) * p[l] * (pm - kl_pm));
                        gt[l] = select(q[l] == 0.0, 0.0, k * beta * q[l] * (qm - kl_qm));
                    }
                }
            }
            // SAFETY: this thread's block; in bounds.
            unsafe {
                if let Some(o) = self.student.g {
                    o.store(base + j, &gs, n);
                }
                if let Some(o) = self.grad_teacher {
                    o.store(base + j, &gt, n);
                }
            }
        });
    }

    /// Forward KL's student gradient is written in pass 2 unless the teacher's is wanted too.
    pub(super) fn early(&self) -> bool {
        self.divergence == Divergence::ForwardKl && self.grad_teacher.is_none()
    }
}

/// Reverse KL's term `p phi(d)`, `d = log q - log p`; `+inf` where `q = 0` (a softmax of finite
/// logits is > 0 even where f32 rounds it to 0). The CPU backends reject such a teacher before
/// (`ops::check_reverse_kl_support`), so this is the device kernels' rule kept alike.
#[inline(always)]
pub(super) fn rkl_term(p: f32, q: f32, d: f32) -> f32 {
    let (phi, _) = vmath::phi_expm1_small(d);
    let v = select(d.abs() < 0.5, p * phi, (q - p) - p * d);
    select(d == f32::NEG_INFINITY, f32::INFINITY, v)
}

/// `w phi(x)` with `x = log m - log w` and `m` given (its limit `m` where `w = 0`).
#[inline(always)]
pub(super) fn phi_term(w: f32, x: f32, m: f32) -> f32 {
    let (phi, _) = vmath::phi_expm1_small(x);
    select(w == 0.0, m, select(x.abs() < 0.5, w * phi, (m - w) - w * x))
}

/// JSD's `log q - log M = -log1p((1 - beta) expm1(-diff))`, `diff = log q - log p`.
#[inline(always)]
pub(super) fn jsd_q_minus_m(diff: f32, (beta, _, ln_1mb): (f32, f32, f32)) -> f32 {
    let v = -vmath::log1p((1.0 - beta) * vmath::expm1(-diff));
    select(diff < -80.0, diff - ln_1mb, v)
}

/// JSD's `log p - log M = -log1p(beta expm1(diff))`.
#[inline(always)]
pub(super) fn jsd_p_minus_m(diff: f32, (beta, ln_b, _): (f32, f32, f32)) -> f32 {
    let v = -vmath::log1p(beta * vmath::expm1(diff));
    select(diff > 80.0, -(ln_b + diff), v)
}

impl RowOp for DivergenceRows<'_> {
    type Stats = DivStats;
    type Row = DivRow;
    type Sums = DivSums;
    // e^xs, and e^xt (logits) or the teacher's (floored) q.
    const SCRATCH: usize = 2;

    fn shape(&self) -> (usize, usize) {
        (self.rows.rows, self.rows.cols)
    }

    #[inline(always)]
    fn stats(&self, r: usize, j0: usize, j1: usize, keep: &mut [f32]) -> DivStats {
        if !self.rows.live(r) {
            return DivStats::default();
        }
        let base = r * self.rows.cols;
        let (es, eq) = keep.split_at_mut(j1 - j0);
        let inv_t = self.inv_t();
        if self.logits() {
            let kd = kd_stats(
                (self.student.s, self.teacher),
                (base, j0, j1),
                inv_t,
                es,
                eq,
                None,
            );
            return DivStats { kd };
        }
        let (ms, bad_s) = max_and_bad(self.student.s, base, j0, j1);
        // The teacher: valid values, the floored q kept, Q = sum q.
        let probs = self.form == TeacherInput::Probs;
        let eps = self.teacher_eps;
        let log_eps = select(eps > 0.0, eps.ln(), f32::NEG_INFINITY);
        let mut bad = [0u32; LANES];
        for_steps!(j0, j1, |j, n| {
            // SAFETY: in bounds.
            let tv = unsafe { self.teacher.load(base + j, n) };
            let mut q = [0.0f32; LANES];
            for l in 0..LANES {
                let t = tv[l];
                let invalid =
                    (probs & !t.is_finite()) | (!probs & (t.is_nan() | (t == f32::INFINITY)));
                bad[l] |= ((l < n) & invalid) as u32;
                let floored = select((eps > 0.0) & (t.is_nan() | (t < eps)), eps, t);
                q[l] = select(probs, floored, vmath::exp(select(t < log_eps, log_eps, t)));
            }
            eq[j - j0..j - j0 + n].copy_from_slice(&q[..n]);
        });
        let bad = bad_s || bad.iter().any(|&b| b != 0);
        if bad {
            return DivStats {
                kd: KdStats {
                    bad,
                    ..Default::default()
                },
            };
        }
        let zs = sum_exp(self.student.s, base, j0, j1, ms, inv_t, es);
        DivStats {
            kd: KdStats {
                ms,
                zs,
                bad,
                ..Default::default()
            },
        }
    }

    fn combine(&self, r: usize, blocks: &[DivStats]) -> DivRow {
        if !self.rows.live(r) {
            return DivRow::default();
        }
        let inv_t = self.inv_t() as f64;
        let kd = if self.logits() {
            merge_kd(blocks.iter().map(|b| &b.kd), inv_t)
        } else {
            let mm = blocks.iter().map(|b| MaxSum {
                m: b.kd.ms,
                z: b.kd.zs,
                bad: b.kd.bad,
            });
            let m = merge_max_sum(mm, inv_t);
            KdRow {
                ms: m.m,
                lzs: m.lz,
                bad: m.bad,
                ..Default::default()
            }
        };
        DivRow {
            live: true,
            kd,
            ..Default::default()
        }
    }

    #[inline(always)]
    fn sums(
        &self,
        r: usize,
        j0: usize,
        j1: usize,
        row: &DivRow,
        b: &DivStats,
        keep: &[f32],
    ) -> DivSums {
        if !row.live || row.kd.bad {
            let v = if row.live { f32::NAN } else { 0.0 };
            let base = r * self.rows.cols;
            fill(self.student.g, base, j0, j1, v);
            fill(self.grad_teacher, base, j0, j1, v);
            return DivSums::default();
        }
        let blk = self.block_consts(row, b);
        let early = if self.early() { self.student.g } else { None };
        if self.logits() {
            self.block_sums::<true>(r, (j0, j1), &blk, keep, early)
        } else {
            self.block_sums::<false>(r, (j0, j1), &blk, keep, early)
        }
    }

    fn finish(&self, _r: usize, row: &mut DivRow, sums: &[DivSums]) -> (f64, bool) {
        if !row.live {
            return (0.0, false);
        }
        if row.kd.bad {
            return (f64::NAN, false);
        }
        let (x, y): (f64, f64) = (
            sums.iter().map(|s| s.x).sum(),
            sums.iter().map(|s| s.y).sum(),
        );
        let qm1 = if self.logits() {
            0.0
        } else {
            sums.iter().map(|s| s.q).sum::<f64>() - 1.0
        };
        row.q_minus_1 = qm1;
        row.d = match self.divergence {
            Divergence::ForwardKl => x + qm1,
            Divergence::ReverseKl => x - qm1,
            Divergence::Jsd { beta } => {
                let beta = beta as f64;
                row.kl_qm = x + (1.0 - beta) * qm1;
                row.kl_pm = y - beta * qm1;
                beta * x + (1.0 - beta) * y
            }
        };
        let t = self.temperature as f64;
        let third = self.grad_teacher.is_some() || (self.student.g.is_some() && !self.early());
        (t * t * row.d, third)
    }

    #[inline(always)]
    fn pass3(&self, r: usize, j0: usize, j1: usize, row: &DivRow, b: &DivStats, keep: &[f32]) {
        let blk = self.block_consts(row, b);
        if self.logits() {
            self.block_grads::<true>(r, (j0, j1), row, &blk, keep)
        } else {
            self.block_grads::<false>(r, (j0, j1), row, &blk, keep)
        }
    }
}
