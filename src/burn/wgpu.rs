//! The zero-copy route of the burn adapter, on burn's wgpu backend: our WGSL kernels run on the
//! wgpu device burn's runtime uses and bind burn's own buffers, so the logits never leave the
//! device (`docs/ARCHITECTURE.md`, adapters).
//!
//! - Device: [`wgpu_device`] creates a wgpu device the way cubecl's WGSL runtime creates its own
//!   (every adapter feature but `MAPPABLE_PRIMARY_BUFFERS`, the adapter's limits), registers it
//!   with burn as an existing setup (`Device::wgpu_options().setup(..).init()`, cubecl's
//!   `try_init_device`) and builds our [`WgpuBackend`] on the same device and queue
//!   ([`WgpuBackend::from_device`]). Tensors on that burn device take this route; tensors on any
//!   other device (burn's default wgpu device included, whose wgpu device we cannot reach) take
//!   the host-copy route.
//! - Buffers: a tensor's primitive is a cubecl tensor (`CubeTensor`: client, memory handle,
//!   layout); the client resolves the handle to the `wgpu::Buffer` of its memory page and the
//!   byte where the tensor starts (`Client::get_resource`), which we wrap as a [`WgpuBuffer`]
//!   window ([`WgpuBackend::wrap_buffer`]; cubecl aligns its allocations to the storage offset
//!   alignment, and a window that is not aligned, or a tensor that is not contiguous, takes the
//!   host-copy route).
//! - Order: `get_resource` moves burn's queued work for those buffers into its command encoder
//!   and `Client::flush` submits it, so our submission on the same queue comes after everything
//!   burn wrote to the inputs; burn's later work is submitted after ours. The resources are held
//!   until the queue reports our work done, so cubecl does not hand the inputs' memory out again
//!   while our kernels still read it.
//! - Outputs: the loss and the gradients are allocated by burn's client (`Client::empty`) and
//!   written by our kernels, then returned as burn tensors of the same device.

use std::cell::Cell;
use std::sync::OnceLock;

use ::burn::backend::wgpu::CubeTensor;
use ::burn::backend::{Cube, CubeDevice, DispatchDevice, TensorMetadata};
use ::burn::cubecl::server::Handle;
use ::burn::cubecl::wgpu::{AutoCompiler, WgpuDevice, WgpuServer};
use ::burn::tensor::wgpu::WgpuSetup;
use ::burn::tensor::{DType, Device, Int, IntDType, Shape, StreamId, Tensor};

use super::Loss;
use crate::backend::wgpu::{WgpuBuffer, WgpuOptions};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::ops::{CrossEntropySpec, DivergenceSpec, RowShape, TeacherInput};
use crate::{Backend, GradOut, LossOut, WgpuBackend};

/// The server type of a wgpu runtime registered from an existing setup.
type Server = WgpuServer<AutoCompiler>;

/// burn's runtime on our device, and our backend on it.
struct Shared {
    device: WgpuDevice,
    backend: WgpuBackend,
}

static SHARED: OnceLock<std::result::Result<Shared, String>> = OnceLock::new();

thread_local! {
    /// How many tensors this thread's calls have read to the host (the copy route).
    static HOST_READS: Cell<usize> = const { Cell::new(0) };
}

/// Counts one tensor read to the host on this thread (the copy route).
pub(super) fn count_host_read() {
    HOST_READS.with(|c| c.set(c.get() + 1));
}

/// How many tensors the adapter has read to the host on this thread so far: unchanged across a
/// call on [`wgpu_device`] (the zero-copy route), one per logits tensor and one for the labels
/// on the copy route. For tests.
#[doc(hidden)]
pub fn host_reads() -> usize {
    HOST_READS.with(Cell::get)
}

fn unavailable(reason: String) -> Error {
    Error::Unavailable {
        backend: "burn wgpu",
        reason,
    }
}

