//! The host API of sparse top-k teachers (`docs/LOSSES.md` section 10): [`SparseKdLoss`].

use super::{check_host_labels, shape_of, LossAndGrad, T32};
use crate::backend::{Backend, GradOut, LossOut};
use crate::dtype::Element;
use crate::error::Result;
use crate::ops::{
    check_finite, Divergence, Reduction, RowShape, SparseSpec, SparseTail, SparseValues,
    IGNORE_INDEX,
};

/// Distillation from a sparse top-k teacher (`docs/LOSSES.md` section 10): per row `k` class
/// indices and `k` values (log-probabilities as a top-k cache stores them, or logits), the
/// student dense; `alpha CE(s, y) + (1 - alpha) T^2 D(Q || P)` with the divergence, the tail
/// (renormalize, bucket, uniform) and the temperature's treatment of section 10. The indices
/// (distinct classes) and the values are checked, with an error naming the row.
///
/// ```
/// use distillation::{CpuBackend, SparseKdLoss};
/// let loss = SparseKdLoss::new(2.0);
/// let s = vec![1.0, 2.0, 0.5, 0.0, -1.0, 3.0];
/// // Two rows of 3 classes, k = 2: the teacher's two largest log-probabilities per row.
/// let (idx, lq) = (vec![1, 0, 2, 0], vec![-0.4, -1.3, -0.2, -2.0]);
/// let out = loss.forward_backward(&CpuBackend::new(), &s, &idx, &lq, None, 3, 2).unwrap();
/// assert!(out.loss > 0.0 && out.grad_student.len() == 6);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseKdLoss {
    pub divergence: Divergence,
    /// What the values are (log-probabilities by default).
    pub values: SparseValues,
    /// How the mass outside the top-k is handled (renormalize by default).
    pub tail: SparseTail,
    pub temperature: f32,
    /// Weight of the hard-label cross-entropy (needs labels); 0 (the default) gives
    /// `T^2 D` alone.
    pub alpha: f32,
    /// Label smoothing of the hard-label term, in [0, 1).
    pub label_smoothing: f32,
    /// Rows whose label equals this are masked (PyTorch's -100 by default).
    pub ignore_index: i32,
    pub reduction: Reduction,
    /// Check the student's logits too (finite), with an error naming the first bad one.
    pub check_inputs: bool,
}

impl SparseKdLoss {
    /// Forward KL at `temperature` against log-probabilities, renormalised over the top-k.
    pub fn new(temperature: f32) -> Self {
        SparseKdLoss {
            divergence: Divergence::ForwardKl,
            values: SparseValues::LogProbs,
            tail: SparseTail::Renormalize,
            temperature,
            alpha: 0.0,
            label_smoothing: 0.0,
            ignore_index: IGNORE_INDEX,
            reduction: Reduction::BatchMean,
            check_inputs: false,
        }
    }

    /// The kernel spec this loss runs.
    pub fn spec(&self, shape: RowShape, k: usize) -> SparseSpec {
        SparseSpec {
            divergence: self.divergence,
            values: self.values,
            tail: self.tail,
            alpha: self.alpha,
            label_smoothing: self.label_smoothing,
            reduction: self.reduction,
            ignore_index: self.ignore_index,
            ..SparseSpec::new(shape, k, self.temperature)
        }
    }

    /// Loss and the student's gradient for a `[N, classes]` student, `[N, k]` indices and values
    /// (f32, bf16 or f16 each) and `N` labels (required when `alpha > 0`); the gradient in the
    /// student's type.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward<B: Backend, S: Element, V: Element>(
        &self,
        backend: &B,
        student: &[S],
        indices: &[i32],
        values: &[V],
        labels: Option<&[i32]>,
        classes: usize,
        k: usize,
    ) -> Result<LossAndGrad<S>> {
        self.forward_backward_as(backend, student, indices, values, labels, classes, k)
    }

    /// [`SparseKdLoss::forward_backward`] with the gradient in f32 whatever the inputs' types.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_f32<B: Backend, S: Element, V: Element>(
        &self,
        backend: &B,
        student: &[S],
        indices: &[i32],
        values: &[V],
        labels: Option<&[i32]>,
        classes: usize,
        k: usize,
    ) -> Result<LossAndGrad<f32>> {
        self.forward_backward_as(backend, student, indices, values, labels, classes, k)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_backward_as<B: Backend, S: Element, V: Element, GS: Element>(
        &self,
        backend: &B,
        student: &[S],
        indices: &[i32],
        values: &[V],
        labels: Option<&[i32]>,
        classes: usize,
        k: usize,
    ) -> Result<LossAndGrad<GS>> {
        let shape = shape_of(student.len(), classes)?;
        let spec = self.spec(shape, k);
        spec.validate()?;
        if let Some(l) = labels {
            check_host_labels(l, shape, self.ignore_index)?;
        }
        crate::ops::sparse::check_sparse_teacher(&spec, indices, &T32::of(values), labels)?;
        if self.check_inputs {
            check_finite("student", &T32::of(student))?;
        }
        let s = backend.upload_host(S::host(student))?;
        let idx = backend.upload_labels(indices)?;
        let v = backend.upload_host(V::host(values))?;
        let l = labels.map(|l| backend.upload_labels(l)).transpose()?;
        let loss = backend.filled(1, f32::NAN)?;
        let rows = backend.filled(shape.rows, f32::NAN)?;
        let grad = backend.filled_as(GS::DTYPE, shape.len(), f32::NAN)?;
        backend.sparse_kd(
            &spec,
            &s,
            &idx,
            &v,
            l.as_ref(),
            LossOut {
                loss: &loss,
                row_loss: Some(&rows),
                grad_student: GradOut::Into(&grad),
                grad_teacher: None,
            },
        )?;
        Ok(LossAndGrad {
            loss: backend.download(&loss)?[0],
            row_loss: backend.download(&rows)?,
            grad_student: GS::from_host(backend.download_host(&grad)?),
            grad_teacher: None,
        })
    }
}
