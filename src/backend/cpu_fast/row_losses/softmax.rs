//! Temperature softmax / log-softmax and its backward (`docs/LOSSES.md` section 1).

use super::*;

pub struct SoftmaxRows {
    pub rows: usize,
    pub cols: usize,
    pub inv_t: f32,
    pub log: bool,
    pub x: In,
    pub y: Out,
}

#[derive(Clone, Copy, Default)]
pub struct MaxSum {
    pub(super) m: f32,
    pub(super) z: f64,
    pub(super) bad: bool,
}

#[derive(Clone, Copy, Default)]
pub struct RowMax {
    pub(super) m: f32,
    pub(super) lz: f64,
    pub(super) bad: bool,
}

/// The sum of `exp((x - m) inv_t)` over a block, the exponentials kept in `keep`.
#[inline(always)]
pub(super) fn sum_exp(
    x: In,
    base: usize,
    j0: usize,
    j1: usize,
    m: f32,
    inv_t: f32,
    keep: &mut [f32],
) -> f64 {
    let mut z = [0.0f32; LANES];
    for_steps!(j0, j1, |j, n| {
        // SAFETY: in bounds.
        let v = unsafe { x.load(base + j, n) };
        let mut e = [0.0f32; LANES];
        for l in 0..LANES {
            e[l] = vmath::exp_nonpos((v[l] - m) * inv_t);
        }
        keep[j - j0..j - j0 + n].copy_from_slice(&e[..n]);
        add(&mut z, &e, n);
    });
    total(&z)
}

/// Merges blocks' `(max, sum exp((x - max) / T))` in f64: the row's max and `log Z`.
pub(super) fn merge_max_sum(blocks: impl Iterator<Item = MaxSum> + Clone, inv_t: f64) -> RowMax {
    let m = blocks
        .clone()
        .fold(f32::NEG_INFINITY, |a, b| vmath::max(a, b.m));
    let (mut z, mut bad) = (0.0f64, false);
    for b in blocks {
        z += b.z * ((b.m as f64 - m as f64) * inv_t).exp();
        bad |= b.bad;
    }
    RowMax { m, lz: z.ln(), bad }
}

impl RowOp for SoftmaxRows {
    type Stats = MaxSum;
    type Row = RowMax;
    type Sums = ();
    const SCRATCH: usize = 1;

    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    #[inline(always)]
    fn stats(&self, r: usize, j0: usize, j1: usize, scratch: &mut [f32]) -> MaxSum {
        let base = r * self.cols;
        let (m, bad) = max_and_bad(self.x, base, j0, j1);
        if bad {
            return MaxSum { m, z: 0.0, bad };
        }
        let z = sum_exp(self.x, base, j0, j1, m, self.inv_t, scratch);
        MaxSum { m, z, bad }
    }

    fn combine(&self, _r: usize, blocks: &[MaxSum]) -> RowMax {
        merge_max_sum(blocks.iter().copied(), self.inv_t as f64)
    }

    #[inline(always)]
    fn sums(&self, r: usize, j0: usize, j1: usize, row: &RowMax, b: &MaxSum, keep: &[f32]) {
        let base = r * self.cols;
        if row.bad {
            return fill(Some(self.y), base, j0, j1, f32::NAN);
        }
        // log y_j = (x_j - m_b) / T + (m_b - m) / T - log Z.
        let off = (b.m as f64 - row.m as f64) * self.inv_t as f64 - row.lz;
        let (scale, shift) = (off.exp() as f32, (-off) as f32);
        let inv_t = self.inv_t;
        for_steps!(j0, j1, |j, n| {
            let mut y = [0.0f32; LANES];
            if self.log {
                // SAFETY: in bounds.
                let v = unsafe { self.x.load(base + j, n) };
                for l in 0..LANES {
                    y[l] = (v[l] - b.m) * inv_t - shift;
                }
            } else {
                let e = lanes(&keep[j - j0..j - j0 + n]);
                for l in 0..LANES {
                    y[l] = e[l] * scale;
                }
            }
            // SAFETY: this thread's block; in bounds.
            unsafe { self.y.store(base + j, &y, n) };
        });
    }

    fn finish(&self, _r: usize, _row: &mut RowMax, _sums: &[()]) -> (f64, bool) {
        (0.0, false)
    }

    fn pass3(&self, _: usize, _: usize, _: usize, _: &RowMax, _: &MaxSum, _: &[f32]) {}
}

/// The softmax backward: `dx = y (dy - sum dy y) / T`, or for log-softmax
/// `dx = (dy - e^y sum dy) / T`, elementwise in f64 (the difference can cancel).
pub struct SoftmaxBackwardRows {
    pub rows: usize,
    pub cols: usize,
    pub inv_t: f64,
    pub log: bool,
    pub y: In,
    pub dy: In,
    pub dx: Out,
}

impl RowOp for SoftmaxBackwardRows {
    type Stats = f64;
    type Row = f64;
    type Sums = ();
    const SCRATCH: usize = 0;

    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    #[inline(always)]
    fn stats(&self, r: usize, j0: usize, j1: usize, _: &mut [f32]) -> f64 {
        let base = r * self.cols;
        let mut acc = [0.0f64; LANES];
        for_steps!(j0, j1, |j, n| {
            // SAFETY: in bounds.
            let (y, d) = unsafe { (self.y.load(base + j, n), self.dy.load(base + j, n)) };
            for l in 0..LANES {
                acc[l] += vmath::select64(self.log, d[l] as f64, y[l] as f64 * d[l] as f64);
            }
        });
        acc.iter().sum()
    }

    fn combine(&self, _r: usize, blocks: &[f64]) -> f64 {
        blocks.iter().sum()
    }

    #[inline(always)]
    fn sums(&self, r: usize, j0: usize, j1: usize, dot: &f64, _: &f64, _: &[f32]) {
        let base = r * self.cols;
        let (dot, inv_t) = (*dot, self.inv_t);
        for_steps!(j0, j1, |j, n| {
            // SAFETY: in bounds.
            let (y, d) = unsafe { (self.y.load(base + j, n), self.dy.load(base + j, n)) };
            let mut dx = [0.0f32; LANES];
            for l in 0..LANES {
                let (yv, dv) = (y[l] as f64, d[l] as f64);
                let log = ((dv - vmath::exp_f64(yv) * dot) * inv_t) as f32;
                dx[l] = select(self.log, log, (yv * (dv - dot) * inv_t) as f32);
            }
            // SAFETY: this thread's block; in bounds.
            unsafe { self.dx.store(base + j, &dx, n) };
        });
    }

    fn finish(&self, _r: usize, _row: &mut f64, _sums: &[()]) -> (f64, bool) {
        (0.0, false)
    }

    fn pass3(&self, _: usize, _: usize, _: usize, _: &f64, _: &f64, _: &[f32]) {}
}
