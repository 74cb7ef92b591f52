//! Soft-target divergences (`docs/LOSSES.md` section 2): forward KL, reverse KL and JSD(beta),
//! the teacher given as logits, probabilities or log-probabilities, with the teacher's gradient
//! on request (online distillation). The math and the gradients are in `reference.rs`.
//!
//! | piece | file |
//! | --- | --- |
//! | spec and validation | here |
//! | f64 reference | `reference.rs` |
//! | fast CPU (f32) | `fast.rs` |
//! | WGSL and its dispatch | `divergence.wgsl`, `wgpu.rs` |
//! | CUDA and its launch | `divergence.cu`, `cuda.rs` |

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod wgpu;

use super::{
    check_grad_scale, check_temperature, check_unit, Divergence, Reduction, RowShape, TeacherInput,
    IGNORE_INDEX,
};
use crate::error::{Error, Result};

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

/// Reverse KL is `+inf` where the teacher gives a class probability 0 and the student does not:
/// without a floor (`teacher_eps` 0) such an input is an error, on the host API and the CPU
/// backends (device backends give the row a `+inf` loss and a NaN gradient).
/// Whether [`check_reverse_kl_support`] has anything to check for this spec (reverse KL, a given
/// teacher, no floor).
pub fn needs_support_check(spec: &DivergenceSpec) -> bool {
    spec.divergence == Divergence::ReverseKl
        && spec.teacher != TeacherInput::Logits
        && spec.teacher_eps == 0.0
}

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
