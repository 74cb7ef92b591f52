//! Our losses as candle ops (feature `candle`): `kd_loss`, `soft_target_loss`, `cross_entropy`
//! and `dkd_loss` take candle tensors and return a scalar candle `Tensor` whose `backward()`
//! gives our gradient.
//!
//! ```no_run
//! # fn main() -> candle_core::Result<()> {
//! use candle_core::{Device, Tensor};
//! let dev = Device::Cpu;
//! let student = candle_core::Var::new(&[[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]], &dev)?;
//! let teacher = Tensor::new(&[[0.5f32, 2.5, 0.0], [1.0, -2.0, 2.0]], &dev)?;
//! let labels = Tensor::new(&[1i64, 2], &dev)?;
//! let loss = distillation::candle::kd_loss(student.as_tensor(), &teacher, &labels, 4.0, 0.2)?;
//! let grads = loss.backward()?;
//! let _g = grads.get(student.as_tensor()).unwrap();
//! # Ok(())
//! # }
//! ```
//!
//! Each op is a candle `CustomOp3` (student, teacher, labels). Its `cpu_fwd` runs the fused
//! kernel of the fast CPU backend once on candle's own memory (contiguous tensors are read in
//! place; other layouts are rejected with a message saying to call `.contiguous()`), computing
//! the loss and the gradients together as every backend of the crate does
//! (`docs/LOSSES.md`); the gradients are kept in the op, and its `bwd` returns them times the
//! upstream gradient. Logits may be f32, bf16 or f16 (the gradients come back in their dtypes,
//! the loss in f32); labels u32, i32 or i64 (`ignore_index`, -100 by default, masks a row; with
//! u32 labels no row is masked).
//!
//! Devices: the CPU. On a candle CUDA or Metal device the ops return an error that says so: the
//! CUDA path through candle's stream is not written yet (`docs/ARCHITECTURE.md`, adapters).

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use half::{bf16, f16};

use crate::dtype::Element;
use crate::error::Error;
use crate::loss::LossAndGrad;
use crate::{
    CrossEntropyLoss, Divergence, DkdLoss, FastCpuBackend, KdLoss, SoftTargetLoss, IGNORE_INDEX,
};

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("distillation: {e}"))
}

/// Which of the crate's losses an op runs.
#[derive(Clone, Copy, Debug)]
enum Loss {
    Kd(KdLoss),
    Soft(SoftTargetLoss),
    CrossEntropy(CrossEntropyLoss),
    Dkd(DkdLoss),
}

impl Loss {
    fn name(&self) -> &'static str {
        match self {
            Loss::Kd(_) => "distillation-kd",
            Loss::Soft(_) => "distillation-soft-target",
            Loss::CrossEntropy(_) => "distillation-cross-entropy",
            Loss::Dkd(_) => "distillation-dkd",
        }
    }
}

/// The gradients the forward computed, kept for `bwd`.
#[derive(Default)]
struct Saved {
    student: Option<Tensor>,
    teacher: Option<Tensor>,
}

/// A loss as a candle op over (student, teacher, labels).
struct LossOp {
    loss: Loss,
    /// The student's and teacher's shapes (`[..., C]`), for the gradients.
    shape: Shape,
    saved: Arc<Mutex<Saved>>,
}

/// A contiguous tensor's elements in candle's storage.
fn contiguous<'a, T>(what: &str, v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(err(format!(
            "{what} is not contiguous (strides {:?}): call .contiguous() first",
            l.stride()
        ))),
    }
}

