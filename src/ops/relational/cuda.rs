//! Launch of `relational.cu`: row normalisation (a warp per row, 8 rows per block), pairwise
//! distances (a block per 16 x 16 tile) and their backward (a thread per element), off-diagonal
//! mean normalisation (one block).

use crate::backend::cuda::{
    config, elementwise, one_block, Arg, CudaBackend, CudaBuffer, CudaKernel, CudaSource, WARP_ROWS,
};
use crate::error::{Error, Result};

pub(crate) const SOURCE: CudaSource = CudaSource {
    file: "relational.cu",
    code: include_str!("relational.cu"),
};
pub(crate) const ROW_NORMALIZE: CudaKernel = kernel("row_normalize", "ppuu");
pub(crate) const ROW_NORMALIZE_BACKWARD: CudaKernel = kernel("row_normalize_backward", "pppuu");
pub(crate) const PAIRWISE_DISTANCE: CudaKernel = kernel("pairwise_distance", "ppuu");
pub(crate) const PAIRWISE_DISTANCE_BACKWARD: CudaKernel =
    kernel("pairwise_distance_backward", "ppppuu");
pub(crate) const OFFDIAG_NORMALIZE: CudaKernel = kernel("offdiag_normalize", "ppu");
pub(crate) const OFFDIAG_NORMALIZE_BACKWARD: CudaKernel =
    kernel("offdiag_normalize_backward", "pppu");

const fn kernel(name: &'static str, signature: &'static str) -> CudaKernel {
    CudaKernel {
        file: "relational.cu",
        name,
        signature,
    }
}

/// The `n` of an `[n, n]` relational matrix as u32: `relational.cu` indexes `n * n` (and `n * dim`)
/// with 32 bits, which also keeps its loops from wrapping.
fn relational_n(what: &str, n: usize, dim: usize) -> Result<u32> {
    if n.checked_mul(n.max(dim))
        .is_none_or(|len| len > u32::MAX as usize)
    {
        return Err(Error::Limit(format!(
            "{what}: n = {n}, dim = {dim}; the CUDA kernel indexes n * max(n, dim) with 32 bits"
        )));
    }
    Ok(n as u32)
}

/// The `[rows, cols]` shape of a row normalisation as u32s.
fn row_shape(len: usize, cols: usize) -> Result<(u32, u32)> {
    CudaBackend::check_cols(cols)?;
    let rows = len / cols;
    let rows = u32::try_from(rows).map_err(|_| {
        Error::Limit(format!(
            "row_normalize: {rows} rows; the CUDA kernel counts rows with 32 bits"
        ))
    })?;
    Ok((rows, cols as u32))
}

pub(crate) fn row_normalize(
    b: &CudaBackend,
    cols: usize,
    x: &CudaBuffer,
    y: &CudaBuffer,
) -> Result<()> {
    let (rows, cols) = row_shape(x.len, cols)?;
    b.launch_one(
        &ROW_NORMALIZE,
        config((rows as u64).div_ceil(WARP_ROWS), 32 * WARP_ROWS as u32),
        &[
            Arg::Ptr(x.ptr),
            Arg::Ptr(y.ptr),
            Arg::U32(rows),
            Arg::U32(cols),
        ],
    )
}

pub(crate) fn row_normalize_backward(
    b: &CudaBackend,
    cols: usize,
    x: &CudaBuffer,
    dy: &CudaBuffer,
    dx: &CudaBuffer,
) -> Result<()> {
    let (rows, cols) = row_shape(x.len, cols)?;
    b.launch_one(
        &ROW_NORMALIZE_BACKWARD,
        config((rows as u64).div_ceil(WARP_ROWS), 32 * WARP_ROWS as u32),
        &[
            Arg::Ptr(x.ptr),
            Arg::Ptr(dy.ptr),
            Arg::Ptr(dx.ptr),
            Arg::U32(rows),
            Arg::U32(cols),
        ],
    )
}

pub(crate) fn pairwise_distance(
    b: &CudaBackend,
    n: usize,
    dim: usize,
    f: &CudaBuffer,
    d: &CudaBuffer,
) -> Result<()> {
    let n32 = relational_n("pairwise_distance", n, dim)?;
    let tiles = (n as u64).div_ceil(16);
    b.launch_one(
        &PAIRWISE_DISTANCE,
        config(tiles * tiles, 256),
        &[
            Arg::Ptr(f.ptr),
            Arg::Ptr(d.ptr),
            Arg::U32(n32),
            Arg::U32(dim as u32),
        ],
    )
}

pub(crate) fn pairwise_distance_backward(
    b: &CudaBackend,
    n: usize,
    dim: usize,
    f: &CudaBuffer,
    d: &CudaBuffer,
    dd: &CudaBuffer,
    df: &CudaBuffer,
) -> Result<()> {
    let n32 = relational_n("pairwise_distance_backward", n, dim)?;
    b.launch_one(
        &PAIRWISE_DISTANCE_BACKWARD,
        elementwise(n * dim),
        &[
            Arg::Ptr(f.ptr),
            Arg::Ptr(d.ptr),
            Arg::Ptr(dd.ptr),
            Arg::Ptr(df.ptr),
            Arg::U32(n32),
            Arg::U32(dim as u32),
        ],
    )
}

pub(crate) fn offdiag_normalize(
    b: &CudaBackend,
    n: usize,
    d: &CudaBuffer,
    y: &CudaBuffer,
) -> Result<()> {
    let n32 = relational_n("offdiag_normalize", n, n)?;
    b.launch_one(
        &OFFDIAG_NORMALIZE,
        one_block(),
        &[Arg::Ptr(d.ptr), Arg::Ptr(y.ptr), Arg::U32(n32)],
    )
}

pub(crate) fn offdiag_normalize_backward(
    b: &CudaBackend,
    n: usize,
    d: &CudaBuffer,
    dy: &CudaBuffer,
    dd: &CudaBuffer,
) -> Result<()> {
    let n32 = relational_n("offdiag_normalize_backward", n, n)?;
    b.launch_one(
        &OFFDIAG_NORMALIZE_BACKWARD,
        one_block(),
        &[
            Arg::Ptr(d.ptr),
            Arg::Ptr(dy.ptr),
            Arg::Ptr(dd.ptr),
            Arg::U32(n32),
        ],
    )
}
