//! Dispatch of `optim.wgsl`: one invocation per parameter.

use bytemuck::{Pod, Zeroable};

use super::{AdamSpec, SgdSpec};
use crate::backend::wgpu::dispatch::{whole, WG};
use crate::backend::wgpu::pipelines::{Bind, WgslKernel};
use crate::backend::wgpu::{uniform_layout, UniformLayout, WgpuBackend, WgpuBuffer};
use crate::error::Result;

const BODY: &str = include_str!("optim.wgsl");
const BINDINGS: &[Bind] = &[
    Bind::Uniform,
    Bind::Read,
    Bind::ReadWrite,
    Bind::ReadWrite,
    Bind::ReadWrite,
];

pub(crate) const ADAM: WgslKernel = WgslKernel {
    file: "optim.wgsl",
    body: BODY,
    entry: "adam",
    row_io: false,
    bindings: BINDINGS,
};
pub(crate) const SGD: WgslKernel = WgslKernel {
    file: "optim.wgsl",
    body: BODY,
    entry: "sgd",
    row_io: false,
    bindings: BINDINGS,
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct OptimParams {
    len: u32,
    lr: f32,
    inv_c2: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    pad: u32,
}

pub(crate) fn uniform_layouts() -> Vec<UniformLayout> {
    vec![uniform_layout!(
        OptimParams,
        "optim.wgsl",
        [len, lr, inv_c2, beta1, beta2, eps, weight_decay]
    )]
}

/// One Adam step.
pub(crate) fn adam_step(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &AdamSpec,
    weights: &WgpuBuffer,
    grad: &WgpuBuffer,
    m: &WgpuBuffer,
    v: &WgpuBuffer,
) -> Result<()> {
    w.check_binding(&[weights, grad, m, v])?;
    let (lr_c1, inv_c2) = spec.corrections();
    let params = OptimParams {
        len: weights.len() as u32,
        lr: lr_c1,
        inv_c2,
        beta1: spec.beta1,
        beta2: spec.beta2,
        eps: spec.eps,
        weight_decay: spec.weight_decay,
        pad: 0,
    };
    w.dispatch(
        enc,
        &ADAM,
        WG,
        bytemuck::bytes_of(&params),
        &[whole(grad), whole(weights), whole(m), whole(v)],
        weights.len().div_ceil(256) as u32,
    )
}

/// One SGD step with momentum.
pub(crate) fn sgd_step(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &SgdSpec,
    weights: &WgpuBuffer,
    grad: &WgpuBuffer,
    velocity: &WgpuBuffer,
) -> Result<()> {
    w.check_binding(&[weights, grad, velocity])?;
    let params = OptimParams {
        len: weights.len() as u32,
        lr: spec.lr,
        beta1: spec.momentum,
        weight_decay: spec.weight_decay,
        ..Default::default()
    };
    w.dispatch(
        enc,
        &SGD,
        WG,
        bytemuck::bytes_of(&params),
        &[whole(grad), whole(weights), whole(velocity), None],
        weights.len().div_ceil(256) as u32,
    )
}
