//! The op families of `docs/LOSSES.md`, one folder each (after dfdx's `tensor_ops/<op>/`): the
//! spec type (validated once, for every backend), the f64 CPU reference every other result is
//! checked against, the fast CPU kernel, the WGSL shader and the CUDA kernel side by side with
//! their dispatch code. A backend's method for an op is one line calling into the op's folder.
//!
//! | family | section | folder | WGSL | CUDA |
//! | --- | --- | --- | --- | --- |
//! | temperature softmax / log-softmax | 1 | [`softmax`] | `softmax.wgsl` | `softmax.cu` |
//! | forward KL, reverse KL, JSD | 2 | [`divergence`] | `divergence.wgsl` | `divergence.cu` |
//! | cross-entropy | 3 | [`cross_entropy`] | `cross_entropy.wgsl` | `cross_entropy.cu` |
//! | fused Hinton loss | 4 | [`hinton`] | `hinton.wgsl` | `hinton.cu` |
//! | decoupled KD (DKD) | 8 | [`dkd`] | `dkd.wgsl` | `dkd.cu` |
//! | vocab-sharded row losses (two phases) | 9 | [`sharded`] | `sharded.wgsl` | `sharded.cu` |
//! | sparse top-k teachers | 10 | [`sparse`] | `sparse.wgsl` | `sparse.cu` |
//! | feature MSE, smooth L1, attention transfer | 5, 6 | [`feature`] | `mse.wgsl`, `attention.wgsl` | `feature.cu` |
//! | relational primitives (SP, RKD) | 7 | [`relational`] | `relational.wgsl` | `relational.cu` |
//! | matmul, bias, ReLU, axpy, strided copy between dtypes | | [`dense`] | `dense.wgsl`, `copy.wgsl` | `dense.cu` |
//! | fused linear + loss, chunked over rows (a loop over the `Backend`) | 11 | [`fused_linear`] | | |
//! | Adam, SGD | | [`optim`] | `optim.wgsl` | `optim.cu` |
//! | im2col, col2im, pooling, transpose | | [`conv`] | `conv.wgsl` | `conv.cu` |
//!
//! The row losses' valid-row count and fixed-order reduction are the backends' runtime
//! (`backend/wgpu/reduce.wgsl`, `backend/cuda/reduce.cu`).

pub mod conv;
pub mod cross_entropy;
pub mod dense;
pub mod divergence;
pub mod dkd;
pub mod feature;
pub mod fused_linear;
pub mod hinton;
pub mod optim;
pub mod relational;
pub mod sharded;
pub mod softmax;
pub mod sparse;

pub use cross_entropy::CrossEntropySpec;
pub use divergence::{check_reverse_kl_support, DivergenceSpec};
pub use dkd::DkdSpec;
pub use feature::{AttentionSpec, MseSpec};
pub use fused_linear::{FusedGrads, FusedLinearKd, Linear, Teacher, Weighting};
pub use hinton::HintonSpec;
pub use sharded::{Shard, ShardedLoss, ShardedSpec};
pub use softmax::SoftmaxSpec;
pub use sparse::{SparseSpec, SparseTail, SparseValues};

use crate::error::{Error, Result};

/// PyTorch's default `ignore_index`.
pub const IGNORE_INDEX: i32 = -100;

/// The smallest and largest temperature the crate accepts (`docs/LOSSES.md`, numerics).
pub const MIN_TEMPERATURE: f32 = 1e-3;
/// See [`MIN_TEMPERATURE`].
pub const MAX_TEMPERATURE: f32 = 1e4;

/// How per-row losses become the scalar loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reduction {
    /// Sum over valid rows divided by the number of valid rows (`N_valid`); 0 when none is valid.
    #[default]
    BatchMean,
    /// Sum over valid rows.
    Sum,
    /// No reduction: the per-row vector is the result (masked rows 0). The scalar output holds the
    /// sum, and gradients are those of the sum (an upstream gradient of `grad_scale` on every row).
    None,
}

impl Reduction {
    pub(crate) fn code(self) -> u32 {
        match self {
            Reduction::BatchMean => 0,
            Reduction::Sum => 1,
            Reduction::None => 2,
        }
    }
}

/// How the teacher is given to a divergence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TeacherInput {
    /// Raw logits; the teacher's soft targets are `softmax(t / T)`.
    #[default]
    Logits,
    /// Probabilities (each row sums to 1); the temperature applies to the student only.
    Probs,
    /// Log-probabilities; the temperature applies to the student only.
    LogProbs,
}

