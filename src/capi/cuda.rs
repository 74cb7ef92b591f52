//! The losses on CUDA device pointers: an opaque context ([`dst_cuda`], a `CudaBackend` on one
//! device and a stream), and `dst_cuda_*`, which wrap the caller's device memory as the backend's
//! buffers (no copies) and enqueue the kernels on the context's stream. Without the crate feature
//! `cuda` the entry points exist, check their arguments and return [`DST_ERR_UNAVAILABLE`].

use std::ffi::c_void;

use super::args::non_null;
#[cfg(feature = "cuda")]
use super::args::{Dst, Src};
#[cfg(feature = "cuda")]
use super::buffers::{Buf, Buffers, Labels};
use super::losses::{CrossEntropyArgs, DivergenceArgs, DkdArgs, HintonArgs, MseArgs, SparseArgs};
#[cfg(any(doc, not(feature = "cuda")))]
use super::status::DST_ERR_UNAVAILABLE;
use super::status::{ffi, Fail, FfiResult, DST_ERR_INVALID_ARGUMENT};
#[cfg(not(feature = "cuda"))]
use super::{
    args::{RawOut, Src},
    losses::{Memory, RowLoss},
};
#[cfg(doc)]
use super::{
    host::{dst_cpu_cross_entropy, dst_cpu_divergence, dst_cpu_dkd, dst_cpu_hinton, dst_cpu_mse},
    sparse::dst_cpu_sparse_kd,
    status::DST_ERR_LABEL,
};
#[cfg(not(feature = "cuda"))]
use crate::ops::MseSpec;
#[cfg(feature = "cuda")]
use crate::{
    backend::cuda::{CudaBuffer, CudaLabels},
    backend::Backend,
    CudaBackend,
};

/// An opaque CUDA context: a `CudaBackend` bound to one device, with its own stream. Create it with
/// [`dst_cuda_create`], free it with [`dst_cuda_destroy`]. It may be used from several threads, but
/// calls on one context are serialized on its stream.
#[allow(non_camel_case_types)]
pub struct dst_cuda {
    #[cfg(feature = "cuda")]
    backend: CudaBackend,
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> FfiResult {
    Err(Fail::new(
        DST_ERR_UNAVAILABLE,
        "backend cuda unavailable: this library was built without the `cuda` feature",
    ))
}

/// The context behind a handle.
///
/// # Safety
/// `ctx` is NULL or a live handle from [`dst_cuda_create`].
#[cfg(feature = "cuda")]
pub(super) unsafe fn cuda_ref<'a>(ctx: *const dst_cuda) -> FfiResult<&'a CudaBackend> {
    non_null("ctx", ctx)?;
    // SAFETY: non-null, and by the contract a live handle made by `Box::into_raw` in
    // `dst_cuda_create`, not yet destroyed.
    Ok(unsafe { &(*ctx).backend })
}

/// Creates a CUDA context on device `device` (0-based) and stores it in `*out` (`*out` is set to
/// NULL on failure). Returns [`DST_ERR_UNAVAILABLE`] with a message when there is no CUDA driver,
/// no such device, no NVRTC, or the library was built without CUDA.
///
/// # Safety
/// `out` must be a valid pointer to a `dst_cuda*`.
#[no_mangle]
pub unsafe extern "C" fn dst_cuda_create(device: i32, out: *mut *mut dst_cuda) -> i32 {
    // SAFETY: forwarded from this function's contract; no stream is borrowed.
    unsafe { create_context(device, None, out) }
}

/// Creates a context on CUDA device `device` whose kernels run on the caller's stream `stream`
/// (a `cudaStream_t` / `CUstream`; 0 for the legacy default stream), so they are ordered with the
/// caller's own work on that stream and nothing needs to synchronize. From PyTorch:
/// `torch.cuda.current_stream().cuda_stream`. On failure `*out` is NULL.
///
/// # Safety
/// `out` must be writable; `stream` must be 0 or a live stream of the device's primary context (the
/// CUDA runtime's, which PyTorch uses) that outlives the context.
#[no_mangle]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn dst_cuda_create_on_stream(
    device: i32,
    stream: *mut c_void,
    out: *mut *mut dst_cuda,
) -> i32 {
    // SAFETY: forwarded from this function's contract.
    unsafe { create_context(device, Some(stream as u64), out) }
}

