//! Each loss of the C ABI declared once: its arguments (in the C order), their checks, the spec
//! built from them, and the call, run on a [`Memory`]. The entry points `dst_cpu_*` (host memory
//! copied into the reference CPU backend), `dst_fast_*` (host memory borrowed by the fast CPU
//! backend) and `dst_cuda_*` (device memory of a CUDA context) are one-line wrappers that fill an
//! argument struct and call its `run` with their memory (`host.rs`, `cuda.rs`).
//!
//! The checks run in the same order for every memory: the memory's handle (a CUDA context) is
//! non-null; the required pointers are non-null; the outputs alias nothing they must not; the
//! integer codes and the spec are valid; then the memory's backend runs (the fast backend checks
//! `threads` there).

use std::ffi::c_void;

use super::args::{
    divergence, non_null, reduction, sparse_tail, sparse_values, teacher_input, Dst, RawOut, Src,
};
use super::status::{ffi, FfiResult};
use crate::error::Error;
use crate::ops::{
    CrossEntropySpec, DivergenceSpec, DkdSpec, HintonSpec, MseSpec, RowShape, SparseSpec,
    TeacherInput,
};

/// Where an entry point's pointers point and which backend computes on them: the only thing in
/// which `dst_cpu_*`, `dst_fast_*` and `dst_cuda_*` differ.
pub(super) trait Memory {
    /// Checked before the arguments: the memory's handle, where it has one (a CUDA context).
    fn check_handle(&self) -> FfiResult {
        Ok(())
    }

    /// Runs a row loss on checked arguments.
    ///
    /// # Safety
    /// `student` (`[n, c]` of its dtype) and the inputs of `loss` (teacher `[n, c]` of its dtype,
    /// labels `[n]`) are readable in this memory, the non-null outputs of `out` writable for
    /// their sizes (`loss` 1, `row_loss` `[n]`, gradients `[n, c]` of their dtypes), and they
    /// alias only as [`RawOut::check`] allows.
    unsafe fn row_loss(&self, loss: RowLoss<'_>, student: Src, out: RawOut) -> FfiResult;

    /// Runs the feature-map MSE on checked arguments.
    ///
    /// # Safety
    /// `args`' non-null pointers are valid in this memory for `spec.len` floats (`loss`: 1) and
    /// the outputs overlap neither the inputs nor each other.
    unsafe fn mse(&self, spec: &MseSpec, args: &MseArgs) -> FfiResult;
}

/// A row loss with its checked spec and its inputs besides the student, as pointers in the
/// entry point's memory.
#[derive(Clone, Copy)]
pub(super) enum RowLoss<'a> {
    Hinton {
        spec: &'a HintonSpec,
        teacher: Src,
        labels: *const i32,
    },
    /// `labels` may be NULL: then no row is masked.
    Divergence {
        spec: &'a DivergenceSpec,
        teacher: Src,
        labels: *const i32,
    },
    CrossEntropy {
        spec: &'a CrossEntropySpec,
        labels: *const i32,
    },
    Dkd {
        spec: &'a DkdSpec,
        teacher: Src,
        labels: *const i32,
    },
    /// `indices` and `values` are `[n, k]`; `labels` may be NULL (then `alpha` is 0).
    Sparse {
        spec: &'a SparseSpec,
        indices: *const i32,
        values: Src,
        labels: *const i32,
    },
}

impl RowLoss<'_> {
    /// `n` rows of `c` classes.
    pub fn shape(&self) -> RowShape {
        match self {
            RowLoss::Hinton { spec, .. } => spec.shape,
            RowLoss::Divergence { spec, .. } => spec.shape,
            RowLoss::CrossEntropy { spec, .. } => spec.shape,
            RowLoss::Dkd { spec, .. } => spec.shape,
            RowLoss::Sparse { spec, .. } => spec.shape,
        }
    }
}

/// The arguments of `dst_*_hinton` after the memory's own (`threads`, `ctx`), in the C order.
pub(super) struct HintonArgs {
    pub student: *const c_void,
    pub student_dtype: i32,
    pub teacher: *const c_void,
    pub teacher_dtype: i32,
    pub labels: *const i32,
    pub n: usize,
    pub c: usize,
    pub temperature: f32,
    pub alpha: f32,
    pub label_smoothing: f32,
    pub ignore_index: i32,
    pub reduction_code: i32,
    pub grad_scale: f32,
    pub loss: *mut f32,
    pub row_loss: *mut f32,
    pub grad_student: *mut c_void,
    pub grad_student_dtype: i32,
    pub grad_teacher: *mut c_void,
    pub grad_teacher_dtype: i32,
}

