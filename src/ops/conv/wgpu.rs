//! Dispatch of `conv.wgsl`: one invocation per output element (im2col, col2im as a gather,
//! pooling and its backward, batched transpose).

use bytemuck::{Pod, Zeroable};

use super::{ConvSpec, PoolSpec};
use crate::backend::wgpu::dispatch::{whole, WG};
use crate::backend::wgpu::pipelines::{Bind, WgslKernel};
use crate::backend::wgpu::{uniform_layout, UniformLayout, WgpuBackend, WgpuBuffer};
use crate::error::Result;

const BODY: &str = include_str!("conv.wgsl");
const BINDINGS: &[Bind] = &[Bind::Uniform, Bind::Read, Bind::Read, Bind::ReadWrite];

const fn kernel(entry: &'static str) -> WgslKernel {
    WgslKernel {
        file: "conv.wgsl",
        body: BODY,
        entry,
        row_io: false,
        bindings: BINDINGS,
    }
}

pub(crate) const IM2COL: WgslKernel = kernel("im2col");
pub(crate) const COL2IM: WgslKernel = kernel("col2im");
pub(crate) const POOL: WgslKernel = kernel("pool");
pub(crate) const POOL_BACKWARD: WgslKernel = kernel("pool_backward");
pub(crate) const TRANSPOSE: WgslKernel = kernel("transpose");

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct ConvParams {
    n: u32,
    h: u32,
    w: u32,
    c: u32,
    k: u32,
    stride: u32,
    pad: u32,
    oh: u32,
    ow: u32,
    max_pool: u32,
    len: u32,
    rows: u32,
    cols: u32,
    pad0: [u32; 3],
}

pub(crate) fn uniform_layouts() -> Vec<UniformLayout> {
    vec![uniform_layout!(
        ConvParams,
        "conv.wgsl",
        [n, h, w, c, k, stride, pad, oh, ow, max_pool, len, rows, cols]
    )]
}

impl ConvParams {
    fn conv(s: &ConvSpec, len: usize) -> Self {
        let (oh, ow) = s.out_hw();
        ConvParams {
            n: s.n as u32,
            h: s.h as u32,
            w: s.w as u32,
            c: s.c as u32,
            k: s.k as u32,
            stride: s.stride as u32,
            pad: s.pad as u32,
            oh: oh as u32,
            ow: ow as u32,
            len: len as u32,
            ..Default::default()
        }
    }

    fn pool(s: &PoolSpec, len: usize) -> Self {
        let (oh, ow) = s.out_hw();
        ConvParams {
            n: s.n as u32,
            h: s.h as u32,
            w: s.w as u32,
            c: s.c as u32,
            k: s.k as u32,
            stride: s.k as u32,
            oh: oh as u32,
            ow: ow as u32,
            max_pool: s.max as u32,
            len: len as u32,
            ..Default::default()
        }
    }
}

/// `cols = im2col(x)`.
pub(crate) fn im2col(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &ConvSpec,
    x: &WgpuBuffer,
    cols: &WgpuBuffer,
) -> Result<()> {
    let p = ConvParams::conv(spec, cols.len());
    encode(w, enc, &IM2COL, &p, x, None, cols)
}

/// `dx = col2im(dcols)`.
pub(crate) fn col2im(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &ConvSpec,
    dcols: &WgpuBuffer,
    dx: &WgpuBuffer,
) -> Result<()> {
    let p = ConvParams::conv(spec, dx.len());
    encode(w, enc, &COL2IM, &p, dcols, None, dx)
}

/// Max or average pooling.
pub(crate) fn pool(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &PoolSpec,
    x: &WgpuBuffer,
    y: &WgpuBuffer,
) -> Result<()> {
    let p = ConvParams::pool(spec, y.len());
    encode(w, enc, &POOL, &p, x, None, y)
}

/// The input gradient of pooling.
pub(crate) fn pool_backward(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &PoolSpec,
    x: &WgpuBuffer,
    dy: &WgpuBuffer,
    dx: &WgpuBuffer,
) -> Result<()> {
    let p = ConvParams::pool(spec, dx.len());
    encode(w, enc, &POOL_BACKWARD, &p, x, Some(dy), dx)
}

/// `y[b, j, i] = x[b, i, j]`.
pub(crate) fn transpose(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    batch: usize,
    rows: usize,
    cols: usize,
    x: &WgpuBuffer,
    y: &WgpuBuffer,
) -> Result<()> {
    let p = ConvParams {
        n: batch as u32,
        rows: rows as u32,
        cols: cols as u32,
        len: (batch * rows * cols) as u32,
        ..Default::default()
    };
    encode(w, enc, &TRANSPOSE, &p, x, None, y)
}

/// One invocation per element of `out`.
fn encode(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    kernel: &WgslKernel,
    params: &ConvParams,
    a: &WgpuBuffer,
    b: Option<&WgpuBuffer>,
    out: &WgpuBuffer,
) -> Result<()> {
    w.check_binding(&[a, out])?;
    w.dispatch(
        enc,
        kernel,
        WG,
        bytemuck::bytes_of(params),
        &[whole(a), b.and_then(whole), whole(out)],
        out.len().div_ceil(256) as u32,
    )
}