/// `dst_cuda_create` (`stream` None: the default stream) and `dst_cuda_create_on_stream`.
///
/// # Safety
/// `out` must be writable; a `stream` must be a live stream of the device's primary context that
/// outlives the context.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
unsafe fn create_context(device: i32, stream: Option<u64>, out: *mut *mut dst_cuda) -> i32 {
    ffi(|| {
        non_null("out", out)?;
        // SAFETY: `out` is non-null and writable by the contract.
        unsafe { *out = std::ptr::null_mut() };
        if device < 0 {
            return Err(Fail::new(
                DST_ERR_INVALID_ARGUMENT,
                format!("invalid device {device}: CUDA device ordinals are 0, 1, ..."),
            ));
        }
        #[cfg(feature = "cuda")]
        {
            let backend = match stream {
                // SAFETY: the stream's validity and lifetime are the caller's contract.
                Some(raw) => unsafe { CudaBackend::with_stream(device as usize, raw)? },
                None => CudaBackend::with_device(device as usize)?,
            };
            let handle = Box::into_raw(Box::new(dst_cuda { backend }));
            // SAFETY: as above.
            unsafe { *out = handle };
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        no_cuda()
    })
}

/// Destroys a context from [`dst_cuda_create`] (NULL is accepted and ignored). Does not wait for
/// its work: call [`dst_cuda_synchronize`] first if kernels may still be running on memory you are
/// about to free.
///
/// # Safety
/// `ctx` is NULL or a live handle, not used after this call.
#[no_mangle]
pub unsafe extern "C" fn dst_cuda_destroy(ctx: *mut dst_cuda) -> i32 {
    ffi(|| {
        if !ctx.is_null() {
            // SAFETY: a live handle made by `Box::into_raw`, released exactly once here.
            drop(unsafe { Box::from_raw(ctx) });
        }
        Ok(())
    })
}

/// Waits until every kernel enqueued on the context's stream has finished; reports an asynchronous
/// error of an earlier launch.
///
/// # Safety
/// `ctx` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn dst_cuda_synchronize(ctx: *const dst_cuda) -> i32 {
    ffi(|| {
        #[cfg(feature = "cuda")]
        {
            // SAFETY: forwarded from this function's contract.
            unsafe { cuda_ref(ctx) }?.synchronize()?;
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            non_null("ctx", ctx)?;
            no_cuda()
        }
    })
}

/// Stores the context's `CUstream` in `*stream` (as `void*`), so that a caller can order its own
/// work against the kernels (e.g. with CUDA events), and its device ordinal in `*device` (optional).
///
/// # Safety
/// `ctx` is NULL or a live handle; `stream` a valid pointer; `device` NULL or a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn dst_cuda_stream(
    ctx: *const dst_cuda,
    stream: *mut *mut c_void,
    device: *mut i32,
) -> i32 {
    ffi(|| {
        non_null("stream", stream)?;
        #[cfg(feature = "cuda")]
        {
            // SAFETY: forwarded from this function's contract.
            let b = unsafe { cuda_ref(ctx) }?;
            // SAFETY: `stream` is non-null and writable; `device` is written only when non-null.
            unsafe {
                *stream = b.stream().cu_stream() as *mut c_void;
                if !device.is_null() {
                    *device = b.context().ordinal() as i32;
                }
            }
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            non_null("ctx", ctx)?;
            no_cuda()
        }
    })
}

/// The caller's device memory on the context `ctx` (`dst_cuda_*`), wrapped in place as the CUDA
/// backend's buffers.
pub(super) struct Device(pub(super) *const dst_cuda);

#[cfg(feature = "cuda")]
impl Buffers for Device {
    type Backend = CudaBackend;

    fn check_handle(&self) -> FfiResult {
        non_null("ctx", self.0)
    }

    fn backend(&self) -> FfiResult<&CudaBackend> {
        // SAFETY: `self.0` is NULL or a live handle, the contract of the entry points that
        // make a `Device`.
        unsafe { cuda_ref(self.0) }
    }

    unsafe fn input(&self, p: Src, len: usize) -> FfiResult<Buf<Self>> {
        // SAFETY: forwarded from this function's contract.
        Ok(unsafe { CudaBuffer::from_raw_as(p.ptr as u64, len, p.dtype) })
    }

    unsafe fn labels(&self, p: *const i32, n: usize, _: usize, _: i32) -> FfiResult<Labels<Self>> {
        // SAFETY: forwarded from this function's contract.
        Ok(unsafe { CudaLabels::from_raw(p as u64, n) })
    }

    unsafe fn output(&self, p: Dst, len: usize) -> FfiResult<Option<Buf<Self>>> {
        // SAFETY: forwarded from this function's contract (only non-null pointers wrapped).
        Ok((!p.is_null()).then(|| unsafe { CudaBuffer::from_raw_as(p.ptr as u64, len, p.dtype) }))
    }