/// burn's wgpu device on which the losses run without copies: our WGSL kernels on burn's own
/// buffers, on one shared wgpu device and queue. The same device on every call (created on the
/// first); `Err` when there is no wgpu adapter or burn refuses the setup. Use it as any burn
/// device (`.autodiff()` for training); tensors on other devices still work, through host copies.
///
/// ```no_run
/// use burn::tensor::{Int, Tensor};
/// let dev = distillation::burn::wgpu_device().unwrap().autodiff();
/// let s = Tensor::<2>::from_data([[1.0f32, 2.0, 0.5]], &dev).require_grad();
/// let t = Tensor::<2>::from_data([[0.5f32, 2.5, 0.0]], &dev);
/// let y = Tensor::<1, Int>::from_data([1i64], &dev);
/// let loss = distillation::burn::kd_loss(s.clone(), t, y, 4.0, 0.5).unwrap();
/// let _g = s.grad(&loss.backward()).unwrap();
/// ```
pub fn wgpu_device() -> Result<Device> {
    Ok(Device::new(shared()?.device.clone()))
}

fn shared() -> Result<&'static Shared> {
    SHARED
        .get_or_init(|| create().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| {
            unavailable(format!(
                "the shared burn wgpu device could not be made: {e}"
            ))
        })
}

fn create() -> Result<Shared> {
    let (instance, adapter) = crate::backend::wgpu::default_adapter()?;
    let info = adapter.get_info();
    // What cubecl's WGSL runtime asks of a device it makes itself: its kernels use the element
    // types the adapter has (f16, i64), so every adapter feature but mappable primary buffers,
    // and the adapter's limits.
    let (device, queue) = pollster::block_on(
        adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("distillation + burn"),
            required_features: adapter
                .features()
                .difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
            required_limits: adapter.limits(),
            memory_hints: wgpu::MemoryHints::MemoryUsage,
            ..Default::default()
        }),
    )
    .map_err(|e| unavailable(format!("the adapter {} refused a device: {e}", info.name)))?;
    let setup = WgpuSetup {
        instance,
        adapter,
        device: device.clone(),
        queue: queue.clone(),
        backend: info.backend,
    };
    let burn_device = Device::wgpu_options()
        .setup(setup)
        .init()
        .map_err(|e| unavailable(format!("burn refused the shared wgpu setup: {e}")))?;
    let device_id = match burn_device.as_dispatch() {
        DispatchDevice::Cube(CubeDevice::Wgpu(d)) => d.clone(),
        other => {
            return Err(unavailable(format!(
                "burn registered the shared setup as {other:?}, not a wgpu device"
            )))
        }
    };
    let backend = WgpuBackend::from_device(info, device, queue, WgpuOptions::default())?;
    Ok(Shared {
        device: device_id,
        backend,
    })
}

/// The shared state when `device` is the shared burn device (with or without autodiff).
fn shared_for(device: &Device) -> Option<&'static Shared> {
    let shared = SHARED.get()?.as_ref().ok()?;
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Cube(CubeDevice::Wgpu(d)) if *d == shared.device => Some(shared),
        _ => None,
    }
}

/// A tensor bound in place: its cubecl primitive, our window of its buffer, and what keeps its
/// memory reserved while held (cubecl's `ManagedResource`).
struct Bound<B> {
    cube: CubeTensor,
    buffer: B,
    keep: Box<dyn Send>,
}

/// A tensor's memory resolved to its wgpu buffer: the buffer, the byte the tensor starts at,
/// the bytes it has from there, and the resource that keeps it reserved.
struct Resolved {
    buffer: wgpu::Buffer,
    offset: u64,
    size: u64,
    keep: Box<dyn Send>,
}

fn dtype_of(d: DType) -> Option<Dtype> {
    match d {
        DType::F32 => Some(Dtype::F32),
        DType::F16 => Some(Dtype::F16),
        _ => None,
    }
}

/// Whether a tensor's memory is its elements in row-major order (not quantized, not a strided
/// view, not storage-tiled: its physical shape is its logical one), made on the calling thread's
/// cubecl stream (so this thread's client flushes burn's work on it).
fn bindable(cube: &CubeTensor) -> bool {
    cube.qparams.is_none()
        && *cube.meta.shape() == cube.shape()
        && cube.is_contiguous()
        && cube.handle.stream == StreamId::current()
}

fn server_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Device {
        backend: "burn wgpu",
        message: format!("{what}: {e}"),
    }
}

fn resolve(cube: &CubeTensor, what: &str) -> Result<Resolved> {
    let resource = cube
        .client
        .get_resource::<Server>(cube.handle.clone())
        .map_err(|e| server_err(&format!("resolving the {what} buffer"), e))?;
    let r = resource.resource();
    let (buffer, offset, size) = (r.buffer.clone(), r.offset, r.size);
    Ok(Resolved {
        buffer,
        offset,
        size,
        keep: Box::new(resource),
    })
}

