//! Dispatch of `relational.wgsl`: row normalisation (a warp-like segment per row), pairwise
//! distances and their backward (an invocation per output element), off-diagonal mean
//! normalisation (one workgroup).

use crate::backend::wgpu::dispatch::{whole, WG};
use crate::backend::wgpu::pipelines::{Bind, WgslKernel};
use crate::backend::wgpu::{uniform_layout, UniformLayout, WgpuBackend, WgpuBuffer};
use crate::error::Result;

const BODY: &str = include_str!("relational.wgsl");
const BINDINGS: &[Bind] = &[
    Bind::Uniform,
    Bind::Read,
    Bind::Read,
    Bind::Read,
    Bind::ReadWrite,
];

const fn kernel(entry: &'static str) -> WgslKernel {
    WgslKernel {
        file: "relational.wgsl",
        body: BODY,
        entry,
        row_io: false,
        bindings: BINDINGS,
    }
}

pub(crate) const ROW_NORMALIZE: WgslKernel = kernel("row_normalize");
pub(crate) const ROW_NORMALIZE_BACKWARD: WgslKernel = kernel("row_normalize_backward");
pub(crate) const PAIRWISE_DISTANCE: WgslKernel = kernel("pairwise_distance");
pub(crate) const PAIRWISE_DISTANCE_BACKWARD: WgslKernel = kernel("pairwise_distance_backward");
pub(crate) const OFFDIAG_NORMALIZE: WgslKernel = kernel("offdiag_normalize");
pub(crate) const OFFDIAG_NORMALIZE_BACKWARD: WgslKernel = kernel("offdiag_normalize_backward");

/// `relational.wgsl`'s uniform: `[n, dim, 0, 0]` as written by [`encode`].
#[repr(C)]
struct RelationalParams {
    n: u32,
    dim: u32,
    pad: [u32; 2],
}

pub(crate) fn uniform_layouts() -> Vec<UniformLayout> {
    vec![uniform_layout!(
        RelationalParams,
        "relational.wgsl",
        [n, dim]
    )]
}

pub(crate) fn row_normalize(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    cols: usize,
    x: &WgpuBuffer,
    y: &WgpuBuffer,
) -> Result<()> {
    let rows = x.len() / cols;
    encode(
        w,
        enc,
        &ROW_NORMALIZE,
        rows,
        cols,
        [Some(x), None, None],
        y,
        rows,
    )
}

pub(crate) fn row_normalize_backward(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    cols: usize,
    x: &WgpuBuffer,
    dy: &WgpuBuffer,
    dx: &WgpuBuffer,
) -> Result<()> {
    let rows = x.len() / cols;
    let inputs = [Some(x), Some(dy), None];
    encode(
        w,
        enc,
        &ROW_NORMALIZE_BACKWARD,
        rows,
        cols,
        inputs,
        dx,
        rows,
    )
}

pub(crate) fn pairwise_distance(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    n: usize,
    dim: usize,
    f: &WgpuBuffer,
    d: &WgpuBuffer,
) -> Result<()> {
    encode(
        w,
        enc,
        &PAIRWISE_DISTANCE,
        n,
        dim,
        [Some(f), None, None],
        d,
        n * n,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn pairwise_distance_backward(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    n: usize,
    dim: usize,
    f: &WgpuBuffer,
    d: &WgpuBuffer,
    dd: &WgpuBuffer,
    df: &WgpuBuffer,
) -> Result<()> {
    let inputs = [Some(f), Some(d), Some(dd)];
    encode(
        w,
        enc,
        &PAIRWISE_DISTANCE_BACKWARD,
        n,
        dim,
        inputs,
        df,
        n * dim,
    )
}

pub(crate) fn offdiag_normalize(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    n: usize,
    d: &WgpuBuffer,
    y: &WgpuBuffer,
) -> Result<()> {
    encode(
        w,
        enc,
        &OFFDIAG_NORMALIZE,
        n,
        0,
        [Some(d), None, None],
        y,
        0,
    )
}

pub(crate) fn offdiag_normalize_backward(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    n: usize,
    d: &WgpuBuffer,
    dy: &WgpuBuffer,
    dd: &WgpuBuffer,
) -> Result<()> {
    let inputs = [Some(d), Some(dy), None];
    encode(w, enc, &OFFDIAG_NORMALIZE_BACKWARD, n, 0, inputs, dd, 0)
}

/// A relational.wgsl dispatch: `threads` invocations (0: one workgroup).
#[allow(clippy::too_many_arguments)]
fn encode(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    kernel: &WgslKernel,
    n: usize,
    dim: usize,
    inputs: [Option<&WgpuBuffer>; 3],
    out: &WgpuBuffer,
    threads: usize,
) -> Result<()> {
    // The bytes of a RelationalParams (its layout is checked against the shader).
    let params = [n as u32, dim as u32, 0, 0];
    let [a, b, c] = inputs;
    w.dispatch(
        enc,
        kernel,
        WG,
        bytemuck::cast_slice(&params),
        &[
            a.and_then(whole),
            b.and_then(whole),
            c.and_then(whole),
            whole(out),
        ],
        threads.div_ceil(256).max(1) as u32,
    )
}
