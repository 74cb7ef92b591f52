//! The op families of `docs/LOSSES.md`: what each op computes (its spec type, validated here once for
//! every backend) and its CPU reference (`reference` functions, f64, written to be read).
//!
//! | family | spec section | CPU reference | WGSL | CUDA |
//! | --- | --- | --- | --- | --- |
//! | temperature softmax / log-softmax | 1 | [`softmax`] | `shaders/softmax.wgsl` | `kernels/softmax.cu` |
//! | forward KL, reverse KL, JSD | 2 | [`divergence`] | `shaders/divergence.wgsl` | `kernels/divergence.cu` |
//! | cross-entropy | 3 | [`cross_entropy`] | `shaders/cross_entropy.wgsl` | `kernels/cross_entropy.cu` |
//! | fused Hinton loss | 4 | [`hinton`] | `shaders/hinton.wgsl` | `kernels/hinton.cu` |
//! | feature MSE | 5 | [`feature`] | `shaders/mse.wgsl` | `kernels/feature.cu` |
//! | attention transfer | 6 | [`feature`] | `shaders/attention.wgsl` | `kernels/feature.cu` |
//! | row-loss count and reduction | 2-4 | (inline) | `shaders/reduce.wgsl` | `kernels/reduce.cu` |

pub mod conv;
pub mod cross_entropy;
pub mod dense;
pub mod divergence;
pub mod feature;
pub mod hinton;
pub mod optim;
pub mod relational;
pub mod softmax;

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

impl RowShape {
    pub fn new(rows: usize, cols: usize) -> Self {
        RowShape { rows, cols }
    }

    /// `rows * cols`.
    pub fn len(&self) -> usize {
        self.rows * self.cols
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
    if !g.is_finite() {
        return Err(Error::Param {
            name: "grad_scale",
            value: g as f64,
            hint:
                "the upstream gradient must be finite (use 1.0 for the gradient of the loss itself)",
        });
    }
    Ok(())
}

fn check_unit(
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

/// Reverse KL is `+inf` where the teacher gives a class probability 0 and the student does not:
/// without a floor (`teacher_eps` 0) such an input is an error, on the host API and the CPU
/// backends (device backends give the row a `+inf` loss and a NaN gradient).
pub fn check_reverse_kl_support(
    spec: &DivergenceSpec,
    teacher: &[f32],
    labels: Option<&[i32]>,
) -> Result<()> {
    if spec.divergence != Divergence::ReverseKl
        || spec.teacher == TeacherInput::Logits
        || spec.teacher_eps > 0.0
    {
        return Ok(());
    }
    let zero = |v: f32| match spec.teacher {
        TeacherInput::Probs => v == 0.0,
        _ => v == f32::NEG_INFINITY,
    };
    for (row, t) in teacher.chunks_exact(spec.shape.cols).enumerate() {
        if labels.is_some_and(|l| l.get(row) == Some(&spec.ignore_index)) {
            continue;
        }
        if let Some(j) = t.iter().position(|&v| zero(v)) {
            return Err(Error::Input {
                what: "reverse KL teacher",
                row,
                problem: format!(
                    "the teacher gives class {j} probability 0, where reverse KL \
                     sum p (log p - log q) is +inf: set a floor (DivergenceSpec::teacher_eps, \
                     SoftTargetLoss::teacher_eps or the C ABI's teacher_eps argument, e.g. 1e-8), \
                     or use forward KL or JSD, which are finite there"
                ),
            });
        }
    }
    Ok(())
}

/// Temperature softmax or log-softmax over rows (section 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftmaxSpec {
    pub shape: RowShape,
    pub temperature: f32,
    /// `log_softmax` instead of `softmax`.
    pub log: bool,
}

impl SoftmaxSpec {
    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
        check_temperature(self.temperature)
    }
}

/// A soft-target divergence (section 2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DivergenceSpec {
    pub shape: RowShape,
    pub divergence: Divergence,
    pub teacher: TeacherInput,
    pub temperature: f32,
    pub reduction: Reduction,
    pub ignore_index: i32,
    /// Upstream gradient `g` multiplied into every gradient (1 for the loss's own gradient).
    pub grad_scale: f32,
    /// Reverse KL with a given teacher (probabilities or log-probabilities) only: a floor on the
    /// teacher's probabilities inside the log, `log max(q_j, eps)`, so that a class the teacher
    /// gives probability 0 (one-hot or top-k targets) costs `p_j (log p_j - log eps)` instead of
    /// making the divergence `+inf` (as Liger's `eps`). 0 (the default) is no floor: an exact zero
    /// then gives `+inf`, which the host API and the CPU backends report as an `Err`
    /// (`docs/LOSSES.md`, section 2).
    pub teacher_eps: f32,
}