/// Labels of any integer dtype as i32 (a label outside i32 stays out of range: an error later).
fn labels_i32(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<i32>> {
    let clamp = |v: i64| v.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
    Ok(match s {
        CpuStorage::U32(v) => contiguous("labels", v, l)?
            .iter()
            .map(|&x| clamp(x as i64))
            .collect(),
        CpuStorage::I32(v) => contiguous("labels", v, l)?.to_vec(),
        CpuStorage::I64(v) => contiguous("labels", v, l)?
            .iter()
            .map(|&x| clamp(x))
            .collect(),
        other => {
            return Err(err(format!(
                "labels must be an integer tensor (u32, i32 or i64), got {:?}",
                other.dtype()
            )))
        }
    })
}

/// Runs the loss on typed student and teacher slices; the loss and the gradients as tensors.
fn run_typed<S: Element + WithDType, T: Element + WithDType>(
    op: &LossOp,
    s: &[S],
    t: &[T],
    labels: &[i32],
) -> crate::Result<(f32, Option<Tensor>, Option<Tensor>)> {
    let b = FastCpuBackend::new();
    let c = op.shape.dims().last().copied().unwrap_or(0);
    // The gradients kept in f32, unrounded: `bwd` scales them by the upstream gradient and
    // rounds once into the logits' dtype (half gradients here would be rounded twice).
    let out: LossAndGrad<f32, f32> = match op.loss {
        Loss::Kd(l) => l.forward_backward_f32(&b, s, t, labels, c)?,
        Loss::Soft(l) => l.forward_backward_f32(&b, s, t, None, c)?,
        Loss::Dkd(l) => l.forward_backward_f32(&b, s, t, labels, c)?,
        Loss::CrossEntropy(l) => {
            let o = l.forward_backward_f32(&b, s, labels, c)?;
            LossAndGrad {
                loss: o.loss,
                row_loss: o.row_loss,
                grad_student: o.grad_student,
                grad_teacher: None,
            }
        }
    };
    let dev = candle_core::Device::Cpu;
    let tensor = |g: Vec<f32>| Tensor::from_vec(g, op.shape.clone(), &dev);
    let gs = tensor(out.grad_student).map_err(|e| Error::Unsupported(e.to_string()))?;
    let gt = match out.grad_teacher {
        Some(g) => Some(
            Tensor::from_vec(g, op.shape.clone(), &dev)
                .map_err(|e| Error::Unsupported(e.to_string()))?,
        ),
        None => None,
    };
    Ok((out.loss, Some(gs), gt))
}

/// The student's slice of its dtype, then the teacher's.
fn run_student<T: Element + WithDType>(
    op: &LossOp,
    s: &CpuStorage,
    ls: &Layout,
    t: &[T],
    labels: &[i32],
) -> candle_core::Result<(f32, Option<Tensor>, Option<Tensor>)> {
    let r = match s {
        CpuStorage::F32(v) => run_typed::<f32, T>(op, contiguous("student", v, ls)?, t, labels),
        CpuStorage::BF16(v) => run_typed::<bf16, T>(op, contiguous("student", v, ls)?, t, labels),
        CpuStorage::F16(v) => run_typed::<f16, T>(op, contiguous("student", v, ls)?, t, labels),
        other => return Err(unsupported_dtype("student", other.dtype())),
    };
    r.map_err(err)
}

fn unsupported_dtype(what: &str, dtype: DType) -> candle_core::Error {
    err(format!(
        "{what} is {dtype:?}: the losses take f32, bf16 or f16 logits (convert with .to_dtype)"
    ))
}

impl CustomOp3 for LossOp {
    fn name(&self) -> &'static str {
        self.loss.name()
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        ls: &Layout,
        t: &CpuStorage,
        lt: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let labels = labels_i32(y, ly)?;
        let (loss, gs, gt) = match t {
            CpuStorage::F32(v) => run_student(self, s, ls, contiguous("teacher", v, lt)?, &labels)?,
            CpuStorage::BF16(v) => {
                run_student(self, s, ls, contiguous("teacher", v, lt)?, &labels)?
            }
            CpuStorage::F16(v) => run_student(self, s, ls, contiguous("teacher", v, lt)?, &labels)?,
            other => return Err(unsupported_dtype("teacher", other.dtype())),
        };
        let mut saved = self
            .saved
            .lock()
            .map_err(|_| err("a previous call panicked"))?;
        saved.student = gs;
        saved.teacher = gt;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        _labels: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| err("a previous call panicked"))?;
        // The upstream gradient (a scalar, f32 as the loss) scales the kept f32 gradients,
        // rounded once into each input's dtype.
        let scale = |g: &Tensor, dtype: DType| -> candle_core::Result<Tensor> {
            let up = grad_res.to_dtype(DType::F32)?;
            g.broadcast_mul(&up)?.to_dtype(dtype)
        };
        let gs = match &saved.student {
            Some(g) => Some(scale(g, student.dtype())?),
            None => None,
        };
        // The teacher's gradient only where it is tracked (online distillation).
        let gt = match (&saved.teacher, teacher.track_op()) {
            (Some(g), true) => Some(scale(g, teacher.dtype())?),
            _ => None,
        };
        Ok((gs, gt, None))
    }
}

