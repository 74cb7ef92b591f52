//! The CUDA backend: CUDA C kernels compiled at run time by NVRTC for the device's compute
//! capability, launched through the CUDA driver API ([`cudarc`], loaded dynamically).
//!
//! - Nothing is linked at build time: `libcuda.so` and `libnvrtc.so.13` are opened when
//!   [`CudaBackend::new`] runs. Where either is missing, or there is no device, it returns
//!   [`Error::Unavailable`] (never a panic).
//! - Each kernel file is compiled with `common.cuh` prepended (NVRTC has no standard headers),
//!   once per process and architecture ([`compile_kernel`]; PTX cached), and loaded once per
//!   backend. [`compile_all_kernels`] compiles them all without a GPU or a driver (CI).
//! - Every kernel runs on the backend's stream (the context's default stream, or the caller's from
//!   [`CudaBackend::with_stream`]), in the order the calls are made. A row loss
//!   is three launches (`count_valid`, the op, `reduce_rows`) with no host read-back in between
//!   ([`CudaBackend::row_loss`]); [`Backend::download`] synchronizes.
//! - Buffers are raw device pointers plus a length ([`CudaBuffer`]); buffers this backend allocates
//!   own their memory (a [`cudarc::driver::CudaSlice`]), [`CudaBuffer::from_slice`] and
//!   [`CudaBuffer::from_raw`] wrap a caller's memory. The caller's work on that memory must be
//!   ordered before ours (the same stream, or a synchronization).
//!
//! This folder is the runtime only: NVRTC and the PTX cache ([`nvrtc`]), buffers, launching and the
//! row-loss sequence (`launch.rs`), the table of kernels ([`kernels`]), `common.cuh` and
//! `reduce.cu`. Each kernel's `.cu` file and its launch code live in the op's folder
//! (`src/ops/<family>/{<family>.cu, cuda.rs}`) and are one line of the tables below.

mod buffer;
pub mod kernels;
mod launch;
pub mod nvrtc;

use std::collections::HashMap;
use std::panic::catch_unwind;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream, DriverError};

pub use self::buffer::{CudaBuffer, CudaLabels};
pub use self::kernels::{CudaKernel, CudaSource, COMMON_SOURCE, KERNELS, SOURCES};
pub(crate) use self::launch::{
    config, elementwise, ensure, grad_dtype, grad_ptr, index_u32, one_block, row_launch,
    stride_launch, Arg, RowLaunch, WARP_ROWS,
};
use self::launch::{Scratch, State};
pub use self::nvrtc::{
    compile_all_kernels, compile_all_kernels_with_logs, compile_kernel, driver_available,
    kernel_source, nvrtc_available, CompiledKernel,
};
use self::nvrtc::{nvrtc_missing, panic_message};
use super::{Backend, LossOut};
use crate::dtype::{Dtype, HostSlice, HostVec};
use crate::error::{Error, Result};
use crate::ops::conv::{ConvSpec, PoolSpec};
use crate::ops::dense::{CopySpec, MatmulSpec};
use crate::ops::optim::{AdamSpec, SgdSpec};
use crate::ops::{
    self, AttentionSpec, CrossEntropySpec, DivergenceSpec, DkdSpec, HintonSpec, MseSpec,
    SoftmaxSpec, SparseSpec,
};

const BACKEND: &str = "cuda";

/// The kernel methods of [`Backend`]: one line per kernel, naming the launch function in the op's
/// folder (`src/ops/<family>/cuda.rs`).
macro_rules! cuda_kernels {
    ($($name:ident($($arg:ident: $ty:ty),* $(,)?) => $($f:ident)::+;)*) => {
        $(
            unsafe fn $name(&self, $($arg: $ty),*) -> Result<()> {
                ops::$($f)::+(self, $($arg),*)
            }
        )*
    };
}

/// The CUDA backend on one device. See the module documentation.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    device_name: String,
    state: Mutex<State>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.device_name)
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .finish()
    }
}

fn unavailable(reason: String) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        reason,
    }
}

