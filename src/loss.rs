//! The loss values a trainer uses on host data: build one, call `forward_backward`, get the loss and
//! the gradient. Each runs on any [`Backend`]; the kernels underneath are the backend's.
//!
//! For device-resident data, call the backend's kernel methods on its own buffers instead
//! ([`Backend::hinton`], [`Backend::divergence`], ...).

use crate::backend::{Backend, GradOut, LossOut};
use crate::dtype::{Element, HostSlice};
use crate::error::{Error, Result};
use crate::ops::{
    check_finite, check_labels, check_reverse_kl_support, check_teacher, CrossEntropySpec,
    Divergence, DivergenceSpec, DkdSpec, HintonSpec, Reduction, RowShape, TeacherInput,
    IGNORE_INDEX,
};

mod sparse;
pub use sparse::SparseKdLoss;

/// A loss, its per-row values and its gradients, on the host. The gradients are in the inputs'
/// element types (`S` the student's, `T` the teacher's: f32, bf16 or f16, rounded once to nearest
/// even), or f32 from the `*_f32` methods; the losses are f32.
#[derive(Clone, Debug, PartialEq)]
pub struct LossAndGrad<S = f32, T = S> {
    /// The reduced loss.
    pub loss: f32,
    /// Each row's loss (masked rows 0).
    pub row_loss: Vec<f32>,
    /// `dL/d student logits`, `[N, C]`.
    pub grad_student: Vec<S>,
    /// `dL/d teacher logits`, `[N, C]`, when asked for.
    pub grad_teacher: Option<Vec<T>>,
}

/// The Hinton distillation loss `alpha*CE(s, y) + (1-alpha)*T^2*KL(softmax(t/T) || softmax(s/T))`
/// (`docs/LOSSES.md` section 4), fused in one kernel.
///
/// ```
/// use distillation::{CpuBackend, KdLoss};
/// let kd = KdLoss::new(4.0, 0.2);
/// let (s, t) = (vec![1.0, 2.0, 0.5, 0.0, -1.0, 3.0], vec![0.5, 2.5, 0.0, 1.0, -2.0, 2.0]);
/// let out = kd.forward_backward(&CpuBackend::new(), &s, &t, &[1, 2], 3).unwrap();
/// assert!(out.loss > 0.0 && out.grad_student.len() == 6);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KdLoss {
    /// Temperature T of the soft targets.
    pub temperature: f32,
    /// Weight of the hard-label cross-entropy; `1 - alpha` weighs the soft-target term.
    pub alpha: f32,
    /// Label smoothing of the hard-label term, in [0, 1).
    pub label_smoothing: f32,
    /// Rows whose label equals this are masked (PyTorch's -100 by default).
    pub ignore_index: i32,
    pub reduction: Reduction,
    /// Also return the teacher's gradient (online / mutual distillation).
    pub teacher_grad: bool,
    /// Check the inputs first (logits finite) and return an error naming the first bad one.
    pub check_inputs: bool,
}

impl KdLoss {
    pub fn new(temperature: f32, alpha: f32) -> Self {
        KdLoss {
            temperature,
            alpha,
            label_smoothing: 0.0,
            ignore_index: IGNORE_INDEX,
            reduction: Reduction::BatchMean,
            teacher_grad: false,
            check_inputs: false,
        }
    }

    /// The kernel spec this loss runs.
    pub fn spec(&self, shape: RowShape) -> HintonSpec {
        HintonSpec {
            shape,
            temperature: self.temperature,
            alpha: self.alpha,
            label_smoothing: self.label_smoothing,
            reduction: self.reduction,
            ignore_index: self.ignore_index,
            grad_scale: 1.0,
        }
    }

    /// Loss and gradients for `[N, classes]` student and teacher logits and `N` labels, each of
    /// f32, bf16 or f16 (mixed allowed); the gradients in the inputs' types.
    pub fn forward_backward<B: Backend, S: Element, T: Element>(
        &self,
        backend: &B,
        student: &[S],
        teacher: &[T],
        labels: &[i32],
        classes: usize,
    ) -> Result<LossAndGrad<S, T>> {
        self.forward_backward_as(backend, student, teacher, labels, classes)
    }

    /// [`KdLoss::forward_backward`] with the gradients in f32 whatever the inputs' types.
    pub fn forward_backward_f32<B: Backend, S: Element, T: Element>(
        &self,
        backend: &B,
        student: &[S],
        teacher: &[T],
        labels: &[i32],
        classes: usize,
    ) -> Result<LossAndGrad<f32, f32>> {
        self.forward_backward_as(backend, student, teacher, labels, classes)
    }

