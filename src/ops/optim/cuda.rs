//! Launch of `optim.cu`: one thread per parameter.

use super::{AdamSpec, SgdSpec};
use crate::backend::cuda::{elementwise, Arg, CudaBackend, CudaBuffer, CudaKernel, CudaSource};
use crate::error::Result;

pub(crate) const SOURCE: CudaSource = CudaSource {
    file: "optim.cu",
    code: include_str!("optim.cu"),
};
pub(crate) const ADAM: CudaKernel = CudaKernel {
    file: "optim.cu",
    name: "adam_step",
    signature: "pppplffffff",
};
pub(crate) const SGD: CudaKernel = CudaKernel {
    file: "optim.cu",
    name: "sgd_step",
    signature: "ppplfff",
};

/// One Adam step.
pub(crate) fn adam_step(
    b: &CudaBackend,
    spec: &AdamSpec,
    w: &CudaBuffer,
    grad: &CudaBuffer,
    m: &CudaBuffer,
    v: &CudaBuffer,
) -> Result<()> {
    let (lr_c1, inv_c2) = spec.corrections();
    b.launch_one(
        &ADAM,
        elementwise(w.len),
        &[
            Arg::Ptr(w.ptr),
            Arg::Ptr(grad.ptr),
            Arg::Ptr(m.ptr),
            Arg::Ptr(v.ptr),
            Arg::U64(w.len as u64),
            Arg::F32(lr_c1),
            Arg::F32(inv_c2),
            Arg::F32(spec.beta1),
            Arg::F32(spec.beta2),
            Arg::F32(spec.eps),
            Arg::F32(spec.weight_decay),
        ],
    )
}

/// One SGD step with momentum.
pub(crate) fn sgd_step(
    b: &CudaBackend,
    spec: &SgdSpec,
    w: &CudaBuffer,
    grad: &CudaBuffer,
    velocity: &CudaBuffer,
) -> Result<()> {
    b.launch_one(
        &SGD,
        elementwise(w.len),
        &[
            Arg::Ptr(w.ptr),
            Arg::Ptr(grad.ptr),
            Arg::Ptr(velocity.ptr),
            Arg::U64(w.len as u64),
            Arg::F32(spec.lr),
            Arg::F32(spec.momentum),
            Arg::F32(spec.weight_decay),
        ],
    )
}
