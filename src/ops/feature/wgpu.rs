//! Dispatch of `mse.wgsl` (MSE and smooth L1: per-workgroup partial sums and the gradients, then
//! the fixed-order reduction) and `attention.wgsl` (a workgroup per sample, then the reduction).

use bytemuck::{Pod, Zeroable};

use super::{AttentionSpec, MseSpec};
use crate::backend::wgpu::dispatch::{whole, Window, WG};
use crate::backend::wgpu::pipelines::{Bind, WgslKernel};
use crate::backend::wgpu::{uniform_layout, UniformLayout, WgpuBackend, WgpuBuffer};
use crate::error::{Error, Result};

const FEATURE_BINDINGS: &[Bind] = &[
    Bind::Uniform,
    Bind::Read,
    Bind::Read,
    Bind::ReadWrite,
    Bind::ReadWrite,
    Bind::ReadWrite,
];

pub(crate) const MSE: WgslKernel = WgslKernel {
    file: "mse.wgsl",
    body: include_str!("mse.wgsl"),
    entry: "mse",
    row_io: false,
    bindings: FEATURE_BINDINGS,
};
pub(crate) const ATTENTION: WgslKernel = WgslKernel {
    file: "attention.wgsl",
    body: include_str!("attention.wgsl"),
    entry: "attention",
    row_io: false,
    bindings: FEATURE_BINDINGS,
};

/// Elements one MSE workgroup reduces (`PER_LANE` in `mse.wgsl`).
const MSE_ELEMS_PER_GROUP: u64 = 256 * 16;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MseParams {
    len: u32,
    grad_mode: u32,
    grad_k: f32,
    /// 0 squared error, 1 smooth L1.
    mode: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AttentionParams {
    n: u32,
    cs: u32,
    ct: u32,
    hw: u32,
    k: f32,
    grad_mode: u32,
    pad: [u32; 2],
}

pub(crate) fn uniform_layouts() -> Vec<UniformLayout> {
    vec![
        uniform_layout!(MseParams, "mse.wgsl", [len, grad_mode, grad_k, mode]),
        uniform_layout!(
            AttentionParams,
            "attention.wgsl",
            [n, cs, ct, hw, k, grad_mode]
        ),
    ]
}

/// Records the feature MSE (see [`crate::Backend::mse`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn mse(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &MseSpec,
    a: &WgpuBuffer,
    b: &WgpuBuffer,
    loss: &WgpuBuffer,
    grad_a: Option<&WgpuBuffer>,
    grad_b: Option<&WgpuBuffer>,
) -> Result<()> {
    pointwise(w, enc, spec, a, b, loss, grad_a, grad_b, false)
}

/// Records smooth L1 (see [`crate::Backend::smooth_l1`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn smooth_l1(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &MseSpec,
    a: &WgpuBuffer,
    b: &WgpuBuffer,
    loss: &WgpuBuffer,
    grad_a: Option<&WgpuBuffer>,
    grad_b: Option<&WgpuBuffer>,
) -> Result<()> {
    pointwise(w, enc, spec, a, b, loss, grad_a, grad_b, true)
}

/// MSE (`smooth_l1` false) or smooth L1, mean over all elements.
#[allow(clippy::too_many_arguments)]
fn pointwise(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &MseSpec,
    a: &WgpuBuffer,
    b: &WgpuBuffer,
    loss: &WgpuBuffer,
    grad_a: Option<&WgpuBuffer>,
    grad_b: Option<&WgpuBuffer>,
    smooth_l1: bool,
) -> Result<()> {
    let m = spec.len as u64;
    let groups_total = m.div_ceil(MSE_ELEMS_PER_GROUP);
    let partial = w.scratch("mse_partial", groups_total * 4)?;
    // Chunks of whole workgroups whose partial-sum offsets stay 256-byte aligned.
    let align =
        MSE_ELEMS_PER_GROUP * (w.limits().min_storage_buffer_offset_alignment as u64 / 4).max(1);
    let chunk = if m * 4 <= w.max_binding_bytes() {
        m
    } else {
        (w.max_binding_bytes() / 4) / align * align
    };
    if chunk == 0 {
        return Err(Error::Limit(
            "the storage binding limit is too small for MSE".into(),
        ));
    }
    let mode = grad_a.is_some() as u32 | (grad_b.is_some() as u32) << 1;
    let mut e0 = 0u64;
    while e0 < m {
        let len = chunk.min(m - e0);
        let win = |buf| Window::elems(buf, e0, len);
        let groups = len.div_ceil(MSE_ELEMS_PER_GROUP);
        let params = MseParams {
            len: len as u32,
            grad_mode: mode,
            grad_k: (spec.grad_scale as f64 * if smooth_l1 { 1.0 } else { 2.0 } / m as f64) as f32,
            mode: smooth_l1 as u32,
        };
        w.dispatch(
            enc,
            &MSE,
            WG,
            bytemuck::bytes_of(&params),
            &[
                Some(win(a)),
                Some(win(b)),
                Some(Window::new(
                    &partial,
                    e0 / MSE_ELEMS_PER_GROUP * 4,
                    groups * 4,
                )),
                grad_a.map(win),
                grad_b.map(win),
            ],
            groups as u32,
        )?;
        e0 += len;
    }
    w.encode_scaled_sum(
        enc,
        &partial,
        groups_total as usize,
        (1.0 / m as f64) as f32,
        loss,
    )
}

/// Records attention transfer (see [`crate::Backend::attention_transfer`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_transfer(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &AttentionSpec,
    student: &WgpuBuffer,
    teacher: &WgpuBuffer,
    loss: &WgpuBuffer,
    grad_student: Option<&WgpuBuffer>,
    grad_teacher: Option<&WgpuBuffer>,
) -> Result<()> {
    let biggest = student.bytes().max(teacher.bytes());
    if biggest > w.max_binding_bytes() {
        return Err(Error::Limit(format!(
            "attention transfer binds whole feature maps: {biggest} bytes exceed the device's \
             storage binding limit of {} bytes; split the batch",
            w.max_binding_bytes()
        )));
    }
    let sample_loss = w.scratch("sample_loss", spec.n as u64 * 4)?;
    let params = AttentionParams {
        n: spec.n as u32,
        cs: spec.student_channels as u32,
        ct: spec.teacher_channels as u32,
        hw: spec.hw as u32,
        k: (2.0 * spec.grad_scale as f64 / (spec.n * spec.hw) as f64) as f32,
        grad_mode: grad_student.is_some() as u32 | (grad_teacher.is_some() as u32) << 1,
        pad: [0; 2],
    };
    w.dispatch(
        enc,
        &ATTENTION,
        WG,
        bytemuck::bytes_of(&params),
        &[
            whole(student),
            whole(teacher),
            Some(Window::whole(&sample_loss, spec.n as u64 * 4)),
            grad_student.and_then(whole),
            grad_teacher.and_then(whole),
        ],
        spec.n as u32,
    )?;
    w.encode_scaled_sum(
        enc,
        &sample_loss,
        spec.n,
        (1.0 / (spec.n * spec.hw) as f64) as f32,
        loss,
    )
}
