//! Dispatch of `softmax.wgsl`: one row kernel per chunk of rows (forward, or backward from the
//! forward output and the upstream gradient).

use bytemuck::{Pod, Zeroable};

use super::SoftmaxSpec;
use crate::backend::wgpu::dispatch::{threads_per_row, Window, WG};
use crate::backend::wgpu::pipelines::{Bind, WgslKernel};
use crate::backend::wgpu::{uniform_layout, Place, UniformLayout, WgpuBackend, WgpuBuffer};
use crate::dtype::Dtype;
use crate::error::Result;

const BODY: &str = include_str!("softmax.wgsl");
const BINDINGS: &[Bind] = &[Bind::Uniform, Bind::Read, Bind::Read, Bind::ReadWrite];

pub(crate) const FORWARD: WgslKernel = WgslKernel {
    file: "softmax.wgsl",
    body: BODY,
    entry: "forward",
    row_io: false,
    bindings: BINDINGS,
};
pub(crate) const BACKWARD: WgslKernel = WgslKernel {
    file: "softmax.wgsl",
    body: BODY,
    entry: "backward",
    row_io: false,
    bindings: BINDINGS,
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SoftmaxParams {
    rows: u32,
    cols: u32,
    inv_t: f32,
    log_mode: u32,
    dtype_x: u32,
    dtype_dy: u32,
    pad: [u32; 2],
}

pub(crate) fn uniform_layouts() -> Vec<UniformLayout> {
    vec![uniform_layout!(
        SoftmaxParams,
        "softmax.wgsl",
        [rows, cols, inv_t, log_mode, dtype_x, dtype_dy]
    )]
}

/// `y = softmax(x / T)` (or its log).
pub(crate) fn softmax(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &SoftmaxSpec,
    x: &WgpuBuffer,
    y: &WgpuBuffer,
) -> Result<()> {
    encode(w, enc, spec, x, None, y)
}

/// `dx` from the forward output `y` and the upstream `dy`.
pub(crate) fn softmax_backward(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &SoftmaxSpec,
    y: &WgpuBuffer,
    dy: &WgpuBuffer,
    dx: &WgpuBuffer,
) -> Result<()> {
    encode(w, enc, spec, y, Some(dy), dx)
}

/// The row kernel per chunk of rows; an output of bf16 or f16 is written in f32 into scratch and
/// packed afterwards (`pack.wgsl`).
fn encode(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &SoftmaxSpec,
    x: &WgpuBuffer,
    dy: Option<&WgpuBuffer>,
    out: &WgpuBuffer,
) -> Result<()> {
    let c = spec.shape.cols;
    let len = spec.shape.len();
    let tpr = threads_per_row(c);
    let kernel = if dy.is_some() { &BACKWARD } else { &FORWARD };
    let scratch = match out.dtype() {
        Dtype::F32 => None,
        _ => Some(w.scratch("softmax_out_f32", len as u64 * 4)?),
    };
    // Where the kernel writes: the f32 scratch (packed into `out` after), or `out` itself.
    let dst = match &scratch {
        Some(s) => Place::of(s),
        None => Place::of(out),
    };
    let any_half = x.dtype() != Dtype::F32 || dy.is_some_and(|d| d.dtype() != Dtype::F32);
    for (r0, rows) in w.row_chunks(spec.shape.rows, c, if any_half { 2 } else { 4 })? {
        let (first, count) = ((r0 * c) as u64, (rows * c) as u64);
        let params = SoftmaxParams {
            rows: rows as u32,
            cols: c as u32,
            inv_t: 1.0 / spec.temperature,
            log_mode: spec.log as u32,
            dtype_x: x.dtype().code(),
            dtype_dy: dy.map_or(0, |d| d.dtype().code()),
            pad: [0; 2],
        };
        w.dispatch(
            enc,
            kernel,
            tpr,
            bytemuck::bytes_of(&params),
            &[
                Some(Window::of(x, first, count)),
                dy.map(|d| Window::of(d, first, count)),
                Some(Window::elems(&dst, first, count)),
            ],
            rows.div_ceil((WG / tpr) as usize) as u32,
        )?;
    }
    if let Some(scratch) = &scratch {
        w.encode_pack(enc, scratch, &Place::of(out), out.dtype(), len)?;
    }
    Ok(())
}