/// Binds a float tensor of `len` elements; `None` when it cannot be bound in place.
fn bind_float(b: &WgpuBackend, cube: CubeTensor, len: usize) -> Result<Option<Bound<WgpuBuffer>>> {
    let Some(dtype) = dtype_of(cube.dtype) else {
        return Ok(None);
    };
    if !bindable(&cube) {
        return Ok(None);
    }
    let r = resolve(&cube, "logits")?;
    if r.size < (len * dtype.size()) as u64 {
        return Ok(None);
    }
    let Ok(buffer) = b.wrap_buffer(r.buffer, r.offset, len, dtype) else {
        return Ok(None);
    };
    Ok(Some(Bound {
        cube,
        buffer,
        keep: r.keep,
    }))
}

/// A new burn buffer for `len` elements of `dtype`, bound as our output.
fn output(
    b: &WgpuBackend,
    like: &CubeTensor,
    shape: Shape,
    dtype: DType,
    len: usize,
) -> Result<Bound<WgpuBuffer>> {
    let ours = dtype_of(dtype).ok_or_else(|| Error::Unsupported(format!("output {dtype:?}")))?;
    let bytes = (len * ours.size()).div_ceil(4) * 4;
    let handle: Handle = like.client.empty(bytes);
    let cube = CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        handle,
        dtype,
    );
    let r = resolve(&cube, "output")?;
    let buffer = b.wrap_buffer(r.buffer, r.offset, len, ours)?;
    Ok(Bound {
        cube,
        buffer,
        keep: r.keep,
    })
}

/// `sum((x - detach(x)) * g)` in f32: exactly 0 in value for finite `x` (no `inf - inf` near
/// f32's range), `g` as the gradient of `x`.
fn surrogate<const D: usize>(x: Tensor<D>, g: Tensor<D>) -> Tensor<1> {
    let x = x.cast(DType::F32);
    ((x.clone() - x.detach()) * g.cast(DType::F32)).sum()
}