    fn forward_backward_as<B: Backend, S: Element, T: Element, GS: Element, GT: Element>(
        &self,
        backend: &B,
        student: &[S],
        teacher: &[T],
        labels: &[i32],
        classes: usize,
    ) -> Result<LossAndGrad<GS, GT>> {
        let shape = shape_of(student.len(), classes)?;
        let spec = self.spec(shape);
        spec.validate()?;
        shape.check_len("teacher", teacher.len())?;
        check_host_labels(labels, shape, self.ignore_index)?;
        if self.check_inputs {
            check_finite("student", &T32::of(student))?;
            check_finite("teacher", &T32::of(teacher))?;
        }
        run(
            backend,
            S::host(student),
            Some(T::host(teacher)),
            Some(labels),
            shape,
            self.teacher_grad,
            |b, s, t, l, out| b.hinton(&spec, s, t.expect("teacher"), l.expect("labels"), out),
        )
    }
}

/// Decoupled knowledge distillation (Zhao et al. 2022; `docs/LOSSES.md` section 8):
/// `ce_weight CE(s, y) + T^2 (alpha TCKD + beta NCKD)`, fused in one kernel. The teacher is
/// detached (DKD gives it no gradient); every row needs a label and at least 2 classes.
///
/// ```
/// use distillation::{CpuBackend, DkdLoss};
/// let dkd = DkdLoss::new(4.0, 1.0, 8.0);
/// let (s, t) = (vec![1.0, 2.0, 0.5, 0.0, -1.0, 3.0], vec![0.5, 2.5, 0.0, 1.0, -2.0, 2.0]);
/// let out = dkd.forward_backward(&CpuBackend::new(), &s, &t, &[1, 2], 3).unwrap();
/// assert!(out.loss > 0.0 && out.grad_student.len() == 6);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DkdLoss {
    /// Temperature T of both binary and non-target distributions.
    pub temperature: f32,
    /// The weight of TCKD (the paper's alpha, times a warm-up factor if the trainer has one).
    pub alpha: f32,
    /// The weight of NCKD (the paper's beta, 8 on CIFAR-100).
    pub beta: f32,
    /// The weight of the hard-label cross-entropy (1 in the paper).
    pub ce_weight: f32,
    /// Label smoothing of the cross-entropy term, in [0, 1).
    pub label_smoothing: f32,
    /// Rows whose label equals this are masked (PyTorch's -100 by default).
    pub ignore_index: i32,
    pub reduction: Reduction,
    /// Check the inputs first (logits finite) and return an error naming the first bad one.
    pub check_inputs: bool,
}

impl DkdLoss {
    pub fn new(temperature: f32, alpha: f32, beta: f32) -> Self {
        DkdLoss {
            temperature,
            alpha,
            beta,
            ce_weight: 1.0,
            label_smoothing: 0.0,
            ignore_index: IGNORE_INDEX,
            reduction: Reduction::BatchMean,
            check_inputs: false,
        }
    }

    /// The kernel spec this loss runs.
    pub fn spec(&self, shape: RowShape) -> DkdSpec {
        DkdSpec {
            ce_weight: self.ce_weight,
            label_smoothing: self.label_smoothing,
            reduction: self.reduction,
            ignore_index: self.ignore_index,
            ..DkdSpec::new(shape, self.temperature, self.alpha, self.beta)
        }
    }

    /// Loss and the student's gradient for `[N, classes]` student and teacher logits and `N`
    /// labels, each of f32, bf16 or f16 (mixed allowed); the gradient in the student's type.
    pub fn forward_backward<B: Backend, S: Element, T: Element>(
        &self,
        backend: &B,
        student: &[S],
        teacher: &[T],
        labels: &[i32],
        classes: usize,
    ) -> Result<LossAndGrad<S, T>> {
        self.forward_backward_as(backend, student, teacher, labels, classes)
    }

    /// [`DkdLoss::forward_backward`] with the gradient in f32 whatever the inputs' types.
    pub fn forward_backward_f32<B: Backend, S: Element, T: Element>(
        &self,
        backend: &B,
        student: &[S],
        teacher: &[T],
        labels: &[i32],
        classes: usize,
    ) -> Result<LossAndGrad<f32, f32>> {
        self.forward_backward_as(backend, student, teacher, labels, classes)
    }

    fn forward_backward_as<B: Backend, S: Element, T: Element, GS: Element, GT: Element>(
        &self,
        backend: &B,
        student: &[S],
        teacher: &[T],
        labels: &[i32],
        classes: usize,
    ) -> Result<LossAndGrad<GS, GT>> {
        let shape = shape_of(student.len(), classes)?;
        let spec = self.spec(shape);
        spec.validate()?;
        shape.check_len("teacher", teacher.len())?;
        check_host_labels(labels, shape, self.ignore_index)?;
        if self.check_inputs {
            check_finite("student", &T32::of(student))?;
            check_finite("teacher", &T32::of(teacher))?;
        }
        run(
            backend,
            S::host(student),
            Some(T::host(teacher)),
            Some(labels),
            shape,
            false,
            |b, s, t, l, out| b.dkd(&spec, s, t.expect("teacher"), l.expect("labels"), out),
        )
    }
}

