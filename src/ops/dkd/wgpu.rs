//! Dispatch of `dkd.wgsl` through the row-loss sequence.

use bytemuck::{Pod, Zeroable};

use super::DkdSpec;
use crate::backend::wgpu::dispatch::{GradTarget, RowBackend, RowBuffers};
use crate::backend::wgpu::pipelines::{WgslKernel, ROW_LOSS_BINDINGS};
use crate::backend::wgpu::{uniform_layout, UniformLayout, WgpuBackend, WgpuBuffer, WgpuLabels};
use crate::backend::LossOut;
use crate::error::Result;

pub(crate) const DKD: WgslKernel = WgslKernel {
    file: "dkd.wgsl",
    body: include_str!("dkd.wgsl"),
    entry: "dkd",
    row_io: true,
    bindings: ROW_LOSS_BINDINGS,
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct DkdParams {
    rows: u32,
    cols: u32,
    inv_t: f32,
    temperature: f32,
    ce_weight: f32,
    tckd_weight: f32,
    nckd_weight: f32,
    eps: f32,
    grad_scale: f32,
    ignore_index: i32,
    reduction: u32,
    grad_mode: u32,
    dtype_s: u32,
    dtype_t: u32,
    pad: [u32; 2],
}

pub(crate) fn uniform_layouts() -> Vec<UniformLayout> {
    vec![uniform_layout!(
        DkdParams,
        "dkd.wgsl",
        [
            rows,
            cols,
            inv_t,
            temperature,
            ce_weight,
            tckd_weight,
            nckd_weight,
            eps,
            grad_scale,
            ignore_index,
            reduction,
            grad_mode,
            dtype_s,
            dtype_t
        ]
    )]
}

/// Records DKD (see [`crate::Backend::dkd`]; the teacher's gradient was refused by validation).
pub(crate) fn dkd<B: RowBackend>(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &DkdSpec,
    student: &WgpuBuffer,
    teacher: &WgpuBuffer,
    labels: &WgpuLabels,
    out: LossOut<'_, B>,
) -> Result<()> {
    let row_loss = w.row_loss_buffer(&out, spec.shape.rows)?;
    let params = |rows: u32, grad_mode: u32| {
        bytemuck::bytes_of(&DkdParams {
            rows,
            cols: spec.shape.cols as u32,
            inv_t: 1.0 / spec.temperature,
            temperature: spec.temperature,
            ce_weight: spec.ce_weight,
            tckd_weight: spec.tckd_weight,
            nckd_weight: spec.nckd_weight,
            eps: spec.label_smoothing,
            grad_scale: spec.grad_scale,
            ignore_index: spec.ignore_index,
            reduction: spec.reduction.code(),
            grad_mode,
            dtype_s: student.dtype().code(),
            dtype_t: teacher.dtype().code(),
            pad: [0; 2],
        })
        .to_vec()
    };
    w.encode_row_loss(
        enc,
        &DKD,
        spec.shape,
        spec.reduction,
        spec.ignore_index,
        RowBuffers {
            student,
            teacher: Some(teacher),
            labels: Some(labels),
            row_loss: &row_loss,
            grad_student: GradTarget::of(&out.grad_student),
            grad_teacher: None,
        },
        out.loss,
        params,
    )
}