impl TeacherInput {
    pub(crate) fn code(self) -> u32 {
        match self {
            TeacherInput::Logits => 0,
            TeacherInput::Probs => 1,
            TeacherInput::LogProbs => 2,
        }
    }
}

/// Which soft-target divergence (`docs/LOSSES.md` section 2).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Divergence {
    /// `KL(q || p)`, Hinton's soft-target loss.
    #[default]
    ForwardKl,
    /// `KL(p || q)`.
    ReverseKl,
    /// Generalized Jensen-Shannon with `beta` in (0, 1), `M = beta*q + (1-beta)*p`.
    Jsd { beta: f32 },
}

impl Divergence {
    pub(crate) fn code(self) -> u32 {
        match self {
            Divergence::ForwardKl => 0,
            Divergence::ReverseKl => 1,
            Divergence::Jsd { .. } => 2,
        }
    }

    pub(crate) fn beta(self) -> f32 {
        match self {
            Divergence::Jsd { beta } => beta,
            _ => 0.0,
        }
    }
}

/// `rows` examples of `cols` classes, row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowShape {
    pub rows: usize,
    pub cols: usize,
}

/// The product of `factors` when it is at most `u32::MAX`, the kernels' index range (`None` past
/// it or on overflow): the one size check before a kernel indexes a buffer.
pub(crate) fn index_len(factors: &[usize]) -> Option<usize> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .filter(|&p| p <= u32::MAX as usize)
}

impl RowShape {
    pub fn new(rows: usize, cols: usize) -> Self {
        RowShape { rows, cols }
    }

    /// `rows * cols` (saturating: [`RowShape::validate`] refuses a shape past 2^32).
    pub fn len(&self) -> usize {
        self.rows.saturating_mul(self.cols)
    }

    /// True when there is no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.rows == 0 || self.cols == 0 {
            return Err(Error::Empty(format!(
                "empty shape [{}, {}]: rows and classes must both be at least 1",
                self.rows, self.cols
            )));
        }
        if self.rows.checked_mul(self.cols).is_none() || self.rows * self.cols > u32::MAX as usize {
            return Err(Error::Limit(format!(
                "[{}, {}] has more than 2^32 elements; split the batch",
                self.rows, self.cols
            )));
        }
        Ok(())
    }

    pub(crate) fn check_len(&self, what: &'static str, got: usize) -> Result<()> {
        if got != self.len() {
            return Err(Error::shape(
                what,
                got,
                self.len(),
                format!(
                    "{} x {} row-major",
                    count(self.rows, "row", "rows"),
                    count(self.cols, "class", "classes")
                ),
            ));
        }
        Ok(())
    }
}

/// `1 row`, `2 rows`.
pub(crate) fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub(crate) fn check_temperature(t: f32) -> Result<()> {
    if !(t.is_finite() && (MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&t)) {
        return Err(Error::Param {
            name: "temperature",
            value: t as f64,
            hint:
                "the temperature must be finite and in [1e-3, 1e4] (T > 0; typical KD uses 1..20)",
        });
    }
    Ok(())
}

pub(crate) fn check_grad_scale(g: f32) -> Result<()> {
    // (bounded so that the kernels' factors `grad_scale * T` (T <= 1e4) and `grad_scale * T^2`
    // stay finite in f32: an infinite factor times a zero gap is NaN where the gradient is 0)
    if !(g.is_finite() && g.abs() <= MAX_GRAD_SCALE) {
        return Err(Error::Param {
            name: "grad_scale",
            value: g as f64,
            hint: "the upstream gradient must be finite and at most 1e29 in magnitude (use 1.0 \
                   for the gradient of the loss itself)",
        });
    }
    Ok(())
}

/// The largest `|grad_scale|` a spec takes.
pub(crate) const MAX_GRAD_SCALE: f32 = 1e29;

pub(crate) fn check_unit(
    name: &'static str,
    v: f32,
    open_low: bool,
    open_high: bool,
    hint: &'static str,
) -> Result<()> {
    let ok = v.is_finite()
        && (if open_low { v > 0.0 } else { v >= 0.0 })
        && (if open_high { v < 1.0 } else { v <= 1.0 });
    if !ok {
        return Err(Error::Param {
            name,
            value: v as f64,
            hint,
        });
    }
    Ok(())
}

/// Checks every label is in `0..classes` or equals `ignore_index`.
pub fn check_labels(labels: &[i32], classes: usize, ignore_index: i32) -> Result<()> {
    for (row, &y) in labels.iter().enumerate() {
        if y != ignore_index && (y < 0 || y as i64 >= classes as i64) {
            return Err(Error::Label {
                row,
                label: y as i64,
                classes,
                ignore_index,
            });
        }
    }
    Ok(())
}