/// Checks the logits' shapes and devices and applies `loss`.
fn apply(
    loss: Loss,
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
) -> candle_core::Result<Tensor> {
    if !student.device().is_cpu() {
        return Err(err(format!(
            "student is on {:?}: the candle adapter runs on the CPU device only for now",
            student.device()
        )));
    }
    if student.rank() < 1 || student.dims().last() == Some(&0) || student.elem_count() == 0 {
        return Err(err(format!(
            "student has shape {:?}: pass [N, C] (or [..., C]) logits with at least one row and class",
            student.dims()
        )));
    }
    let reduction = match loss {
        Loss::Kd(l) => l.reduction,
        Loss::Soft(l) => l.reduction,
        Loss::CrossEntropy(l) => l.reduction,
        Loss::Dkd(l) => l.reduction,
    };
    if reduction == crate::Reduction::None {
        return Err(err(
            "Reduction::None: the adapter returns the reduced loss (a scalar tensor); use \
             Reduction::BatchMean or Reduction::Sum"
                .to_string(),
        ));
    }
    if teacher.dims() != student.dims() {
        return Err(err(format!(
            "teacher has shape {:?} but student {:?}: they must match",
            teacher.dims(),
            student.dims()
        )));
    }
    let rows = student.elem_count() / student.dims().last().copied().unwrap_or(1);
    if labels.elem_count() != rows {
        return Err(err(format!(
            "labels has {} elements but the logits have {rows} rows: one label per row",
            labels.elem_count()
        )));
    }
    let op = LossOp {
        loss,
        shape: student.shape().clone(),
        saved: Arc::new(Mutex::new(Saved::default())),
    };
    // With the teacher not tracked, candle does not ask for its gradient; KdLoss computes it only
    // when asked (teacher_grad).
    student.apply_op3(teacher, labels, op)
}

/// The Hinton loss `alpha CE(s, y) + (1 - alpha) T^2 KL(softmax(t/T) || softmax(s/T))`
/// (`docs/LOSSES.md` section 4), batchmean over the rows whose label is not -100.
pub fn kd_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    temperature: f32,
    alpha: f32,
) -> candle_core::Result<Tensor> {
    let kd = KdLoss {
        teacher_grad: teacher.track_op(),
        ..KdLoss::new(temperature, alpha)
    };
    apply(Loss::Kd(kd), student, teacher, labels)
}

/// [`kd_loss`] with the crate's full [`KdLoss`] configuration (label smoothing, ignore_index,
/// reduction sum).
pub fn kd_loss_with(
    loss: &KdLoss,
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
) -> candle_core::Result<Tensor> {
    let kd = KdLoss {
        teacher_grad: teacher.track_op(),
        ..*loss
    };
    apply(Loss::Kd(kd), student, teacher, labels)
}

/// `T^2 D(q || p)` with D forward KL, reverse KL or JSD (`docs/LOSSES.md` section 2), the teacher
/// as logits; batchmean over all rows.
pub fn soft_target_loss(
    student: &Tensor,
    teacher: &Tensor,
    divergence: Divergence,
    temperature: f32,
) -> candle_core::Result<Tensor> {
    let loss = SoftTargetLoss {
        teacher_grad: teacher.track_op(),
        ..SoftTargetLoss::new(divergence, temperature)
    };
    let rows = student.elem_count() / student.dims().last().copied().unwrap_or(1).max(1);
    let labels = Tensor::zeros(rows, DType::U32, student.device())?;
    apply(Loss::Soft(loss), student, teacher, &labels)
}

/// Cross-entropy with hard labels (mean over the rows whose label is not -100), with label
/// smoothing.
pub fn cross_entropy(
    student: &Tensor,
    labels: &Tensor,
    label_smoothing: f32,
) -> candle_core::Result<Tensor> {
    let loss = CrossEntropyLoss {
        label_smoothing,
        ignore_index: IGNORE_INDEX,
        ..Default::default()
    };
    apply(Loss::CrossEntropy(loss), student, student, labels)
}

/// DKD `CE + T^2 (alpha TCKD + beta NCKD)` (`docs/LOSSES.md` section 8); the teacher detached.
pub fn dkd_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    temperature: f32,
    alpha: f32,
    beta: f32,
) -> candle_core::Result<Tensor> {
    let loss = DkdLoss::new(temperature, alpha, beta);
    apply(Loss::Dkd(loss), student, &teacher.detach(), labels)
}
