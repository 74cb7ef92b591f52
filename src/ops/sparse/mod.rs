//! Sparse top-k teachers (`docs/LOSSES.md` section 10): the teacher given per row as `k` class
//! indices (i32) and `k` values (log-probabilities, or logits), the student dense `[N, C]`.
//!
//! Per valid row, with the support `S` (the `k` indices), the student `p = softmax(s / T)` over
//! all `C` classes and the teacher on `S` at temperature T:
//! - from log-probabilities `l_i`: `q~_i = softmax_S(l / T)_i` (re-tempered as `log q / T` and
//!   renormalised over the support), and the tail mass `m = 1 - sum_S e^(l_i)` (at T = 1, as
//!   stored: the temperature does not move mass into or out of the support);
//! - from logits `v_i`: `q~_i = softmax_S(v / T)_i`, and `m = 0` (logits carry no tail).
//!
//! The tail decides the two distributions `Q` and `P` the divergence compares:
//! - [`SparseTail::Renormalize`]: the top-k is the whole distribution, `Q = q~` on `S` and 0
//!   elsewhere, against the student's full `p` (the dense loss with a teacher of `-inf` outside
//!   the support);
//! - [`SparseTail::Bucket`]: `k + 1` events, `Q = ((1 - m) q~, m)` against
//!   `P = (p_S, 1 - sum_S p)`, the tail an extra class (TRL's `loss_add_tail`);
//! - [`SparseTail::Uniform`]: `Q = (1 - m) q~` on `S` and `m / (C - k)` on every other class,
//!   against the full `p` (DistillKit's uniform tail; the dense loss with that fill).
//!
//! `L_r = alpha CE_r + (1 - alpha) T^2 D_r(Q || P)` with `D` forward KL, reverse KL or JSD(beta)
//! (section 2's definitions), CE the hard-label cross-entropy at T = 1 with label smoothing
//! (section 3; only when `alpha > 0`, which needs labels), reduced over the valid rows as every
//! row loss. With every `P_e` an event's student mass, `dP_e/ds_j = P_e (1[j in e] - p_j) / T`
//! gives one gradient for all three tails and divergences (`reference.rs`):
//! `dD/ds_j = (1/T) [ (p_j / P_e(j)) G_e(j) - p_j sum_e G_e ]`, `G_e = P_e dD/dP_e`:
//! `G = -Q` (forward KL), `P (log(P/Q) + 1)` (reverse KL), `(1 - beta) P log(P/M)` (JSD).
//!
//! | piece | file |
//! | --- | --- |
//! | spec, validation, the teacher's row | here |
//! | f64 reference | `reference.rs` |
//! | fast CPU (f32 dense pass, f64 support) | `backend/cpu_fast/row_losses/sparse.rs` |
//! | wgpu (one workgroup per row, float-float tail mass; `T <= 30`) | `sparse.wgsl`, `wgpu.rs` |
//! | CUDA (a block per row, f64 per element) | `sparse.cu`, `cuda.rs` |
//!
//! Indices must be distinct classes in `0..C` (an `Err` on the host API and the CPU backends,
//! checked by [`check_sparse_teacher`]). The GPU kernels do not read device indices back and never
//! read or write out of bounds: a duplicate or an index outside `0..C` makes that row's loss and
//! gradient NaN (each kernel sorts the row's indices in workgroup / shared memory), as do a label
//! out of range and, under reverse KL, a `-inf` log-probability on the support.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod wgpu;

use super::{
    check_grad_scale, check_temperature, check_unit, count, Divergence, Reduction, RowShape,
    IGNORE_INDEX, TEACHER_SUM_TOLERANCE,
};
use crate::error::{Error, Result};

/// The largest `k` a sparse teacher may have per row.
pub const MAX_TOP_K: usize = 1024;

/// What the sparse teacher's values are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SparseValues {
    /// Log-probabilities of the teacher's full distribution (at T = 1), as a top-k cache stores
    /// them: re-tempered as `log q / T` and renormalised over the support; their missing mass
    /// `1 - sum e^l` is the tail.
    #[default]
    LogProbs,
    /// Logits; the teacher on the support is `softmax_S(v / T)` and there is no tail mass
    /// (only [`SparseTail::Renormalize`]).
    Logits,
}

