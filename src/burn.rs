//! Our losses on burn tensors (feature `burn`): `kd_loss`, `soft_target_loss`, `cross_entropy`
//! and `dkd_loss` take burn 0.22 tensors on any burn device and return a one-element f32 tensor
//! whose `backward()` gives our gradient, through burn's autodiff.
//!
//! ```no_run
//! use burn::tensor::{Device, Int, Tensor};
//! let dev = Device::flex().autodiff();
//! let student = Tensor::<2>::from_data([[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]], &dev).require_grad();
//! let teacher = Tensor::<2>::from_data([[0.5f32, 2.5, 0.0], [1.0, -2.0, 2.0]], &dev);
//! let labels = Tensor::<1, Int>::from_data([1i64, 2], &dev);
//! let loss = distillation::burn::kd_loss(student.clone(), teacher, labels, 4.0, 0.2).unwrap();
//! let grads = loss.backward();
//! let _g = student.grad(&grads).unwrap();
//! ```
//!
//! How: the logits are read to the host (`into_data`), the fused kernel of the fast CPU backend
//! computes the loss `L` and the gradient `G` in one pass (`docs/LOSSES.md`), and the result is
//! returned as `L + (S - detach(S))` with `S = sum(student * G)` in f32: its value is `L`
//! (`S - S` is exactly 0) and its gradient with respect to the student is `G`, times the
//! upstream gradient, through burn's own autodiff. The teacher gets its gradient the same way
//! when it is tracked (online distillation). Logits may be f32, bf16 or f16 (the gradient comes
//! back in the logits' dtype, as our kernels round it), labels any integer dtype (`ignore_index`,
//! -100 by default, masks a row).
//!
//! Devices: on the burn wgpu device of [`wgpu_device`], without copies: our WGSL kernels run on
//! burn's wgpu device and queue and bind burn's own buffers (logits f32 or f16, contiguous;
//! labels cast to i32 on the device), write the loss and the gradient into buffers burn
//! allocated, and the same surrogate gives burn's autodiff our gradient (`src/burn/wgpu.rs`,
//! `docs/ARCHITECTURE.md` adapters). There, as on our own wgpu backend, the labels are not read
//! back: a label that is neither a class nor `ignore_index` gives a NaN loss instead of an `Err`.
//! Every other device (Flex, burn's default wgpu device, CUDA, ...), and tensors that cannot be
//! bound in place (bf16, strided views, `check_inputs`), take the host-copy route: two reads of
//! `[N, C]` and one upload of the gradient. bf16 / f16 work where burn's backend has those dtypes
//! (WGSL has no bf16).

use ::burn::tensor::{DType, Device, Int, Tensor, TensorData};
use half::{bf16, f16};

mod wgpu;
#[doc(hidden)]
pub use self::wgpu::host_reads;
pub use self::wgpu::wgpu_device;

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::loss::LossAndGrad;
use crate::{
    CrossEntropyLoss, Divergence, DkdLoss, FastCpuBackend, KdLoss, Reduction, SoftTargetLoss,
    IGNORE_INDEX,
};

/// Which of the crate's losses a call runs.
#[derive(Clone, Copy, Debug)]
enum Loss {
    Kd(KdLoss),
    Soft(SoftTargetLoss),
    CrossEntropy(CrossEntropyLoss),
    Dkd(DkdLoss),
}

impl Loss {
    fn reduction(&self) -> Reduction {
        match self {
            Loss::Kd(l) => l.reduction,
            Loss::Soft(l) => l.reduction,
            Loss::CrossEntropy(l) => l.reduction,
            Loss::Dkd(l) => l.reduction,
        }
    }
}

fn burn_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unsupported(format!("burn adapter: reading {what} failed: {e}"))
}

