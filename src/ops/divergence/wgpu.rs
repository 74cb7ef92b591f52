//! Dispatch of `divergence.wgsl` through the row-loss sequence (count of valid rows, the row
//! kernel per chunk of rows, the fixed-order reduction).

use bytemuck::{Pod, Zeroable};

use super::DivergenceSpec;
use crate::backend::wgpu::dispatch::{GradTarget, RowBackend, RowBuffers};
use crate::backend::wgpu::pipelines::{WgslKernel, ROW_LOSS_BINDINGS};
use crate::backend::wgpu::{uniform_layout, UniformLayout, WgpuBackend, WgpuBuffer, WgpuLabels};
use crate::backend::LossOut;
use crate::error::{Error, Result};
use crate::ops::TeacherInput;

pub(crate) const DIVERGENCE: WgslKernel = WgslKernel {
    file: "divergence.wgsl",
    body: include_str!("divergence.wgsl"),
    entry: "divergence",
    row_io: true,
    bindings: ROW_LOSS_BINDINGS,
};

/// The highest temperature the wgpu divergence kernel accepts for a teacher given as
/// probabilities or log-probabilities: measured on lavapipe, the loss and gradients stay within
/// 1e-4 of the f64 reference up to T = 30 (7e-5 worst), not at T = 100 (8e-4). Teacher logits
/// are accurate over the whole accepted range (to T = 1e4).
pub const GIVEN_TEACHER_MAX_TEMPERATURE: f32 = 30.0;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct DivergenceParams {
    rows: u32,
    cols: u32,
    inv_t: f32,
    temperature: f32,
    divergence: u32,
    teacher_form: u32,
    beta: f32,
    grad_scale: f32,
    has_labels: u32,
    ignore_index: i32,
    reduction: u32,
    grad_mode: u32,
    want_grad_t: u32,
    teacher_eps: f32,
    dtype_s: u32,
    dtype_t: u32,
}

pub(crate) fn uniform_layouts() -> Vec<UniformLayout> {
    vec![uniform_layout!(
        DivergenceParams,
        "divergence.wgsl",
        [
            rows,
            cols,
            inv_t,
            temperature,
            divergence,
            teacher_form,
            beta,
            grad_scale,
            has_labels,
            ignore_index,
            reduction,
            grad_mode,
            want_grad_t,
            teacher_eps,
            dtype_s,
            dtype_t
        ]
    )]
}

/// Records the divergence (see [`crate::Backend::divergence`]).
pub(crate) fn divergence<B: RowBackend>(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &DivergenceSpec,
    student: &WgpuBuffer,
    teacher: &WgpuBuffer,
    labels: Option<&WgpuLabels>,
    out: LossOut<'_, B>,
) -> Result<()> {
    if spec.teacher != TeacherInput::Logits && spec.temperature > GIVEN_TEACHER_MAX_TEMPERATURE {
        return Err(Error::Unsupported(format!(
            "temperature {} with the teacher given as probabilities or log-probabilities: \
             the wgpu kernels meet 1e-4 there only up to T = {GIVEN_TEACHER_MAX_TEMPERATURE} \
             (at higher T the loss is second order in 1/T and the f32 exp / log of a given \
             teacher decides it; docs/ARCHITECTURE.md, numerics); pass the teacher's logits \
             (TeacherInput::Logits, accurate to T = 1e4), or use the CPU or CUDA backend",
            spec.temperature
        )));
    }
    let row_loss = w.row_loss_buffer(&out, spec.shape.rows)?;
    let params = |rows: u32, grad_mode: u32| {
        bytemuck::bytes_of(&DivergenceParams {
            rows,
            cols: spec.shape.cols as u32,
            inv_t: 1.0 / spec.temperature,
            temperature: spec.temperature,
            divergence: spec.divergence.code(),
            teacher_form: spec.teacher.code(),
            beta: spec.divergence.beta(),
            grad_scale: spec.grad_scale,
            has_labels: labels.is_some() as u32,
            ignore_index: spec.ignore_index,
            reduction: spec.reduction.code(),
            grad_mode,
            want_grad_t: out.grad_teacher.is_some() as u32,
            teacher_eps: spec.teacher_eps,
            dtype_s: student.dtype().code(),
            dtype_t: teacher.dtype().code(),
        })
        .to_vec()
    };
    w.encode_row_loss(
        enc,
        &DIVERGENCE,
        spec.shape,
        spec.reduction,
        spec.ignore_index,
        RowBuffers {
            student,
            teacher: Some(teacher),
            labels,
            row_loss: &row_loss,
            grad_student: GradTarget::of(&out.grad_student),
            grad_teacher: out.grad_teacher,
        },
        out.loss,
        params,
    )
}