/// A soft-target divergence alone (forward KL, reverse KL or JSD) between student logits and a
/// teacher given as logits, probabilities or log-probabilities (`docs/LOSSES.md` section 2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftTargetLoss {
    pub divergence: Divergence,
    pub teacher: TeacherInput,
    pub temperature: f32,
    pub reduction: Reduction,
    pub ignore_index: i32,
    pub teacher_grad: bool,
    /// Reverse KL with teacher probabilities or log-probabilities: a floor on the teacher's
    /// probabilities inside the log (see [`DivergenceSpec::teacher_eps`]); 0 is none, and then a
    /// teacher probability of exactly 0 is an error.
    pub teacher_eps: f32,
    /// Check the inputs first and return an error naming the first bad row or element: student
    /// logits finite; the teacher as [`check_teacher`] says for its form (probabilities
    /// non-negative summing to 1, log-probabilities `<= 0` with `-inf` allowed, logits finite).
    pub check_inputs: bool,
}

impl SoftTargetLoss {
    pub fn new(divergence: Divergence, temperature: f32) -> Self {
        SoftTargetLoss {
            divergence,
            teacher: TeacherInput::Logits,
            temperature,
            reduction: Reduction::BatchMean,
            ignore_index: IGNORE_INDEX,
            teacher_grad: false,
            teacher_eps: 0.0,
            check_inputs: false,
        }
    }

    /// Loss and gradients; `labels`, when given, only mask rows equal to `ignore_index`. Student
    /// and teacher of f32, bf16 or f16 (mixed allowed); the gradients in the inputs' types.
    pub fn forward_backward<B: Backend, S: Element, T: Element>(
        &self,
        backend: &B,
        student: &[S],
        teacher: &[T],
        labels: Option<&[i32]>,
        classes: usize,
    ) -> Result<LossAndGrad<S, T>> {
        self.forward_backward_as(backend, student, teacher, labels, classes)
    }

    /// [`SoftTargetLoss::forward_backward`] with the gradients in f32.
    pub fn forward_backward_f32<B: Backend, S: Element, T: Element>(
        &self,
        backend: &B,
        student: &[S],
        teacher: &[T],
        labels: Option<&[i32]>,
        classes: usize,
    ) -> Result<LossAndGrad<f32, f32>> {
        self.forward_backward_as(backend, student, teacher, labels, classes)
    }

    fn forward_backward_as<B: Backend, S: Element, T: Element, GS: Element, GT: Element>(
        &self,
        backend: &B,
        student: &[S],
        teacher: &[T],
        labels: Option<&[i32]>,
        classes: usize,
    ) -> Result<LossAndGrad<GS, GT>> {
        let shape = shape_of(student.len(), classes)?;
        let spec = DivergenceSpec {
            shape,
            divergence: self.divergence,
            teacher: self.teacher,
            temperature: self.temperature,
            reduction: self.reduction,
            ignore_index: self.ignore_index,
            grad_scale: 1.0,
            teacher_eps: self.teacher_eps,
        };
        spec.validate()?;
        shape.check_len("teacher", teacher.len())?;
        if let Some(l) = labels {
            check_host_labels(l, shape, self.ignore_index)?;
        }
        let teacher32 = T32::of(teacher);
        if self.check_inputs {
            check_finite("student", &T32::of(student))?;
            check_teacher(self.teacher, &teacher32, shape, labels, self.ignore_index)?;
        }
        check_reverse_kl_support(&spec, &teacher32, labels)?;
        run(
            backend,
            S::host(student),
            Some(T::host(teacher)),
            labels,
            shape,
            self.teacher_grad,
            |b, s, t, l, out| b.divergence(&spec, s, t.expect("teacher"), l, out),
        )
    }
}

/// Cross-entropy with hard labels and label smoothing (`docs/LOSSES.md` section 3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropyLoss {
    pub label_smoothing: f32,
    pub reduction: Reduction,
    pub ignore_index: i32,
    /// Check the logits first (finite) and return an error naming the first bad one.
    pub check_inputs: bool,
}

impl Default for CrossEntropyLoss {
    fn default() -> Self {
        CrossEntropyLoss {
            label_smoothing: 0.0,
            reduction: Reduction::BatchMean,
            ignore_index: IGNORE_INDEX,
            check_inputs: false,
        }
    }
}