impl HintonArgs {
    /// Checks the arguments, builds the spec and runs the loss on `memory`; the status code.
    ///
    /// # Safety
    /// The entry point's: every non-null pointer valid in `memory` for the size it documents.
    pub unsafe fn run(self, memory: impl Memory) -> i32 {
        ffi(|| {
            memory.check_handle()?;
            non_null("student", self.student)?;
            non_null("teacher", self.teacher)?;
            non_null("labels", self.labels)?;
            let out = RawOut {
                loss: self.loss,
                row_loss: self.row_loss,
                grad_student: Dst::new("grad_student", self.grad_student, self.grad_student_dtype)?,
                grad_teacher: Dst::new("grad_teacher", self.grad_teacher, self.grad_teacher_dtype)?,
            };
            let student = Src::new("student", self.student, self.student_dtype)?;
            let teacher = Src::new("teacher", self.teacher, self.teacher_dtype)?;
            let spec = HintonSpec {
                shape: RowShape::new(self.n, self.c),
                temperature: self.temperature,
                alpha: self.alpha,
                label_smoothing: self.label_smoothing,
                reduction: reduction(self.reduction_code)?,
                ignore_index: self.ignore_index,
                grad_scale: self.grad_scale,
            };
            spec.validate()?;
            // (after the spec's checks: a size past the limits is that error, not an overlap)
            out.check((self.n, self.c), student, teacher, self.labels)?;
            let loss = RowLoss::Hinton {
                spec: &spec,
                teacher,
                labels: self.labels,
            };
            // SAFETY: the pointers are checked non-null and non-aliasing above, and valid for
            // their sizes by this function's contract.
            unsafe { memory.row_loss(loss, student, out) }
        })
    }
}

/// The arguments of `dst_*_divergence` after the memory's own, in the C order.
pub(super) struct DivergenceArgs {
    pub student: *const c_void,
    pub student_dtype: i32,
    pub teacher: *const c_void,
    pub teacher_dtype: i32,
    pub labels: *const i32,
    pub n: usize,
    pub c: usize,
    pub divergence_code: i32,
    pub beta: f32,
    pub teacher_eps: f32,
    pub teacher_input_code: i32,
    pub temperature: f32,
    pub ignore_index: i32,
    pub reduction_code: i32,
    pub grad_scale: f32,
    pub loss: *mut f32,
    pub row_loss: *mut f32,
    pub grad_student: *mut c_void,
    pub grad_student_dtype: i32,
    pub grad_teacher: *mut c_void,
    pub grad_teacher_dtype: i32,
}

impl DivergenceArgs {
    /// Checks the arguments, builds the spec and runs the divergence on `memory`; the status.
    ///
    /// # Safety
    /// As [`HintonArgs::run`]; `labels` may be NULL.
    pub unsafe fn run(self, memory: impl Memory) -> i32 {
        ffi(|| {
            memory.check_handle()?;
            non_null("student", self.student)?;
            non_null("teacher", self.teacher)?;
            let out = RawOut {
                loss: self.loss,
                row_loss: self.row_loss,
                grad_student: Dst::new("grad_student", self.grad_student, self.grad_student_dtype)?,
                grad_teacher: Dst::new("grad_teacher", self.grad_teacher, self.grad_teacher_dtype)?,
            };
            let student = Src::new("student", self.student, self.student_dtype)?;
            let teacher = Src::new("teacher", self.teacher, self.teacher_dtype)?;
            let spec = DivergenceSpec {
                shape: RowShape::new(self.n, self.c),
                divergence: divergence(self.divergence_code, self.beta)?,
                teacher: teacher_input(self.teacher_input_code)?,
                temperature: self.temperature,
                reduction: reduction(self.reduction_code)?,
                ignore_index: self.ignore_index,
                grad_scale: self.grad_scale,
                teacher_eps: self.teacher_eps,
            };
            spec.validate()?;
            if !self.grad_teacher.is_null() && spec.teacher != TeacherInput::Logits {
                // (the fast CPU path's kernels would write the logits' gradient formula)
                return Err(Error::Unsupported(
                    "grad_teacher needs the teacher as logits (teacher_input 0); probabilities \
                     and log-probabilities are constants: pass grad_teacher = NULL"
                        .into(),
                )
                .into());
            }
            // (after the spec's checks: a size past the limits is that error, not an overlap)
            out.check((self.n, self.c), student, teacher, self.labels)?;
            let loss = RowLoss::Divergence {
                spec: &spec,
                teacher,
                labels: self.labels,
            };
            // SAFETY: as in `HintonArgs::run`.
            unsafe { memory.row_loss(loss, student, out) }
        })
    }
}

