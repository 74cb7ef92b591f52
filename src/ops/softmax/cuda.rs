//! Launch of `softmax.cu`: a warp per row up to C = 1024, a block per row beyond.

use super::SoftmaxSpec;
use crate::backend::cuda::{inv, row_launch, Arg, CudaBackend, CudaBuffer, CudaKernel, CudaSource};
use crate::error::Result;

pub(crate) const SOURCE: CudaSource = CudaSource {
    file: "softmax.cu",
    code: include_str!("softmax.cu"),
};
pub(crate) const FORWARD_WARP: CudaKernel = kernel("softmax_fwd_warp", "ppuufuuu");
pub(crate) const FORWARD_BLOCK: CudaKernel = kernel("softmax_fwd_block", "ppuufuuu");
pub(crate) const BACKWARD_WARP: CudaKernel = kernel("softmax_bwd_warp", "pppuufuuuu");
pub(crate) const BACKWARD_BLOCK: CudaKernel = kernel("softmax_bwd_block", "pppuufuuuu");

const fn kernel(name: &'static str, signature: &'static str) -> CudaKernel {
    CudaKernel {
        file: "softmax.cu",
        name,
        signature,
    }
}

/// `y = softmax(x / T)` (or its log).
pub(crate) fn softmax(
    b: &CudaBackend,
    spec: &SoftmaxSpec,
    x: &CudaBuffer,
    y: &CudaBuffer,
) -> Result<()> {
    let (rows, cols) = (spec.shape.rows, spec.shape.cols);
    CudaBackend::check_cols(cols)?;
    let (block, cfg) = row_launch(rows, cols);
    let kernel = if block { &FORWARD_BLOCK } else { &FORWARD_WARP };
    b.launch_one(
        kernel,
        cfg,
        &[
            Arg::Ptr(x.ptr),
            Arg::Ptr(y.ptr),
            Arg::U32(rows as u32),
            Arg::U32(cols as u32),
            Arg::F32(inv(spec.temperature)),
            Arg::U32(spec.log as u32),
            Arg::U32(x.dtype.code()),
            Arg::U32(y.dtype.code()),
        ],
    )
}

/// `dx` from the forward output `y` and the upstream `dy`.
pub(crate) fn softmax_backward(
    b: &CudaBackend,
    spec: &SoftmaxSpec,
    y: &CudaBuffer,
    dy: &CudaBuffer,
    dx: &CudaBuffer,
) -> Result<()> {
    let (rows, cols) = (spec.shape.rows, spec.shape.cols);
    CudaBackend::check_cols(cols)?;
    let (block, cfg) = row_launch(rows, cols);
    let kernel = if block {
        &BACKWARD_BLOCK
    } else {
        &BACKWARD_WARP
    };
    b.launch_one(
        kernel,
        cfg,
        &[
            Arg::Ptr(y.ptr),
            Arg::Ptr(dy.ptr),
            Arg::Ptr(dx.ptr),
            Arg::U32(rows as u32),
            Arg::U32(cols as u32),
            Arg::F32(inv(spec.temperature)),
            Arg::U32(spec.log as u32),
            Arg::U32(y.dtype.code()),
            Arg::U32(dy.dtype.code()),
            Arg::U32(dx.dtype.code()),
        ],
    )
}
