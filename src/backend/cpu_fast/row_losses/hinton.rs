//! The fused Hinton loss (`docs/LOSSES.md` section 4).

use super::cross_entropy::{ce_stats, merge_ce, CeRow, CeStats, Smoothing, Student};
use super::soft_targets::*;
use super::*;

pub struct HintonRows<'a> {
    pub rows: Rows<'a>,
    pub student: Student,
    pub teacher: In,
    pub grad_teacher: Option<Out>,
    pub temperature: f32,
    pub alpha: f32,
    pub label_smoothing: f32,
    /// `grad_scale` times the reduction's factor.
    pub k: f32,
}

#[derive(Clone, Copy, Default)]
pub struct HintonStats {
    pub(super) ce: CeStats,
    pub(super) kd: KdStats,
}

#[derive(Clone, Copy, Default)]
pub struct HintonRow {
    pub(super) ce: CeRow,
    pub(super) kd: KdRow,
    pub(super) kl: f64,
}

impl HintonRows<'_> {
    pub(super) fn inv_t(&self) -> f32 {
        1.0 / self.temperature
    }

    /// The gradients of one block of a live, finite row: the student's always, the teacher's
    /// (which needs `KL_r`) when `with_teacher`. Returns the block's KL sum.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)] // the pass's inputs and its two switches
    pub(super) fn block(
        &self,
        r: usize,
        (j0, j1): (usize, usize),
        row: &HintonRow,
        b: &HintonStats,
        keep: &[f32],
        write_student: bool,
        with_teacher: bool,
    ) -> f64 {
        let c = self.rows.cols;
        let (base, len) = (r * c, j1 - j0);
        let (es1, rest) = keep.split_at(len);
        let (es, et) = rest.split_at(len);
        let inv_t = self.inv_t();
        let kb = kd_block(&row.kd, &b.kd, inv_t as f64);
        let p1 = ((b.ce.m as f64 - row.ce.m as f64) - row.ce.lz).exp() as f32;
        let sm = Smoothing {
            eps: self.label_smoothing,
            cols: c,
        };
        let y = self.rows.label(r);
        let (k, alpha, temp) = (self.k, self.alpha, self.temperature);
        let eps_c = self.label_smoothing / c as f32;
        let kt = k * (1.0 - alpha) * temp;
        let mut kl = [0.0f32; LANES];
        for_steps!(j0, j1, |j, n| {
            let i = j - j0;
            // SAFETY: in bounds; in place, the student's elements are read before this step's
            // gradient overwrites them, and no later pass reads them (pass 3 writes the student
            // gradient itself when it runs).
            let (sv, tv) = unsafe {
                (
                    self.student.s.load(base + j, n),
                    self.teacher.load(base + j, n),
                )
            };
            let (p, q, u) = kd_elems(&sv, &tv, &es[i..i + n], &et[i..i + n], &kb, inv_t);
            let (mut term, mut gap) = ([0.0f32; LANES], [0.0f32; LANES]);
            for l in 0..LANES {
                (term[l], gap[l]) = kl_and_gap(q[l], p[l], u[l]);
            }
            add(&mut kl, &term, n);
            if write_student {
                if let Some(g) = self.student.g {
                    let mut out = [0.0f32; LANES];
                    let e1 = lanes(&es1[i..i + n]);
                    for l in 0..LANES {
                        out[l] = k * alpha * (e1[l] * p1 - eps_c) + kt * gap[l];
                    }
                    if (j..j + n).contains(&y) {
                        let at = sm.at_label(row.ce.z, row.ce.z_rest);
                        out[y - j] = k * alpha * at + kt * gap[y - j];
                    }
                    // SAFETY: this thread's block; in bounds.
                    unsafe { g.store(base + j, &out, n) };
                }
            }
            if with_teacher {
                if let Some(gt) = self.grad_teacher {
                    let u_kl = u_minus(&sv, &tv, &kb, inv_t as f64, -row.kl);
                    let mut out = [0.0f32; LANES];
                    for l in 0..LANES {
                        out[l] = select(q[l] == 0.0, 0.0, -kt * q[l] * u_kl[l]);
                    }
                    // SAFETY: as above.
                    unsafe { gt.store(base + j, &out, n) };
                }
            }
        });
        total(&kl)
    }
}

