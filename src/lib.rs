//! # distillation
//!
//! Hand-written GPU kernels for knowledge distillation: fused temperature softmax, forward and
//! reverse KL, JSD, cross-entropy, the fused Hinton loss, decoupled KD (DKD), feature-map MSE and
//! attention transfer, each with its backward pass, on four backends behind one boundary
//! ([`backend::Backend`]):
//!
//! - [`CpuBackend`]: the f64 reference every other backend is checked against;
//! - [`FastCpuBackend`]: f32 kernels for the CPU (packed matmul, vectorised multi-threaded losses);
//! - [`WgpuBackend`]: WGSL shaders (`src/ops/*/*.wgsl`) through wgpu (Vulkan, Metal, DX12);
//! - `CudaBackend` (feature `cuda`): CUDA kernels (`src/ops/*/*.cu`) compiled at run time by NVRTC.
//!
//! The math every backend meets is `docs/LOSSES.md`; the op families live in [`ops`], one folder
//! each with its spec, CPU reference, WGSL and CUDA kernels and their dispatch.
//!
//! Trainers use [`KdLoss`] (host slices in, loss and gradient out), or the backends' kernel methods on
//! their own device buffers ([`backend::Backend`], and [`backend::wgpu::Recorder`] to record into a
//! caller's `wgpu::CommandEncoder`).

pub mod backend;
#[cfg(feature = "burn")]
pub mod burn;
#[cfg(feature = "candle")]
pub mod candle;
pub mod capi;
pub mod checkpoint;
pub mod data;
pub mod dtype;
pub mod error;
pub mod experiment;
pub mod loss;
pub mod nn;
pub mod ops;
pub mod report;
pub mod rng;
pub mod sharded;
pub mod tape;
pub mod topk_cache;

pub use backend::cpu::CpuBackend;
pub use backend::cpu_fast::FastCpuBackend;
#[cfg(feature = "cuda")]
pub use backend::cuda::CudaBackend;
pub use backend::wgpu::WgpuBackend;
pub use backend::{Backend, GradOut, LossOut};
#[cfg(feature = "cuda")]
/// The cudarc version of the CUDA backend, for callers that bring their own device memory.
pub use cudarc;
pub use dtype::{Dtype, Element, HostSlice, HostVec};
pub use error::{Error, Result};
pub use half;
pub use loss::{CrossEntropyLoss, DkdLoss, KdLoss, LossAndGrad, SoftTargetLoss, SparseKdLoss};
pub use ops::sharded::{Shard, ShardedLoss, ShardedSpec};
pub use ops::{
    AttentionSpec, CrossEntropySpec, Divergence, DivergenceSpec, DkdSpec, FusedGrads,
    FusedLinearKd, HintonSpec, Linear, MseSpec, Reduction, RowShape, SoftmaxSpec, SparseSpec,
    SparseTail, SparseValues, Teacher, TeacherInput, Weighting, IGNORE_INDEX,
};
pub use sharded::{ShardedBackend, ShardedKdLoss, ShardedOut};
/// The wgpu version this crate records into, for callers that bring their own buffers and encoders.
pub use wgpu;
