//! Launch of `cross_entropy.cu` through the row-loss sequence ([`CudaBackend::row_loss`]).

use super::CrossEntropySpec;
use crate::backend::cuda::{
    grad_dtype, grad_ptr, Arg, CudaBackend, CudaBuffer, CudaKernel, CudaLabels, CudaSource,
    RowLaunch,
};
use crate::backend::LossOut;
use crate::error::Result;

pub(crate) const SOURCE: CudaSource = CudaSource {
    file: "cross_entropy.cu",
    code: include_str!("cross_entropy.cu"),
};
pub(crate) const WARP: CudaKernel = CudaKernel {
    file: "cross_entropy.cu",
    name: "cross_entropy_warp",
    signature: "pppppuuffiuuu",
};
pub(crate) const BLOCK: CudaKernel = CudaKernel {
    file: "cross_entropy.cu",
    name: "cross_entropy_block",
    signature: "pppppuuffiuuu",
};

/// Cross-entropy (see [`crate::Backend::cross_entropy`]).
pub(crate) fn cross_entropy(
    b: &CudaBackend,
    spec: &CrossEntropySpec,
    student: &CudaBuffer,
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
            Arg::Ptr(labels.ptr),
            Arg::Ptr(count),
            Arg::Ptr(row_loss),
            Arg::Ptr(grad_ptr(out.grad_student, student)),
            Arg::U32(spec.shape.rows as u32),
            Arg::U32(spec.shape.cols as u32),
            Arg::F32(spec.label_smoothing),
            Arg::F32(spec.grad_scale),
            Arg::I32(spec.ignore_index),
            Arg::U32(spec.reduction.code()),
            Arg::U32(student.dtype.code()),
            Arg::U32(grad_dtype(out.grad_student, student).code()),
        ]
    })
}