impl DivergenceSpec {
    /// Forward KL at temperature `t` over `[rows, cols]` logits, batchmean, upstream gradient 1.
    pub fn new(shape: RowShape, temperature: f32) -> Self {
        DivergenceSpec {
            shape,
            divergence: Divergence::ForwardKl,
            teacher: TeacherInput::Logits,
            temperature,
            reduction: Reduction::BatchMean,
            ignore_index: IGNORE_INDEX,
            grad_scale: 1.0,
            teacher_eps: 0.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
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
        if self.teacher_eps != 0.0 {
            if !(self.teacher_eps.is_finite() && self.teacher_eps > 0.0 && self.teacher_eps < 1.0) {
                return Err(Error::Param {
                    name: "teacher_eps",
                    value: self.teacher_eps as f64,
                    hint: "the teacher's probability floor must be 0 (none) or in (0, 1); 1e-8 is \
                           a common choice",
                });
            }
            if self.divergence != Divergence::ReverseKl || self.teacher == TeacherInput::Logits {
                return Err(Error::Unsupported(
                    "teacher_eps applies to reverse KL with the teacher given as probabilities or \
                     log-probabilities (where a probability can be exactly 0); forward KL and JSD \
                     are finite there and a softmax of logits is never 0: set teacher_eps to 0"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}

/// Cross-entropy with hard labels (section 3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropySpec {
    pub shape: RowShape,
    pub label_smoothing: f32,
    pub reduction: Reduction,
    pub ignore_index: i32,
    pub grad_scale: f32,
}

impl CrossEntropySpec {
    pub fn new(shape: RowShape) -> Self {
        CrossEntropySpec {
            shape,
            label_smoothing: 0.0,
            reduction: Reduction::BatchMean,
            ignore_index: IGNORE_INDEX,
            grad_scale: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
        check_grad_scale(self.grad_scale)?;
        check_unit(
            "label_smoothing",
            self.label_smoothing,
            false,
            true,
            "label smoothing must be in [0, 1) (0 disables it; 0.1 is common)",
        )
    }
}

/// The fused Hinton loss `alpha*CE + (1-alpha)*T^2*KL` (section 4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HintonSpec {
    pub shape: RowShape,
    pub temperature: f32,
    pub alpha: f32,
    pub label_smoothing: f32,
    pub reduction: Reduction,
    pub ignore_index: i32,
    pub grad_scale: f32,
}

impl HintonSpec {
    pub fn new(shape: RowShape, temperature: f32, alpha: f32) -> Self {
        HintonSpec {
            shape,
            temperature,
            alpha,
            label_smoothing: 0.0,
            reduction: Reduction::BatchMean,
            ignore_index: IGNORE_INDEX,
            grad_scale: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
        check_temperature(self.temperature)?;
        check_grad_scale(self.grad_scale)?;
        check_unit(
            "alpha",
            self.alpha,
            false,
            false,
            "alpha weighs hard-label CE against the soft-target KL and must be in [0, 1]",
        )?;
        check_unit(
            "label_smoothing",
            self.label_smoothing,
            false,
            true,
            "label smoothing must be in [0, 1) (0 disables it)",
        )
    }
}

/// Feature-map MSE over `len` elements (section 5).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MseSpec {
    pub len: usize,
    pub grad_scale: f32,
}

impl MseSpec {
    pub fn new(len: usize) -> Self {
        MseSpec {
            len,
            grad_scale: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.len == 0 {
            return Err(Error::Empty(
                "MSE over 0 elements: pass at least one element".into(),
            ));
        }
        if self.len > u32::MAX as usize {
            return Err(Error::Limit("MSE over more than 2^32 elements".into()));
        }
        check_grad_scale(self.grad_scale)
    }
}

/// Attention transfer between `[n, student_channels, hw]` and `[n, teacher_channels, hw]` feature
/// maps (section 6; `hw = H*W`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSpec {
    pub n: usize,
    pub student_channels: usize,
    pub teacher_channels: usize,
    pub hw: usize,
    pub grad_scale: f32,
}

impl AttentionSpec {
    pub fn new(n: usize, student_channels: usize, teacher_channels: usize, hw: usize) -> Self {
        AttentionSpec {
            n,
            student_channels,
            teacher_channels,
            hw,
            grad_scale: 1.0,
        }
    }

    pub fn student_len(&self) -> usize {
        self.n * self.student_channels * self.hw
    }

    pub fn teacher_len(&self) -> usize {
        self.n * self.teacher_channels * self.hw
    }

    pub fn validate(&self) -> Result<()> {
        if self.n == 0 || self.student_channels == 0 || self.teacher_channels == 0 || self.hw == 0 {
            return Err(Error::Empty(format!(
                "attention transfer needs n, channels and H*W all >= 1, got n={}, student channels={}, \
                 teacher channels={}, H*W={}",
                self.n, self.student_channels, self.teacher_channels, self.hw
            )));
        }
        if self.student_len().max(self.teacher_len()) > u32::MAX as usize {
            return Err(Error::Limit(
                "attention transfer over more than 2^32 elements".into(),
            ));
        }
        check_grad_scale(self.grad_scale)
    }
}