impl RowOp for HintonRows<'_> {
    type Stats = HintonStats;
    type Row = HintonRow;
    type Sums = f64;
    // e^(s - m) at T = 1, e^xs and e^xt at T.
    const SCRATCH: usize = 3;

    fn shape(&self) -> (usize, usize) {
        (self.rows.rows, self.rows.cols)
    }

    #[inline(always)]
    fn stats(&self, r: usize, j0: usize, j1: usize, keep: &mut [f32]) -> HintonStats {
        if !self.rows.live(r) {
            return HintonStats::default();
        }
        let base = r * self.rows.cols;
        let len = j1 - j0;
        let (es1, rest) = keep.split_at_mut(len);
        let (es, et) = rest.split_at_mut(len);
        let ce = ce_stats(self.student.s, base, j0, j1, self.rows.label(r), es1);
        if ce.bad {
            return HintonStats {
                ce,
                kd: KdStats::default(),
            };
        }
        let st = (self.student.s, self.teacher);
        let kd = kd_stats(st, (base, j0, j1), self.inv_t(), es, et, Some(ce.m));
        HintonStats { ce, kd }
    }

    fn combine(&self, r: usize, blocks: &[HintonStats]) -> HintonRow {
        if !self.rows.live(r) {
            return HintonRow::default();
        }
        let (m, z, z_rest, sum_s, sy, bad_s) = merge_ce(blocks.iter().map(|b| &b.ce));
        let kd = merge_kd(blocks.iter().map(|b| &b.kd), 1.0 / self.temperature as f64);
        HintonRow {
            ce: CeRow {
                live: true,
                bad: bad_s || kd.bad,
                m,
                lz: z.ln(),
                z,
                z_rest,
                sy,
                sum_s,
            },
            kd,
            kl: 0.0,
        }
    }

    #[inline(always)]
    fn sums(
        &self,
        r: usize,
        j0: usize,
        j1: usize,
        row: &HintonRow,
        b: &HintonStats,
        keep: &[f32],
    ) -> f64 {
        let want_gt = self.grad_teacher.is_some();
        if !row.ce.live || row.ce.bad {
            if !want_gt {
                let v = if row.ce.live { f32::NAN } else { 0.0 };
                fill(self.student.g, r * self.rows.cols, j0, j1, v);
            }
            return 0.0;
        }
        self.block(r, (j0, j1), row, b, keep, !want_gt, false)
    }

    fn finish(&self, _r: usize, row: &mut HintonRow, sums: &[f64]) -> (f64, bool) {
        let want_gt = self.grad_teacher.is_some();
        if !row.ce.live {
            return (0.0, want_gt);
        }
        if row.ce.bad {
            return (f64::NAN, want_gt);
        }
        row.kl = sums.iter().sum();
        let sm = Smoothing {
            eps: self.label_smoothing,
            cols: self.rows.cols,
        };
        let ce = sm.loss(row.ce.lz, row.ce.m, row.ce.sy, row.ce.sum_s);
        let (alpha, t) = (self.alpha as f64, self.temperature as f64);
        (alpha * ce + (1.0 - alpha) * t * t * row.kl, want_gt)
    }

    #[inline(always)]
    fn pass3(
        &self,
        r: usize,
        j0: usize,
        j1: usize,
        row: &HintonRow,
        b: &HintonStats,
        keep: &[f32],
    ) {
        if !row.ce.live || row.ce.bad {
            let v = if row.ce.live { f32::NAN } else { 0.0 };
            let base = r * self.rows.cols;
            fill(self.student.g, base, j0, j1, v);
            fill(self.grad_teacher, base, j0, j1, v);
            return;
        }
        self.block(r, (j0, j1), row, b, keep, true, true);
    }
}