/// The arguments of `dst_*_cross_entropy` after the memory's own, in the C order.
pub(super) struct CrossEntropyArgs {
    pub student: *const c_void,
    pub student_dtype: i32,
    pub labels: *const i32,
    pub n: usize,
    pub c: usize,
    pub label_smoothing: f32,
    pub ignore_index: i32,
    pub reduction_code: i32,
    pub grad_scale: f32,
    pub loss: *mut f32,
    pub row_loss: *mut f32,
    pub grad_student: *mut c_void,
    pub grad_student_dtype: i32,
}

impl CrossEntropyArgs {
    /// Checks the arguments, builds the spec and runs cross-entropy on `memory`; the status.
    ///
    /// # Safety
    /// As [`HintonArgs::run`].
    pub unsafe fn run(self, memory: impl Memory) -> i32 {
        ffi(|| {
            memory.check_handle()?;
            non_null("student", self.student)?;
            non_null("labels", self.labels)?;
            let out = RawOut {
                loss: self.loss,
                row_loss: self.row_loss,
                grad_student: Dst::new("grad_student", self.grad_student, self.grad_student_dtype)?,
                grad_teacher: Dst::null(),
            };
            let student = Src::new("student", self.student, self.student_dtype)?;
            let spec = CrossEntropySpec {
                shape: RowShape::new(self.n, self.c),
                label_smoothing: self.label_smoothing,
                reduction: reduction(self.reduction_code)?,
                ignore_index: self.ignore_index,
                grad_scale: self.grad_scale,
            };
            spec.validate()?;
            // (after the spec's checks: a size past the limits is that error, not an overlap)
            out.check((self.n, self.c), student, Src::null(), self.labels)?;
            let loss = RowLoss::CrossEntropy {
                spec: &spec,
                labels: self.labels,
            };
            // SAFETY: as in `HintonArgs::run`.
            unsafe { memory.row_loss(loss, student, out) }
        })
    }
}

/// The arguments of `dst_*_dkd` after the memory's own, in the C order (no teacher gradient:
/// DKD's teacher is detached).
pub(super) struct DkdArgs {
    pub student: *const c_void,
    pub student_dtype: i32,
    pub teacher: *const c_void,
    pub teacher_dtype: i32,
    pub labels: *const i32,
    pub n: usize,
    pub c: usize,
    pub temperature: f32,
    pub ce_weight: f32,
    pub tckd_weight: f32,
    pub nckd_weight: f32,
    pub label_smoothing: f32,
    pub ignore_index: i32,
    pub reduction_code: i32,
    pub grad_scale: f32,
    pub loss: *mut f32,
    pub row_loss: *mut f32,
    pub grad_student: *mut c_void,
    pub grad_student_dtype: i32,
}

impl DkdArgs {
    /// Checks the arguments, builds the spec and runs DKD on `memory`; the status code.
    ///
    /// # Safety
    /// As [`HintonArgs::run`].
    pub unsafe fn run(self, memory: impl Memory) -> i32 {
        ffi(|| {
            memory.check_handle()?;
            non_null("student", self.student)?;
            non_null("teacher", self.teacher)?;
            non_null("labels", self.labels)?;
            let out = RawOut {
                loss: self.loss,
                row_loss: self.row_loss,
                grad_student: Dst::new("grad_student", self.grad_student, self.grad_student_dtype)?,
                grad_teacher: Dst::null(),
            };
            let student = Src::new("student", self.student, self.student_dtype)?;
            let teacher = Src::new("teacher", self.teacher, self.teacher_dtype)?;
            let spec = DkdSpec {
                shape: RowShape::new(self.n, self.c),
                temperature: self.temperature,
                ce_weight: self.ce_weight,
                tckd_weight: self.tckd_weight,
                nckd_weight: self.nckd_weight,
                label_smoothing: self.label_smoothing,
                reduction: reduction(self.reduction_code)?,
                ignore_index: self.ignore_index,
                grad_scale: self.grad_scale,
            };
            spec.validate()?;
            // (after the spec's checks: a size past the limits is that error, not an overlap)
            out.check((self.n, self.c), student, teacher, self.labels)?;
            let loss = RowLoss::Dkd {
                spec: &spec,
                teacher,
                labels: self.labels,
            };
            // SAFETY: as in `HintonArgs::run`.
            unsafe { memory.row_loss(loss, student, out) }
        })
    }
}

