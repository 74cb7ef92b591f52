//! Vocab-sharded row losses (`docs/LOSSES.md` section 9): the vocabulary of `C` classes split over
//! devices (a Megatron-style vocab-parallel output layer), each shard holding the columns
//! `offset..offset + width` of every row. Two phases around the caller's own collective:
//!
//! 1. per shard, [`reference::stats`] (or a backend's) writes each row's statistics relative to
//!    the shard's own maxima ([`STATS`] floats a row, layout below);
//! 2. the caller combines them over the shards: an all-reduce MAX of the maxima plane, then each
//!    shard rescales its sums to the global maxima ([`rescale_stats`]), then an all-reduce SUM of
//!    the sums plane; in one process [`combine_shard_stats`] does both;
//! 3. (JSD only) per shard, the two partial sums `KL(q||M)`, `KL(p||M)` of its columns
//!    ([`reference::jsd_terms`]), all-reduced SUM;
//! 4. per shard, [`reference::loss_and_grad`] writes the shard's part of each row's loss (the parts
//!    sum over the shards to the unsharded row loss) and the shard's gradient columns.
//!
//! Nothing here does networking: the collectives are the caller's (NCCL, torch.distributed, MPI).
//!
//! | piece | file |
//! | --- | --- |
//! | spec, layout, validation, the combine rule | here |
//! | f64 reference | `reference.rs` |
//! | fast CPU (f32) | `backend/cpu_fast/row_losses/sharded.rs` |
//! | WGSL and its dispatch (host slices) | `sharded.wgsl`, `wgpu.rs` |
//! | CUDA and its launch (host slices) | `sharded.cu`, `cuda.rs` |

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod wgpu;

use super::{
    check_grad_scale, check_temperature, check_unit, count, Divergence, Reduction, TeacherInput,
    IGNORE_INDEX, TEACHER_SUM_TOLERANCE,
};
use crate::error::{Error, Result};

/// Floats of statistics per row: the maxima plane (`MAXIMA` per row) then the sums plane
/// (`SUMS` per row). A stats buffer for `n` rows holds `n * STATS` floats: `[n, MAXIMA]` maxima
/// first, then `[n, SUMS]` sums, so that each plane is one contiguous range for an all-reduce.
pub const STATS: usize = MAXIMA + SUMS;
/// Per row: `m_s = max_j s_j`, `m_t = max_j t_j` (raw logits; `max s/T = m_s / T` for `T > 0`);
/// `m_t = 0` for a teacher given as probabilities or log-probabilities (see [`Sum`]).
pub const MAXIMA: usize = 2;
/// Per row, relative to the maxima `m_s`, `m_t` of the same stats buffer (see [`Sum`]).
pub const SUMS: usize = 9;
/// The JSD terms per row: `sum q (log q - log M)`, `sum p (log p - log M)` over the shard's columns.
pub const JSD_TERMS: usize = 2;

/// The sums plane's columns, `j` over the shard's columns, `u_j = s_j - m_s`, `v_j = t_j - m_t`.
///
/// DKD ([`ShardedLoss::Dkd`]) takes every statistic but `S`, `s_y`, `t_y` over the rest of the
/// row: `j` over the shard's columns other than the label's, `m_s`, `m_t` their maxima (`-inf`
/// where the shard holds the label alone: its rest sums are 0), `Zs1` relative to the rest's
/// `m_s`, and `Ar` 0. Phase 2 forms CE's `log sum_j e^{s_j}` as `logaddexp(m_s + log Zs1, s_y)`.
///
/// A teacher given as probabilities or log-probabilities ([`TeacherInput`]) is already
/// normalised: its stats are the same with `m_t = 0` and `v_j = T log q_j` (so `e^{v_j/T} = q_j`,
/// `Zt = sum q_j`), a term of `Af` with `q_j = 0` being 0 and one of `Ar` being `+inf`; `t_y` is
/// the given value at the label. Phase 2 then takes `log q_j` from the input itself (no `log Zt`:
/// the teacher is not renormalised, as in section 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Sum {
    /// `Zs = sum e^{u_j / T}`
    StudentT = 0,
    /// `Zs1 = sum e^{u_j}` (the cross-entropy's softmax at temperature 1)
    Student1 = 1,
    /// `Zt = sum e^{v_j / T}`
    TeacherT = 2,
    /// `Af = sum e^{v_j / T} (v_j - u_j)` (forward KL)
    Forward = 3,
    /// `Ar = sum e^{u_j / T} (u_j - v_j)` (reverse KL)
    Reverse = 4,
    /// `S = sum s_j` (label smoothing; raw logits, not relative)
    LogitSum = 5,
    /// `s_y`, the student's logit at the label where the label is in the shard, else 0
    StudentLabel = 6,
    /// `t_y`, the teacher's logit at the label where the label is in the shard, else 0
    TeacherLabel = 7,
    /// `D = sum e^{u_j / T} - e^{v_j / T}` (`= Zs - Zt`, formed term by term so that
    /// `log Zs - log Zt = log1p(D / Zt)` keeps its digits at high temperature)
    Difference = 8,
}

