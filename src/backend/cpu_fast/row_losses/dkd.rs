//! Decoupled knowledge distillation (`docs/LOSSES.md` section 8): `w_ce CE + T^2 (w_tc TCKD +
//! w_nc NCKD)` in the passes of `hinton.rs`.
//!
//! Pass 1 per block: the student's T = 1 statistics over every class (cross-entropy,
//! `cross_entropy.rs`) and the soft-target statistics of the non-target classes only (their own
//! maxima, `Zs`, `Zt` and `dz = Zs - Zt`, as `soft_targets.rs` takes them over a whole row), plus
//! `t_g`. The row's merge gives, in f64, the binary distributions' log-odds `D = log Z_rest - x_g`
//! and their difference `e = D_s - D_t = log(Zs_rest / Zt_rest) - (x^s_g - x^t_g)`, from which
//! [`binary_kl`] takes TCKD and `p_g - q_g` without cancellation. Pass 2 sums NCKD as
//! `sum q^ phi(u)` over the non-target classes (forward KL's terms, `kl_and_gap`) and writes
//! every gradient (none needs the row's loss): two passes.

use super::cross_entropy::{ce_stats, merge_ce, CeRow, CeStats, Smoothing, Student};
use super::soft_targets::*;
use super::*;

pub struct DkdRows<'a> {
    pub rows: Rows<'a>,
    pub student: Student,
    pub teacher: In,
    pub temperature: f32,
    pub ce_weight: f32,
    pub tckd_weight: f32,
    pub nckd_weight: f32,
    pub label_smoothing: f32,
    /// `grad_scale` times the reduction's factor.
    pub k: f32,
}

#[derive(Clone, Copy, Default)]
pub struct DkdStats {
    ce: CeStats,
    /// Over the block's non-target classes.
    rest: KdStats,
    /// `t_g` where the label falls in this block.
    tg: Option<f32>,
}

#[derive(Clone, Copy, Default)]
pub struct DkdRow {
    ce: CeRow,
    rest: KdRow,
    tckd: f64,
    /// `k T w_tc (p_g - q_g)`: the TCKD part of the gradient at `g`, and, times `p^_j`, at `j`.
    tc: f32,
}

/// `phi(u) = e^u - 1 - u` times `q`, forward KL's term (its limit `p` where `q` is 0), and
/// `p - q`, in f64: the forms of [`kl_and_gap`].
fn term_and_gap(q: f64, p: f64, u: f64) -> (f64, f64) {
    if q == 0.0 {
        return (p, p);
    }
    if u.abs() < 0.5 {
        let em1 = u.exp_m1();
        (q * (em1 - u), q * em1)
    } else {
        ((p - q) - q * u, p - q)
    }
}

/// `log(1 + e^x)` in f64.
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// TCKD and `p_g - q_g` from the log-odds `d_t = log(Z_rest / e^(x_g))` (`d_s` likewise) and
/// `e = D_s - D_t` taken without cancellation: `q_g = sigmoid(-d_t)`, `1 - q_g = sigmoid(d_t)`
/// (the student's likewise), and `u_g = log p_g - log q_g = -log1p((1 - q_g) expm1(e))`,
/// `u_r = log(1 - p_g) - log(1 - q_g) = -log1p(q_g expm1(-e))` where `|e| < 1/2` (the softplus
/// differences beyond), so that `TCKD = q_g phi(u_g) + (1 - q_g) phi(u_r)` is a sum of two
/// non-negative terms, second order in `e` at high T.
pub(crate) fn binary_kl(d_t: f64, d_s: f64, e: f64) -> (f64, f64) {
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let (qg, qr, pg, pr) = (sig(-d_t), sig(d_t), sig(-d_s), sig(d_s));
    let (ug, ur) = if e.abs() < 0.5 {
        (-(qr * e.exp_m1()).ln_1p(), -(qg * (-e).exp_m1()).ln_1p())
    } else {
        (
            softplus(d_t) - softplus(d_s),
            softplus(-d_t) - softplus(-d_s),
        )
    };
    let (tg, gap) = term_and_gap(qg, pg, ug);
    let (tr, gap_r) = term_and_gap(qr, pr, ur);
    // p_g - q_g = -(p_r - q_r): the side with the smaller probabilities has the digits.
    let gap = if qg <= qr { gap } else { -gap_r };
    (tg + tr, gap)
}

