//! Dispatch of `hinton.wgsl` through the row-loss sequence.

use bytemuck::{Pod, Zeroable};

use super::HintonSpec;
use crate::backend::wgpu::dispatch::{GradTarget, RowBackend, RowBuffers};
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
    dtype_s: u32,
    dtype_t: u32,
    pad: [u32; 3],
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
            want_grad_t,
            dtype_s,
            dtype_t
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
    let params = |rows: u32, grad_mode: u32| {
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
            grad_mode,
            want_grad_t: out.grad_teacher.is_some() as u32,
            dtype_s: student.dtype().code(),
            dtype_t: teacher.dtype().code(),
            pad: [0; 3],
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
            student,
            teacher: Some(teacher),
            labels: Some(labels),
            row_loss: &row_loss,
            grad_student: GradTarget::of(&out.grad_student),
            grad_teacher: out.grad_teacher,
        },
        out.loss,
        params,
    )
}
