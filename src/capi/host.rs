//! The losses on host pointers: `dst_cpu_*` copy the inputs into the reference CPU backend (f64
//! inside) and copy the outputs back; `dst_fast_*` run the fast CPU backend (f32 kernels) on the
//! caller's memory with no copies, on at most `threads` threads.

use std::ffi::c_void;

use super::args::{Dst, RawOut, Src};
use super::buffers::{Buf, Buffers, Labels};
use super::losses::{
    CrossEntropyArgs, DivergenceArgs, DkdArgs, HintonArgs, Memory, MseArgs, RowLoss,
};
use super::status::{Fail, FfiResult, DST_ERR_INVALID_ARGUMENT};
#[cfg(doc)]
use super::status::{DST_BF16, DST_F16, DST_F32};
use crate::backend::cpu_fast::rows::{In, Out};
use crate::backend::cpu_fast::HostOut;
use crate::backend::Backend;
use crate::dtype::{Dtype, HostSlice};
use crate::{CpuBackend, FastCpuBackend};

/// Host memory copied into the reference CPU backend's buffers (`dst_cpu_*`).
pub(super) struct HostCopy(CpuBackend);

impl HostCopy {
    pub(super) fn new() -> Self {
        HostCopy(CpuBackend::new())
    }
}

/// Copies `len` elements from a host pointer.
///
/// # Safety
/// `p` must be valid for reads of `len` elements (checked non-null by the caller).
unsafe fn host_vec<T: Copy>(p: *const T, len: usize) -> Vec<T> {
    // SAFETY: the caller guarantees `p` points to `len` readable, initialized elements; the slice
    // lives only for the copy, during which nothing writes through an alias.
    unsafe { std::slice::from_raw_parts(p, len) }.to_vec()
}

impl Buffers for HostCopy {
    type Backend = CpuBackend;

    fn backend(&self) -> FfiResult<&CpuBackend> {
        Ok(&self.0)
    }

    unsafe fn input(&self, p: Src, len: usize) -> FfiResult<Buf<Self>> {
        // SAFETY: forwarded from this function's contract (`len` elements of `p.dtype`).
        let data = unsafe {
            match p.dtype {
                Dtype::F32 => HostSlice::F32(host_slice(p.ptr.cast(), len)),
                Dtype::Bf16 => HostSlice::Bf16(host_slice(p.ptr.cast(), len)),
                Dtype::F16 => HostSlice::F16(host_slice(p.ptr.cast(), len)),
            }
        };
        Ok(self.0.upload_host(data)?)
    }

    unsafe fn labels(
        &self,
        p: *const i32,
        n: usize,
        classes: usize,
        ignore_index: i32,
    ) -> FfiResult<Labels<Self>> {
        // SAFETY: forwarded from this function's contract.
        let l = unsafe { host_vec(p, n) };
        crate::ops::check_labels(&l, classes, ignore_index)?;
        Ok(self.0.upload_labels(&l)?)
    }

    unsafe fn indices(&self, p: *const i32, len: usize) -> FfiResult<Labels<Self>> {
        // SAFETY: forwarded from this function's contract; the backend checks the indices.
        Ok(self.0.upload_labels(&unsafe { host_vec(p, len) })?)
    }

    unsafe fn output(&self, p: Dst, len: usize) -> FfiResult<Option<Buf<Self>>> {
        match p.is_null() {
            true => Ok(None),
            false => Ok(Some(self.0.filled_as(p.dtype, len, 0.0)?)),
        }
    }

    unsafe fn store(&self, p: Dst, buf: &Buf<Self>) -> FfiResult {
        let v = self.0.download_host(buf)?;
        let bytes = v.as_slice();
        let bytes = bytes.bytes();
        // SAFETY: `p` is writable for the buffer's length in its dtype (the buffer was made by
        // `output` or `input` with that dtype and length) by the contract; `v` is our own Vec, so
        // the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.ptr.cast::<u8>(), bytes.len()) };
        Ok(())
    }
}