/// Which loss a sharded call computes: `w_ce CE + w_div T^2 D`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ShardedLoss {
    /// `T^2 D(q || p)` (section 2); labels optional (they only mask rows).
    Divergence(Divergence),
    /// Cross-entropy with label smoothing (section 3); no teacher.
    CrossEntropy,
    /// The Hinton loss `alpha CE + (1 - alpha) T^2 KL(q || p)` (section 4).
    Hinton { alpha: f32 },
    /// Decoupled KD `w_ce CE + T^2 (w_tc TCKD + w_nc NCKD)` (section 8): the teacher as logits,
    /// labels required, no teacher gradient. Its stats are the rest of the row's (the label's
    /// column left out; see [`Sum`] and section 9).
    Dkd {
        ce_weight: f32,
        tckd_weight: f32,
        nckd_weight: f32,
    },
}

impl ShardedLoss {
    /// `(w_ce, w_div, divergence)`; DKD's `w_div` is its NCKD weight (its TCKD weight is
    /// [`ShardedLoss::tckd_weight`]), its divergence forward KL (NCKD's, over the rest).
    pub(crate) fn weights(self) -> (f64, f64, Divergence) {
        match self {
            ShardedLoss::Divergence(d) => (0.0, 1.0, d),
            ShardedLoss::CrossEntropy => (1.0, 0.0, Divergence::ForwardKl),
            ShardedLoss::Hinton { alpha } => {
                (alpha as f64, 1.0 - alpha as f64, Divergence::ForwardKl)
            }
            ShardedLoss::Dkd {
                ce_weight,
                nckd_weight,
                ..
            } => (ce_weight as f64, nckd_weight as f64, Divergence::ForwardKl),
        }
    }

    /// Whether this is DKD (rest-of-row stats, the TCKD term at the label's column).
    pub fn is_dkd(self) -> bool {
        matches!(self, ShardedLoss::Dkd { .. })
    }

    /// DKD's TCKD weight (0 for the other losses).
    pub(crate) fn tckd_weight(self) -> f64 {
        match self {
            ShardedLoss::Dkd { tckd_weight, .. } => tckd_weight as f64,
            _ => 0.0,
        }
    }

    /// The kernels' codes `(div, beta)`: `div` 0 forward KL, 1 reverse KL, 2 JSD, 3 DKD; `beta`
    /// JSD's beta, DKD's TCKD weight (the one float the kernels take for either), else 0.5.
    pub(crate) fn kernel_codes(self) -> (u32, f32) {
        match self {
            ShardedLoss::Dkd { tckd_weight, .. } => (3, tckd_weight),
            _ => match self.weights().2 {
                Divergence::Jsd { beta } => (2, beta),
                d => (d.code(), 0.5),
            },
        }
    }

    /// Whether the loss reads a teacher.
    pub fn needs_teacher(self) -> bool {
        !matches!(self, ShardedLoss::CrossEntropy)
    }

    /// Whether every row needs a label (cross-entropy and Hinton).
    pub fn needs_labels(self) -> bool {
        !matches!(self, ShardedLoss::Divergence(_))
    }

    /// Whether the loss needs the JSD round (phase 1c).
    pub fn needs_jsd_terms(self) -> bool {
        matches!(self, ShardedLoss::Divergence(Divergence::Jsd { .. }))
    }
}

/// One shard of `[rows, classes]` logits: the columns `offset..offset + width` of every row,
/// stored row-major as `[rows, width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rows: usize,
    /// The global vocabulary `C`.
    pub classes: usize,
    /// The shard's first global column.
    pub offset: usize,
    /// The shard's number of columns.
    pub width: usize,
}

