//! Launch of `feature.cu`: MSE and smooth L1 (`mse_partial` blocks of partial sums in f64 and the
//! gradients, then `mse_final`), attention transfer (`at_map`, `at_norm`, `at_loss`, `at_grad`).

use super::{AttentionSpec, MseSpec};
use crate::backend::cuda::{
    config, ensure, one_block, stride_launch, Arg, CudaBackend, CudaBuffer, CudaKernel, CudaSource,
};
use crate::error::Result;

pub(crate) const SOURCE: CudaSource = CudaSource {
    file: "feature.cu",
    code: include_str!("feature.cu"),
};
pub(crate) const MSE_PARTIAL: CudaKernel = kernel("mse_partial", "pppplfpu");
pub(crate) const MSE_FINAL: CudaKernel = kernel("mse_final", "pudp");
pub(crate) const AT_MAP: CudaKernel = kernel("at_map", "ppuuu");
pub(crate) const AT_NORM: CudaKernel = kernel("at_norm", "ppuupp");
pub(crate) const AT_LOSS: CudaKernel = kernel("at_loss", "pudp");
pub(crate) const AT_GRAD: CudaKernel = kernel("at_grad", "pppppuuuuf");

const fn kernel(name: &'static str, signature: &'static str) -> CudaKernel {
    CudaKernel {
        file: "feature.cu",
        name,
        signature,
    }
}

/// `mse_partial`'s modes.
const MODE_SQUARED: u32 = 0;
const MODE_SMOOTH_L1: u32 = 1;

/// Blocks of `mse_partial`: a function of M alone, so the summation order is too.
fn mse_blocks(m: u64) -> u64 {
    m.div_ceil(2048).clamp(1, 1024)
}

/// The feature MSE (see [`crate::Backend::mse`]).
pub(crate) fn mse(
    b: &CudaBackend,
    spec: &MseSpec,
    x: &CudaBuffer,
    y: &CudaBuffer,
    loss: &CudaBuffer,
    grad_a: Option<&CudaBuffer>,
    grad_b: Option<&CudaBuffer>,
) -> Result<()> {
    pointwise(b, MODE_SQUARED, spec, x, y, loss, grad_a, grad_b)
}

/// Smooth L1 (see [`crate::Backend::smooth_l1`]).
pub(crate) fn smooth_l1(
    b: &CudaBackend,
    spec: &MseSpec,
    x: &CudaBuffer,
    y: &CudaBuffer,
    loss: &CudaBuffer,
    grad_a: Option<&CudaBuffer>,
    grad_b: Option<&CudaBuffer>,
) -> Result<()> {
    pointwise(b, MODE_SMOOTH_L1, spec, x, y, loss, grad_a, grad_b)
}

/// `mse_partial` then `mse_final`.
#[allow(clippy::too_many_arguments)]
fn pointwise(
    b: &CudaBackend,
    mode: u32,
    spec: &MseSpec,
    x: &CudaBuffer,
    y: &CudaBuffer,
    loss: &CudaBuffer,
    grad_a: Option<&CudaBuffer>,
    grad_b: Option<&CudaBuffer>,
) -> Result<()> {
    let m = spec.len as u64;
    let blocks = mse_blocks(m);
    let factor = if mode == MODE_SQUARED { 2.0 } else { 1.0 };
    let k = (factor * spec.grad_scale as f64 / m as f64) as f32;
    let mut st = b.lock()?;
    let partials = ensure(b.stream(), &mut st.scratch.f64s, blocks as usize)?;
    b.launch(
        &mut st,
        &MSE_PARTIAL,
        config(blocks, 256),
        &[
            Arg::Ptr(x.ptr),
            Arg::Ptr(y.ptr),
            Arg::Ptr(grad_a.map_or(0, |g| g.ptr)),
            Arg::Ptr(grad_b.map_or(0, |g| g.ptr)),
            Arg::U64(m),
            Arg::F32(k),
            Arg::Ptr(partials),
            Arg::U32(mode),
        ],
    )?;
    b.launch(
        &mut st,
        &MSE_FINAL,
        one_block(),
        &[
            Arg::Ptr(partials),
            Arg::U32(blocks as u32),
            Arg::F64(m as f64),
            Arg::Ptr(loss.ptr),
        ],
    )
}

/// Attention transfer (see [`crate::Backend::attention_transfer`]).
pub(crate) fn attention_transfer(
    b: &CudaBackend,
    spec: &AttentionSpec,
    student: &CudaBuffer,
    teacher: &CudaBuffer,
    loss: &CudaBuffer,
    grad_student: Option<&CudaBuffer>,
    grad_teacher: Option<&CudaBuffer>,
) -> Result<()> {
    let (n, cs, ct, hw) = (
        spec.n,
        spec.student_channels,
        spec.teacher_channels,
        spec.hw,
    );
    let maps = n * hw;
    let denom = maps as f64;
    let kk = (spec.grad_scale as f64 * 2.0 / denom) as f32;
    let mut guard = b.lock()?;
    let st = &mut *guard;
    let qs = ensure(b.stream(), &mut st.scratch.f32s[0], maps)?;
    let qt = ensure(b.stream(), &mut st.scratch.f32s[1], maps)?;
    let diff = ensure(b.stream(), &mut st.scratch.f32s[2], maps)?;
    let stats = ensure(b.stream(), &mut st.scratch.f64s, n * 8)?;
    let (n32, hw32) = (n as u32, hw as u32);
    for (a, q, ch) in [(student, qs, cs), (teacher, qt, ct)] {
        b.launch(
            st,
            &AT_MAP,
            stride_launch(maps as u64),
            &[
                Arg::Ptr(a.ptr),
                Arg::Ptr(q),
                Arg::U32(n32),
                Arg::U32(ch as u32),
                Arg::U32(hw32),
            ],
        )?;
    }
    b.launch(
        st,
        &AT_NORM,
        config(n as u64, 256),
        &[
            Arg::Ptr(qs),
            Arg::Ptr(qt),
            Arg::U32(n32),
            Arg::U32(hw32),
            Arg::Ptr(stats),
            Arg::Ptr(diff),
        ],
    )?;
    b.launch(
        st,
        &AT_LOSS,
        one_block(),
        &[
            Arg::Ptr(stats),
            Arg::U32(n32),
            Arg::F64(denom),
            Arg::Ptr(loss.ptr),
        ],
    )?;
    // at_norm left u_s in qs and u_t in qt.
    let sides = [
        (grad_student, student, qs, 0u32, cs),
        (grad_teacher, teacher, qt, 1u32, ct),
    ];
    for (grad, a, u_this, side, ch) in sides {
        let Some(g) = grad else { continue };
        b.launch(
            st,
            &AT_GRAD,
            stride_launch((n * ch * hw) as u64),
            &[
                Arg::Ptr(a.ptr),
                Arg::Ptr(g.ptr),
                Arg::Ptr(u_this),
                Arg::Ptr(diff),
                Arg::Ptr(stats),
                Arg::U32(side),
                Arg::U32(n32),
                Arg::U32(ch as u32),
                Arg::U32(hw32),
                Arg::F32(kk),
            ],
        )?;
    }
    Ok(())
}