/// The arguments of `dst_*_sparse_kd` after the memory's own, in the C order (no teacher
/// gradient: a sparse teacher is a constant).
pub(super) struct SparseArgs {
    pub student: *const c_void,
    pub student_dtype: i32,
    pub indices: *const i32,
    pub values: *const c_void,
    pub values_dtype: i32,
    pub labels: *const i32,
    pub n: usize,
    pub c: usize,
    pub k: usize,
    pub divergence_code: i32,
    pub beta: f32,
    pub values_code: i32,
    pub tail_code: i32,
    pub temperature: f32,
    pub alpha: f32,
    pub label_smoothing: f32,
    pub ignore_index: i32,
    pub reduction_code: i32,
    pub grad_scale: f32,
    pub loss: *mut f32,
    pub row_loss: *mut f32,
    pub grad_student: *mut c_void,
    pub grad_student_dtype: i32,
}

impl SparseArgs {
    /// Checks the arguments, builds the spec and runs the sparse loss on `memory`; the status.
    ///
    /// # Safety
    /// As [`HintonArgs::run`]; `indices` and `values` valid for `n * k` elements, `labels` NULL
    /// or valid for `n`.
    pub unsafe fn run(self, memory: impl Memory) -> i32 {
        ffi(|| {
            memory.check_handle()?;
            non_null("student", self.student)?;
            non_null("indices", self.indices)?;
            non_null("values", self.values)?;
            let out = RawOut {
                loss: self.loss,
                row_loss: self.row_loss,
                grad_student: Dst::new("grad_student", self.grad_student, self.grad_student_dtype)?,
                grad_teacher: Dst::null(),
            };
            let student = Src::new("student", self.student, self.student_dtype)?;
            let values = Src::new("values", self.values, self.values_dtype)?;
            let entries = self.n.saturating_mul(self.k);
            let spec = SparseSpec {
                shape: RowShape::new(self.n, self.c),
                k: self.k,
                divergence: divergence(self.divergence_code, self.beta)?,
                values: sparse_values(self.values_code)?,
                tail: sparse_tail(self.tail_code)?,
                temperature: self.temperature,
                alpha: self.alpha,
                label_smoothing: self.label_smoothing,
                reduction: reduction(self.reduction_code)?,
                ignore_index: self.ignore_index,
                grad_scale: self.grad_scale,
            };
            spec.validate()?;
            // (after the spec's checks: a size past the limits is that error, not an overlap)
            out.check_with(
                (self.n, self.c),
                student,
                Src::null(),
                self.labels,
                &[
                    ("indices", self.indices.cast(), entries.saturating_mul(4)),
                    (
                        "values",
                        values.ptr,
                        entries.saturating_mul(values.dtype.size()),
                    ),
                ],
            )?;
            if self.labels.is_null() && spec.alpha > 0.0 {
                non_null("labels (required when alpha > 0)", self.labels)?;
            }
            let loss = RowLoss::Sparse {
                spec: &spec,
                indices: self.indices,
                values,
                labels: self.labels,
            };
            // SAFETY: as in `HintonArgs::run`.
            unsafe { memory.row_loss(loss, student, out) }
        })
    }
}

/// The arguments of `dst_*_mse` after the memory's own, in the C order.
pub(super) struct MseArgs {
    pub a: *const f32,
    pub b: *const f32,
    pub len: usize,
    pub grad_scale: f32,
    pub loss: *mut f32,
    pub grad_a: *mut f32,
    pub grad_b: *mut f32,
}

impl MseArgs {
    /// Checks the arguments, builds the spec and runs the MSE on `memory`; the status code.
    ///
    /// # Safety
    /// As [`HintonArgs::run`].
    pub unsafe fn run(self, memory: impl Memory) -> i32 {
        use super::args::check_no_alias;
        use std::ffi::c_void;
        ffi(|| {
            memory.check_handle()?;
            non_null("a", self.a)?;
            non_null("b", self.b)?;
            non_null("loss", self.loss)?;
            let bytes = self.len.saturating_mul(4);
            check_no_alias(
                &[
                    ("a", self.a as *const c_void, bytes),
                    ("b", self.b as *const c_void, bytes),
                ],
                &[
                    ("loss", self.loss as *const c_void, 4),
                    ("grad_a", self.grad_a as *const c_void, bytes),
                    ("grad_b", self.grad_b as *const c_void, bytes),
                ],
            )?;
            let spec = MseSpec {
                len: self.len,
                grad_scale: self.grad_scale,
            };
            spec.validate()?;
            // SAFETY: as in `HintonArgs::run`.
            unsafe { memory.mse(&spec, &self) }
        })
    }
}