impl Shard {
    pub fn new(rows: usize, classes: usize, offset: usize, width: usize) -> Self {
        Shard {
            rows,
            classes,
            offset,
            width,
        }
    }

    /// `rows * width`, the elements of the shard's logits and gradients.
    pub fn len(&self) -> usize {
        self.rows * self.width
    }

    /// True when there is no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether global class `y` is one of the shard's columns (its local column then).
    pub fn local(&self, y: i32) -> Option<usize> {
        let y = usize::try_from(y).ok()?;
        (y >= self.offset && y < self.offset + self.width).then(|| y - self.offset)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.rows == 0 || self.width == 0 || self.classes == 0 {
            return Err(Error::Empty(format!(
                "empty shard: {} of width {} in {}; a shard needs at least 1 row and 1 column",
                count(self.rows, "row", "rows"),
                self.width,
                count(self.classes, "class", "classes")
            )));
        }
        if self
            .offset
            .checked_add(self.width)
            .is_none_or(|e| e > self.classes)
        {
            return Err(Error::Unsupported(format!(
                "the shard's columns offset..offset + width = {}..{} + {} run past the vocabulary \
                 of {} classes: the shards must lie inside 0..classes (offset + width <= classes)",
                self.offset, self.offset, self.width, self.classes
            )));
        }
        if self.classes > i32::MAX as usize {
            return Err(Error::Limit(format!(
                "{} classes: the labels are int32, so the vocabulary must have at most 2^31 - 1 \
                 classes",
                self.classes
            )));
        }
        if self.rows.checked_mul(self.width.max(STATS)).is_none()
            || self.rows * self.width.max(STATS) > u32::MAX as usize
        {
            return Err(Error::Limit(format!(
                "a shard of [{}, {}] has more than 2^32 elements; split the batch",
                self.rows, self.width
            )));
        }
        Ok(())
    }

    /// Checks a buffer of `per_row` floats a row.
    pub(crate) fn check(&self, what: &'static str, got: usize, per_row: usize) -> Result<()> {
        let expected = self.rows * per_row;
        if got != expected {
            return Err(Error::shape(
                what,
                got,
                expected,
                format!("{} x {per_row} row-major", count(self.rows, "row", "rows")),
            ));
        }
        Ok(())
    }
}

/// A vocab-sharded row loss (section 9): which loss, over which shard, with the row losses'
/// usual parameters. Every shard of one loss uses the same spec except `shard.offset` and
/// `shard.width`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShardedSpec {
    pub shard: Shard,
    pub loss: ShardedLoss,
    /// How the teacher is given: logits (`q = softmax(t / T)`), or probabilities or
    /// log-probabilities, to which the temperature does not apply (section 2). Ignored by
    /// cross-entropy.
    pub teacher: TeacherInput,
    pub temperature: f32,
    /// Label smoothing of the cross-entropy term, in [0, 1).
    pub label_smoothing: f32,
    pub reduction: Reduction,
    pub ignore_index: i32,
    /// Upstream gradient `g` multiplied into every gradient (1 for the loss's own gradient).
    pub grad_scale: f32,
}

