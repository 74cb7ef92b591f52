//! Dispatch of `softmax.wgsl`: one row kernel per chunk of rows (forward, or backward from the
//! forward output and the upstream gradient).

use bytemuck::{Pod, Zeroable};

use super::SoftmaxSpec;
use crate::backend::wgpu::dispatch::{threads_per_row, Window, WG};
use crate::backend::wgpu::pipelines::{Bind, WgslKernel};
use crate::backend::wgpu::{uniform_layout, UniformLayout, WgpuBackend, WgpuBuffer};
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
}

pub(crate) fn uniform_layouts() -> Vec<UniformLayout> {
    vec![uniform_layout!(
        SoftmaxParams,
        "softmax.wgsl",
        [rows, cols, inv_t, log_mode]
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

fn encode(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &SoftmaxSpec,
    x: &WgpuBuffer,
    dy: Option<&WgpuBuffer>,
    out: &WgpuBuffer,
) -> Result<()> {
    let c = spec.shape.cols;
    let tpr = threads_per_row(c);
    let kernel = if dy.is_some() { &BACKWARD } else { &FORWARD };
    for (r0, rows) in w.row_chunks(spec.shape.rows, c)? {
        let mat = |b| Window::elems(b, (r0 * c) as u64, (rows * c) as u64);
        let params = SoftmaxParams {
            rows: rows as u32,
            cols: c as u32,
            inv_t: 1.0 / spec.temperature,
            log_mode: spec.log as u32,
        };
        w.dispatch(
            enc,
            kernel,
            tpr,
            bytemuck::bytes_of(&params),
            &[
                Some(mat(x.buffer())),
                dy.map(|d| mat(d.buffer())),
                Some(mat(out.buffer())),
            ],
            rows.div_ceil((WG / tpr) as usize) as u32,
        )?;
    }
    Ok(())
}
