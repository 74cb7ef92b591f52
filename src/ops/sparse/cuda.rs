//! Launch of `sparse.cu` through the row-loss sequence ([`CudaBackend::row_loss_blocks`]): a
//! block per row at every `C` (the sorted support lives in the block's shared memory).

use super::{SparseSpec, SparseTail, SparseValues};
use crate::backend::cuda::{
    grad_dtype, grad_ptr, Arg, CudaBackend, CudaBuffer, CudaKernel, CudaLabels, CudaSource,
    RowLaunch,
};
use crate::backend::LossOut;
use crate::error::Result;

pub(crate) const SOURCE: CudaSource = CudaSource {
    file: "sparse.cu",
    code: include_str!("sparse.cu"),
};
pub(crate) const KERNEL: CudaKernel = CudaKernel {
    file: "sparse.cu",
    name: "sparse_kd",
    signature: "pppppppuuufffffiuuuuuuu",
};

/// Threads per row: enough that each handles up to about 32 elements per pass, 128 to 1024.
pub(crate) fn threads_for(cols: usize) -> u32 {
    match cols {
        0..=4096 => 128,
        4097..=16384 => 256,
        16385..=65536 => 512,
        _ => 1024,
    }
}

/// The sparse top-k teacher's loss (see [`crate::Backend::sparse_kd`]; the indices and values
/// are not read back: out-of-range indices are skipped by the kernel, their rows undefined).
pub(crate) fn sparse_kd(
    b: &CudaBackend,
    spec: &SparseSpec,
    student: &CudaBuffer,
    indices: &CudaLabels,
    values: &CudaBuffer,
    labels: Option<&CudaLabels>,
    out: LossOut<'_, CudaBackend>,
) -> Result<()> {
    let launch = RowLaunch {
        warp: &KERNEL,
        block: &KERNEL,
        shape: spec.shape,
        labels,
        ignore_index: spec.ignore_index,
        reduction: spec.reduction,
        row_loss: out.row_loss,
        loss: out.loss,
    };
    let tail = match spec.tail {
        SparseTail::Renormalize => 0,
        SparseTail::Bucket => 1,
        SparseTail::Uniform => 2,
    };
    let logits = match spec.values {
        SparseValues::LogProbs => 0,
        SparseValues::Logits => 1,
    };
    b.row_loss_blocks(launch, threads_for(spec.shape.cols), |count, row_loss| {
        vec![
            Arg::Ptr(student.ptr),
            Arg::Ptr(indices.ptr),
            Arg::Ptr(values.ptr),
            Arg::Ptr(labels.map_or(0, |l| l.ptr)),
            Arg::Ptr(count),
            Arg::Ptr(row_loss),
            Arg::Ptr(grad_ptr(out.grad_student, student)),
            Arg::U32(spec.shape.rows as u32),
            Arg::U32(spec.shape.cols as u32),
            Arg::U32(spec.k as u32),
            Arg::F32(spec.temperature),
            Arg::F32(spec.alpha),
            Arg::F32(spec.label_smoothing),
            Arg::F32(spec.divergence.beta()),
            Arg::F32(spec.grad_scale),
            Arg::I32(spec.ignore_index),
            Arg::U32(spec.divergence.code()),
            Arg::U32(tail),
            Arg::U32(logits),
            Arg::U32(spec.reduction.code()),
            Arg::U32(student.dtype.code()),
            Arg::U32(values.dtype.code()),
            Arg::U32(grad_dtype(out.grad_student, student).code()),
        ]
    })
}
