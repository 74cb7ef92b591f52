//! The fast CPU backend's row losses in f32 (`docs/LOSSES.md` sections 1-4): temperature softmax
//! and its backward, cross-entropy, the fused Hinton loss and the three divergences, each a
//! [`RowOp`] for the driver in `rows.rs`. The math is the GPU kernels' (`shaders/divergence.wgsl`
//! explains the high-temperature forms): per block of a row, pass 1 takes the maxima and the
//! sums of exponentials, pass 2 the loss sums and the gradients.
//!
//! Precision: every element is computed in f32 with `vmath`'s functions, every sum is
//! accumulated in f32 lanes over a block (64 terms a lane) and in f64 across lanes and
//! blocks, and the per-row and per-block constants (`log Z`, `log(Zs / Zt)`
//! from `dz = Zs - Zt` summed through `expm1`, the block offsets) are f64. Where a difference
//! of two f32 values near `log C` would lose the digits that matter (`log p - log q` for a
//! teacher given as probabilities or log-probabilities at high T), it is formed in f64
//! (`vmath::ln_f64`). The gradient at the label, `p_y - 1`, is `-(Z - e_y) / Z` from the f64
//! sums. Tests: the backend suite (`tests/kernels.rs`, `tests/contract.rs`) at 1e-4 of the f64
//! reference over T in [1e-3, 1e4], logits to |1e4|, masked rows.

use super::rows::{In, Out, RowOp};
use super::vmath::{self, select, LANES};
use crate::ops::{Divergence, TeacherInput};

type Lanes = [f32; LANES];
/// Per-lane partial sums within a block (f32: 64 terms a lane at most; the blocks' sums meet in
/// f64). f64 lanes would double the registers a step holds, and AVX2 has 16.
type Acc = [f32; LANES];

/// Runs `body` for each step of `LANES` columns over `j0..j1`, with `j` the step's first column
/// and `n` its width: `LANES` (a constant, so loads and stores are whole vectors) except in one
/// last step. A macro rather than a function taking a closure: the body must be inlined into the
/// caller, which `rows.rs` compiles for the chosen instruction set.
macro_rules! for_steps {
    ($j0:expr, $j1:expr, |$j:ident, $n:ident| $body:expr) => {{
        let (start, end) = ($j0, $j1);
        let full = start + (end - start) / LANES * LANES;
        let mut $j = start;
        while $j < full {
            let $n = LANES;
            $body;
            $j += LANES;
        }
        if $j < end {
            let $n = end - $j;
            $body;
        }
    }};
}

/// Adds the first `n` lanes of `v` to `acc`.
#[inline(always)]
fn add(acc: &mut Acc, v: &Lanes, n: usize) {
    for l in 0..LANES {
        acc[l] += select(l < n, v[l], 0.0);
    }
}

/// The first `x.len() <= LANES` values in a full vector (zeros after them).
#[inline(always)]
fn lanes(x: &[f32]) -> Lanes {
    let mut v = [0.0f32; LANES];
    v[..x.len()].copy_from_slice(x);
    v
}

/// The lanes summed in a fixed order.
#[inline(always)]
fn total(acc: &Acc) -> f64 {
    acc.iter().map(|&v| v as f64).sum()
}

/// The rows a loss covers and which of them are masked.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub rows: usize,
    pub cols: usize,
    /// Rows whose label is `ignore_index` are masked (all rows live when `None`).
    pub labels: Option<&'a [i32]>,
    pub ignore_index: i32,
}

impl Rows<'_> {
    #[inline(always)]
    fn live(&self, r: usize) -> bool {
        self.labels.is_none_or(|l| l[r] != self.ignore_index)
    }

    /// The label of a live row (cross-entropy and Hinton, whose labels are checked).
    #[inline(always)]
    fn label(&self, r: usize) -> usize {
        self.labels.map_or(0, |l| l[r] as usize)
    }
}

/// Writes `value` to columns `j0..j1` of row `r` of `out` (masked rows 0, bad rows NaN).
#[inline(always)]
fn fill(out: Option<Out>, base: usize, j0: usize, j1: usize, value: f32) {
    if let Some(o) = out {
        let v = [value; LANES];
        // SAFETY: the driver gives this block of this row to this thread alone; in bounds.
        for_steps!(j0, j1, |j, n| unsafe { o.store(base + j, &v, n) });
    }
}