/// Host memory borrowed by the fast CPU backend (`dst_fast_*`), with at most `threads` threads
/// (0: one per core).
pub(super) struct HostBorrow {
    pub(super) threads: i32,
}

impl HostBorrow {
    /// The backend; [`DST_ERR_INVALID_ARGUMENT`] for a negative thread count.
    fn backend(&self) -> FfiResult<FastCpuBackend> {
        fast_backend(self.threads)
    }
}

/// The fast CPU backend on at most `threads` threads (0: one per core); a negative count is
/// [`DST_ERR_INVALID_ARGUMENT`] (every `dst_fast_*` entry point).
pub(super) fn fast_backend(threads: i32) -> FfiResult<FastCpuBackend> {
    if threads < 0 {
        return Err(Fail::new(
            DST_ERR_INVALID_ARGUMENT,
            format!("threads = {threads}: pass 0 for one thread per core, or a positive maximum"),
        ));
    }
    Ok(FastCpuBackend::new().with_threads(threads as usize))
}

/// A host slice of `len` elements.
///
/// # Safety
/// `p` non-null and readable for `len` elements, not written while the slice lives.
unsafe fn host_slice<'a, T>(p: *const T, len: usize) -> &'a [T] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(p, len) }
}

impl Memory for HostBorrow {
    unsafe fn row_loss(&self, loss: RowLoss<'_>, student: Src, out: RawOut) -> FfiResult {
        let fast = self.backend()?;
        let shape = loss.shape();
        let n = shape.rows;
        // SAFETY: the pointers are valid for these sizes by `Memory::row_loss`'s contract, which
        // is the `*_host` functions' (labels are read only when non-null).
        unsafe {
            let typed_out = |p: Dst| (!p.is_null()).then(|| Out::from_raw(p.ptr.cast(), p.dtype));
            let out = HostOut {
                loss: out.loss,
                row_loss: out.row_loss,
                grad_student: typed_out(out.grad_student),
                grad_teacher: typed_out(out.grad_teacher),
            };
            let student = In::from_raw(student.ptr.cast(), student.dtype);
            let typed_in = |p: Src| In::from_raw(p.ptr.cast(), p.dtype);
            match loss {
                RowLoss::Hinton {
                    spec,
                    teacher,
                    labels,
                } => {
                    let (t, l) = (typed_in(teacher), host_slice(labels, n));
                    fast.hinton_host(spec, student, t, l, out)?
                }
                RowLoss::Divergence {
                    spec,
                    teacher,
                    labels,
                } => {
                    let t = typed_in(teacher);
                    let l = (!labels.is_null()).then(|| host_slice(labels, n));
                    fast.divergence_host(spec, student, t, l, out)?
                }
                RowLoss::CrossEntropy { spec, labels } => {
                    fast.cross_entropy_host(spec, student, host_slice(labels, n), out)?
                }
                RowLoss::Dkd {
                    spec,
                    teacher,
                    labels,
                } => {
                    let (t, l) = (typed_in(teacher), host_slice(labels, n));
                    fast.dkd_host(spec, student, t, l, out)?
                }
                RowLoss::Sparse {
                    spec,
                    indices,
                    values,
                    labels,
                } => {
                    let idx = host_slice(indices, spec.entries());
                    let l = (!labels.is_null()).then(|| host_slice(labels, n));
                    fast.sparse_host(spec, student, idx, typed_in(values), l, out)?
                }
            }
        }
        Ok(())
    }

    unsafe fn mse(&self, spec: &crate::ops::MseSpec, args: &MseArgs) -> FfiResult {
        let fast = self.backend()?;
        let len = spec.len;
        let (grad_a, grad_b) = (args.grad_a, args.grad_b);
        // SAFETY: non-null pointers valid for `len` (inputs, gradients) and 1 (loss) elements by
        // `Memory::mse`'s contract; the outputs overlap neither the inputs nor each other, so the
        // mutable slices are exclusive.
        unsafe {
            let ga = (!grad_a.is_null()).then(|| std::slice::from_raw_parts_mut(grad_a, len));
            let gb = (!grad_b.is_null()).then(|| std::slice::from_raw_parts_mut(grad_b, len));
            let (a, b) = (host_slice(args.a, len), host_slice(args.b, len));
            let l = fast.mse_host(spec, a, b, ga, gb);
            args.loss.write(l as f32);
        }
        Ok(())
    }
}