/// Returns an error naming the first NaN or infinity in `data` (logits must be finite; the
/// optional input check).
pub fn check_finite(what: &'static str, data: &[f32]) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(Error::NonFinite {
            what,
            index,
            value: data[index],
            hint: "logits must be finite",
        }),
        None => Ok(()),
    }
}

/// How far a row of teacher probabilities may sum from 1 (and log-probabilities' logsumexp from
/// 0, and a log-probability rise above 0) in [`check_teacher`]: `1e-3`, about what an f32 or
/// bf16 softmax of a 256k-class row can be off by after rounding each probability.
pub const TEACHER_SUM_TOLERANCE: f64 = 1e-3;

/// The optional check of a teacher's values for its form, over the rows that are not masked
/// (`labels` equal to `ignore_index`; all rows when `labels` is `None`), with an error naming the
/// row and element:
/// - logits: finite;
/// - probabilities: finite, `>= 0`, each row summing to 1 within [`TEACHER_SUM_TOLERANCE`];
/// - log-probabilities: not NaN, not `+inf`, `<= TEACHER_SUM_TOLERANCE` (`-inf` is a probability
///   of 0 and allowed), each row's logsumexp 0 within the tolerance.
pub fn check_teacher(
    form: TeacherInput,
    teacher: &[f32],
    shape: RowShape,
    labels: Option<&[i32]>,
    ignore_index: i32,
) -> Result<()> {
    if form == TeacherInput::Logits {
        return check_finite("teacher", teacher);
    }
    let c = shape.cols;
    for (row, t) in teacher.chunks_exact(c).enumerate() {
        if labels.is_some_and(|l| l.get(row) == Some(&ignore_index)) {
            continue;
        }
        let bad = |j: usize, why: &str| Error::Input {
            what: if form == TeacherInput::Probs {
                "teacher probabilities"
            } else {
                "teacher log-probabilities"
            },
            row,
            problem: format!("element {j} = {} {why}", t[j]),
        };
        let sum: f64 = match form {
            TeacherInput::Probs => {
                if let Some(j) = t.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
                    return Err(bad(j, "is not a probability (finite and >= 0)"));
                }
                t.iter().map(|&v| v as f64).sum()
            }
            _ => {
                if let Some(j) = t.iter().position(|v| v.is_nan() || *v == f32::INFINITY) {
                    return Err(bad(j, "is not a log-probability (NaN or +inf)"));
                }
                if let Some(j) = t.iter().position(|&v| v as f64 > TEACHER_SUM_TOLERANCE) {
                    return Err(bad(j, "is above 0, so it is not a log-probability"));
                }
                t.iter().map(|&v| (v as f64).exp()).sum()
            }
        };
        let off = (sum - 1.0).abs();
        if off.is_nan() || off > TEACHER_SUM_TOLERANCE {
            return Err(Error::Input {
                what: if form == TeacherInput::Probs {
                    "teacher probabilities"
                } else {
                    "teacher log-probabilities"
                },
                row,
                problem: format!(
                    "the row's probabilities sum to {sum}, not 1 (within {TEACHER_SUM_TOLERANCE}): \
                     normalise each row (softmax / log_softmax), or pass logits with \
                     TeacherInput::Logits"
                ),
            });
        }
    }
    Ok(())
}

// ---- what the row losses share (sections 2-4) ----

/// What a row loss's CPU reference returns (f64).
#[derive(Clone, Debug, Default)]
pub struct RowLossResult {
    /// The reduced loss.
    pub loss: f64,
    /// Each row's loss (masked rows 0).
    pub row_loss: Vec<f64>,
    /// `dL/ds` times `grad_scale`.
    pub grad_student: Vec<f64>,
    /// `dL/dt` times `grad_scale` (empty where the op has none).
    pub grad_teacher: Vec<f64>,
}

/// The valid-row count and the factor that turns a row sum into the reduced loss.
pub(crate) fn reduction_factor(reduction: Reduction, valid: usize) -> f64 {
    match reduction {
        Reduction::BatchMean if valid == 0 => 0.0,
        Reduction::BatchMean => 1.0 / valid as f64,
        Reduction::Sum | Reduction::None => 1.0,
    }
}

/// Whether row `r` is masked by `ignore_index`.
pub(crate) fn masked(labels: Option<&[i32]>, r: usize, ignore_index: i32) -> bool {
    labels.is_some_and(|l| l[r] == ignore_index)
}
