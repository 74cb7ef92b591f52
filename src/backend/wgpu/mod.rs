//! The wgpu backend: WGSL shaders (`src/ops/*/*.wgsl`) on Vulkan, Metal or DX12 (and on Mesa's lavapipe,
//! a software Vulkan device, where there is no GPU).
//!
//! This folder is the backend's runtime only: the device, buffers and scratch memory (here), the
//! table of kernels and the pipeline cache ([`pipelines`]; each pipeline is compiled once),
//! dispatch and the row-loss sequence ([`dispatch`]), and [`Recorder`], which records any kernel
//! into a caller's `wgpu::CommandEncoder` (no submit, no readback) with the same validation as
//! the backend. The kernels themselves, their uniforms and their dispatch code live in the op
//! folders (`src/ops/<family>/{<family>.wgsl, wgpu.rs}`); each is one line of the table below.
//!
//! (Over 600 lines on purpose: the `kernels!` macro that generates the backend's and the recorder's
//! `Backend` implementations from one list needs the buffer and scratch helpers beside it.)

/// The kernel methods of [`Backend`] for [`WgpuBackend`] (which submits each call) and
/// [`Recorder`] (which records it into the caller's encoder): one line per kernel, naming the
/// dispatch function in the op's folder. Both types provide
/// `run_kernel(|backend, encoder| ..)`.
macro_rules! kernels {
    () => {
        kernels! { @each
            softmax_unchecked(spec: &SoftmaxSpec, x: &WgpuBuffer, y: &WgpuBuffer) => softmax::wgpu::softmax;
            softmax_backward_unchecked(spec: &SoftmaxSpec, y: &WgpuBuffer, dy: &WgpuBuffer, dx: &WgpuBuffer)
                => softmax::wgpu::softmax_backward;
            divergence_unchecked(spec: &DivergenceSpec, student: &WgpuBuffer, teacher: &WgpuBuffer,
                labels: Option<&WgpuLabels>, out: LossOut<'_, Self>) => divergence::wgpu::divergence;
            cross_entropy_unchecked(spec: &CrossEntropySpec, student: &WgpuBuffer, labels: &WgpuLabels,
                out: LossOut<'_, Self>) => cross_entropy::wgpu::cross_entropy;
            hinton_unchecked(spec: &HintonSpec, student: &WgpuBuffer, teacher: &WgpuBuffer, labels: &WgpuLabels,
                out: LossOut<'_, Self>) => hinton::wgpu::hinton;
            dkd_unchecked(spec: &DkdSpec, student: &WgpuBuffer, teacher: &WgpuBuffer, labels: &WgpuLabels,
                out: LossOut<'_, Self>) => dkd::wgpu::dkd;
            sparse_kd_unchecked(spec: &SparseSpec, student: &WgpuBuffer, indices: &WgpuLabels, values: &WgpuBuffer,
                labels: Option<&WgpuLabels>, out: LossOut<'_, Self>) => sparse::wgpu::sparse_kd;
            mse_unchecked(spec: &MseSpec, a: &WgpuBuffer, b: &WgpuBuffer, loss: &WgpuBuffer, grad_a: Option<&WgpuBuffer>,
                grad_b: Option<&WgpuBuffer>) => feature::wgpu::mse;
            smooth_l1_unchecked(spec: &MseSpec, a: &WgpuBuffer, b: &WgpuBuffer, loss: &WgpuBuffer, grad_a: Option<&WgpuBuffer>,
                grad_b: Option<&WgpuBuffer>) => feature::wgpu::smooth_l1;
            attention_transfer_unchecked(spec: &AttentionSpec, student: &WgpuBuffer, teacher: &WgpuBuffer,
                loss: &WgpuBuffer, grad_student: Option<&WgpuBuffer>, grad_teacher: Option<&WgpuBuffer>)
                => feature::wgpu::attention_transfer;
            matmul_unchecked(spec: &MatmulSpec, a: &WgpuBuffer, b: &WgpuBuffer, c: &WgpuBuffer) => dense::wgpu::matmul;
            copy_rows_unchecked(spec: &CopySpec, src: &WgpuBuffer, dst: &WgpuBuffer) => dense::wgpu::copy_rows;
            bias_add_unchecked(x: &WgpuBuffer, bias: &WgpuBuffer, y: &WgpuBuffer) => dense::wgpu::bias_add;
            sum_rows_unchecked(x: &WgpuBuffer, out: &WgpuBuffer, accumulate: bool) => dense::wgpu::sum_rows;
            relu_unchecked(x: &WgpuBuffer, y: &WgpuBuffer) => dense::wgpu::relu;
            relu_backward_unchecked(y: &WgpuBuffer, dy: &WgpuBuffer, dx: &WgpuBuffer) => dense::wgpu::relu_backward;
            axpy_unchecked(alpha: f32, x: &WgpuBuffer, y: &WgpuBuffer) => dense::wgpu::axpy;
            adam_step_unchecked(spec: &AdamSpec, w: &WgpuBuffer, grad: &WgpuBuffer, m: &WgpuBuffer, v: &WgpuBuffer)
                => optim::wgpu::adam_step;
            sgd_step_unchecked(spec: &SgdSpec, w: &WgpuBuffer, grad: &WgpuBuffer, velocity: &WgpuBuffer)
                => optim::wgpu::sgd_step;
            im2col_unchecked(spec: &ConvSpec, x: &WgpuBuffer, cols: &WgpuBuffer) => conv::wgpu::im2col;
            col2im_unchecked(spec: &ConvSpec, dcols: &WgpuBuffer, dx: &WgpuBuffer) => conv::wgpu::col2im;
            pool_unchecked(spec: &PoolSpec, x: &WgpuBuffer, y: &WgpuBuffer) => conv::wgpu::pool;
            pool_backward_unchecked(spec: &PoolSpec, x: &WgpuBuffer, dy: &WgpuBuffer, dx: &WgpuBuffer)
                => conv::wgpu::pool_backward;
            transpose_unchecked(batch: usize, rows: usize, cols: usize, x: &WgpuBuffer, y: &WgpuBuffer)
                => conv::wgpu::transpose;
            row_normalize_unchecked(cols: usize, x: &WgpuBuffer, y: &WgpuBuffer) => relational::wgpu::row_normalize;
            row_normalize_backward_unchecked(cols: usize, x: &WgpuBuffer, dy: &WgpuBuffer, dx: &WgpuBuffer)
                => relational::wgpu::row_normalize_backward;
            pairwise_distance_unchecked(n: usize, dim: usize, f: &WgpuBuffer, d: &WgpuBuffer)
                => relational::wgpu::pairwise_distance;
            pairwise_distance_backward_unchecked(n: usize, dim: usize, f: &WgpuBuffer, d: &WgpuBuffer, dd: &WgpuBuffer,
                df: &WgpuBuffer) => relational::wgpu::pairwise_distance_backward;
            offdiag_normalize_unchecked(n: usize, d: &WgpuBuffer, y: &WgpuBuffer)
                => relational::wgpu::offdiag_normalize;
            offdiag_normalize_backward_unchecked(n: usize, d: &WgpuBuffer, dy: &WgpuBuffer, dd: &WgpuBuffer)
                => relational::wgpu::offdiag_normalize_backward;
        }
    };
    (@each $($name:ident($($arg:ident: $ty:ty),* $(,)?) => $($f:ident)::+;)*) => {
        $(
            unsafe fn $name(&self, $($arg: $ty),*) -> $crate::error::Result<()> {
                self.run_kernel(|backend, encoder| {
                    $crate::ops::$($f)::+(backend, encoder, $($arg),*)
                })
            }
        )*
    };
}

mod buffer;
pub mod dispatch;
pub mod pipelines;
mod recorder;

pub use crate::ops::divergence::wgpu::GIVEN_TEACHER_MAX_TEMPERATURE;
pub(crate) use buffer::Place;
pub use buffer::{WgpuBuffer, WgpuLabels};
pub use recorder::Recorder;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

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

const BACKEND: &str = "wgpu";

/// A `#[repr(C)]` uniform struct of this backend and the shader file whose `Params` it fills:
/// `tests/suite/shaders.rs` checks its size and field offsets against naga's layout of the WGSL struct.
#[doc(hidden)]
#[derive(Debug)]
pub struct UniformLayout {
    pub file: &'static str,
    pub rust_name: &'static str,
    pub size: usize,
    /// The fields that are not padding, with their byte offsets (named as in the WGSL struct).
    pub fields: Vec<(&'static str, usize)>,
}

/// One [`UniformLayout`] from a struct and its named (non-padding) fields.
macro_rules! uniform_layout {
    ($t:ty, $file:expr, [$($f:ident),* $(,)?]) => {
        $crate::backend::wgpu::UniformLayout {
            file: $file,
            rust_name: stringify!($t),
            size: std::mem::size_of::<$t>(),
            fields: vec![$((stringify!($f), std::mem::offset_of!($t, $f))),*],
        }
    };
}
pub(crate) use uniform_layout;

/// Every uniform struct the backend uploads, for the layout test.
#[doc(hidden)]
pub fn uniform_layouts() -> Vec<UniformLayout> {
    [
        dispatch::uniform_layouts(),
        ops::softmax::wgpu::uniform_layouts(),
        ops::divergence::wgpu::uniform_layouts(),
        ops::cross_entropy::wgpu::uniform_layouts(),
        ops::hinton::wgpu::uniform_layouts(),
        ops::dkd::wgpu::uniform_layouts(),
        ops::sparse::wgpu::uniform_layouts(),
        ops::sharded::wgpu::uniform_layouts(),
        ops::feature::wgpu::uniform_layouts(),
        ops::dense::wgpu::uniform_layouts(),
        ops::optim::wgpu::uniform_layouts(),
        ops::conv::wgpu::uniform_layouts(),
        ops::relational::wgpu::uniform_layouts(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Options for [`WgpuBackend::with_options`].
#[derive(Clone, Debug, Default)]
pub struct WgpuOptions {
    /// Cap the storage binding size below the adapter's (bytes), e.g. to exercise the chunked path.
    pub max_binding_bytes: Option<u64>,
    /// Refuse software adapters (llvmpipe, WARP, SwiftShader).
    pub hardware_only: bool,
}

/// The wgpu backend.
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    max_binding: u64,
    pipelines: pipelines::PipelineCache,
    /// One small buffer per binding slot, bound where a kernel's optional input or output is absent.
    dummies: Vec<wgpu::Buffer>,
    scratch: Mutex<HashMap<&'static str, wgpu::Buffer>>,
}

impl std::fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBackend")
            .field("adapter", &self.info.name)
            .finish()
    }
}

/// The instance (from the environment, no display) and its default adapter, high performance
/// first: what [`WgpuBackend::with_options`] and the burn adapter's shared device start from.
pub(crate) fn default_adapter() -> Result<(wgpu::Instance, wgpu::Adapter)> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        force_fallback_adapter: false,
        compatible_surface: None,
        ..Default::default()
    }))
    .map_err(|e| Error::Unavailable {
        backend: BACKEND,
        reason: format!(
            "no wgpu adapter ({e}); install a Vulkan driver, e.g. `apt-get install \
             mesa-vulkan-drivers libvulkan1` for the software device lavapipe"
        ),
    })?;
    Ok((instance, adapter))
}

impl WgpuBackend {
    /// The default adapter (high performance first); `Err` when there is none.
    pub fn new() -> Result<Self> {
        Self::with_options(WgpuOptions::default())
    }

    pub fn with_options(options: WgpuOptions) -> Result<Self> {
        let (_instance, adapter) = default_adapter()?;
        let info = adapter.get_info();
        if options.hardware_only && info.device_type == wgpu::DeviceType::Cpu {
            return Err(Error::Unavailable {
                backend: BACKEND,
                reason: format!("only a software adapter was found ({})", info.name),
            });
        }
        let limits = adapter.limits();
        // Timestamp queries, where the adapter has them, for the GPU bench runner.
        let timestamps =
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("distillation"),
            required_features: adapter.features() & timestamps,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| Error::Unavailable {
            backend: BACKEND,
            reason: format!("the adapter {} refused a device: {e}", info.name),
        })?;
        device.on_uncaptured_error(Arc::new(|e| {
            eprintln!("distillation: uncaptured wgpu error: {e}");
        }));
        Ok(Self::from_parts(info, limits, device, queue, &options))
    }

    /// The backend on a device and queue the caller already has (shared with another wgpu
    /// user, e.g. burn's wgpu runtime: `distillation::burn::wgpu_device`). Our kernels are then
    /// submitted on that queue, ordered after what the other user submitted before, and can bind
    /// its buffers ([`WgpuBackend::wrap_buffer`]). The device's error handler is left as the
    /// caller set it; our own calls still capture their validation errors as `Err`.
    pub fn from_device(
        info: wgpu::AdapterInfo,
        device: wgpu::Device,
        queue: wgpu::Queue,
        options: WgpuOptions,
    ) -> Result<Self> {
        if options.hardware_only && info.device_type == wgpu::DeviceType::Cpu {
            return Err(Error::Unavailable {
                backend: BACKEND,
                reason: format!("only a software adapter was given ({})", info.name),
            });
        }
        let limits = device.limits();
        Ok(Self::from_parts(info, limits, device, queue, &options))
    }

    fn from_parts(
        info: wgpu::AdapterInfo,
        limits: wgpu::Limits,
        device: wgpu::Device,
        queue: wgpu::Queue,
        options: &WgpuOptions,
    ) -> Self {
        let max_binding = options
            .max_binding_bytes
            .map_or(limits.max_storage_buffer_binding_size, |m| {
                m.min(limits.max_storage_buffer_binding_size)
            })
            .min(limits.max_buffer_size);
        let dummies = (0..8)
            .map(|i| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(
                        [
                            "dummy0", "dummy1", "dummy2", "dummy3", "dummy4", "dummy5", "dummy6",
                            "dummy7",
                        ][i],
                    ),
                    size: 256,
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                })
            })
            .collect();
        WgpuBackend {
            device,
            queue,
            info,
            limits,
            max_binding,
            pipelines: Default::default(),
            dummies,
            scratch: Mutex::new(HashMap::new()),
        }
    }

    /// Wraps `len` elements of `dtype` of a buffer of this backend's device from byte `offset`
    /// (see [`WgpuBuffer::from_buffer_at`]), checking that `offset` is on the device's
    /// `min_storage_buffer_offset_alignment` (every window the kernels bind starts there).
    pub fn wrap_buffer(
        &self,
        buffer: wgpu::Buffer,
        offset: u64,
        len: usize,
        dtype: Dtype,
    ) -> Result<WgpuBuffer> {
        self.check_offset(offset)?;
        WgpuBuffer::from_buffer_at(buffer, offset, len, dtype)
    }

    /// [`WgpuBackend::wrap_buffer`] for `len` i32 labels.
    pub fn wrap_labels(&self, buffer: wgpu::Buffer, offset: u64, len: usize) -> Result<WgpuLabels> {
        self.check_offset(offset)?;
        WgpuLabels::from_buffer_at(buffer, offset, len)
    }

    fn check_offset(&self, offset: u64) -> Result<()> {
        let align = self.limits.min_storage_buffer_offset_alignment.max(4) as u64;
        if !offset.is_multiple_of(align) {
            return Err(Error::Unsupported(format!(
                "a buffer window at byte {offset} is not on the device's storage offset \
                 alignment of {align} bytes; copy the data into a buffer of its own"
            )));
        }
        Ok(())
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// True when the device can write timestamps between commands of an encoder.
    pub fn has_timestamps(&self) -> bool {
        self.device.features().contains(
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS,
        )
    }

    /// Times what `record` records, on the GPU's clock when the device has timestamp queries (else
    /// the wall clock around submit and wait): seconds.
    pub fn time_recorded(
        &self,
        record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<f64> {
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("timed"),
            });
        if !self.has_timestamps() {
            let start = std::time::Instant::now();
            self.with_error_scope(|| {
                record(&mut encoder)?;
                self.queue.submit([encoder.finish()]);
                Ok(())
            })?;
            self.wait()?;
            return Ok(start.elapsed().as_secs_f64());
        }
        let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolved = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        self.with_error_scope(|| {
            encoder.write_timestamp(&set, 0);
            record(&mut encoder)?;
            encoder.write_timestamp(&set, 1);
            encoder.resolve_query_set(&set, 0..2, &resolved, 0);
            self.queue.submit([encoder.finish()]);
            Ok(())
        })?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&self.read_back(&resolved, 0, 16)?);
        Ok(
            ticks[1].wrapping_sub(ticks[0]) as f64
                * self.queue.get_timestamp_period() as f64
                * 1e-9,
        )
    }

    /// Records a device-to-device copy of `bytes` bytes (for the copy-bandwidth reference).
    pub fn record_copy(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        src: &WgpuBuffer,
        dst: &WgpuBuffer,
    ) -> Result<()> {
        let bytes = src.bytes().min(dst.bytes());
        encoder.copy_buffer_to_buffer(&src.buffer, src.offset, &dst.buffer, dst.offset, bytes);
        Ok(())
    }

    /// True for software adapters such as lavapipe.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The device's limits.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// The largest storage binding this backend uses, in bytes; larger row sets run in chunks.
    pub fn max_binding_bytes(&self) -> u64 {
        self.max_binding
    }

    /// Compiles every pipeline now (otherwise each compiles at first use).
    pub fn warm_up(&self) -> Result<()> {
        self.with_error_scope(|| {
            for k in pipelines::KERNELS {
                self.pipelines.get(&self.device, k, 256);
            }
            Ok(())
        })
    }

    /// A storage buffer of `len` f32 that can be copied from and to (for the caller's own use too).
    pub fn create_buffer(&self, len: usize) -> Result<WgpuBuffer> {
        self.create_buffer_as(len, Dtype::F32)
    }

    /// A storage buffer of `len` elements of `dtype` that can be copied from and to.
    pub fn create_buffer_as(&self, len: usize, dtype: Dtype) -> Result<WgpuBuffer> {
        let buffer = self.raw_buffer("buffer", len, dtype.size() as u64)?;
        Ok(WgpuBuffer {
            buffer,
            offset: 0,
            len,
            dtype,
        })
    }

    fn raw_buffer(&self, label: &str, len: usize, size: u64) -> Result<wgpu::Buffer> {
        let bytes = buffer::padded_bytes(len.max(1), size);
        if bytes > self.limits.max_buffer_size {
            return Err(Error::Limit(format!(
                "a buffer of {len} elements ({bytes} bytes) exceeds the device's max_buffer_size \
                 ({} bytes); split the batch",
                self.limits.max_buffer_size
            )));
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    fn upload_bytes(
        &self,
        label: &str,
        len: usize,
        size: u64,
        bytes: &[u8],
    ) -> Result<wgpu::Buffer> {
        let buffer = self.raw_buffer(label, len, size)?;
        if !bytes.is_empty() {
            // write_buffer wants a multiple of 4 bytes: pad an odd count of 2-byte elements.
            if bytes.len().is_multiple_of(4) {
                self.queue.write_buffer(&buffer, 0, bytes);
            } else {
                let mut padded = bytes.to_vec();
                padded.resize(bytes.len().div_ceil(4) * 4, 0);
                self.queue.write_buffer(&buffer, 0, &padded);
            }
        }
        Ok(buffer)
    }

    /// A reused scratch buffer of at least `bytes` bytes.
    pub(crate) fn scratch(&self, name: &'static str, bytes: u64) -> Result<wgpu::Buffer> {
        let bytes = bytes.max(256).next_power_of_two();
        let mut map = self.scratch.lock().unwrap();
        if let Some(b) = map.get(name) {
            if b.size() >= bytes {
                return Ok(b.clone());
            }
        }
        if bytes > self.limits.max_buffer_size {
            return Err(Error::Limit(format!(
                "scratch buffer {name} of {bytes} bytes exceeds max_buffer_size"
            )));
        }
        let b = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(name),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        map.insert(name, b.clone());
        Ok(b)
    }

    pub(crate) fn uniform(&self, bytes: &[u8]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytes,
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }

    /// Runs `f` with validation and out-of-memory errors captured and returned as `Err`.
    pub(crate) fn with_error_scope<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = v.or(o) {
            return Err(Error::Device {
                backend: BACKEND,
                message: e.to_string(),
            });
        }
        out
    }

    /// Records with `f` into a new encoder and submits it (no wait).
    pub(crate) fn submit(
        &self,
        f: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<()> {
        self.with_error_scope(|| {
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("distillation"),
                });
            f(&mut encoder)?;
            self.queue.submit([encoder.finish()]);
            Ok(())
        })
    }

    /// Records `f` into a new encoder and submits it: each kernel method of [`Backend`].
    fn run_kernel(
        &self,
        f: impl FnOnce(&WgpuBackend, &mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<()> {
        self.submit(|enc| f(self, enc))
    }

    /// Blocks until the device has finished all submitted work.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Device {
                backend: BACKEND,
                message: e.to_string(),
            })
    }

    /// `bytes` bytes of `buffer` from byte `offset` (a multiple of 4), on the host.
    fn read_back(&self, buffer: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.submit(|enc| {
            enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, bytes);
            Ok(())
        })?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|e| Error::Device {
                backend: BACKEND,
                message: format!("map callback lost: {e}"),
            })?
            .map_err(|e| Error::Device {
                backend: BACKEND,
                message: format!("map failed: {e}"),
            })?;
        let view = staging.get_mapped_range(..).map_err(|e| Error::Device {
            backend: BACKEND,
            message: format!("mapped range: {e}"),
        })?;
        let out = view.to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// A recorder of this backend's kernels into `encoder` (see [`Recorder`]).
    pub fn recorder<'a>(&'a self, encoder: &'a mut wgpu::CommandEncoder) -> Recorder<'a> {
        Recorder::new(self, encoder)
    }

    /// Reads a label buffer back (used by [`Backend::check_labels`]).
    pub(crate) fn download_labels(&self, labels: &WgpuLabels) -> Result<Vec<i32>> {
        let bytes = self.read_back(&labels.buffer, labels.offset, labels.len as u64 * 4)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

impl Backend for WgpuBackend {
    type Buffer = WgpuBuffer;
    type Labels = WgpuLabels;

    fn name(&self) -> String {
        format!("wgpu ({}, {:?})", self.info.name, self.info.backend)
    }

    fn upload_host(&self, data: HostSlice<'_>) -> Result<WgpuBuffer> {
        let dtype = data.dtype();
        let buffer =
            self.upload_bytes(dtype.name(), data.len(), dtype.size() as u64, data.bytes())?;
        Ok(WgpuBuffer {
            buffer,
            offset: 0,
            len: data.len(),
            dtype,
        })
    }

    fn download_host(&self, buf: &WgpuBuffer) -> Result<HostVec> {
        let bytes = self.read_back(&buf.buffer, buf.offset, buf.bytes())?;
        let used = buf.len * buf.dtype.size();
        Ok(HostVec::from_bytes(
            buf.dtype,
            &bytes[..used.min(bytes.len())],
        ))
    }

    fn dtype(&self, buf: &WgpuBuffer) -> Dtype {
        buf.dtype
    }

    fn upload_labels(&self, labels: &[i32]) -> Result<WgpuLabels> {
        let buffer = self.upload_bytes("labels", labels.len(), 4, bytemuck::cast_slice(labels))?;
        Ok(WgpuLabels {
            buffer,
            offset: 0,
            len: labels.len(),
        })
    }

    fn len(&self, buf: &WgpuBuffer) -> usize {
        buf.len
    }

    fn synchronize(&self) -> Result<()> {
        self.wait()
    }

    fn overlaps(&self, a: &WgpuBuffer, b: &WgpuBuffer) -> bool {
        // Windows of one wgpu::Buffer (a framework's memory page holds many tensors) overlap
        // when their byte ranges do.
        a.overlaps(b)
    }

    fn labels_len(&self, labels: &WgpuLabels) -> usize {
        labels.len
    }

    fn labels_overlap(&self, labels: &WgpuLabels, buf: &WgpuBuffer) -> bool {
        let end = labels.offset + 4 * labels.len as u64;
        labels.buffer == buf.buffer && labels.offset < buf.offset + buf.bytes() && buf.offset < end
    }

    fn check_labels(&self, labels: &WgpuLabels, classes: usize, ignore_index: i32) -> Result<()> {
        crate::ops::check_labels(&self.download_labels(labels)?, classes, ignore_index)
    }

    kernels!();
}