/// How the teacher's mass outside its top-k is handled (`docs/LOSSES.md` section 10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SparseTail {
    /// The top-k is the whole distribution (renormalised over the support).
    #[default]
    Renormalize,
    /// One extra class holding the tail mass, against the student's mass outside the support.
    Bucket,
    /// The tail mass spread uniformly over the other `C - k` classes.
    Uniform,
}

impl SparseTail {
    /// The `--top-k-tail` / Python name.
    pub fn name(self) -> &'static str {
        match self {
            SparseTail::Renormalize => "renormalize",
            SparseTail::Bucket => "bucket",
            SparseTail::Uniform => "uniform",
        }
    }

    /// Parses [`SparseTail::name`].
    pub fn parse(s: &str) -> Option<SparseTail> {
        [
            SparseTail::Renormalize,
            SparseTail::Bucket,
            SparseTail::Uniform,
        ]
        .into_iter()
        .find(|t| t.name() == s)
    }
}

/// A sparse-teacher row loss `alpha CE + (1 - alpha) T^2 D(Q || P)` (section 10).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseSpec {
    /// `N` rows of `C` classes (the student).
    pub shape: RowShape,
    /// Teacher entries per row, `1..=min(C, 1024)`.
    pub k: usize,
    pub divergence: Divergence,
    pub values: SparseValues,
    pub tail: SparseTail,
    pub temperature: f32,
    /// Weight of the hard-label cross-entropy (needs labels); 0 gives the divergence alone.
    pub alpha: f32,
    /// Label smoothing of the cross-entropy term, in [0, 1).
    pub label_smoothing: f32,
    pub reduction: Reduction,
    pub ignore_index: i32,
    pub grad_scale: f32,
}

impl SparseSpec {
    /// Forward KL against stored log-probabilities, renormalised, batchmean, no hard-label term.
    pub fn new(shape: RowShape, k: usize, temperature: f32) -> Self {
        SparseSpec {
            shape,
            k,
            divergence: Divergence::ForwardKl,
            values: SparseValues::LogProbs,
            tail: SparseTail::Renormalize,
            temperature,
            alpha: 0.0,
            label_smoothing: 0.0,
            reduction: Reduction::BatchMean,
            ignore_index: IGNORE_INDEX,
            grad_scale: 1.0,
        }
    }

    /// `N * k`: the length of the indices and of the values.
    pub fn entries(&self) -> usize {
        self.shape.rows * self.k
    }

    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
        let c = self.shape.cols;
        if self.k == 0 || self.k > MAX_TOP_K || self.k > c {
            return Err(Error::Param {
                name: "k",
                value: self.k as f64,
                hint: "the teacher's entries per row k must be in 1..=min(C, 1024) (a top-k \
                       teacher has at most as many entries as classes; above 1024, densify it)",
            });
        }
        check_temperature(self.temperature)?;
        check_grad_scale(self.grad_scale)?;
        if let Divergence::Jsd { beta } = self.divergence {
            check_unit(
                "beta",
                beta,
                true,
                true,
                "JSD's beta must be in (0, 1); use Divergence::ForwardKl for beta = 0 and \
                 Divergence::ReverseKl for beta = 1",
            )?;
        }
        check_unit(
            "alpha",
            self.alpha,
            false,
            false,
            "alpha (the hard-label weight) must be in [0, 1]; 0 gives the divergence alone",
        )?;
        check_unit(
            "label_smoothing",
            self.label_smoothing,
            false,
            true,
            "label smoothing must be in [0, 1) (0 disables it)",
        )?;
        if self.values == SparseValues::Logits && self.tail != SparseTail::Renormalize {
            return Err(Error::Unsupported(format!(
                "the {} tail needs the teacher's values as log-probabilities \
                 (SparseValues::LogProbs): logits carry no tail mass; use the renormalize tail \
                 with logits",
                self.tail.name()
            )));
        }
        if self.divergence == Divergence::ReverseKl
            && self.tail == SparseTail::Renormalize
            && self.k < c
        {
            return Err(Error::Unsupported(format!(
                "reverse KL with the renormalize tail is +inf: the teacher gives 0 to the {} \
                 outside its top-{} that the student gives mass to; use the bucket or uniform \
                 tail (log-probabilities), or forward KL or JSD",
                count(c - self.k, "class", "classes"),
                self.k
            )));
        }
        Ok(())
    }

    /// Whether the off-support classes form one event (the bucket) with a tail.
    pub(crate) fn has_tail(&self) -> bool {
        self.tail != SparseTail::Renormalize && self.k < self.shape.cols
    }
}