impl DkdRows<'_> {
    fn inv_t(&self) -> f32 {
        1.0 / self.temperature
    }

    /// Pass 1 over the non-target classes of a block: maxima (the label's lane left out), then
    /// `e^xs`, `e^xt` (0 at the label, kept) and their sums and `dz`. `bad` also covers `t_g`.
    #[inline(always)]
    fn rest_stats(
        &self,
        (base, j0, j1): (usize, usize, usize),
        y: usize,
        keep_s: &mut [f32],
        keep_t: &mut [f32],
    ) -> KdStats {
        let (s, t, inv_t) = (self.student.s, self.teacher, self.inv_t());
        let inv_t64 = 1.0 / self.temperature as f64;
        let mut ms = [f32::NEG_INFINITY; LANES];
        let mut mt = [f32::NEG_INFINITY; LANES];
        let mut bad = [0.0f32; LANES];
        for_steps!(j0, j1, |j, n| {
            // SAFETY: in bounds.
            let (sv, tv) = unsafe { (s.load(base + j, n), t.load(base + j, n)) };
            for l in 0..LANES {
                let on = l < n && j + l != y;
                ms[l] = select(on, vmath::max(ms[l], sv[l]), ms[l]);
                mt[l] = select(on, vmath::max(mt[l], tv[l]), mt[l]);
                bad[l] += select(l < n, tv[l] * 0.0, 0.0);
            }
        });
        let fold = |m: &Lanes| m.iter().fold(f32::NEG_INFINITY, |a, &b| vmath::max(a, b));
        let (ms, mt) = (fold(&ms), fold(&mt));
        if bad.iter().any(|b| b.is_nan()) {
            return KdStats {
                bad: true,
                ..Default::default()
            };
        }
        let (mut zs, mut zt, mut dz) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
        for_steps!(j0, j1, |j, n| {
            // SAFETY: in bounds.
            let (sv, tv) = unsafe { (s.load(base + j, n), t.load(base + j, n)) };
            let (mut es, mut et, mut gap) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
            for l in 0..LANES {
                let on = l < n && j + l != y;
                let xs = select(on, (sv[l] - ms) * inv_t, f32::NEG_INFINITY);
                let xt = select(on, (tv[l] - mt) * inv_t, f32::NEG_INFINITY);
                es[l] = vmath::exp_nonpos(xs);
                et[l] = vmath::exp_nonpos(xt);
                // xs - xt from f64 differences of the logits (exact): the f32 difference of xs
                // and xt would carry their rounding, first order where the teacher is close to
                // the student.
                let d = ((sv[l] as f64 - ms as f64) - (tv[l] as f64 - mt as f64)) * inv_t64;
                gap[l] = select(on, exp_gap(d as f32, es[l], et[l]), 0.0);
            }
            keep_s[j - j0..j - j0 + n].copy_from_slice(&es[..n]);
            keep_t[j - j0..j - j0 + n].copy_from_slice(&et[..n]);
            add(&mut zs, &es, n);
            add(&mut zt, &et, n);
            add(&mut dz, &gap, n);
        });
        KdStats {
            ms,
            mt,
            zs: total(&zs),
            zt: total(&zt),
            dz: total(&dz),
            bad: false,
        }
    }

    /// Pass 2 of a block of a live, finite row: the gradients; returns the block's NCKD sum.
    #[inline(always)]
    fn block(
        &self,
        r: usize,
        (j0, j1): (usize, usize),
        row: &DkdRow,
        b: &DkdStats,
        keep: &[f32],
    ) -> f64 {
        let c = self.rows.cols;
        let (base, len) = (r * c, j1 - j0);
        let (es1, rest) = keep.split_at(len);
        let (es, et) = rest.split_at(len);
        let inv_t = self.inv_t();
        let kb = kd_block(&row.rest, &b.rest, inv_t as f64);
        let p1 = ((b.ce.m as f64 - row.ce.m as f64) - row.ce.lz).exp() as f32;
        let sm = Smoothing {
            eps: self.label_smoothing,
            cols: c,
        };
        let y = self.rows.label(r);
        let k = self.k;
        let (kce, eps_c) = (k * self.ce_weight, self.label_smoothing / c as f32);
        let knc = k * self.temperature * self.nckd_weight;
        let tc = row.tc;
        let mut nckd = [0.0f32; LANES];
        for_steps!(j0, j1, |j, n| {
            let i = j - j0;
            // SAFETY: in bounds; in place, the student's elements are read before this step's
            // gradient overwrites them, and no later pass reads them.
            let (sv, tv) = unsafe {
                (
                    self.student.s.load(base + j, n),
                    self.teacher.load(base + j, n),
                )
            };
            // p^, q^ (0 at the label, whose e^x are 0) and u = log p^ - log q^ from f64 logit
            // differences (as `dz` in pass 1).
            let (p, q, _) = kd_elems(&sv, &tv, &es[i..i + n], &et[i..i + n], &kb, inv_t);
            let u = u_minus(&sv, &tv, &kb, inv_t as f64, 0.0);
            let (mut term, mut gap) = ([0.0f32; LANES], [0.0f32; LANES]);
            for l in 0..LANES {
                (term[l], gap[l]) = kl_and_gap(q[l], p[l], u[l]);
            }
            add(&mut nckd, &term, n);
            if let Some(g) = self.student.g {
                let e1 = lanes(&es1[i..i + n]);
                let mut out = [0.0f32; LANES];
                for l in 0..LANES {
                    out[l] = kce * (e1[l] * p1 - eps_c) + (knc * gap[l] - tc * p[l]);
                }
                if (j..j + n).contains(&y) {
                    out[y - j] = kce * sm.at_label(row.ce.z, row.ce.z_rest) + tc;
                }
                // SAFETY: this thread's block; in bounds.
                unsafe { g.store(base + j, &out, n) };
            }
        });
        total(&nckd)
    }
}