/// Runs `loss` with our kernels on burn's buffers when the tensors are on the shared device and
/// bindable in place; `Ok(None)` sends the call to the host-copy route. Shapes are checked by
/// the caller (`rows` rows of `c` classes, labels one per row).
pub(super) fn try_apply<const D: usize, const L: usize>(
    loss: Loss,
    student: &Tensor<D>,
    teacher: Option<&Tensor<D>>,
    labels: Option<&Tensor<L, Int>>,
    rows: usize,
    c: usize,
) -> Result<Option<Tensor<1>>> {
    let device = student.device();
    let Some(shared) = shared_for(&device) else {
        return Ok(None);
    };
    // The optional input checks read the logits on the host, and so do the teacher forms other
    // than logits (reverse KL's support check): the copy route does both.
    let host_only = match loss {
        Loss::Kd(l) => l.check_inputs,
        Loss::Soft(l) => l.check_inputs || l.teacher != TeacherInput::Logits,
        Loss::CrossEntropy(l) => l.check_inputs,
        Loss::Dkd(l) => l.check_inputs,
    };
    if host_only {
        return Ok(None);
    }
    let b = &shared.backend;
    let shape = RowShape::new(rows, c);
    let len = rows * c;
    let cube_of = |t: &Tensor<D>| t.clone().inner().try_into_primitive::<Cube>().ok();
    let Some(s_cube) = cube_of(student) else {
        return Ok(None);
    };
    let t_cube = match teacher {
        Some(t) => match cube_of(t) {
            Some(cube) => Some(cube),
            None => return Ok(None),
        },
        None => None,
    };
    // Labels as i32 on the device (a cast kernel of burn's when they are i64).
    let l_cube = match labels {
        Some(y) => match y
            .clone()
            .inner()
            .cast(IntDType::I32)
            .try_into_primitive::<Cube>()
        {
            Ok(cube) if cube.dtype == DType::I32 && bindable(&cube) => Some(cube),
            _ => return Ok(None),
        },
        None => None,
    };
    let Some(s) = bind_float(b, s_cube, len)? else {
        return Ok(None);
    };
    let t = match t_cube {
        Some(cube) => match bind_float(b, cube, len)? {
            Some(t) => Some(t),
            None => return Ok(None),
        },
        None => None,
    };
    let l = match l_cube {
        Some(cube) => {
            let r = resolve(&cube, "labels")?;
            if r.size < rows as u64 * 4 {
                return Ok(None);
            }
            let Ok(buffer) = b.wrap_labels(r.buffer, r.offset, rows) else {
                return Ok(None);
            };
            Some(Bound {
                cube,
                buffer,
                keep: r.keep,
            })
        }
        None => None,
    };

    // The outputs, in burn's memory: the loss, and the gradients in f32 (the surrogate's cast
    // back to a half student rounds the upstream times the gradient once, not twice).
    let grad_teacher = match loss {
        Loss::Kd(l) => l.teacher_grad,
        Loss::Soft(l) => l.teacher_grad,
        Loss::CrossEntropy(_) | Loss::Dkd(_) => false,
    };
    let s_shape = s.cube.shape();
    let out_loss = output(b, &s.cube, Shape::new([1]), DType::F32, 1)?;
    let want_gs = student.is_tracked();
    let gs = if want_gs {
        Some(output(b, &s.cube, s_shape.clone(), DType::F32, len)?)
    } else {
        None
    };
    let gt = match (&t, grad_teacher) {
        (Some(t), true) => Some(output(b, &t.cube, s_shape, DType::F32, len)?),
        _ => None,
    };

    // burn's queued work on these buffers goes to the queue before ours.
    s.cube
        .client
        .flush()
        .map_err(|e| server_err("flushing burn's queued work", e))?;
    let out = LossOut {
        loss: &out_loss.buffer,
        row_loss: None,
        grad_student: match &gs {
            Some(g) => GradOut::Into(&g.buffer),
            None => GradOut::None,
        },
        grad_teacher: gt.as_ref().map(|g| &g.buffer),
    };
    let labels_buf = l.as_ref().map(|l| &l.buffer);
    let need = |what: &str| Error::Unsupported(format!("burn adapter: {what} missing"));
    match loss {
        Loss::Kd(kd) => b.hinton(
            &kd.spec(shape),
            &s.buffer,
            &t.as_ref().ok_or_else(|| need("teacher"))?.buffer,
            labels_buf.ok_or_else(|| need("labels"))?,
            out,
        )?,
        Loss::Soft(st) => {
            let spec = DivergenceSpec {
                shape,
                divergence: st.divergence,
                teacher: st.teacher,
                temperature: st.temperature,
                reduction: st.reduction,
                ignore_index: st.ignore_index,
                grad_scale: 1.0,
                teacher_eps: st.teacher_eps,
            };
            b.divergence(
                &spec,
                &s.buffer,
                &t.as_ref().ok_or_else(|| need("teacher"))?.buffer,
                labels_buf,
                out,
            )?
        }
        Loss::CrossEntropy(ce) => {
            let spec = CrossEntropySpec {
                shape,
                label_smoothing: ce.label_smoothing,
                reduction: ce.reduction,
                ignore_index: ce.ignore_index,
                grad_scale: 1.0,
            };
            b.cross_entropy(
                &spec,
                &s.buffer,
                labels_buf.ok_or_else(|| need("labels"))?,
                out,
            )?
        }
        Loss::Dkd(dkd) => b.dkd(
            &dkd.spec(shape),
            &s.buffer,
            &t.as_ref().ok_or_else(|| need("teacher"))?.buffer,
            labels_buf.ok_or_else(|| need("labels"))?,
            out,
        )?,
    }

    // Keep every buffer our kernels touch reserved until the queue has run them.
    let mut held: Vec<Box<dyn Send>> = vec![s.keep, out_loss.keep];
    held.extend(t.map(|t| t.keep));
    held.extend(l.map(|l| l.keep));
    let gs_cube = gs.map(|g| {
        held.push(g.keep);
        g.cube
    });
    let gt_cube = gt.map(|g| {
        held.push(g.keep);
        g.cube
    });
    b.queue().on_submitted_work_done(move || drop(held));

    let autodiff = device.is_autodiff();
    let lift = |x: Tensor<1>| if autodiff { x.autodiff() } else { x };
    let mut value = lift(Tensor::<1>::from_primitive::<Cube>(out_loss.cube));
    if let Some(g) = gs_cube {
        value = value + surrogate(student.clone(), Tensor::<D>::from_primitive::<Cube>(g));
    }
    if let (Some(t), Some(g)) = (teacher, gt_cube) {
        value = value + surrogate(t.clone(), Tensor::<D>::from_primitive::<Cube>(g));
    }
    Ok(Some(value))
}
