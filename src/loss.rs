//! The loss values a trainer uses on host data: build one, call `forward_backward`, get the loss and
//! the gradient. Each runs on any [`Backend`]; the kernels underneath are the backend's.
//!
//! For device-resident data, call the backend's kernel methods on its own buffers instead
//! ([`Backend::hinton`], [`Backend::divergence`], ...).

use crate::backend::{Backend, GradOut, LossOut};
use crate::error::{Error, Result};
use crate::ops::{
    check_finite, check_labels, check_reverse_kl_support, check_teacher, CrossEntropySpec,
    Divergence, DivergenceSpec, HintonSpec, Reduction, RowShape, TeacherInput, IGNORE_INDEX,
};

/// A loss, its per-row values and its gradients, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct LossAndGrad {
    /// The reduced loss.
    pub loss: f32,
    /// Each row's loss (masked rows 0).
    pub row_loss: Vec<f32>,
    /// `dL/d student logits`, `[N, C]`.
    pub grad_student: Vec<f32>,
    /// `dL/d teacher logits`, `[N, C]`, when asked for.
    pub grad_teacher: Option<Vec<f32>>,
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

    /// Loss and gradients for `[N, classes]` student and teacher logits and `N` labels.
    pub fn forward_backward<B: Backend>(
        &self,
        backend: &B,
        student: &[f32],
        teacher: &[f32],
        labels: &[i32],
        classes: usize,
    ) -> Result<LossAndGrad> {
        let shape = shape_of(student.len(), classes)?;
        let spec = self.spec(shape);
        spec.validate()?;
        shape.check_len("teacher", teacher.len())?;
        check_host_labels(labels, shape, self.ignore_index)?;
        if self.check_inputs {
            check_finite("student", student)?;
            check_finite("teacher", teacher)?;
        }
        run(
            backend,
            student,
            Some(teacher),
            Some(labels),
            shape,
            self.teacher_grad,
            |b, s, t, l, out| b.hinton(&spec, s, t.expect("teacher"), l.expect("labels"), out),
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

    /// Loss and gradients; `labels`, when given, only mask rows equal to `ignore_index`.
    pub fn forward_backward<B: Backend>(
        &self,
        backend: &B,
        student: &[f32],
        teacher: &[f32],
        labels: Option<&[i32]>,
        classes: usize,
    ) -> Result<LossAndGrad> {
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
        if self.check_inputs {
            check_finite("student", student)?;
            check_teacher(self.teacher, teacher, shape, labels, self.ignore_index)?;
        }
        check_reverse_kl_support(&spec, teacher, labels)?;
        run(
            backend,
            student,
            Some(teacher),
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
    pub fn forward_backward<B: Backend>(
        &self,
        backend: &B,
        student: &[f32],
        labels: &[i32],
        classes: usize,
    ) -> Result<LossAndGrad> {
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
            check_finite("student", student)?;
        }
        run(
            backend,
            student,
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

/// Uploads, runs one row-loss kernel, downloads.
fn run<B: Backend>(
    backend: &B,
    student: &[f32],
    teacher: Option<&[f32]>,
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
) -> Result<LossAndGrad> {
    let s = backend.upload(student)?;
    let t = teacher.map(|t| backend.upload(t)).transpose()?;
    let l = labels.map(|l| backend.upload_labels(l)).transpose()?;
    let loss = backend.filled(1, f32::NAN)?;
    let rows = backend.filled(shape.rows, f32::NAN)?;
    let grad = backend.filled(shape.len(), f32::NAN)?;
    let grad_t = if teacher_grad {
        Some(backend.filled(shape.len(), f32::NAN)?)
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
        grad_student: backend.download(&grad)?,
        grad_teacher: grad_t.map(|g| backend.download(&g)).transpose()?,
    })
}
