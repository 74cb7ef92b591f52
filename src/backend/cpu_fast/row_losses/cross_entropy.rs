//! Cross-entropy with label smoothing (`docs/LOSSES.md` section 3), and the student's T = 1
//! statistics that Hinton shares.

use super::*;

/// The student logits and where the student gradient goes (`g == s` for the in-place gradient).
#[derive(Clone, Copy)]
pub struct Student {
    pub s: In,
    pub g: Option<Out>,
}

/// Cross-entropy's smoothing weights.
#[derive(Clone, Copy)]
pub(super) struct Smoothing {
    pub(super) eps: f32,
    pub(super) cols: usize,
}

impl Smoothing {
    /// `CE_r = (1 - eps)(log Z + m - s_y) + eps (log Z + m - mean s)` with `Z` at T = 1.
    pub(super) fn loss(&self, lz: f64, m: f32, sy: f32, sum_s: f64) -> f64 {
        let eps = self.eps as f64;
        (1.0 - eps) * (lz + (m as f64 - sy as f64))
            + eps * (lz + (m as f64 - sum_s / self.cols as f64))
    }

    /// `p_y - target_y` from `p_y - 1 = -(Z - e_y) / Z`.
    pub(super) fn at_label(&self, z: f64, z_rest: f64) -> f32 {
        let eps = self.eps as f64;
        (-(z_rest / z) + eps * (1.0 - 1.0 / self.cols as f64)) as f32
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy (section 3)

pub struct CrossEntropyRows<'a> {
    pub rows: Rows<'a>,
    pub student: Student,
    pub label_smoothing: f32,
    /// `grad_scale` times the reduction's factor.
    pub k: f32,
}

#[derive(Clone, Copy, Default)]
pub struct CeStats {
    pub(super) m: f32,
    pub(super) z: f64,
    pub(super) sum_s: f64,
    /// `s_y` and `e^(s_y - m)` when the label falls in this block.
    pub(super) sy: Option<(f32, f32)>,
    pub(super) bad: bool,
}

#[derive(Clone, Copy, Default)]
pub struct CeRow {
    pub(super) live: bool,
    pub(super) bad: bool,
    pub(super) m: f32,
    pub(super) lz: f64,
    pub(super) z: f64,
    /// `Z - e_y` (rescaled to the row's max).
    pub(super) z_rest: f64,
    pub(super) sy: f32,
    pub(super) sum_s: f64,
}

/// The student's pass 1 at T = 1: max, `sum e^(s - m)` (kept), `sum s`, the label's values.
#[inline(always)]
pub(super) fn ce_stats(
    s: In,
    base: usize,
    j0: usize,
    j1: usize,
    y: usize,
    keep: &mut [f32],
) -> CeStats {
    let (m, bad) = max_and_bad(s, base, j0, j1);
    if bad {
        return CeStats {
            bad,
            ..Default::default()
        };
    }
    let mut z = [0.0f32; LANES];
    let mut sum = [0.0f32; LANES];
    for_steps!(j0, j1, |j, n| {
        // SAFETY: in bounds.
        let v = unsafe { s.load(base + j, n) };
        let mut e = [0.0f32; LANES];
        for l in 0..LANES {
            e[l] = vmath::exp_nonpos(v[l] - m);
        }
        keep[j - j0..j - j0 + n].copy_from_slice(&e[..n]);
        add(&mut z, &e, n);
        add(&mut sum, &v, n);
    });
    let sy = (j0..j1).contains(&y).then(|| {
        // SAFETY: in bounds (y < cols).
        (unsafe { s.at(base + y) }, keep[y - j0])
    });
    CeStats {
        m,
        z: total(&z),
        sum_s: total(&sum),
        sy,
        bad,
    }
}

/// Merges the student's blocks at T = 1: `(m, Z, Z - e_y, sum s, s_y, bad)`.
pub(super) fn merge_ce<'a>(
    blocks: impl Iterator<Item = &'a CeStats> + Clone,
) -> (f32, f64, f64, f64, f32, bool) {
    let m = blocks
        .clone()
        .fold(f32::NEG_INFINITY, |a, b| vmath::max(a, b.m));
    let (mut z, mut ey, mut sum, mut sy, mut bad) = (0.0, 0.0, 0.0, 0.0, false);
    for b in blocks {
        bad |= b.bad;
        let r = (b.m as f64 - m as f64).exp();
        z += b.z * r;
        sum += b.sum_s;
        if let Some((v, e)) = b.sy {
            sy = v;
            ey = e as f64 * r;
        }
    }
    (m, z, z - ey, sum, sy, bad)
}

impl RowOp for CrossEntropyRows<'_> {
    type Stats = CeStats;
    type Row = CeRow;
    type Sums = ();
    const SCRATCH: usize = 1;

    fn shape(&self) -> (usize, usize) {
        (self.rows.rows, self.rows.cols)
    }

    #[inline(always)]
    fn stats(&self, r: usize, j0: usize, j1: usize, keep: &mut [f32]) -> CeStats {
        if !self.rows.live(r) {
            return CeStats::default();
        }
        let base = r * self.rows.cols;
        ce_stats(self.student.s, base, j0, j1, self.rows.label(r), keep)
    }

    fn combine(&self, r: usize, blocks: &[CeStats]) -> CeRow {
        if !self.rows.live(r) {
            return CeRow::default();
        }
        let (m, z, z_rest, sum_s, sy, bad) = merge_ce(blocks.iter());
        CeRow {
            live: true,
            bad,
            m,
            lz: z.ln(),
            z,
            z_rest,
            sy,
            sum_s,
        }
    }

    #[inline(always)]
    fn sums(&self, r: usize, j0: usize, j1: usize, row: &CeRow, b: &CeStats, keep: &[f32]) {
        let c = self.rows.cols;
        let base = r * c;
        let Some(g) = self.student.g else { return };
        if !row.live || row.bad {
            let v = if row.live { f32::NAN } else { 0.0 };
            return fill(Some(g), base, j0, j1, v);
        }
        let sm = Smoothing {
            eps: self.label_smoothing,
            cols: c,
        };
        let scale = ((b.m as f64 - row.m as f64) - row.lz).exp() as f32;
        let (k, eps_c) = (self.k, self.label_smoothing / c as f32);
        let y = self.rows.label(r);
        for_steps!(j0, j1, |j, n| {
            let e = lanes(&keep[j - j0..j - j0 + n]);
            let mut out = [0.0f32; LANES];
            for l in 0..LANES {
                out[l] = k * (e[l] * scale - eps_c);
            }
            if (j..j + n).contains(&y) {
                out[y - j] = k * sm.at_label(row.z, row.z_rest);
            }
            // SAFETY: this thread's block; in bounds. In place, these elements were last read
            // in pass 1.
            unsafe { g.store(base + j, &out, n) };
        });
    }

    fn finish(&self, _r: usize, row: &mut CeRow, _: &[()]) -> (f64, bool) {
        let loss = if !row.live {
            0.0
        } else if row.bad {
            f64::NAN
        } else {
            let sm = Smoothing {
                eps: self.label_smoothing,
                cols: self.rows.cols,
            };
            sm.loss(row.lz, row.m, row.sy, row.sum_s)
        };
        (loss, false)
    }

    fn pass3(&self, _: usize, _: usize, _: usize, _: &CeRow, _: &CeStats, _: &[f32]) {}
}
