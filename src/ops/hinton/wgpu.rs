//! Dispatch of `hinton.wgsl` through the row-loss sequence.

use bytemuck::{Pod, Zeroable};

use super::HintonSpec;
use crate::backend::wgpu::dispatch::{grad_into, grad_mode, RowBackend, RowBuffers};
use crate::backend::wgpu::pipelines::{WgslKernel, ROW_LOSS_BINDINGS};
use crate::backend::wgpu::{uniform_layout, UniformLayout, WgpuBackend, WgpuBuffer, WgpuLabels};
use crate::backend::LossOut;
use crate::error::Result;

pub(crate) const HINTON: WgslKernel = WgslKernel {
    file: "hinton.wgsl",
    body: include_str!("hinton.wgsl"),
    entry: "hinton",
    row_io: true,
    bindings: ROW_LOSS_BINDINGS,
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct HintonParams {
    rows: u32,
    cols: u32,
    inv_t: f32,
    temperature: f32,
    alpha: f32,
    eps: f32,
    grad_scale: f32,
    ignore_index: i32,
    reduction: u32,
    grad_mode: u32,
    want_grad_t: u32,
    pad: u32,
}

pub(crate) fn uniform_layouts() -> Vec<UniformLayout> {
    vec![uniform_layout!(
        HintonParams,
        "hinton.wgsl",
        [
            rows,
            cols,
            inv_t,
            temperature,
            alpha,
            eps,
            grad_scale,
            ignore_index,
            reduction,
            grad_mode,
            want_grad_t
        ]
    )]
}

/// Records the fused Hinton loss (see [`crate::Backend::hinton`]).
pub(crate) fn hinton<B: RowBackend>(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &HintonSpec,
    student: &WgpuBuffer,
    teacher: &WgpuBuffer,
    labels: &WgpuLabels,
    out: LossOut<'_, B>,
) -> Result<()> {
    let row_loss = w.row_loss_buffer(&out, spec.shape.rows)?;
    let params = |rows: u32| {
        bytemuck::bytes_of(&HintonParams {
            rows,
            cols: spec.shape.cols as u32,
            inv_t: 1.0 / spec.temperature,
            temperature: spec.temperature,
            alpha: spec.alpha,
            eps: spec.label_smoothing,
            grad_scale: spec.grad_scale,
            ignore_index: spec.ignore_index,
            reduction: spec.reduction.code(),
            grad_mode: grad_mode(&out.grad_student),
            want_grad_t: out.grad_teacher.is_some() as u32,
            pad: 0,
        })
        .to_vec()
    };
    w.encode_row_loss(
        enc,
        &HINTON,
        spec.shape,
        spec.reduction,
        spec.ignore_index,
        RowBuffers {
            student: student.buffer(),
            teacher: Some(teacher.buffer()),
            labels: Some(labels.buffer()),
            row_loss: &row_loss,
            grad_student: grad_into(&out.grad_student),
            grad_teacher: out.grad_teacher.map(|g| g.buffer()),
        },
        out.loss.buffer(),
        params,
    )
}