impl CrossEntropyLoss {
    /// Loss and gradient for `[N, classes]` logits of f32, bf16 or f16 (the gradient in their
    /// type) and `N` labels.
    pub fn forward_backward<B: Backend, S: Element>(
        &self,
        backend: &B,
        student: &[S],
        labels: &[i32],
        classes: usize,
    ) -> Result<LossAndGrad<S>> {
        self.forward_backward_as(backend, student, labels, classes)
    }

    /// [`CrossEntropyLoss::forward_backward`] with the gradient in f32.
    pub fn forward_backward_f32<B: Backend, S: Element>(
        &self,
        backend: &B,
        student: &[S],
        labels: &[i32],
        classes: usize,
    ) -> Result<LossAndGrad<f32>> {
        self.forward_backward_as(backend, student, labels, classes)
    }

    fn forward_backward_as<B: Backend, S: Element, GS: Element>(
        &self,
        backend: &B,
        student: &[S],
        labels: &[i32],
        classes: usize,
    ) -> Result<LossAndGrad<GS>> {
        let shape = shape_of(student.len(), classes)?;
        let spec = CrossEntropySpec {
            shape,
            label_smoothing: self.label_smoothing,
            reduction: self.reduction,
            ignore_index: self.ignore_index,
            grad_scale: 1.0,
        };
        spec.validate()?;
        check_host_labels(labels, shape, self.ignore_index)?;
        if self.check_inputs {
            check_finite("student", &T32::of(student))?;
        }
        run::<B, GS, GS>(
            backend,
            S::host(student),
            None,
            Some(labels),
            shape,
            false,
            |b, s, _, l, out| b.cross_entropy(&spec, s, l.expect("labels"), out),
        )
    }
}

fn shape_of(len: usize, classes: usize) -> Result<RowShape> {
    if classes == 0 {
        return Err(Error::Unsupported("classes must be at least 1".into()));
    }
    if len == 0 || !len.is_multiple_of(classes) {
        return Err(Error::shape(
            "student",
            len,
            len.div_ceil(classes).max(1) * classes,
            format!("a non-empty [N, {classes}] row-major array: a whole number of rows of {classes} classes"),
        ));
    }
    Ok(RowShape::new(len / classes, classes))
}

fn check_host_labels(labels: &[i32], shape: RowShape, ignore_index: i32) -> Result<()> {
    if labels.len() != shape.rows {
        return Err(Error::shape(
            "labels",
            labels.len(),
            shape.rows,
            "one i32 label per row",
        ));
    }
    check_labels(labels, shape.cols, ignore_index)
}

/// Host values as f32 for the optional input checks (borrowed when they already are).
struct T32;

impl T32 {
    fn of<E: Element>(data: &[E]) -> std::borrow::Cow<'_, [f32]> {
        match E::host(data) {
            HostSlice::F32(v) => std::borrow::Cow::Borrowed(v),
            other => std::borrow::Cow::Owned(other.to_f32()),
        }
    }
}

/// Uploads, runs one row-loss kernel, downloads. The gradients are allocated as `GS` (student)
/// and `GT` (teacher) buffers, so the kernel writes them in those types.
#[allow(clippy::type_complexity)]
fn run<B: Backend, GS: Element, GT: Element>(
    backend: &B,
    student: HostSlice<'_>,
    teacher: Option<HostSlice<'_>>,
    labels: Option<&[i32]>,
    shape: RowShape,
    teacher_grad: bool,
    kernel: impl Fn(
        &B,
        &B::Buffer,
        Option<&B::Buffer>,
        Option<&B::Labels>,
        LossOut<'_, B>,
    ) -> Result<()>,
) -> Result<LossAndGrad<GS, GT>> {
    let s = backend.upload_host(student)?;
    let t = teacher.map(|t| backend.upload_host(t)).transpose()?;
    let l = labels.map(|l| backend.upload_labels(l)).transpose()?;
    let loss = backend.filled(1, f32::NAN)?;
    let rows = backend.filled(shape.rows, f32::NAN)?;
    let grad = backend.filled_as(GS::DTYPE, shape.len(), f32::NAN)?;
    let grad_t = if teacher_grad {
        Some(backend.filled_as(GT::DTYPE, shape.len(), f32::NAN)?)
    } else {
        None
    };
    kernel(
        backend,
        &s,
        t.as_ref(),
        l.as_ref(),
        LossOut {
            loss: &loss,
            row_loss: Some(&rows),
            grad_student: GradOut::Into(&grad),
            grad_teacher: grad_t.as_ref(),
        },
    )?;
    Ok(LossAndGrad {
        loss: backend.download(&loss)?[0],
        row_loss: backend.download(&rows)?,
        grad_student: GS::from_host(backend.download_host(&grad)?),
        grad_teacher: grad_t
            .map(|g| backend.download_host(&g).map(GT::from_host))
            .transpose()?,
    })
}