    unsafe fn store(&self, _: Dst, _: &Buf<Self>) -> FfiResult {
        // The kernels wrote the caller's memory.
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
impl Memory for Device {
    fn check_handle(&self) -> FfiResult {
        non_null("ctx", self.0)
    }

    unsafe fn row_loss(&self, _: RowLoss<'_>, _: Src, _: RawOut) -> FfiResult {
        no_cuda()
    }

    unsafe fn mse(&self, _: &MseSpec, _: &MseArgs) -> FfiResult {
        no_cuda()
    }
}

/// [`dst_cpu_hinton`] on device pointers of the context's device; enqueued on its stream, no
/// synchronization. Labels out of range are not checked (those rows get a NaN loss); check them
/// with [`dst_cuda_check_labels`] when needed.
///
/// # Safety
/// `ctx` is NULL or a live handle; every non-null pointer is device memory of its device valid for
/// the sizes of [`dst_cpu_hinton`] until the kernels finish, and not written by other work meanwhile.
#[no_mangle]
pub unsafe extern "C" fn dst_cuda_hinton(
    ctx: *const dst_cuda,
    student: *const c_void,
    student_dtype: i32,
    teacher: *const c_void,
    teacher_dtype: i32,
    labels: *const i32,
    n: usize,
    c: usize,
    temperature: f32,
    alpha: f32,
    label_smoothing: f32,
    ignore_index: i32,
    reduction_code: i32,
    grad_scale: f32,
    loss: *mut f32,
    row_loss: *mut f32,
    grad_student: *mut c_void,
    grad_student_dtype: i32,
    grad_teacher: *mut c_void,
    grad_teacher_dtype: i32,
) -> i32 {
    #[rustfmt::skip]
    let args = HintonArgs { student, teacher, labels, n, c, temperature, alpha, label_smoothing,
        ignore_index, reduction_code, grad_scale, loss, row_loss, grad_student, grad_teacher,
        student_dtype, teacher_dtype, grad_student_dtype, grad_teacher_dtype };
    // SAFETY: this function's contract is `run`'s and `Device`'s.
    unsafe { args.run(Device(ctx)) }
}

/// [`dst_cpu_dkd`] on device pointers (see [`dst_cuda_hinton`] for the stream rules; labels out
/// of range give those rows a NaN loss).
///
/// # Safety
/// As [`dst_cuda_hinton`], with the sizes of [`dst_cpu_dkd`].
#[no_mangle]
pub unsafe extern "C" fn dst_cuda_dkd(
    ctx: *const dst_cuda,
    student: *const c_void,
    student_dtype: i32,
    teacher: *const c_void,
    teacher_dtype: i32,
    labels: *const i32,
    n: usize,
    c: usize,
    temperature: f32,
    ce_weight: f32,
    tckd_weight: f32,
    nckd_weight: f32,
    label_smoothing: f32,
    ignore_index: i32,
    reduction_code: i32,
    grad_scale: f32,
    loss: *mut f32,
    row_loss: *mut f32,
    grad_student: *mut c_void,
    grad_student_dtype: i32,
) -> i32 {
    #[rustfmt::skip]
    let args = DkdArgs { student, teacher, labels, n, c, temperature, ce_weight, tckd_weight,
        nckd_weight, label_smoothing, ignore_index, reduction_code, grad_scale, loss, row_loss,
        grad_student,
        student_dtype, teacher_dtype, grad_student_dtype };
    // SAFETY: this function's contract is `run`'s and `Device`'s.
    unsafe { args.run(Device(ctx)) }
}

/// [`dst_cpu_sparse_kd`] on device pointers (see [`dst_cuda_hinton`] for the stream rules):
/// `indices` `[n, k]` i32 and `values` `[n, k]` are device memory too. Neither is read back: an
/// index outside `0..c` or repeated within a row, a label out of range, or under reverse KL a
/// `-inf` log-probability, is not an error here but gives that row a NaN loss and gradient (the
/// kernel reads or writes nothing out of bounds).
///
/// # Safety
/// As [`dst_cuda_hinton`], with the sizes of [`dst_cpu_sparse_kd`].
#[no_mangle]
pub unsafe extern "C" fn dst_cuda_sparse_kd(
    ctx: *const dst_cuda,
    student: *const c_void,
    student_dtype: i32,
    indices: *const i32,
    values: *const c_void,
    values_dtype: i32,
    labels: *const i32,
    n: usize,
    c: usize,
    k: usize,
    divergence_code: i32,
    beta: f32,
    values_code: i32,
    tail_code: i32,
    temperature: f32,
    alpha: f32,
    label_smoothing: f32,
    ignore_index: i32,
    reduction_code: i32,
    grad_scale: f32,
    loss: *mut f32,
    row_loss: *mut f32,
    grad_student: *mut c_void,
    grad_student_dtype: i32,
) -> i32 {
    #[rustfmt::skip]
    let args = SparseArgs { student, student_dtype, indices, values, values_dtype, labels, n, c,
        k, divergence_code, beta, values_code, tail_code, temperature, alpha, label_smoothing,
        ignore_index, reduction_code, grad_scale, loss, row_loss, grad_student,
        grad_student_dtype };
    // SAFETY: this function's contract is `run`'s and `Device`'s.
    unsafe { args.run(Device(ctx)) }
}

/// [`dst_cpu_divergence`] on device pointers (see [`dst_cuda_hinton`] for the stream rules).
///
/// # Safety
/// As [`dst_cuda_hinton`], with the sizes of [`dst_cpu_divergence`].
#[no_mangle]
pub unsafe extern "C" fn dst_cuda_divergence(
    ctx: *const dst_cuda,
    student: *const c_void,
    student_dtype: i32,
    teacher: *const c_void,
    teacher_dtype: i32,
    labels: *const i32,
    n: usize,
    c: usize,
    divergence_code: i32,
    beta: f32,
    teacher_eps: f32,
    teacher_input_code: i32,
    temperature: f32,
    ignore_index: i32,
    reduction_code: i32,
    grad_scale: f32,
    loss: *mut f32,
    row_loss: *mut f32,
    grad_student: *mut c_void,
    grad_student_dtype: i32,
    grad_teacher: *mut c_void,
    grad_teacher_dtype: i32,
) -> i32 {
    #[rustfmt::skip]
    let args = DivergenceArgs { student, teacher, labels, n, c, divergence_code, beta, teacher_eps,
        teacher_input_code, temperature, ignore_index, reduction_code, grad_scale, loss, row_loss,
        grad_student, grad_teacher,
        student_dtype, teacher_dtype, grad_student_dtype, grad_teacher_dtype };
    // SAFETY: this function's contract is `run`'s and `Device`'s.
    unsafe { args.run(Device(ctx)) }
}

/// [`dst_cpu_cross_entropy`] on device pointers (see [`dst_cuda_hinton`] for the stream rules).
///
/// # Safety
/// As [`dst_cuda_hinton`], with the sizes of [`dst_cpu_cross_entropy`].
#[no_mangle]
pub unsafe extern "C" fn dst_cuda_cross_entropy(
    ctx: *const dst_cuda,
    student: *const c_void,
    student_dtype: i32,
    labels: *const i32,
    n: usize,
    c: usize,
    label_smoothing: f32,
    ignore_index: i32,
    reduction_code: i32,
    grad_scale: f32,
    loss: *mut f32,
    row_loss: *mut f32,
    grad_student: *mut c_void,
    grad_student_dtype: i32,
) -> i32 {
    #[rustfmt::skip]
    let args = CrossEntropyArgs { student, labels, n, c, label_smoothing, ignore_index,
        reduction_code, grad_scale, loss, row_loss, grad_student,
        student_dtype, grad_student_dtype };
    // SAFETY: this function's contract is `run`'s and `Device`'s.
    unsafe { args.run(Device(ctx)) }
}

/// [`dst_cpu_mse`] on device pointers (see [`dst_cuda_hinton`] for the stream rules).
///
/// # Safety
/// As [`dst_cuda_hinton`], with the sizes of [`dst_cpu_mse`].
#[no_mangle]
pub unsafe extern "C" fn dst_cuda_mse(
    ctx: *const dst_cuda,
    a: *const f32,
    b: *const f32,
    len: usize,
    grad_scale: f32,
    loss: *mut f32,
    grad_a: *mut f32,
    grad_b: *mut f32,
) -> i32 {
    let args = MseArgs {
        a,
        b,
        len,
        grad_scale,
        loss,
        grad_a,
        grad_b,
    };
    // SAFETY: this function's contract is `run`'s and `Device`'s.
    unsafe { args.run(Device(ctx)) }
}

/// Checks `n` device labels against `0..c` and `ignore_index` (reads them back: this one
/// synchronizes the context's stream). [`DST_ERR_LABEL`] names the first bad row.
///
/// # Safety
/// `ctx` is NULL or a live handle; `labels` device memory valid for `n` `int32_t`.
#[no_mangle]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn dst_cuda_check_labels(
    ctx: *const dst_cuda,
    labels: *const i32,
    n: usize,
    c: usize,
    ignore_index: i32,
) -> i32 {
    ffi(|| {
        non_null("ctx", ctx)?;
        non_null("labels", labels)?;
        if n > u32::MAX as usize {
            // (the labels are copied to the host: no allocation from a wrong n)
            return Err(crate::Error::Limit(format!(
                "n = {n} labels: past 2^32, as no loss takes; pass the labels' count"
            ))
            .into());
        }
        #[cfg(feature = "cuda")]
        {
            // SAFETY: forwarded from this function's contract.
            unsafe {
                let b = cuda_ref(ctx)?;
                let l = CudaLabels::from_raw(labels as u64, n);
                b.check_labels(&l, c, ignore_index)?;
            }
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        no_cuda()
    })
}