/// The fused Hinton loss `alpha*CE + (1-alpha)*T^2*KL` on host memory (CPU reference backend,
/// f64 inside; [`dst_fast_hinton`] is the fast f32 backend).
///
/// `student`, `teacher`: `[n, c]` logits; `labels`: `[n]`. Outputs: `loss` (1 float, required),
/// `row_loss` (`[n]`, optional), `grad_student` (`[n, c]`, optional, may equal `student` for an
/// in-place gradient), `grad_teacher` (`[n, c]`, optional). Labels out of range are an error.
///
/// Each of `student`, `teacher`, `grad_student`, `grad_teacher` is followed by its dtype:
/// [`DST_F32`], [`DST_BF16`] or [`DST_F16`] (`docs/LOSSES.md`, half precision), mixed as the
/// caller likes. The math is f32 (f64 here), `loss` and `row_loss` are f32, and each gradient is
/// rounded once to its own dtype (an in-place gradient has the student's). The dtype code of a
/// NULL gradient is checked too: pass `DST_F32`. The row losses' other entry points take their
/// arrays' dtypes the same way.
///
/// # Safety
/// Every non-null pointer must be valid for the number of elements named above.
#[no_mangle]
pub unsafe extern "C" fn dst_cpu_hinton(
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
    // SAFETY: this function's contract is `run`'s.
    unsafe { args.run(HostCopy::new()) }
}

/// [`dst_cpu_hinton`] on the fast CPU backend: f32 kernels on at most `threads` threads (0: one
/// per core), reading and writing the caller's memory directly (no copies). The result is the same
/// bits for any `threads`, and within 1e-4 of the reference's.
///
/// # Safety
/// As [`dst_cpu_hinton`].
#[no_mangle]
pub unsafe extern "C" fn dst_fast_hinton(
    threads: i32,
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
    // SAFETY: this function's contract is `run`'s.
    unsafe { args.run(HostBorrow { threads }) }
}

/// Decoupled knowledge distillation `ce_weight CE + T^2 (tckd_weight TCKD + nckd_weight NCKD)` on
/// host memory (CPU reference backend, f64 inside; [`dst_fast_dkd`] is the fast f32 backend):
/// TCKD the binary KL of the label's class against the rest, NCKD the KL among the other classes
/// renormalised (`docs/LOSSES.md` section 8). DKD's paper uses `ce_weight` 1, `tckd_weight`
/// alpha = 1 and `nckd_weight` beta = 8 (both times its warm-up factor), T = 4.
///
/// `student`, `teacher`: `[n, c]` logits, `c >= 2`; `labels`: `[n]`. Outputs: `loss` (1 float,
/// required), `row_loss` (`[n]`, optional), `grad_student` (`[n, c]`, optional, may equal
/// `student` for an in-place gradient). The teacher is detached: there is no teacher gradient.
/// Labels out of range are an error.
///
/// # Safety
/// Every non-null pointer must be valid for the number of elements named above.
#[no_mangle]
pub unsafe extern "C" fn dst_cpu_dkd(
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
    // SAFETY: this function's contract is `run`'s.
    unsafe { args.run(HostCopy::new()) }
}

/// [`dst_cpu_dkd`] on the fast CPU backend, as [`dst_fast_hinton`] is to [`dst_cpu_hinton`].
///
/// # Safety
/// As [`dst_cpu_dkd`].
#[no_mangle]
pub unsafe extern "C" fn dst_fast_dkd(
    threads: i32,
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
    // SAFETY: this function's contract is `run`'s.
    unsafe { args.run(HostBorrow { threads }) }
}