impl ShardedSpec {
    pub fn new(shard: Shard, loss: ShardedLoss, temperature: f32) -> Self {
        ShardedSpec {
            shard,
            loss,
            teacher: TeacherInput::Logits,
            temperature,
            label_smoothing: 0.0,
            reduction: Reduction::BatchMean,
            ignore_index: IGNORE_INDEX,
            grad_scale: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.shard.validate()?;
        check_temperature(self.temperature)?;
        check_grad_scale(self.grad_scale)?;
        check_unit(
            "label_smoothing",
            self.label_smoothing,
            false,
            true,
            "label smoothing must be in [0, 1) (0 disables it)",
        )?;
        match self.loss {
            ShardedLoss::Hinton { alpha } => check_unit(
                "alpha",
                alpha,
                false,
                false,
                "alpha weighs hard-label CE against the soft-target KL and must be in [0, 1]",
            ),
            ShardedLoss::Divergence(Divergence::Jsd { beta }) => check_unit(
                "beta",
                beta,
                true,
                true,
                "JSD's beta must be in (0, 1); use Divergence::ForwardKl for beta = 0 and \
                 Divergence::ReverseKl for beta = 1",
            ),
            ShardedLoss::Dkd {
                ce_weight,
                tckd_weight,
                nckd_weight,
            } => {
                if self.shard.classes < 2 {
                    return Err(Error::Param {
                        name: "classes",
                        value: self.shard.classes as f64,
                        hint: "DKD splits the classes into the target and the non-target ones, \
                               so it needs at least 2 classes",
                    });
                }
                if self.teacher != TeacherInput::Logits {
                    return Err(Error::Unsupported(
                        "sharded DKD takes the teacher as logits (TeacherInput::Logits): its \
                         binary and non-target distributions are softmaxes at T of the teacher's \
                         logits"
                            .into(),
                    ));
                }
                for (name, w) in [
                    ("ce_weight", ce_weight),
                    ("tckd_weight", tckd_weight),
                    ("nckd_weight", nckd_weight),
                ] {
                    crate::ops::dkd::check_weight(name, w)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Checks the labels (global classes in `0..classes` or `ignore_index`, `rows` of them) and
    /// that the loss has the labels it needs.
    pub fn check_labels(&self, labels: Option<&[i32]>) -> Result<()> {
        match labels {
            None if self.loss.needs_labels() => Err(Error::Unsupported(
                "cross-entropy and the Hinton loss need labels (one global class index per row, \
                 the same on every shard)"
                    .into(),
            )),
            None => Ok(()),
            Some(l) => {
                self.shard.check("labels", l.len(), 1)?;
                super::check_labels(l, self.shard.classes, self.ignore_index)
            }
        }
    }

    /// Checks a teacher's presence and length against the loss.
    pub fn check_teacher(&self, teacher: Option<usize>) -> Result<()> {
        match (teacher, self.loss.needs_teacher()) {
            (None, true) => Err(Error::Unsupported(
                "this sharded loss reads the teacher's values (logits, probabilities or \
                 log-probabilities) of the same shard: pass them"
                    .into(),
            )),
            (Some(n), true) => self.shard.check("teacher", n, self.shard.width),
            _ => Ok(()),
        }
    }

    /// Whether the teacher is given normalised (probabilities or log-probabilities).
    pub fn given_teacher(&self) -> bool {
        self.loss.needs_teacher() && self.teacher != TeacherInput::Logits
    }

    /// Reverse KL is `+inf` where a given teacher has a probability of exactly 0 (a `0`
    /// probability, a `-inf` log-probability) and the student does not (section 2): an error
    /// naming the row and the global class, over the rows that are not masked. Nothing to check
    /// for logits or the other losses.
    pub fn check_reverse_kl_support(&self, teacher: &[f32], labels: Option<&[i32]>) -> Result<()> {
        if self.loss != ShardedLoss::Divergence(Divergence::ReverseKl) || !self.given_teacher() {
            return Ok(());
        }
        let zero = |v: f32| match self.teacher {
            TeacherInput::Probs => v == 0.0,
            _ => v == f32::NEG_INFINITY,
        };
        let w = self.shard.width;
        for (row, t) in teacher.chunks_exact(w).enumerate() {
            if self.masked(labels, row) {
                continue;
            }
            if let Some(j) = t.iter().position(|&v| zero(v)) {
                return Err(Error::Input {
                    what: "reverse KL teacher",
                    row,
                    problem: format!(
                        "the teacher gives class {} probability 0, where reverse KL \
                         sum p (log p - log q) is +inf (the sharded losses have no teacher_eps \
                         floor): floor the teacher's probabilities yourself, or use forward KL \
                         or JSD, which are finite there",
                        self.shard.offset + j
                    ),
                });
            }
        }
        Ok(())
    }

    /// The opt-in check of a given teacher's values on this shard: probabilities finite and
    /// `>= 0`; log-probabilities not NaN, not `+inf`, at most [`TEACHER_SUM_TOLERANCE`]. The rows'
    /// sums span the shards: [`ShardedSpec::check_teacher_sums`] checks them from the combined
    /// stats. Logits: finite.
    pub fn check_teacher_values(&self, teacher: &[f32], labels: Option<&[i32]>) -> Result<()> {
        let w = self.shard.width;
        for (row, t) in teacher.chunks_exact(w).enumerate() {
            if self.masked(labels, row) {
                continue;
            }
            let bad = |j: usize, what: &'static str, why: &str| Error::Input {
                what,
                row,
                problem: format!(
                    "element {j} (class {}) = {} {why}",
                    self.shard.offset + j,
                    t[j]
                ),
            };
            match self.teacher {
                TeacherInput::Logits => {
                    if let Some(j) = t.iter().position(|v| !v.is_finite()) {
                        return Err(bad(j, "teacher", "is not finite: logits must be finite"));
                    }
                }
                TeacherInput::Probs => {
                    if let Some(j) = t.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
                        return Err(bad(
                            j,
                            "teacher probabilities",
                            "is not a probability (finite and >= 0)",
                        ));
                    }
                }
                TeacherInput::LogProbs => {
                    if let Some(j) = t.iter().position(|v| v.is_nan() || *v == f32::INFINITY) {
                        return Err(bad(
                            j,
                            "teacher log-probabilities",
                            "is not a log-probability (NaN or +inf)",
                        ));
                    }
                    if let Some(j) = t.iter().position(|&v| v as f64 > TEACHER_SUM_TOLERANCE) {
                        return Err(bad(
                            j,
                            "teacher log-probabilities",
                            "is above 0, so it is not a log-probability",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The opt-in check of a given teacher's row sums from the combined stats (`Zt = sum q_j`
    /// over every shard): 1 within [`TEACHER_SUM_TOLERANCE`] on the rows that are not masked.
    pub fn check_teacher_sums(&self, global: &[f32], labels: Option<&[i32]>) -> Result<()> {
        if !self.given_teacher() {
            return Ok(());
        }
        let rows = self.shard.rows;
        for row in 0..rows {
            if self.masked(labels, row) {
                continue;
            }
            let sum = global[rows * MAXIMA + row * SUMS + Sum::TeacherT as usize] as f64;
            let off = (sum - 1.0).abs();
            if off.is_nan() || off > TEACHER_SUM_TOLERANCE {
                return Err(Error::Input {
                    what: if self.teacher == TeacherInput::Probs {
                        "teacher probabilities"
                    } else {
                        "teacher log-probabilities"
                    },
                    row,
                    problem: format!(
                        "the row's probabilities sum to {sum} over every shard, not 1 (within \
                         {TEACHER_SUM_TOLERANCE}): normalise each row over the whole vocabulary \
                         (softmax / log_softmax), or pass logits with TeacherInput::Logits"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Whether row `r` is masked.
    pub(crate) fn masked(&self, labels: Option<&[i32]>, r: usize) -> bool {
        labels.is_some_and(|l| l[r] == self.ignore_index)
    }

    /// The reduction's factor, from the valid rows (the same on every shard: every shard holds
    /// every row).
    pub(crate) fn scale(&self, labels: Option<&[i32]>) -> f64 {
        let valid = (0..self.shard.rows)
            .filter(|&r| !self.masked(labels, r))
            .count();
        super::reduction_factor(self.reduction, valid)
    }
}

/// Rewrites one shard's `stats` (`[rows * STATS]`, sums relative to its own maxima) relative to
/// the global maxima `global_maxima` (`[rows, MAXIMA]`, the all-reduce MAX of every shard's
/// maxima plane), which it also copies into the maxima plane. With `d_s = m_s - M_s`,
/// `d_t = m_t - M_t` (both `<= 0`):
/// `Zs *= e^{d_s/T}`, `Zs1 *= e^{d_s}`, `Zt *= e^{d_t/T}`,
/// `Af = e^{d_t/T} (Af + Zt (d_t - d_s))`, `Ar = e^{d_s/T} (Ar + Zs (d_s - d_t))`,
/// `D = e^{d_t/T} D + Zs (e^{d_s/T} - e^{d_t/T})` (all from the sums before rescaling; the
/// difference formed as `-expm1(-|d_s - d_t|/T) e^{max(d_s, d_t)/T}`, signed); `S`, `s_y`,
/// `t_y` unchanged. After it, the sums plane of every shard is summed (all-reduce SUM).
pub fn rescale_stats(temperature: f32, stats: &mut [f64], global_maxima: &[f64]) -> Result<()> {
    let rows = stats_rows(stats.len())?;
    if global_maxima.len() != rows * MAXIMA {
        return Err(Error::shape(
            "global maxima",
            global_maxima.len(),
            rows * MAXIMA,
            format!("{rows} rows x {MAXIMA} (the all-reduce MAX of the stats' maxima plane)"),
        ));
    }
    let inv_t = 1.0 / temperature as f64;
    let (maxima, sums) = stats.split_at_mut(rows * MAXIMA);
    for r in 0..rows {
        let m = &mut maxima[r * MAXIMA..(r + 1) * MAXIMA];
        let g = &global_maxima[r * MAXIMA..(r + 1) * MAXIMA];
        let z = &mut sums[r * SUMS..(r + 1) * SUMS];
        // The global maxima are the MAX over every shard's, so never below this shard's (a SUM
        // instead of a MAX, or another row's maxima, would overflow e^{d/T} silently).
        for k in 0..MAXIMA {
            if g[k] < m[k] || (g[k].is_nan() && !m[k].is_nan()) {
                return Err(Error::Input {
                    what: "global maxima",
                    row: r,
                    problem: format!(
                        "the global maximum {} is below (or NaN beside) this shard's {}: \
                         global_maxima must be the all-reduce MAX of every shard's maxima plane \
                         (stats[..rows * 2]), not a SUM",
                        g[k], m[k]
                    ),
                });
            }
        }
        if m[0] == f64::NEG_INFINITY && m[1] == f64::NEG_INFINITY {
            // DKD's shard that holds only the label's column: its rest is empty (sums 0).
            for c in [
                Sum::StudentT,
                Sum::Student1,
                Sum::TeacherT,
                Sum::Forward,
                Sum::Reverse,
                Sum::Difference,
            ] {
                z[c as usize] = 0.0;
            }
            m.copy_from_slice(g);
            continue;
        }
        let (ds, dt) = (m[0] - g[0], m[1] - g[1]);
        // A shard whose maximum is the global one keeps its sums bit for bit.
        let (es, et) = ((ds * inv_t).exp(), (dt * inv_t).exp());
        // e^{d_s/T} - e^{d_t/T} around the larger (both <= 0: no overflow, no cancellation).
        let gap = -(-(ds - dt).abs() * inv_t).exp_m1() * (ds.max(dt) * inv_t).exp();
        let between = if ds >= dt { gap } else { -gap };
        z[Sum::Difference as usize] =
            et * z[Sum::Difference as usize] + z[Sum::StudentT as usize] * between;
        z[Sum::Forward as usize] =
            et * (z[Sum::Forward as usize] + z[Sum::TeacherT as usize] * (dt - ds));
        z[Sum::Reverse as usize] =
            es * (z[Sum::Reverse as usize] + z[Sum::StudentT as usize] * (ds - dt));
        z[Sum::StudentT as usize] *= es;
        z[Sum::Student1 as usize] *= ds.exp();
        z[Sum::TeacherT as usize] *= et;
        m.copy_from_slice(g);
    }
    Ok(())
}

/// The rows of a stats buffer of `len` floats.
pub(crate) fn stats_rows(len: usize) -> Result<usize> {
    if len == 0 || !len.is_multiple_of(STATS) {
        return Err(Error::shape(
            "stats",
            len,
            (len / STATS).max(1) * STATS,
            format!("rows x {STATS}: the maxima plane [rows, {MAXIMA}] then the sums plane [rows, {SUMS}]"),
        ));
    }
    Ok(len / STATS)
}

/// The in-process all-reduce: every shard's stats (each `[rows * STATS]`, relative to its own
/// maxima, in shard order) combined into the global stats: the maxima plane's elementwise
/// maximum, then each shard's sums rescaled to it ([`rescale_stats`]) and summed in shard order.
pub fn combine_shard_stats(temperature: f32, shards: &[&[f64]]) -> Result<Vec<f64>> {
    let Some(first) = shards.first() else {
        return Err(Error::Empty(
            "combine_shard_stats needs at least one shard's stats".into(),
        ));
    };
    let rows = stats_rows(first.len())?;
    for s in shards {
        if s.len() != first.len() {
            return Err(Error::shape(
                "a shard's stats",
                s.len(),
                first.len(),
                "every shard's stats cover the same rows",
            ));
        }
    }
    let split = rows * MAXIMA;
    let mut global = first[..split].to_vec();
    for s in &shards[1..] {
        for (g, &m) in global.iter_mut().zip(&s[..split]) {
            *g = g.max(m);
        }
    }
    let mut out = vec![0.0; first.len()];
    out[..split].copy_from_slice(&global);
    for s in shards {
        let mut local = s.to_vec();
        rescale_stats(temperature, &mut local, &global)?;
        for (o, v) in out[split..].iter_mut().zip(&local[split..]) {
            *o += v;
        }
    }
    Ok(out)
}

/// [`combine_shard_stats`] on f32 stats (combined in f64, rounded once).
pub fn combine_shard_stats_f32(temperature: f32, shards: &[&[f32]]) -> Result<Vec<f32>> {
    let wide: Vec<Vec<f64>> = shards
        .iter()
        .map(|s| s.iter().map(|&v| v as f64).collect())
        .collect();
    let refs: Vec<&[f64]> = wide.iter().map(|v| v.as_slice()).collect();
    Ok(combine_shard_stats(temperature, &refs)?
        .into_iter()
        .map(|v| v as f32)
        .collect())
}

/// [`rescale_stats`] on f32 stats (computed in f64, rounded once).
pub fn rescale_stats_f32(temperature: f32, stats: &mut [f32], global_maxima: &[f32]) -> Result<()> {
    let mut wide: Vec<f64> = stats.iter().map(|&v| v as f64).collect();
    let g: Vec<f64> = global_maxima.iter().map(|&v| v as f64).collect();
    rescale_stats(temperature, &mut wide, &g)?;
    for (d, v) in stats.iter_mut().zip(wide) {
        *d = v as f32;
    }
    Ok(())
}

/// The phase a call runs, for [`check_call`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Phase 1: the shard's stats.
    Stats,
    /// The JSD round.
    JsdTerms,
    /// Phase 2: the shard's loss part and gradients.
    LossAndGrad,
}

/// [`check_call`] on host slices, then reverse KL's check that a given teacher has no
/// probability of exactly 0 ([`ShardedSpec::check_reverse_kl_support`]): every host backend runs
/// both, so that each accepts and refuses the same inputs.
pub fn check_host_call(
    spec: &ShardedSpec,
    phase: Phase,
    student: &[f32],
    teacher: Option<&[f32]>,
    labels: Option<&[i32]>,
    global: Option<&[f32]>,
    jsd: Option<&[f32]>,
) -> Result<()> {
    check_call(
        spec,
        phase,
        student.len(),
        teacher.map(<[f32]>::len),
        labels,
        global.map(<[f32]>::len),
        jsd.map(<[f32]>::len),
    )?;
    match teacher {
        Some(t) if phase != Phase::JsdTerms => spec.check_reverse_kl_support(t, labels),
        _ => Ok(()),
    }
}

/// Checks a sharded call's spec and inputs: the spec, the student's and teacher's lengths
/// (`[rows, width]`), the labels, the combined stats (`[rows * STATS]`, phases after 1) and the
/// JSD terms (`[rows * 2]`, phase 2 of JSD only).
pub fn check_call(
    spec: &ShardedSpec,
    phase: Phase,
    student: usize,
    teacher: Option<usize>,
    labels: Option<&[i32]>,
    global: Option<usize>,
    jsd: Option<usize>,
) -> Result<()> {
    spec.validate()?;
    spec.shard.check("student", student, spec.shard.width)?;
    spec.check_teacher(teacher)?;
    spec.check_labels(labels)?;
    if phase == Phase::JsdTerms && !spec.loss.needs_jsd_terms() {
        return Err(Error::Unsupported(
            "the JSD round is for the JSD divergence only; the other sharded losses go from the \
             combined stats straight to loss_and_grad"
                .into(),
        ));
    }
    if phase != Phase::Stats {
        match global {
            Some(n) => spec.shard.check("combined stats", n, STATS)?,
            None => {
                return Err(Error::Unsupported(
                    "this phase needs the combined stats of every shard (combine_shard_stats, or \
                     all-reduce MAX of the maxima then SUM of the rescaled sums)"
                        .into(),
                ))
            }
        }
    }
    if phase == Phase::LossAndGrad {
        match (jsd, spec.loss.needs_jsd_terms()) {
            (Some(n), true) => spec.shard.check("JSD terms", n, JSD_TERMS)?,
            (None, true) => {
                return Err(Error::Unsupported(
                    "JSD's phase 2 needs the JSD terms of every shard summed (jsd_terms, then an \
                     all-reduce SUM): its gradient holds the global KL(p || M) and KL(q || M)"
                        .into(),
                ))
            }
            (Some(_), false) => {
                return Err(Error::Unsupported(
                    "JSD terms were given to a loss that is not JSD: pass none".into(),
                ))
            }
            (None, false) => {}
        }
    }
    Ok(())
}