impl RowOp for DkdRows<'_> {
    type Stats = DkdStats;
    type Row = DkdRow;
    type Sums = f64;
    // e^(s - m) at T = 1 over every class, e^xs and e^xt at T over the non-target ones.
    const SCRATCH: usize = 3;

    fn shape(&self) -> (usize, usize) {
        (self.rows.rows, self.rows.cols)
    }

    #[inline(always)]
    fn stats(&self, r: usize, j0: usize, j1: usize, keep: &mut [f32]) -> DkdStats {
        if !self.rows.live(r) {
            return DkdStats::default();
        }
        let base = r * self.rows.cols;
        let len = j1 - j0;
        let (es1, rest) = keep.split_at_mut(len);
        let (es, et) = rest.split_at_mut(len);
        let y = self.rows.label(r);
        let ce = ce_stats(self.student.s, base, j0, j1, y, es1);
        if ce.bad {
            return DkdStats {
                ce,
                ..Default::default()
            };
        }
        let rest = self.rest_stats((base, j0, j1), y, es, et);
        // SAFETY: in bounds (y < cols).
        let tg = (j0..j1)
            .contains(&y)
            .then(|| unsafe { self.teacher.at(base + y) });
        DkdStats { ce, rest, tg }
    }

    fn combine(&self, r: usize, blocks: &[DkdStats]) -> DkdRow {
        if !self.rows.live(r) {
            return DkdRow::default();
        }
        let inv_t = 1.0 / self.temperature as f64;
        let (m, z, z_rest, sum_s, sy, bad_s) = merge_ce(blocks.iter().map(|b| &b.ce));
        let rest = merge_kd(blocks.iter().map(|b| &b.rest), inv_t);
        let tg = blocks.iter().find_map(|b| b.tg).unwrap_or(0.0);
        let bad = bad_s || rest.bad;
        let (mut tckd, mut tc) = (0.0, 0.0);
        if !bad {
            // The target's logit over the rest's max, x_g = (z_g - m_rest) / T, the two
            // differences exact in f64; D = log Z_rest - x_g; e = D_s - D_t without cancellation.
            let (ds, dt) = (sy as f64 - rest.ms as f64, tg as f64 - rest.mt as f64);
            let (d_t, d_s) = (rest.lzt - dt * inv_t, rest.lzs - ds * inv_t);
            let e = rest.dlz - (ds - dt) * inv_t;
            let (kl, gap) = binary_kl(d_t, d_s, e);
            tckd = kl;
            tc = (self.k as f64 * self.temperature as f64 * self.tckd_weight as f64 * gap) as f32;
        }
        DkdRow {
            ce: CeRow {
                live: true,
                bad,
                m,
                lz: z.ln(),
                z,
                z_rest,
                sy,
                sum_s,
            },
            rest,
            tckd,
            tc,
        }
    }

    #[inline(always)]
    fn sums(
        &self,
        r: usize,
        j0: usize,
        j1: usize,
        row: &DkdRow,
        b: &DkdStats,
        keep: &[f32],
    ) -> f64 {
        if !row.ce.live || row.ce.bad {
            let v = if row.ce.live { f32::NAN } else { 0.0 };
            fill(self.student.g, r * self.rows.cols, j0, j1, v);
            return 0.0;
        }
        self.block(r, (j0, j1), row, b, keep)
    }

    fn finish(&self, _r: usize, row: &mut DkdRow, sums: &[f64]) -> (f64, bool) {
        if !row.ce.live {
            return (0.0, false);
        }
        if row.ce.bad {
            return (f64::NAN, false);
        }
        let nckd: f64 = sums.iter().sum();
        let sm = Smoothing {
            eps: self.label_smoothing,
            cols: self.rows.cols,
        };
        let ce = sm.loss(row.ce.lz, row.ce.m, row.ce.sy, row.ce.sum_s);
        let t = self.temperature as f64;
        let kd = self.tckd_weight as f64 * row.tckd + self.nckd_weight as f64 * nckd;
        (self.ce_weight as f64 * ce + t * t * kd, false)
    }

    fn pass3(&self, _: usize, _: usize, _: usize, _: &DkdRow, _: &DkdStats, _: &[f32]) {}
}