/// A soft-target divergence on host memory (CPU reference backend, f64 inside;
/// [`dst_fast_divergence`] is the fast f32 backend).
///
/// `divergence_code`: 0 forward KL `KL(q||p)`, 1 reverse KL, 2 JSD with `beta` in (0, 1) (`beta`
/// is ignored otherwise). `teacher_eps`: 0 for none, or a floor in (0, 1) on the teacher's
/// probabilities inside the log, `log max(q, teacher_eps)` (e.g. 1e-8); accepted only with reverse
/// KL and `teacher_input` 1 or 2, where without it a teacher probability of exactly 0 is an error
/// (`DST_ERR_INPUT`: the divergence is infinite). `teacher_input`: 0 logits (`softmax(t/T)`), 1
/// probabilities, 2 log-probabilities. `labels` (`[n]`) is optional: when given, rows whose label
/// is `ignore_index` are masked. Outputs as [`dst_cpu_hinton`]; `grad_teacher` needs
/// `teacher_input` 0.
///
/// # Safety
/// Every non-null pointer must be valid for the number of elements named above.
#[no_mangle]
pub unsafe extern "C" fn dst_cpu_divergence(
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
    // SAFETY: this function's contract is `run`'s.
    unsafe { args.run(HostCopy::new()) }
}

/// [`dst_cpu_divergence`] on the fast CPU backend, as [`dst_fast_hinton`] is to
/// [`dst_cpu_hinton`].
///
/// # Safety
/// As [`dst_cpu_divergence`].
#[no_mangle]
pub unsafe extern "C" fn dst_fast_divergence(
    threads: i32,
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
    // SAFETY: this function's contract is `run`'s.
    unsafe { args.run(HostBorrow { threads }) }
}

/// Cross-entropy with hard labels on host memory (CPU reference backend, f64 inside;
/// [`dst_fast_cross_entropy`] is the fast f32 backend).
///
/// `student`: `[n, c]` logits; `labels`: `[n]`; `label_smoothing` in [0, 1). Outputs as
/// [`dst_cpu_hinton`] without `grad_teacher`.
///
/// # Safety
/// Every non-null pointer must be valid for the number of elements named above.
#[no_mangle]
pub unsafe extern "C" fn dst_cpu_cross_entropy(
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
    // SAFETY: this function's contract is `run`'s.
    unsafe { args.run(HostCopy::new()) }
}

/// [`dst_cpu_cross_entropy`] on the fast CPU backend, as [`dst_fast_hinton`] is to
/// [`dst_cpu_hinton`].
///
/// # Safety
/// As [`dst_cpu_cross_entropy`].
#[no_mangle]
pub unsafe extern "C" fn dst_fast_cross_entropy(
    threads: i32,
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
    // SAFETY: this function's contract is `run`'s.
    unsafe { args.run(HostBorrow { threads }) }
}

/// Feature-map MSE `mean((a - b)^2)` over `len` floats on host memory (CPU reference backend;
/// [`dst_fast_mse`] is the fast f32 backend).
///
/// `loss`: 1 float (required); `grad_a`, `grad_b`: `[len]` (optional, must not alias an input).
///
/// # Safety
/// Every non-null pointer must be valid for the number of elements named above.
#[no_mangle]
pub unsafe extern "C" fn dst_cpu_mse(
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
    // SAFETY: this function's contract is `run`'s.
    unsafe { args.run(HostCopy::new()) }
}

/// [`dst_cpu_mse`] on the fast CPU backend, as [`dst_fast_hinton`] is to [`dst_cpu_hinton`].
///
/// # Safety
/// As [`dst_cpu_mse`].
#[no_mangle]
pub unsafe extern "C" fn dst_fast_mse(
    threads: i32,
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
    // SAFETY: this function's contract is `run`'s.
    unsafe { args.run(HostBorrow { threads }) }
}