/// One row's teacher on its support (f64): `log Q_i` (tempered, renormalised, times `1 - m`
/// under a tail) and the tail mass `m` (0 under [`SparseTail::Renormalize`], for logits, and
/// for `k = C`). `None` when the values are not valid for their kind (a NaN; for logits an
/// infinity; for log-probabilities `+inf` or all `-inf`), which makes the row NaN.
pub fn teacher_row(spec: &SparseSpec, values: &[f64]) -> Option<(Vec<f64>, f64)> {
    let t = spec.temperature as f64;
    let ok = match spec.values {
        SparseValues::Logits => values.iter().all(|v| v.is_finite()),
        SparseValues::LogProbs => {
            values.iter().all(|&v| !v.is_nan() && v != f64::INFINITY)
                && values.iter().any(|v| v.is_finite())
        }
    };
    if !ok {
        return None;
    }
    let mx = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = values
        .iter()
        .map(|&v| ((v - mx) / t).exp())
        .sum::<f64>()
        .ln();
    // log(1 - m) = log sum_S e^(l_i) directly (not log1p(-m): a row whose top-k holds 1e-140
    // of the mass keeps its log), at most 0 (a sum above 1 within the tolerance is rounding).
    let l1m = if spec.has_tail() {
        let m1 = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        (m1 + values.iter().map(|&v| (v - m1).exp()).sum::<f64>().ln()).min(0.0)
    } else {
        0.0
    };
    let m = -l1m.exp_m1();
    Some((
        values.iter().map(|&v| (v - mx) / t - lse + l1m).collect(),
        m,
    ))
}

/// One event's divergence term `f` (the cancellation-free `q phi(u)` forms of section 2, summed
/// over every event of a row: `sum_e f = D`), `a = dD/dP_e` and `G = P_e a`, from the event's
/// `log Q` and `log P`.
pub fn event_terms(div: Divergence, lq: f64, lp: f64) -> (f64, f64, f64) {
    match div {
        Divergence::ForwardKl => {
            let q = lq.exp();
            (kl_term(lq, lp), -(lq - lp).exp(), -q)
        }
        Divergence::ReverseKl => {
            let a = lp - lq + 1.0;
            (kl_term(lp, lq), a, lp.exp() * a)
        }
        Divergence::Jsd { beta } => {
            let b = beta as f64;
            let lm = logaddexp(b.ln() + lq, (1.0 - b).ln() + lp);
            let a = (1.0 - b) * (lp - lm);
            (
                b * kl_term(lq, lm) + (1.0 - b) * kl_term(lp, lm),
                a,
                lp.exp() * a,
            )
        }
    }
}

/// `q phi(log p - log q)` with `phi(u) = e^u - 1 - u`: forward KL's term `q log(q/p)` plus
/// `p - q` (which sums to 0 over a row), non-negative; `p` where `q = 0`, `+inf` where
/// `q > 0 = p` (as `q log(q/p)` is).
pub fn kl_term(lq: f64, lp: f64) -> f64 {
    if lq == f64::NEG_INFINITY {
        return lp.exp();
    }
    let (u, q) = (lp - lq, lq.exp());
    if u.abs() < 1.0 {
        q * (u.exp_m1() - u)
    } else {
        (lp.exp() - q) - q * u
    }
}

/// `log(e^a + e^b)`.
pub fn logaddexp(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + ((a - m).exp() + (b - m).exp()).ln()
}