impl CudaBackend {
    /// The backend on CUDA device 0.
    pub fn new() -> Result<Self> {
        Self::with_device(0)
    }

    /// The backend on CUDA device `ordinal`. [`Error::Unavailable`] when the driver library, a
    /// device or NVRTC is missing.
    pub fn with_device(ordinal: usize) -> Result<Self> {
        Self::open(ordinal, None)
    }

    /// The backend on device `ordinal` running every kernel on the caller's stream `stream` (a
    /// `CUstream` / `cudaStream_t`, e.g. PyTorch's `torch.cuda.current_stream().cuda_stream`), so
    /// its work is ordered with the caller's without synchronizing. 0 is the legacy default stream.
    ///
    /// # Safety
    /// `stream` must be 0 or a valid stream of the device's primary context (the context the CUDA
    /// runtime, and so PyTorch, uses), and must outlive the backend.
    pub unsafe fn with_stream(ordinal: usize, stream: u64) -> Result<Self> {
        Self::open(ordinal, Some(stream))
    }

    fn open(ordinal: usize, stream: Option<u64>) -> Result<Self> {
        if !driver_available() {
            return Err(unavailable(format!(
                "no CUDA driver library (libcuda.so) found: searched {:?}; install the NVIDIA \
                 driver or add the directory of libcuda.so.1 to LD_LIBRARY_PATH",
                cudarc::get_lib_name_candidates("cuda")
            )));
        }
        let ctx = catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|p| {
                unavailable(format!(
                    "the CUDA driver could not be used: {}",
                    panic_message(&p)
                ))
            })?
            .map_err(|e| unavailable(format!("no usable CUDA device {ordinal}: {e}")))?;
        if !nvrtc_available() {
            return Err(nvrtc_missing());
        }
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| device_error("reading the compute capability", e))?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown device".into());
        // One stream and no other: the per-buffer events cudarc records for multi-stream use are
        // not needed.
        // SAFETY: called before this context allocates anything; we never create another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = match stream {
            // SAFETY: `with_stream`'s contract: a live stream of this (primary) context, kept alive
            // by its owner for the backend's life; ordering with its owner's work is the stream's.
            Some(raw) => unsafe { ctx.wrap_borrowed_stream(raw as cudarc::driver::sys::CUstream) },
            None => ctx.default_stream(),
        };
        Ok(CudaBackend {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            device_name,
            state: Mutex::new(State {
                modules: HashMap::new(),
                functions: HashMap::new(),
                scratch: Scratch::default(),
            }),
        })
    }

    /// The NVRTC architecture the kernels are compiled for (`sm_90` on an H100).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The cudarc context (to allocate [`CudaSlice`]s to wrap with [`CudaBuffer::from_slice`]).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every kernel of this backend runs on (the context's default stream, or the
    /// caller's from [`CudaBackend::with_stream`]).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for every launched kernel; reports an asynchronous error of an earlier launch.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| device_error("synchronizing the stream", e))
    }
}

pub(crate) fn poisoned() -> Error {
    Error::Device {
        backend: BACKEND,
        message: "a lock was poisoned by a panic in another thread".into(),
    }
}

