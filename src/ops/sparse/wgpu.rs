//! Dispatch of `sparse.wgsl` through the row-loss sequence, one workgroup per row, with the
//! `[N, k]` indices bound in slot 8 and the `[N, k]` values in the teacher's slot.
//!
//! Indices on the device are not checked on the host (that would read them back): in the kernel
//! an index outside `0..C` or a duplicate within a row makes that row's loss and gradient NaN (it
//! is never read or written out of bounds). Bad values (NaN, `+inf`, all `-inf` log-probabilities,
//! a non-finite logit) and an invalid label do the same.

use bytemuck::{Pod, Zeroable};

use super::{SparseSpec, SparseTail, SparseValues};
use crate::backend::wgpu::dispatch::{GradTarget, RowBackend, RowBuffers, SparseTeacher};
use crate::backend::wgpu::pipelines::{WgslKernel, SPARSE_BINDINGS};
use crate::backend::wgpu::{
    uniform_layout, UniformLayout, WgpuBackend, WgpuBuffer, WgpuLabels,
    GIVEN_TEACHER_MAX_TEMPERATURE,
};
use crate::backend::LossOut;
use crate::error::{Error, Result};

pub(crate) const SPARSE: WgslKernel = WgslKernel {
    file: "sparse.wgsl",
    body: include_str!("sparse.wgsl"),
    entry: "sparse_kd",
    row_io: true,
    bindings: SPARSE_BINDINGS,
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SparseParams {
    rows: u32,
    cols: u32,
    k: u32,
    k2: u32,
    inv_t: f32,
    temperature: f32,
    divergence: u32,
    beta: f32,
    tail: u32,
    logits: u32,
    alpha: f32,
    eps: f32,
    grad_scale: f32,
    ignore_index: i32,
    reduction: u32,
    grad_mode: u32,
    has_labels: u32,
    dtype_s: u32,
    dtype_t: u32,
    one: f32,
}

pub(crate) fn uniform_layouts() -> Vec<UniformLayout> {
    vec![uniform_layout!(
        SparseParams,
        "sparse.wgsl",
        [
            rows,
            cols,
            k,
            k2,
            inv_t,
            temperature,
            divergence,
            beta,
            tail,
            logits,
            alpha,
            eps,
            grad_scale,
            ignore_index,
            reduction,
            grad_mode,
            has_labels,
            dtype_s,
            dtype_t,
            one
        ]
    )]
}

/// The wgpu limits of a sparse teacher beyond the spec's validation: the temperature at most
/// [`GIVEN_TEACHER_MAX_TEMPERATURE`] (the divergence kernel's policy for a given teacher: above
/// it the loss is second order in `1/T` and f32 logs of the values decide it).
pub fn check_wgpu(spec: &SparseSpec) -> Result<()> {
    if spec.temperature > GIVEN_TEACHER_MAX_TEMPERATURE {
        return Err(Error::Unsupported(format!(
            "temperature {} with a sparse teacher: the wgpu kernel meets 1e-4 only up to \
             T = {GIVEN_TEACHER_MAX_TEMPERATURE} (at higher T the loss is second order in 1/T \
             and the f32 logs of the teacher's values decide it; docs/LOSSES.md section 10); \
             use the CPU backends (FastCpuBackend) for higher temperatures",
            spec.temperature
        )));
    }
    Ok(())
}

/// Records the sparse teacher's loss (see [`crate::Backend::sparse_kd`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sparse_kd<B: RowBackend>(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &SparseSpec,
    student: &WgpuBuffer,
    indices: &WgpuLabels,
    values: &WgpuBuffer,
    labels: Option<&WgpuLabels>,
    out: LossOut<'_, B>,
) -> Result<()> {
    check_wgpu(spec)?;
    let row_loss = w.row_loss_buffer(&out, spec.shape.rows)?;
    let tail = match spec.tail {
        _ if !spec.has_tail() || spec.values == SparseValues::Logits => 0,
        SparseTail::Renormalize => 0,
        SparseTail::Bucket => 1,
        SparseTail::Uniform => 2,
    };
    let params = |rows: u32, grad_mode: u32| {
        bytemuck::bytes_of(&SparseParams {
            rows,
            cols: spec.shape.cols as u32,
            k: spec.k as u32,
            k2: spec.k.next_power_of_two() as u32,
            inv_t: 1.0 / spec.temperature,
            temperature: spec.temperature,
            divergence: spec.divergence.code(),
            beta: spec.divergence.beta(),
            tail,
            logits: (spec.values == SparseValues::Logits) as u32,
            alpha: spec.alpha,
            eps: spec.label_smoothing,
            grad_scale: spec.grad_scale,
            ignore_index: spec.ignore_index,
            reduction: spec.reduction.code(),
            grad_mode,
            has_labels: labels.is_some() as u32,
            dtype_s: student.dtype().code(),
            dtype_t: values.dtype().code(),
            one: 1.0,
        })
        .to_vec()
    };
    w.encode_sparse_row_loss(
        enc,
        &SPARSE,
        spec.shape,
        spec.reduction,
        spec.ignore_index,
        RowBuffers {
            student,
            teacher: Some(values),
            labels,
            row_loss: &row_loss,
            grad_student: GradTarget::of(&out.grad_student),
            grad_teacher: None,
        },
        SparseTeacher { k: spec.k, indices },
        out.loss,
        params,
    )
}