/// Checks a sparse teacher's host arrays against `spec` (validated): `indices` and `values` of
/// `N * k`; in every row (masked ones included) the indices distinct and in `0..C`; over the rows
/// that are not masked, logits finite, log-probabilities not NaN nor `+inf`, at most
/// [`TEACHER_SUM_TOLERANCE`], not all `-inf`, their probabilities summing to at most
/// `1 + TEACHER_SUM_TOLERANCE`; for reverse KL, no `-inf` entry (a class the teacher rules out
/// and the student does not: `+inf`) and under a tail a tail mass above 0 (else the divergence is
/// `+inf`). The labels, when given, are one per row. The error names the row and the entry.
pub fn check_sparse_teacher(
    spec: &SparseSpec,
    indices: &[i32],
    values: &[f32],
    labels: Option<&[i32]>,
) -> Result<()> {
    spec.validate()?;
    let (n, c, k) = (spec.shape.rows, spec.shape.cols, spec.k);
    if let Some(l) = labels {
        if l.len() != n {
            return Err(Error::shape("labels", l.len(), n, "one label per row"));
        }
    }
    for (what, len) in [("indices", indices.len()), ("values", values.len())] {
        if len != n * k {
            return Err(Error::shape(
                what,
                len,
                n * k,
                format!(
                    "{} x {k} row-major (k entries per row)",
                    count(n, "row", "rows")
                ),
            ));
        }
    }
    let mut seen = vec![false; c];
    for r in 0..n {
        let idx = &indices[r * k..(r + 1) * k];
        let bad_index = |i: usize, problem: String| Error::Input {
            what: "sparse teacher indices",
            row: r,
            problem: format!("entry {i}: {problem}"),
        };
        let mut dup = None;
        for (i, &j) in idx.iter().enumerate() {
            if j < 0 || j as i64 >= c as i64 {
                // Clear what this row set before returning.
                for &jj in &idx[..i] {
                    seen[jj as usize] = false;
                }
                return Err(bad_index(
                    i,
                    format!(
                        "class {j} is not in 0..{c}: each index must be a class of the student"
                    ),
                ));
            }
            if seen[j as usize] && dup.is_none() {
                dup = Some((i, j));
            }
            seen[j as usize] = true;
        }
        for &j in idx {
            seen[j as usize] = false;
        }
        if let Some((i, j)) = dup {
            return Err(bad_index(
                i,
                format!(
                    "class {j} appears twice in the row: a top-k teacher's indices must be \
                     distinct (merge the duplicates' probabilities)"
                ),
            ));
        }
        if labels.is_some_and(|l| l[r] == spec.ignore_index) {
            continue;
        }
        let vals = &values[r * k..(r + 1) * k];
        let bad = |i: usize, problem: String| Error::Input {
            what: match spec.values {
                SparseValues::Logits => "sparse teacher logits",
                SparseValues::LogProbs => "sparse teacher log-probabilities",
            },
            row: r,
            problem: format!("entry {i} = {}: {problem}", vals[i]),
        };
        match spec.values {
            SparseValues::Logits => {
                if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
                    return Err(bad(i, "logits must be finite".into()));
                }
            }
            SparseValues::LogProbs => {
                if let Some(i) = vals.iter().position(|v| v.is_nan() || *v == f32::INFINITY) {
                    return Err(bad(i, "is not a log-probability (NaN or +inf)".into()));
                }
                if let Some(i) = vals.iter().position(|&v| v as f64 > TEACHER_SUM_TOLERANCE) {
                    return Err(bad(i, "is above 0, so it is not a log-probability".into()));
                }
                if vals.iter().all(|&v| v == f32::NEG_INFINITY) {
                    return Err(bad(
                        0,
                        "every entry of the row is -inf: the teacher has no mass on its \
                         support (mask the row with ignore_index)"
                            .into(),
                    ));
                }
                if spec.divergence == Divergence::ReverseKl {
                    if let Some(i) = vals.iter().position(|&v| v == f32::NEG_INFINITY) {
                        return Err(bad(
                            i,
                            "a probability of 0 on the support: reverse KL is +inf there (the \
                             student has mass on every class); use forward KL or JSD, or store \
                             the class's log-probability"
                                .into(),
                        ));
                    }
                }
                let sum: f64 = vals.iter().map(|&v| (v as f64).exp()).sum();
                if sum > 1.0 + TEACHER_SUM_TOLERANCE {
                    return Err(Error::Input {
                        what: "sparse teacher log-probabilities",
                        row: r,
                        problem: format!(
                            "the top-{k} probabilities sum to {sum}, above 1 (tail mass {} < 0 \
                             beyond rounding, {TEACHER_SUM_TOLERANCE}): store log_softmax of the \
                             full row, rounded toward -inf when it is stored in half precision \
                             (round-to-nearest bf16 can push the sum past 1), or pass logits \
                             (SparseValues::Logits)",
                            1.0 - sum
                        ),
                    });
                }
                if spec.divergence == Divergence::ReverseKl && spec.has_tail() && sum >= 1.0 {
                    return Err(Error::Input {
                        what: "sparse teacher log-probabilities",
                        row: r,
                        problem: format!(
                            "the top-{k} probabilities sum to {sum}, leaving no tail mass, so \
                             reverse KL against the {} tail is +inf (the student has mass \
                             there); use forward KL or JSD",
                            spec.tail.name()
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}
