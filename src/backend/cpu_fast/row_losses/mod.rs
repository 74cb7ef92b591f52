//! The fast CPU backend's row losses in f32 (`docs/LOSSES.md` sections 1-4): temperature softmax
//! and its backward, cross-entropy, the fused Hinton loss, the three divergences and DKD, each a
//! [`RowOp`] for the driver in `rows.rs`. The math is the GPU kernels' (`divergence.wgsl`
//! explains the high-temperature forms): per block of a row, pass 1 takes the maxima and the
//! sums of exponentials, pass 2 the loss sums and the gradients.
//!
//! Precision: every element is computed in f32 with `vmath`'s functions, every sum is
//! accumulated in f32 lanes over a block (128 terms a lane) and in f64 across lanes and
//! blocks, and the per-row and per-block constants (`log Z`, `log(Zs / Zt)`
//! from `dz = Zs - Zt` summed through `expm1`, the block offsets) are f64. Where a difference
//! of two f32 values near `log C` would lose the digits that matter (`log p - log q` for a
//! teacher given as probabilities or log-probabilities at high T), it is formed in f64
//! (`vmath::ln_f64`). The gradient at the label, `p_y - 1`, is `-(Z - e_y) / Z` from the f64
//! sums. Tests: the backend suite (`tests/suite/kernels.rs`, `tests/suite/contract.rs`) at 1e-4 of the f64
//! reference over T in [1e-3, 1e4], logits to |1e4|, masked rows.

use super::rows::{In, Out, RowOp};
use super::vmath::{self, select, LANES};

pub(super) type Lanes = [f32; LANES];
/// Per-lane partial sums within a block (f32: 128 terms a lane at most; the blocks' sums meet in
/// f64). f64 lanes would double the registers a step holds, and AVX2 has 16.
pub(super) type Acc = [f32; LANES];

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
pub(super) fn add(acc: &mut Acc, v: &Lanes, n: usize) {
    for l in 0..LANES {
        acc[l] += select(l < n, v[l], 0.0);
    }
}

/// The first `x.len() <= LANES` values in a full vector (zeros after them).
#[inline(always)]
pub(super) fn lanes(x: &[f32]) -> Lanes {
    let mut v = [0.0f32; LANES];
    v[..x.len()].copy_from_slice(x);
    v
}

/// The lanes summed in a fixed order.
#[inline(always)]
pub(super) fn total(acc: &Acc) -> f64 {
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
pub(super) fn fill(out: Option<Out>, base: usize, j0: usize, j1: usize, value: f32) {
    if let Some(o) = out {
        let v = [value; LANES];
        // SAFETY: the driver gives this block of this row to this thread alone; in bounds.
        for_steps!(j0, j1, |j, n| unsafe { o.store(base + j, &v, n) });
    }
}

/// The maximum of `x` over `j0..j1` and whether any element is not finite.
#[inline(always)]
pub(super) fn max_and_bad(x: In, base: usize, j0: usize, j1: usize) -> (f32, bool) {
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

// After the helpers above: `for_steps!` must be defined before the modules that use it.
mod cross_entropy;
mod divergence;
mod dkd;
mod hinton;
pub(crate) mod sharded;
mod soft_targets;
mod softmax;
mod sparse;

pub use cross_entropy::{CrossEntropyRows, Student};
pub use divergence::DivergenceRows;
pub use dkd::DkdRows;
pub use hinton::HintonRows;
pub use softmax::{SoftmaxBackwardRows, SoftmaxRows};
pub use sparse::SparseRows;