/// The maximum of `x` over `j0..j1` and whether any element is not finite.
#[inline(always)]
fn max_and_bad(x: In, base: usize, j0: usize, j1: usize) -> (f32, bool) {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut bad = [0.0f32; LANES];
    for_steps!(j0, j1, |j, n| {
        // SAFETY: in bounds of the [rows, cols] input.
        let v = unsafe { x.load(base + j, n) };
        for l in 0..LANES {
            m[l] = select(l < n, vmath::max(m[l], v[l]), m[l]);
            // inf * 0 and NaN * 0 are NaN: bad stays NaN from then on.
            bad[l] += select(l < n, v[l] * 0.0, 0.0);
        }
    });
    (
        m.iter().fold(f32::NEG_INFINITY, |a, &b| vmath::max(a, b)),
        bad.iter().any(|b| b.is_nan()),
    )
}

// ---------------------------------------------------------------------------------------------
// Temperature softmax / log-softmax (section 1)

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
    m: f32,
    z: f64,
    bad: bool,
}

#[derive(Clone, Copy, Default)]
pub struct RowMax {
    m: f32,
    lz: f64,
    bad: bool,
}

/// The sum of `exp((x - m) inv_t)` over a block, the exponentials kept in `keep`.
#[inline(always)]
fn sum_exp(x: In, base: usize, j0: usize, j1: usize, m: f32, inv_t: f32, keep: &mut [f32]) -> f64 {
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
fn merge_max_sum(blocks: &[MaxSum], inv_t: f64) -> RowMax {
    let m = blocks
        .iter()
        .fold(f32::NEG_INFINITY, |a, b| vmath::max(a, b.m));
    let z: f64 = blocks
        .iter()
        .map(|b| b.z * ((b.m as f64 - m as f64) * inv_t).exp())
        .sum();
    RowMax {
        m,
        lz: z.ln(),
        bad: blocks.iter().any(|b| b.bad),
    }
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
        merge_max_sum(blocks, self.inv_t as f64)
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

// ---------------------------------------------------------------------------------------------
// The student's side shared by cross-entropy and Hinton: statistics at T = 1 and the label.

/// The student logits and where the student gradient goes (`g == s` for the in-place gradient).
#[derive(Clone, Copy)]
pub struct Student {
    pub s: In,
    pub g: Option<Out>,
}

/// Cross-entropy's smoothing weights.
#[derive(Clone, Copy)]
struct Smoothing {
    eps: f32,
    cols: usize,
}

impl Smoothing {
    /// `CE_r = (1 - eps)(log Z + m - s_y) + eps (log Z + m - mean s)` with `Z` at T = 1.
    fn loss(&self, lz: f64, m: f32, sy: f32, sum_s: f64) -> f64 {
        let eps = self.eps as f64;
        (1.0 - eps) * (lz + (m as f64 - sy as f64))
            + eps * (lz + (m as f64 - sum_s / self.cols as f64))
    }

    /// `p_y - target_y` from `p_y - 1 = -(Z - e_y) / Z`.
    fn at_label(&self, z: f64, z_rest: f64) -> f32 {
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
    m: f32,
    z: f64,
    sum_s: f64,
    /// `s_y` and `e^(s_y - m)` when the label falls in this block.
    sy: Option<(f32, f32)>,
    bad: bool,
}

#[derive(Clone, Copy, Default)]
pub struct CeRow {
    live: bool,
    bad: bool,
    m: f32,
    lz: f64,
    z: f64,
    /// `Z - e_y` (rescaled to the row's max).
    z_rest: f64,
    sy: f32,
    sum_s: f64,
}

/// The student's pass 1 at T = 1: max, `sum e^(s - m)` (kept), `sum s`, the label's values.
#[inline(always)]
fn ce_stats(s: In, base: usize, j0: usize, j1: usize, y: usize, keep: &mut [f32]) -> CeStats {
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
fn merge_ce(blocks: &[CeStats]) -> (f32, f64, f64, f64, f32, bool) {
    let m = blocks
        .iter()
        .fold(f32::NEG_INFINITY, |a, b| vmath::max(a, b.m));
    let (mut z, mut ey, mut sum, mut sy) = (0.0, 0.0, 0.0, 0.0);
    for b in blocks {
        let r = (b.m as f64 - m as f64).exp();
        z += b.z * r;
        sum += b.sum_s;
        if let Some((v, e)) = b.sy {
            sy = v;
            ey = e as f64 * r;
        }
    }
    let bad = blocks.iter().any(|b| b.bad);
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
        let (m, z, z_rest, sum_s, sy, bad) = merge_ce(blocks);
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

// ---------------------------------------------------------------------------------------------
// The soft-target side (sections 2 and 4): student and teacher logits at temperature T.

/// A block's statistics with the teacher as logits: maxima, `Zs`, `Zt` and `dz = Zs - Zt`, the
/// last summed element by element as `e^xt expm1(xs - xt)` where the two are close (high T), so
/// that `log(Zs / Zt)` keeps its digits when `p ~ q`.
#[derive(Clone, Copy, Default)]
pub struct KdStats {
    ms: f32,
    mt: f32,
    zs: f64,
    zt: f64,
    dz: f64,
    bad: bool,
}

/// `e^a - e^b` from `a - b` and the values: `e^b expm1(a - b)` where they are close.
#[inline(always)]
fn exp_gap(d: f32, ea: f32, eb: f32) -> f32 {
    let (_, em1) = vmath::phi_expm1_small(d);
    select(d.abs() < 0.5, eb * em1, ea - eb)
}

/// Pass 1 of a block with teacher logits; keeps `e^xs` in `keep_s` and `e^xt` in `keep_t`.
#[inline(always)]
fn kd_stats(
    (s, t): (In, In),
    (base, j0, j1): (usize, usize, usize),
    inv_t: f32,
    keep_s: &mut [f32],
    keep_t: &mut [f32],
    s_max: Option<f32>,
) -> KdStats {
    // The student's block max, when the caller has it (Hinton's T = 1 pass, which has also
    // checked the block is finite).
    let (ms, bad_s) = match s_max {
        Some(m) => (m, false),
        None => max_and_bad(s, base, j0, j1),
    };
    let (mt, bad_t) = max_and_bad(t, base, j0, j1);
    if bad_s || bad_t {
        return KdStats {
            bad: true,
            ..Default::default()
        };
    }
    // Three simple loops over the block (in L1) rather than one that holds everything: fewer
    // live vectors, no spills.
    let zs = sum_exp(s, base, j0, j1, ms, inv_t, keep_s);
    let zt = sum_exp(t, base, j0, j1, mt, inv_t, keep_t);
    let mut dz = [0.0f32; LANES];
    for_steps!(j0, j1, |j, n| {
        // SAFETY: in bounds.
        let (sv, tv) = unsafe { (s.load(base + j, n), t.load(base + j, n)) };
        let (es, et) = (
            lanes(&keep_s[j - j0..j - j0 + n]),
            lanes(&keep_t[j - j0..j - j0 + n]),
        );
        let mut gap = [0.0f32; LANES];
        for l in 0..LANES {
            let xs = (sv[l] - ms) * inv_t;
            let xt = (tv[l] - mt) * inv_t;
            gap[l] = exp_gap(xs - xt, es[l], et[l]);
        }
        add(&mut dz, &gap, n);
    });
    KdStats {
        ms,
        mt,
        zs,
        zt,
        dz: total(&dz),
        bad: false,
    }
}

/// A row's merged soft-target statistics (teacher logits), f64.
#[derive(Clone, Copy, Default)]
pub struct KdRow {
    ms: f32,
    mt: f32,
    lzs: f64,
    lzt: f64,
    /// `log(Zs / Zt) = log1p(dz / Zt)`.
    dlz: f64,
    bad: bool,
}

/// Merges blocks in order: `Zs = sum e^os Zs_b`, `Zt = sum e^ot Zt_b` and
/// `dz = sum e^ot dz_b + (e^os - e^ot) Zs_b`, with `os = (ms_b - ms) / T` (likewise `ot`) and
/// `e^os - e^ot = e^ot expm1(os - ot)`.
fn merge_kd<'a>(blocks: impl Iterator<Item = &'a KdStats> + Clone, inv_t: f64) -> KdRow {
    let ms = blocks
        .clone()
        .fold(f32::NEG_INFINITY, |a, b| vmath::max(a, b.ms));
    let mt = blocks
        .clone()
        .fold(f32::NEG_INFINITY, |a, b| vmath::max(a, b.mt));
    let (mut zs, mut zt, mut dz, mut bad) = (0.0f64, 0.0f64, 0.0f64, false);
    for b in blocks {
        bad |= b.bad;
        let os = (b.ms as f64 - ms as f64) * inv_t;
        let ot = (b.mt as f64 - mt as f64) * inv_t;
        let (ras, rat) = (os.exp(), ot.exp());
        zs += ras * b.zs;
        zt += rat * b.zt;
        // e^os - e^ot without cancellation where close (and without 0 * inf where far apart).
        let gap = if (os - ot).abs() < 0.5 {
            rat * (os - ot).exp_m1()
        } else {
            ras - rat
        };
        dz += rat * b.dz + gap * b.zs;
    }
    KdRow {
        ms,
        mt,
        lzs: zs.ln(),
        lzt: zt.ln(),
        dlz: (dz / zt).ln_1p(),
        bad,
    }
}

/// A block's constants for its elements: `p_j = e^xs_j ps`, `q_j = e^xt_j pt` and
/// `u_j = log p_j - log q_j = (xs_j - xt_j) - w`, with `xs_j = (s_j - ms_b) / T`.
#[derive(Clone, Copy)]
struct KdBlock {
    ms: f32,
    mt: f32,
    ps: f32,
    pt: f32,
    w: f32,
    /// `w` in f64, for the gradients that subtract the row's divergence from `u`.
    w64: f64,
}

fn kd_block(row: &KdRow, b: &KdStats, inv_t: f64) -> KdBlock {
    let os = (b.ms as f64 - row.ms as f64) * inv_t;
    let ot = (b.mt as f64 - row.mt as f64) * inv_t;
    KdBlock {
        ms: b.ms,
        mt: b.mt,
        ps: (os - row.lzs).exp() as f32,
        pt: (ot - row.lzt).exp() as f32,
        w: (row.dlz - (os - ot)) as f32,
        w64: row.dlz - (os - ot),
    }
}

/// `u_j - d` in f64 for a step (teacher logits): where one class dominates, `u_j` and the row's
/// divergence `d` are large and nearly cancel (the teacher gradient `q (-u - KL)` at the
/// teacher's top class), more than f32 can resolve.
#[inline(always)]
fn u_minus(sv: &Lanes, tv: &Lanes, kb: &KdBlock, inv_t: f64, d: f64) -> Lanes {
    let mut out = [0.0f32; LANES];
    let (ms, mt) = (kb.ms as f64, kb.mt as f64);
    for l in 0..LANES {
        let xs = (sv[l] as f64 - ms) * inv_t;
        let xt = (tv[l] as f64 - mt) * inv_t;
        out[l] = (((xs - xt) - kb.w64) - d) as f32;
    }
    out
}

/// `(p, q, u)` of a step of LANES elements, teacher logits.
#[inline(always)]
fn kd_elems(
    sv: &Lanes,
    tv: &Lanes,
    es: &[f32],
    et: &[f32],
    kb: &KdBlock,
    inv_t: f32,
) -> (Lanes, Lanes, Lanes) {
    let (es, et) = (lanes(es), lanes(et));
    let (mut p, mut q, mut u) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
    for l in 0..LANES {
        let xs = (sv[l] - kb.ms) * inv_t;
        let xt = (tv[l] - kb.mt) * inv_t;
        p[l] = es[l] * kb.ps;
        q[l] = et[l] * kb.pt;
        u[l] = (xs - xt) - kb.w;
    }
    (p, q, u)
}

/// Forward KL's term `q phi(u)` (its limit `p` where `q` is 0) and `p - q` (as `q expm1(u)`
/// where they are close): `KL = sum q phi(u)` because `sum q e^u = sum p = 1`.
#[inline(always)]
fn kl_and_gap(q: f32, p: f32, u: f32) -> (f32, f32) {
    let (phi, em1) = vmath::phi_expm1_small(u);
    let small = u.abs() < 0.5;
    let term = select(q == 0.0, p, select(small, q * phi, (p - q) - q * u));
    let gap = select((q == 0.0) | !small, p - q, q * em1);
    (term, gap)
}

// ---------------------------------------------------------------------------------------------
// The fused Hinton loss (section 4)

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
    ce: CeStats,
    kd: KdStats,
}

#[derive(Clone, Copy, Default)]
pub struct HintonRow {
    ce: CeRow,
    kd: KdRow,
    kl: f64,
}

impl HintonRows<'_> {
    fn inv_t(&self) -> f32 {
        1.0 / self.temperature
    }

    /// The gradients of one block of a live, finite row: the student's always, the teacher's
    /// (which needs `KL_r`) when `with_teacher`. Returns the block's KL sum.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)] // the pass's inputs and its two switches
    fn block(
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
        let (m, z, z_rest, sum_s, sy, bad_s) =
            merge_ce(&blocks.iter().map(|b| b.ce).collect::<Vec<_>>());
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

// ---------------------------------------------------------------------------------------------
// Forward KL, reverse KL and JSD (section 2)

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
    kd: KdStats,
}

#[derive(Clone, Copy, Default)]
pub struct DivRow {
    live: bool,
    kd: KdRow,
    /// A given teacher's `Q - 1`.
    q_minus_1: f64,
    d: f64,
    kl_qm: f64,
    kl_pm: f64,
}

#[derive(Clone, Copy, Default)]
pub struct DivSums {
    x: f64,
    y: f64,
    q: f64,
}

/// What an element step needs besides its inputs: the block constants; for a given teacher
/// `c = log Zs - os` (f64), so that `log p_j = xs_j - c`.
#[derive(Clone, Copy)]
struct DivBlock {
    kb: KdBlock,
    c: f64,
}

impl DivergenceRows<'_> {
    fn inv_t(&self) -> f32 {
        1.0 / self.temperature
    }

    fn logits(&self) -> bool {
        self.form == TeacherInput::Logits
    }

    /// The floor of a given teacher's `log q` (`-inf`: none).
    fn log_floor(&self) -> f64 {
        if self.teacher_eps > 0.0 {
            (self.teacher_eps as f64).ln()
        } else {
            f64::NEG_INFINITY
        }
    }

    fn block_consts(&self, row: &DivRow, b: &DivStats) -> DivBlock {
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
    fn elems<const LOGITS: bool>(
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
    fn u_minus<const LOGITS: bool>(
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
    fn block_sums<const LOGITS: bool>(
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
    fn block_grads<const LOGITS: bool>(
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
    fn early(&self) -> bool {
        self.divergence == Divergence::ForwardKl && self.grad_teacher.is_none()
    }
}

/// Reverse KL's term `p phi(d)`, `d = log q - log p` (`+inf` where `q = 0` and `p > 0`).
#[inline(always)]
fn rkl_term(p: f32, q: f32, d: f32) -> f32 {
    let (phi, _) = vmath::phi_expm1_small(d);
    let v = select(d.abs() < 0.5, p * phi, (q - p) - p * d);
    select(
        d == f32::NEG_INFINITY,
        select(p == 0.0, 0.0, f32::INFINITY),
        v,
    )
}

/// `w phi(x)` with `x = log m - log w` and `m` given (its limit `m` where `w = 0`).
#[inline(always)]
fn phi_term(w: f32, x: f32, m: f32) -> f32 {
    let (phi, _) = vmath::phi_expm1_small(x);
    select(w == 0.0, m, select(x.abs() < 0.5, w * phi, (m - w) - w * x))
}

/// JSD's `log q - log M = -log1p((1 - beta) expm1(-diff))`, `diff = log q - log p`.
#[inline(always)]
fn jsd_q_minus_m(diff: f32, (beta, _, ln_1mb): (f32, f32, f32)) -> f32 {
    let v = -vmath::log1p((1.0 - beta) * vmath::expm1(-diff));
    select(diff < -80.0, diff - ln_1mb, v)
}

/// JSD's `log p - log M = -log1p(beta expm1(diff))`.
#[inline(always)]
fn jsd_p_minus_m(diff: f32, (beta, ln_b, _): (f32, f32, f32)) -> f32 {
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
            let mm: Vec<MaxSum> = blocks
                .iter()
                .map(|b| MaxSum {
                    m: b.kd.ms,
                    z: b.kd.zs,
                    bad: b.kd.bad,
                })
                .collect();
            let m = merge_max_sum(&mm, inv_t);
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
