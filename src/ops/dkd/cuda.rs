//! Launch of `dkd.cu` through the row-loss sequence ([`CudaBackend::row_loss`]).

use super::DkdSpec;
use crate::backend::cuda::{
    grad_dtype, grad_ptr, inv, Arg, CudaBackend, CudaBuffer, CudaKernel, CudaLabels, CudaSource,
    RowLaunch,
};
use crate::backend::LossOut;
use crate::error::Result;

pub(crate) const SOURCE: CudaSource = CudaSource {
    file: "dkd.cu",
    code: include_str!("dkd.cu"),
};
pub(crate) const WARP: CudaKernel = CudaKernel {
    file: "dkd.cu",
    name: "dkd_warp",
    signature: "ppppppuufffffffiuuuu",
};
pub(crate) const BLOCK: CudaKernel = CudaKernel {
    file: "dkd.cu",
    name: "dkd_block",
    signature: "ppppppuufffffffiuuuu",
};

/// DKD (see [`crate::Backend::dkd`]; the teacher's gradient was refused by validation).
pub(crate) fn dkd(
    b: &CudaBackend,
    spec: &DkdSpec,
    student: &CudaBuffer,
    teacher: &CudaBuffer,
    labels: &CudaLabels,
    out: LossOut<'_, CudaBackend>,
) -> Result<()> {
    let launch = RowLaunch {
        warp: &WARP,
        block: &BLOCK,
        shape: spec.shape,
        labels: Some(labels),
        ignore_index: spec.ignore_index,
        reduction: spec.reduction,
        row_loss: out.row_loss,
        loss: out.loss,
    };
    b.row_loss(launch, |count, row_loss| {
        vec![
            Arg::Ptr(student.ptr),
            Arg::Ptr(teacher.ptr),
            Arg::Ptr(labels.ptr),
            Arg::Ptr(count),
            Arg::Ptr(row_loss),
            Arg::Ptr(grad_ptr(out.grad_student, student)),
            Arg::U32(spec.shape.rows as u32),
            Arg::U32(spec.shape.cols as u32),
            Arg::F32(inv(spec.temperature)),
            Arg::F32(spec.temperature),
            Arg::F32(spec.ce_weight),
            Arg::F32(spec.tckd_weight),
            Arg::F32(spec.nckd_weight),
            Arg::F32(spec.label_smoothing),
            Arg::F32(spec.grad_scale),
            Arg::I32(spec.ignore_index),
            Arg::U32(spec.reduction.code()),
            Arg::U32(student.dtype.code()),
            Arg::U32(teacher.dtype.code()),
            Arg::U32(grad_dtype(out.grad_student, student).code()),
        ]
    })
}
