//! Launch of `dense.cu`: the tiled matmul (a block of 256 per 16 x 16 tile of C) and the
//! elementwise kernels (one thread per output element).

use super::{CopySpec, MatmulSpec};
use crate::backend::cuda::{
    config, elementwise, index_u32, Arg, CudaBackend, CudaBuffer, CudaKernel, CudaSource,
};
use crate::error::Result;

pub(crate) const SOURCE: CudaSource = CudaSource {
    file: "dense.cu",
    code: include_str!("dense.cu"),
};
pub(crate) const MATMUL: CudaKernel = kernel("matmul", "pppuuuuuu");
pub(crate) const BIAS_ADD: CudaKernel = kernel("bias_add", "pppuu");
pub(crate) const SUM_ROWS: CudaKernel = kernel("sum_rows", "ppuuu");
pub(crate) const RELU: CudaKernel = kernel("relu", "ppl");
pub(crate) const RELU_BACKWARD: CudaKernel = kernel("relu_backward", "pppl");
pub(crate) const AXPY: CudaKernel = kernel("axpy", "pplf");
pub(crate) const COPY_ROWS: CudaKernel = kernel("copy_rows", "ppuuuuuuuu");

const fn kernel(name: &'static str, signature: &'static str) -> CudaKernel {
    CudaKernel {
        file: "dense.cu",
        name,
        signature,
    }
}

/// `C (+)= op(A) op(B)`.
pub(crate) fn matmul(
    b: &CudaBackend,
    spec: &MatmulSpec,
    x: &CudaBuffer,
    y: &CudaBuffer,
    c: &CudaBuffer,
) -> Result<()> {
    // MatmulSpec::validate: every operand below 2^32 elements, so m, k, n fit u32.
    let tiles = (spec.m as u64).div_ceil(16) * (spec.n as u64).div_ceil(16);
    b.launch_one(
        &MATMUL,
        config(tiles, 256),
        &[
            Arg::Ptr(x.ptr),
            Arg::Ptr(y.ptr),
            Arg::Ptr(c.ptr),
            Arg::U32(spec.m as u32),
            Arg::U32(spec.k as u32),
            Arg::U32(spec.n as u32),
            Arg::U32(spec.trans_a as u32),
            Arg::U32(spec.trans_b as u32),
            Arg::U32(spec.accumulate as u32),
        ],
    )
}

/// `y = x + bias` per row.
pub(crate) fn bias_add(
    b: &CudaBackend,
    x: &CudaBuffer,
    bias: &CudaBuffer,
    y: &CudaBuffer,
) -> Result<()> {
    let len = index_u32("bias_add", x.len)?;
    b.launch_one(
        &BIAS_ADD,
        elementwise(x.len),
        &[
            Arg::Ptr(x.ptr),
            Arg::Ptr(bias.ptr),
            Arg::Ptr(y.ptr),
            Arg::U32(len),
            Arg::U32(bias.len as u32),
        ],
    )
}

/// `out (+)= column sums of x`.
pub(crate) fn sum_rows(
    b: &CudaBackend,
    x: &CudaBuffer,
    out: &CudaBuffer,
    accumulate: bool,
) -> Result<()> {
    index_u32("sum_rows", x.len)?;
    b.launch_one(
        &SUM_ROWS,
        elementwise(out.len),
        &[
            Arg::Ptr(x.ptr),
            Arg::Ptr(out.ptr),
            Arg::U32((x.len / out.len) as u32),
            Arg::U32(out.len as u32),
            Arg::U32(accumulate as u32),
        ],
    )
}

/// `y = max(x, 0)`.
pub(crate) fn relu(b: &CudaBackend, x: &CudaBuffer, y: &CudaBuffer) -> Result<()> {
    b.launch_one(
        &RELU,
        elementwise(x.len),
        &[Arg::Ptr(x.ptr), Arg::Ptr(y.ptr), Arg::U64(x.len as u64)],
    )
}

/// `dx = dy (y > 0)`.
pub(crate) fn relu_backward(
    b: &CudaBackend,
    y: &CudaBuffer,
    dy: &CudaBuffer,
    dx: &CudaBuffer,
) -> Result<()> {
    b.launch_one(
        &RELU_BACKWARD,
        elementwise(y.len),
        &[
            Arg::Ptr(y.ptr),
            Arg::Ptr(dy.ptr),
            Arg::Ptr(dx.ptr),
            Arg::U64(y.len as u64),
        ],
    )
}

/// `y += alpha x`.
pub(crate) fn axpy(b: &CudaBackend, alpha: f32, x: &CudaBuffer, y: &CudaBuffer) -> Result<()> {
    b.launch_one(
        &AXPY,
        elementwise(x.len),
        &[
            Arg::Ptr(x.ptr),
            Arg::Ptr(y.ptr),
            Arg::U64(x.len as u64),
            Arg::F32(alpha),
        ],
    )
}

/// The strided block copy of [`CopySpec`]: one thread per copied element.
pub(crate) fn copy_rows(
    b: &CudaBackend,
    spec: &CopySpec,
    src: &CudaBuffer,
    dst: &CudaBuffer,
) -> Result<()> {
    // CopySpec::validate: every index below 2^32.
    let total = spec.rows as u64 * spec.cols as u64;
    b.launch_one(
        &COPY_ROWS,
        config(total.div_ceil(256), 256),
        &[
            Arg::Ptr(src.ptr),
            Arg::Ptr(dst.ptr),
            Arg::U32(spec.rows as u32),
            Arg::U32(spec.cols as u32),
            Arg::U32(spec.src_offset as u32),
            Arg::U32(spec.src_stride as u32),
            Arg::U32(spec.dst_offset as u32),
            Arg::U32(spec.dst_stride as u32),
            Arg::U32(src.dtype.code()),
            Arg::U32(dst.dtype.code()),
        ],
    )
}
