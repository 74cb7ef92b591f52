//! The sparse top-k teacher's host entry points (`docs/LOSSES.md` section 10): `dst_cpu_sparse_kd`
//! on the CPU reference backend (copies), `dst_fast_sparse_kd` on the fast CPU backend (the
//! caller's memory); the memories are `host.rs`'s, the checks `losses.rs`'s `SparseArgs`.

use std::ffi::c_void;

#[cfg(doc)]
use super::host::{dst_cpu_hinton, dst_fast_hinton};
use super::host::{HostBorrow, HostCopy};
use super::losses::SparseArgs;

/// Distillation from a sparse top-k teacher on host memory (CPU reference backend, f64 inside;
/// [`dst_fast_sparse_kd`] is the fast f32 backend): `alpha CE + (1 - alpha) T^2 D(Q || P)`
/// (`docs/LOSSES.md` section 10).
///
/// `student`: `[n, c]` logits; `indices`: `[n, k]` i32 classes, distinct within a row, `1 <= k <=
/// min(c, 1024)`; `values`: `[n, k]`, log-probabilities (`values_code` 0) or logits (1);
/// `labels`: `[n]` or NULL (required when `alpha > 0`; `ignore_index` masks rows).
/// `divergence_code`: 0 forward KL, 1 reverse KL, 2 JSD with `beta` in (0, 1). `tail_code`: 0
/// renormalize over the top-k, 1 a tail bucket (one extra class of mass `1 - sum e^values`), 2
/// the tail spread uniformly over the other `c - k` classes (1 and 2 need log-probabilities).
/// Outputs: `loss` (1 float, required), `row_loss` (`[n]`, optional), `grad_student` (`[n, c]`,
/// optional, may equal `student` for an in-place gradient). Bad indices or values are an error
/// (`DST_ERR_INPUT`) naming the row. Dtypes as [`dst_cpu_hinton`] (`values_dtype` for the values).
///
/// # Safety
/// Every non-null pointer must be valid for the number of elements named above.
#[no_mangle]
pub unsafe extern "C" fn dst_cpu_sparse_kd(
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
    // SAFETY: this function's contract is `run`'s.
    unsafe { args.run(HostCopy::new()) }
}

/// [`dst_cpu_sparse_kd`] on the fast CPU backend, as [`dst_fast_hinton`] is to
/// [`dst_cpu_hinton`].
///
/// # Safety
/// As [`dst_cpu_sparse_kd`].
#[no_mangle]
pub unsafe extern "C" fn dst_fast_sparse_kd(
    threads: i32,
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
    // SAFETY: this function's contract is `run`'s.
    unsafe { args.run(HostBorrow { threads }) }
}
