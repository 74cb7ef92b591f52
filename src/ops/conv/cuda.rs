//! Launch of `conv.cu`: one thread per output element.

use super::{ConvSpec, PoolSpec};
use crate::backend::cuda::{
    elementwise, index_u32, Arg, CudaBackend, CudaBuffer, CudaKernel, CudaSource,
};
use crate::error::{Error, Result};

pub(crate) const SOURCE: CudaSource = CudaSource {
    file: "conv.cu",
    code: include_str!("conv.cu"),
};
pub(crate) const IM2COL: CudaKernel = kernel("im2col", "ppuuuuuuuuu");
pub(crate) const COL2IM: CudaKernel = kernel("col2im", "ppuuuuuuuuu");
pub(crate) const POOL: CudaKernel = kernel("pool", "ppuuuuuuuu");
pub(crate) const POOL_BACKWARD: CudaKernel = kernel("pool_backward", "pppuuuuuuuu");
pub(crate) const TRANSPOSE: CudaKernel = kernel("transpose", "ppuuu");

const fn kernel(name: &'static str, signature: &'static str) -> CudaKernel {
    CudaKernel {
        file: "conv.cu",
        name,
        signature,
    }
}

/// The arguments `h, w, c, k, stride, pad, oh, ow, len` of `im2col` / `col2im` (`len` the number of
/// elements written). `conv.cu` computes padded coordinates in an `int` and indices in u32.
fn conv_args(spec: &ConvSpec, len: usize) -> Result<[Arg; 9]> {
    let fits_int = |v: Option<usize>| v.is_some_and(|v| v < (1 << 31));
    let padded = |d: usize| spec.pad.checked_mul(2).and_then(|p| p.checked_add(d));
    if !fits_int(padded(spec.h)) || !fits_int(padded(spec.w)) || !fits_int(Some(spec.stride)) {
        return Err(Error::Limit(format!(
            "convolution {spec:?}: the CUDA kernels need H + 2 pad, W + 2 pad and the stride below 2^31"
        )));
    }
    index_u32("convolution input", spec.input_len())?;
    let (oh, ow) = spec.out_hw();
    Ok([
        Arg::U32(spec.h as u32),
        Arg::U32(spec.w as u32),
        Arg::U32(spec.c as u32),
        Arg::U32(spec.k as u32),
        Arg::U32(spec.stride as u32),
        Arg::U32(spec.pad as u32),
        Arg::U32(oh as u32),
        Arg::U32(ow as u32),
        Arg::U32(index_u32("convolution", len)?),
    ])
}

/// The arguments `h, w, c, k, oh, ow, max_pool, len` of `pool` / `pool_backward`.
fn pool_args(spec: &PoolSpec, len: usize) -> Result<[Arg; 8]> {
    index_u32("pooling input", spec.input_len())?;
    let (oh, ow) = spec.out_hw();
    Ok([
        Arg::U32(spec.h as u32),
        Arg::U32(spec.w as u32),
        Arg::U32(spec.c as u32),
        Arg::U32(spec.k as u32),
        Arg::U32(oh as u32),
        Arg::U32(ow as u32),
        Arg::U32(spec.max as u32),
        Arg::U32(index_u32("pooling", len)?),
    ])
}

/// `cols = im2col(x)`.
pub(crate) fn im2col(
    b: &CudaBackend,
    spec: &ConvSpec,
    x: &CudaBuffer,
    cols: &CudaBuffer,
) -> Result<()> {
    let mut args = vec![Arg::Ptr(x.ptr), Arg::Ptr(cols.ptr)];
    args.extend(conv_args(spec, cols.len)?);
    b.launch_one(&IM2COL, elementwise(cols.len), &args)
}

/// `dx = col2im(dcols)`.
pub(crate) fn col2im(
    b: &CudaBackend,
    spec: &ConvSpec,
    dcols: &CudaBuffer,
    dx: &CudaBuffer,
) -> Result<()> {
    let mut args = vec![Arg::Ptr(dcols.ptr), Arg::Ptr(dx.ptr)];
    args.extend(conv_args(spec, dx.len)?);
    b.launch_one(&COL2IM, elementwise(dx.len), &args)
}

/// Max or average pooling.
pub(crate) fn pool(b: &CudaBackend, spec: &PoolSpec, x: &CudaBuffer, y: &CudaBuffer) -> Result<()> {
    let mut args = vec![Arg::Ptr(x.ptr), Arg::Ptr(y.ptr)];
    args.extend(pool_args(spec, y.len)?);
    b.launch_one(&POOL, elementwise(y.len), &args)
}

/// The input gradient of pooling.
pub(crate) fn pool_backward(
    b: &CudaBackend,
    spec: &PoolSpec,
    x: &CudaBuffer,
    dy: &CudaBuffer,
    dx: &CudaBuffer,
) -> Result<()> {
    let mut args = vec![Arg::Ptr(x.ptr), Arg::Ptr(dy.ptr), Arg::Ptr(dx.ptr)];
    args.extend(pool_args(spec, dx.len)?);
    b.launch_one(&POOL_BACKWARD, elementwise(dx.len), &args)
}

/// `y[b, j, i] = x[b, i, j]`.
pub(crate) fn transpose(
    b: &CudaBackend,
    _batch: usize,
    rows: usize,
    cols: usize,
    x: &CudaBuffer,
    y: &CudaBuffer,
) -> Result<()> {
    let len = index_u32("transpose", y.len)?;
    b.launch_one(
        &TRANSPOSE,
        elementwise(y.len),
        &[
            Arg::Ptr(x.ptr),
            Arg::Ptr(y.ptr),
            Arg::U32(rows as u32),
            Arg::U32(cols as u32),
            Arg::U32(len),
        ],
    )
}