/// A float tensor's elements on the host, in its own dtype.
enum Host {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

fn read<const D: usize>(what: &str, t: Tensor<D>) -> Result<Host> {
    self::wgpu::count_host_read();
    Ok(match t.dtype() {
        DType::F32 => Host::F32(t.try_into_vec_as::<f32>().map_err(|e| burn_err(what, e))?),
        DType::BF16 => Host::Bf16(t.try_into_vec_as::<bf16>().map_err(|e| burn_err(what, e))?),
        DType::F16 => Host::F16(t.try_into_vec_as::<f16>().map_err(|e| burn_err(what, e))?),
        other => {
            return Err(Error::Unsupported(format!(
                "{what} is {other:?}: the losses take f32, bf16 or f16 logits (cast with \
                 .cast(DType::F32))"
            )))
        }
    })
}

/// The loss and the gradients (as f32 host vectors) of `loss` on typed slices.
fn run_typed<S: Element, T: Element>(
    loss: Loss,
    s: &[S],
    t: &[T],
    labels: &[i32],
    c: usize,
) -> Result<(f32, Vec<f32>, Option<Vec<f32>>)> {
    let b = FastCpuBackend::new();
    // The gradients in f32, unrounded: the surrogate's cast back to a half student rounds the
    // upstream times the gradient once (a half gradient here would be rounded twice).
    let out: LossAndGrad<f32, f32> = match loss {
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
    Ok((out.loss, out.grad_student, out.grad_teacher))
}

fn run_student<T: Element>(
    loss: Loss,
    s: &Host,
    t: &[T],
    labels: &[i32],
    c: usize,
) -> Result<(f32, Vec<f32>, Option<Vec<f32>>)> {
    match s {
        Host::F32(v) => run_typed(loss, v, t, labels, c),
        Host::Bf16(v) => run_typed(loss, v, t, labels, c),
        Host::F16(v) => run_typed(loss, v, t, labels, c),
    }
}

/// `sum((x - detach(x)) * g)` in f32: exactly 0 in value for finite `x` (no `inf - inf` where
/// the logits are near f32's range), `g` as the gradient of `x`.
fn surrogate<const D: usize>(x: Tensor<D>, g: Vec<f32>) -> Tensor<1> {
    let dev = x.device();
    let g = Tensor::<D>::from_data(TensorData::new(g, x.shape()), (&dev, DType::F32));
    let x = x.cast(DType::F32);
    ((x.clone() - x.detach()) * g).sum()
}

/// Checks the shapes, runs `loss` on the host and builds the differentiable result.
fn apply<const D: usize, const L: usize>(
    loss: Loss,
    student: Tensor<D>,
    teacher: Option<Tensor<D>>,
    labels: Option<Tensor<L, Int>>,
) -> Result<Tensor<1>> {
    let dims = student.dims();
    let c = dims.last().copied().unwrap_or(0);
    let len: usize = dims.iter().product();
    if D == 0 || c == 0 || len == 0 {
        return Err(Error::Empty(format!(
            "student has shape {dims:?}: pass [N, C] (or [..., C]) logits with at least one row \
             and class"
        )));
    }
    let rows = len / c;
    if loss.reduction() == Reduction::None {
        return Err(Error::Unsupported(
            "Reduction::None: the adapter returns the reduced loss (a scalar tensor); use \
             Reduction::BatchMean or Reduction::Sum"
                .into(),
        ));
    }
    // (burn's own binary ops panic on tensors of two devices)
    let dev = student.device();
    let other_device = |what: &str, on: &Device| {
        Error::Unsupported(format!(
            "the {what} are on {on:?} and the student on {dev:?}: move them with \
             .to_device(&student.device())"
        ))
    };
    if let Some(t) = &teacher {
        if t.device() != dev {
            return Err(other_device("teacher logits", &t.device()));
        }
        if t.dims() != dims {
            return Err(Error::Shape {
                what: "teacher",
                got: t.dims().iter().product(),
                expected: len,
                hint: format!(
                    "the teacher has shape {:?} and the student {dims:?}: they must match",
                    t.dims()
                ),
            });
        }
    }
    if let Some(y) = &labels {
        if y.device() != dev {
            return Err(other_device("labels", &y.device()));
        }
        let n: usize = y.dims().iter().product();
        if n != rows {
            return Err(Error::Shape {
                what: "labels",
                got: n,
                expected: rows,
                hint: format!("one label per row of the {dims:?} logits"),
            });
        }
    }
    // On the shared wgpu device: our kernels on burn's buffers, no copies.
    if let Some(out) =
        self::wgpu::try_apply(loss, &student, teacher.as_ref(), labels.as_ref(), rows, c)?
    {
        return Ok(out);
    }
    let labels_host: Vec<i32> = match labels {
        Some(y) => {
            self::wgpu::count_host_read();
            // A label outside i32 stays out of range (an error in the loss's validation).
            let clamp = |v: i64| v.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
            y.try_into_vec_as::<i64>()
                .map_err(|e| burn_err("labels", e))?
                .into_iter()
                .map(clamp)
                .collect()
        }
        None => vec![0; rows],
    };
    let track_teacher = teacher.as_ref().is_some_and(|t| t.is_tracked());
    let s_host = read("student", student.clone())?;
    let (value, gs, gt) = match &teacher {
        // Cross-entropy has no teacher: the student stands in (never read as one).
        None => run_student(loss, &s_host, &[0f32; 0], &labels_host, c)?,
        Some(t) => match read("teacher", t.clone())? {
            Host::F32(v) => run_student(loss, &s_host, &v, &labels_host, c)?,
            Host::Bf16(v) => run_student(loss, &s_host, &v, &labels_host, c)?,
            Host::F16(v) => run_student(loss, &s_host, &v, &labels_host, c)?,
        },
    };
    let mut out = Tensor::<1>::from_data(TensorData::new(vec![value], [1]), (&dev, DType::F32));
    if student.is_tracked() {
        out = out + surrogate(student, gs);
    }
    if let (Some(t), Some(gt), true) = (teacher, gt, track_teacher) {
        out = out + surrogate(t, gt);
    }
    Ok(out)
}

/// The Hinton loss `alpha CE(s, y) + (1 - alpha) T^2 KL(softmax(t/T) || softmax(s/T))`
/// (`docs/LOSSES.md` section 4), batchmean over the rows whose label is not -100. The teacher
/// gets a gradient when it is tracked.
pub fn kd_loss<const D: usize, const L: usize>(
    student: Tensor<D>,
    teacher: Tensor<D>,
    labels: Tensor<L, Int>,
    temperature: f32,
    alpha: f32,
) -> Result<Tensor<1>> {
    kd_loss_with(&KdLoss::new(temperature, alpha), student, teacher, labels)
}

/// [`kd_loss`] with the crate's full [`KdLoss`] configuration (label smoothing, ignore_index,
/// reduction sum).
pub fn kd_loss_with<const D: usize, const L: usize>(
    loss: &KdLoss,
    student: Tensor<D>,
    teacher: Tensor<D>,
    labels: Tensor<L, Int>,
) -> Result<Tensor<1>> {
    let kd = KdLoss {
        teacher_grad: teacher.is_tracked(),
        ..*loss
    };
    apply(Loss::Kd(kd), student, Some(teacher), Some(labels))
}

/// `T^2 D(q || p)` with D forward KL, reverse KL or JSD (`docs/LOSSES.md` section 2), the teacher
/// as logits; batchmean over all rows.
pub fn soft_target_loss<const D: usize>(
    student: Tensor<D>,
    teacher: Tensor<D>,
    divergence: Divergence,
    temperature: f32,
) -> Result<Tensor<1>> {
    let loss = SoftTargetLoss {
        teacher_grad: teacher.is_tracked(),
        ..SoftTargetLoss::new(divergence, temperature)
    };
    apply::<D, 1>(Loss::Soft(loss), student, Some(teacher), None)
}

/// Cross-entropy with hard labels (mean over the rows whose label is not -100), with label
/// smoothing (`docs/LOSSES.md` section 3).
pub fn cross_entropy<const D: usize, const L: usize>(
    student: Tensor<D>,
    labels: Tensor<L, Int>,
    label_smoothing: f32,
) -> Result<Tensor<1>> {
    let loss = CrossEntropyLoss {
        label_smoothing,
        ignore_index: IGNORE_INDEX,
        ..Default::default()
    };
    apply(Loss::CrossEntropy(loss), student, None, Some(labels))
}

/// DKD `CE + T^2 (alpha TCKD + beta NCKD)` (`docs/LOSSES.md` section 8); the teacher detached.
pub fn dkd_loss<const D: usize, const L: usize>(
    student: Tensor<D>,
    teacher: Tensor<D>,
    labels: Tensor<L, Int>,
    temperature: f32,
    alpha: f32,
    beta: f32,
) -> Result<Tensor<1>> {
    let loss = DkdLoss::new(temperature, alpha, beta);
    apply(
        Loss::Dkd(loss),
        student,
        Some(teacher.detach()),
        Some(labels),
    )
}
