//! Dispatch of `cross_entropy.wgsl` through the row-loss sequence.

use bytemuck::{Pod, Zeroable};

use super::CrossEntropySpec;
use crate::backend::wgpu::dispatch::{GradTarget, RowBackend, RowBuffers};
use crate::backend::wgpu::pipelines::{WgslKernel, ROW_LOSS_BINDINGS};
use crate::backend::wgpu::{uniform_layout, UniformLayout, WgpuBackend, WgpuBuffer, WgpuLabels};
use crate::backend::LossOut;
use crate::error::Result;

pub(crate) const CROSS_ENTROPY: WgslKernel = WgslKernel {
    file: "cross_entropy.wgsl",
    body: include_str!("cross_entropy.wgsl"),
    entry: "cross_entropy",
    row_io: true,
    bindings: ROW_LOSS_BINDINGS,
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct CrossEntropyParams {
    rows: u32,
    cols: u32,
    eps: f32,
    grad_scale: f32,
    ignore_index: i32,
    reduction: u32,
    grad_mode: u32,
    dtype_s: u32,
    dtype_t: u32,
    pad: [u32; 3],
}

pub(crate) fn uniform_layouts() -> Vec<UniformLayout> {
    vec![uniform_layout!(
        CrossEntropyParams,
        "cross_entropy.wgsl",
        [
            rows,
            cols,
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

/// Records cross-entropy (see [`crate::Backend::cross_entropy`]).
pub(crate) fn cross_entropy<B: RowBackend>(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &CrossEntropySpec,
    student: &WgpuBuffer,
    labels: &WgpuLabels,
    out: LossOut<'_, B>,
) -> Result<()> {
    let row_loss = w.row_loss_buffer(&out, spec.shape.rows)?;
    let params = |rows: u32, grad_mode: u32| {
        bytemuck::bytes_of(&CrossEntropyParams {
            rows,
            cols: spec.shape.cols as u32,
            eps: spec.label_smoothing,
            grad_scale: spec.grad_scale,
            ignore_index: spec.ignore_index,
            reduction: spec.reduction.code(),
            grad_mode,
            dtype_s: student.dtype().code(),
            dtype_t: 0,
            pad: [0; 3],
        })
        .to_vec()
    };
    w.encode_row_loss(
        enc,
        &CROSS_ENTROPY,
        spec.shape,
        spec.reduction,
        spec.ignore_index,
        RowBuffers {
            student,
            teacher: None,
            labels: Some(labels),
            row_loss: &row_loss,
            grad_student: GradTarget::of(&out.grad_student),
            grad_teacher: None,
        },
        out.loss,
        params,
    )
}