pub(crate) fn device_error(what: &str, e: DriverError) -> Error {
    Error::Device {
        backend: BACKEND,
        message: format!("{what}: {e}"),
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;
    type Labels = CudaLabels;

    fn name(&self) -> String {
        format!("cuda ({}, {}, NVRTC)", self.device_name, self.arch)
    }

    fn upload_host(&self, data: HostSlice<'_>) -> Result<CudaBuffer> {
        if data.is_empty() {
            return Ok(CudaBuffer::empty(data.dtype()));
        }
        let copied = |e| device_error("copying to the device", e);
        match data {
            HostSlice::F32(v) => Ok(CudaBuffer::from_slice(
                self.stream.clone_htod(v).map_err(copied)?,
            )),
            HostSlice::Bf16(_) | HostSlice::F16(_) => {
                let bits: Vec<u16> = bytemuck::pod_collect_to_vec(data.bytes());
                let slice = self.stream.clone_htod(&bits).map_err(copied)?;
                CudaBuffer::from_half_slice(slice, data.dtype())
            }
        }
    }

    fn download_host(&self, buf: &CudaBuffer) -> Result<HostVec> {
        Ok(match buf.dtype {
            Dtype::F32 => HostVec::F32(self.copy_to_host(buf.ptr, buf.len)?),
            d => {
                let bits: Vec<u16> = self.copy_to_host(buf.ptr, buf.len)?;
                HostVec::from_bytes(d, bytemuck::cast_slice(&bits))
            }
        })
    }

    fn dtype(&self, buf: &CudaBuffer) -> Dtype {
        buf.dtype
    }

    fn upload_labels(&self, labels: &[i32]) -> Result<CudaLabels> {
        if labels.is_empty() {
            return Ok(CudaLabels::empty());
        }
        let slice = self
            .stream
            .clone_htod(labels)
            .map_err(|e| device_error("copying labels to the device", e))?;
        Ok(CudaLabels::from_slice(slice))
    }

    fn len(&self, buf: &CudaBuffer) -> usize {
        buf.len
    }

    fn synchronize(&self) -> Result<()> {
        CudaBackend::synchronize(self)
    }

    fn overlaps(&self, a: &CudaBuffer, b: &CudaBuffer) -> bool {
        // Caller memory is wrapped by address: compare the byte ranges.
        let (a0, b0) = (a.ptr, b.ptr);
        let (a1, b1) = (a0 + a.bytes(), b0 + b.bytes());
        a0 < b1 && b0 < a1
    }

    fn labels_overlap(&self, labels: &CudaLabels, buf: &CudaBuffer) -> bool {
        let (l0, b0) = (labels.ptr, buf.ptr);
        let (l1, b1) = (l0 + 4 * labels.len as u64, b0 + buf.bytes());
        labels.len > 0 && l0 < b1 && b0 < l1
    }

    fn labels_len(&self, labels: &CudaLabels) -> usize {
        labels.len
    }

    fn check_labels(&self, labels: &CudaLabels, classes: usize, ignore_index: i32) -> Result<()> {
        let host: Vec<i32> = self.copy_to_host(labels.ptr, labels.len)?;
        ops::check_labels(&host, classes, ignore_index)
    }

    cuda_kernels! {
        softmax_unchecked(spec: &SoftmaxSpec, x: &CudaBuffer, y: &CudaBuffer)
            => softmax::cuda::softmax;
        softmax_backward_unchecked(spec: &SoftmaxSpec, y: &CudaBuffer, dy: &CudaBuffer,
            dx: &CudaBuffer) => softmax::cuda::softmax_backward;
        divergence_unchecked(spec: &DivergenceSpec, student: &CudaBuffer, teacher: &CudaBuffer,
            labels: Option<&CudaLabels>, out: LossOut<'_, Self>) => divergence::cuda::divergence;
        cross_entropy_unchecked(spec: &CrossEntropySpec, student: &CudaBuffer,
            labels: &CudaLabels, out: LossOut<'_, Self>) => cross_entropy::cuda::cross_entropy;
        hinton_unchecked(spec: &HintonSpec, student: &CudaBuffer, teacher: &CudaBuffer,
            labels: &CudaLabels, out: LossOut<'_, Self>) => hinton::cuda::hinton;
        dkd_unchecked(spec: &DkdSpec, student: &CudaBuffer, teacher: &CudaBuffer,
            labels: &CudaLabels, out: LossOut<'_, Self>) => dkd::cuda::dkd;
        sparse_kd_unchecked(spec: &SparseSpec, student: &CudaBuffer, indices: &CudaLabels,
            values: &CudaBuffer, labels: Option<&CudaLabels>, out: LossOut<'_, Self>)
            => sparse::cuda::sparse_kd;
        mse_unchecked(spec: &MseSpec, a: &CudaBuffer, b: &CudaBuffer, loss: &CudaBuffer,
            grad_a: Option<&CudaBuffer>, grad_b: Option<&CudaBuffer>) => feature::cuda::mse;
        smooth_l1_unchecked(spec: &MseSpec, a: &CudaBuffer, b: &CudaBuffer, loss: &CudaBuffer,
            grad_a: Option<&CudaBuffer>, grad_b: Option<&CudaBuffer>) => feature::cuda::smooth_l1;
        attention_transfer_unchecked(spec: &AttentionSpec, student: &CudaBuffer,
            teacher: &CudaBuffer, loss: &CudaBuffer, grad_student: Option<&CudaBuffer>,
            grad_teacher: Option<&CudaBuffer>) => feature::cuda::attention_transfer;
        matmul_unchecked(spec: &MatmulSpec, a: &CudaBuffer, b: &CudaBuffer, c: &CudaBuffer)
            => dense::cuda::matmul;
        copy_rows_unchecked(spec: &CopySpec, src: &CudaBuffer, dst: &CudaBuffer)
            => dense::cuda::copy_rows;
        bias_add_unchecked(x: &CudaBuffer, bias: &CudaBuffer, y: &CudaBuffer)
            => dense::cuda::bias_add;
        sum_rows_unchecked(x: &CudaBuffer, out: &CudaBuffer, accumulate: bool)
            => dense::cuda::sum_rows;
        relu_unchecked(x: &CudaBuffer, y: &CudaBuffer) => dense::cuda::relu;
        relu_backward_unchecked(y: &CudaBuffer, dy: &CudaBuffer, dx: &CudaBuffer)
            => dense::cuda::relu_backward;
        axpy_unchecked(alpha: f32, x: &CudaBuffer, y: &CudaBuffer) => dense::cuda::axpy;
        adam_step_unchecked(spec: &AdamSpec, w: &CudaBuffer, grad: &CudaBuffer, m: &CudaBuffer,
            v: &CudaBuffer) => optim::cuda::adam_step;
        sgd_step_unchecked(spec: &SgdSpec, w: &CudaBuffer, grad: &CudaBuffer,
            velocity: &CudaBuffer) => optim::cuda::sgd_step;
        im2col_unchecked(spec: &ConvSpec, x: &CudaBuffer, cols: &CudaBuffer)
            => conv::cuda::im2col;
        col2im_unchecked(spec: &ConvSpec, dcols: &CudaBuffer, dx: &CudaBuffer)
            => conv::cuda::col2im;
        pool_unchecked(spec: &PoolSpec, x: &CudaBuffer, y: &CudaBuffer) => conv::cuda::pool;
        pool_backward_unchecked(spec: &PoolSpec, x: &CudaBuffer, dy: &CudaBuffer,
            dx: &CudaBuffer) => conv::cuda::pool_backward;
        transpose_unchecked(batch: usize, rows: usize, cols: usize, x: &CudaBuffer,
            y: &CudaBuffer) => conv::cuda::transpose;
        row_normalize_unchecked(cols: usize, x: &CudaBuffer, y: &CudaBuffer)
            => relational::cuda::row_normalize;
        row_normalize_backward_unchecked(cols: usize, x: &CudaBuffer, dy: &CudaBuffer,
            dx: &CudaBuffer) => relational::cuda::row_normalize_backward;
        pairwise_distance_unchecked(n: usize, dim: usize, f: &CudaBuffer, d: &CudaBuffer)
            => relational::cuda::pairwise_distance;
        pairwise_distance_backward_unchecked(n: usize, dim: usize, f: &CudaBuffer, d: &CudaBuffer,
            dd: &CudaBuffer, df: &CudaBuffer) => relational::cuda::pairwise_distance_backward;
        offdiag_normalize_unchecked(n: usize, d: &CudaBuffer, y: &CudaBuffer)
            => relational::cuda::offdiag_normalize;
        offdiag_normalize_backward_unchecked(n: usize, d: &CudaBuffer, dy: &CudaBuffer,
            dd: &CudaBuffer) => relational::cuda::offdiag_normalize_backward;
    }
}

/// `1/T`, rounded once.
pub(crate) fn inv(t: f32) -> f32 {
    (1.0 / t as f64) as f32
}
