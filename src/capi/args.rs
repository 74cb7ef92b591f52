//! Checks of the C arguments that every memory shares: null pointers, the integer codes of the
//! enums, and the aliasing rules of the outputs.

use std::ffi::c_void;

use super::status::{
    Fail, FfiResult, DST_ERR_ALIAS, DST_ERR_INVALID_ARGUMENT, DST_ERR_NULL_POINTER,
};
use crate::dtype::Dtype;
use crate::ops::{Divergence, Reduction, SparseTail, SparseValues, TeacherInput};

/// [`DST_ERR_NULL_POINTER`] when `p` is NULL.
pub(super) fn non_null<T>(what: &str, p: *const T) -> FfiResult {
    if p.is_null() {
        return Err(Fail::new(
            DST_ERR_NULL_POINTER,
            format!("{what} is NULL: pass a valid pointer"),
        ));
    }
    aligned(what, p.cast(), std::mem::align_of::<T>())
}

/// A pointer to elements of `align` bytes is a multiple of `align` (NULL passes): the kernels
/// and the host copies read whole elements, which a misaligned address would make undefined.
pub(super) fn aligned(what: &str, p: *const c_void, align: usize) -> FfiResult {
    if align > 1 && !(p as usize).is_multiple_of(align) {
        return Err(Fail::new(
            DST_ERR_INVALID_ARGUMENT,
            format!(
                "{what} = {p:p} is not aligned to its elements' {align} bytes: pass an array \
                 of whole, aligned elements"
            ),
        ));
    }
    Ok(())
}

/// A dtype code (`DST_F32` 0, `DST_BF16` 1, `DST_F16` 2) of the array `what`.
pub(super) fn dtype(what: &str, code: i32) -> FfiResult<Dtype> {
    Dtype::from_code(code as i64).ok_or_else(|| {
        Fail::new(
            DST_ERR_INVALID_ARGUMENT,
            format!("invalid {what}_dtype {code}: use 0 (DST_F32), 1 (DST_BF16) or 2 (DST_F16)"),
        )
    })
}

/// An input array in the caller's memory: its address and element type.
#[derive(Clone, Copy)]
pub(super) struct Src {
    pub ptr: *const c_void,
    pub dtype: Dtype,
}

impl Src {
    /// An array of `dtype` at `ptr` given as a C pointer and its dtype code.
    pub fn new(what: &str, ptr: *const c_void, code: i32) -> FfiResult<Src> {
        let dtype = dtype(what, code)?;
        aligned(what, ptr, dtype.size())?;
        Ok(Src { ptr, dtype })
    }

    /// An f32 array (the feature losses, the labels' neighbours).
    pub fn f32(ptr: *const f32) -> Src {
        Src {
            ptr: ptr.cast(),
            dtype: Dtype::F32,
        }
    }

    /// The null array (an absent teacher).
    pub fn null() -> Src {
        Src::f32(std::ptr::null())
    }
}

/// An output array in the caller's memory (NULL: not wanted).
#[derive(Clone, Copy)]
pub(super) struct Dst {
    pub ptr: *mut c_void,
    pub dtype: Dtype,
}

impl Dst {
    /// An output array given as a C pointer and its dtype code.
    pub fn new(what: &str, ptr: *mut c_void, code: i32) -> FfiResult<Dst> {
        let dtype = dtype(what, code)?;
        aligned(what, ptr.cast_const(), dtype.size())?;
        Ok(Dst { ptr, dtype })
    }

    /// An f32 output.
    pub fn f32(ptr: *mut f32) -> Dst {
        Dst {
            ptr: ptr.cast(),
            dtype: Dtype::F32,
        }
    }

    /// No output.
    pub fn null() -> Dst {
        Dst::f32(std::ptr::null_mut())
    }

    pub fn is_null(&self) -> bool {
        self.ptr.is_null()
    }
}

/// `reduction`: 0 batchmean, 1 sum, 2 none.
pub(super) fn reduction(code: i32) -> FfiResult<Reduction> {
    match code {
        0 => Ok(Reduction::BatchMean),
        1 => Ok(Reduction::Sum),
        2 => Ok(Reduction::None),
        _ => Err(Fail::new(
            DST_ERR_INVALID_ARGUMENT,
            format!("invalid reduction {code}: use 0 (batchmean), 1 (sum) or 2 (none)"),
        )),
    }
}

/// `teacher_input`: 0 logits, 1 probabilities, 2 log-probabilities.
pub(super) fn teacher_input(code: i32) -> FfiResult<TeacherInput> {
    match code {
        0 => Ok(TeacherInput::Logits),
        1 => Ok(TeacherInput::Probs),
        2 => Ok(TeacherInput::LogProbs),
        _ => Err(Fail::new(
            DST_ERR_INVALID_ARGUMENT,
            format!("invalid teacher_input {code}: use 0 (logits), 1 (probs) or 2 (logprobs)"),
        )),
    }
}

/// `divergence`: 0 forward KL, 1 reverse KL, 2 JSD with `beta`.
pub(super) fn divergence(code: i32, beta: f32) -> FfiResult<Divergence> {
    match code {
        0 => Ok(Divergence::ForwardKl),
        1 => Ok(Divergence::ReverseKl),
        2 => Ok(Divergence::Jsd { beta }),
        _ => Err(Fail::new(
            DST_ERR_INVALID_ARGUMENT,
            format!("invalid divergence {code}: use 0 (forward KL), 1 (reverse KL) or 2 (JSD)"),
        )),
    }
}

/// A pointer argument and the number of bytes the call reads or writes through it.
/// `values_code` of the sparse entry points: 0 log-probabilities, 1 logits.
pub(super) fn sparse_values(code: i32) -> FfiResult<SparseValues> {
    match code {
        0 => Ok(SparseValues::LogProbs),
        1 => Ok(SparseValues::Logits),
        _ => Err(Fail::new(
            DST_ERR_INVALID_ARGUMENT,
            format!("invalid values_code {code}: use 0 (log-probabilities) or 1 (logits)"),
        )),
    }
}

/// `tail_code` of the sparse entry points: 0 renormalize, 1 bucket, 2 uniform.
pub(super) fn sparse_tail(code: i32) -> FfiResult<SparseTail> {
    match code {
        0 => Ok(SparseTail::Renormalize),
        1 => Ok(SparseTail::Bucket),
        2 => Ok(SparseTail::Uniform),
        _ => Err(Fail::new(
            DST_ERR_INVALID_ARGUMENT,
            format!("invalid tail_code {code}: use 0 (renormalize), 1 (bucket) or 2 (uniform)"),
        )),
    }
}

pub(super) type Span<'a> = (&'a str, *const c_void, usize);

/// Whether two spans share a byte (null pointers and empty spans share none).
fn spans_overlap(a: &Span<'_>, b: &Span<'_>) -> bool {
    let (a0, b0) = (a.1 as usize, b.1 as usize);
    if a0 == 0 || b0 == 0 || a.2 == 0 || b.2 == 0 {
        return false;
    }
    a0 < b0.saturating_add(b.2) && b0 < a0.saturating_add(a.2)
}

/// Outputs must not overlap inputs (except `grad_student == student` exactly, handled by the
/// caller) nor each other: any shared byte of the address ranges is an alias, not only equal
/// pointers.
pub(super) fn check_no_alias(inputs: &[Span<'_>], outputs: &[Span<'_>]) -> FfiResult {
    for (i, o) in outputs.iter().enumerate() {
        for x in inputs {
            if spans_overlap(o, x) {
                return Err(Fail::new(
                    DST_ERR_ALIAS,
                    format!(
                        "{} overlaps the input {}: outputs need memory of their own (only \
                         grad_student == student, exactly, is allowed: the in-place gradient)",
                        o.0, x.0
                    ),
                ));
            }
        }
        for o2 in &outputs[i + 1..] {
            if spans_overlap(o, o2) {
                return Err(Fail::new(
                    DST_ERR_ALIAS,
                    format!("{} and {} overlap: pass separate buffers", o.0, o2.0),
                ));
            }
        }
    }
    Ok(())
}

/// The outputs of a row loss, as raw pointers (`loss` required, the others optional); the
/// gradients of any dtype.
#[derive(Clone, Copy)]
pub(super) struct RawOut {
    pub loss: *mut f32,
    pub row_loss: *mut f32,
    pub grad_student: Dst,
    pub grad_teacher: Dst,
}

impl RawOut {
    /// Whether the student's gradient is written over the student (`grad_student == student`).
    pub fn in_place(&self, student: Src) -> bool {
        std::ptr::eq(self.grad_student.ptr.cast_const(), student.ptr)
    }

    /// Null checks and aliasing rules of a row loss on `[n, c]` `student` (and `teacher`,
    /// `labels`, either of which may be NULL when the loss has none). An in-place gradient has
    /// the student's dtype.
    pub fn check(
        &self,
        shape: (usize, usize),
        student: Src,
        teacher: Src,
        labels: *const i32,
    ) -> FfiResult {
        self.check_with(shape, student, teacher, labels, &[])
    }

    /// [`RawOut::check`] with more inputs (a sparse teacher's indices and values).
    pub fn check_with(
        &self,
        (n, c): (usize, usize),
        student: Src,
        teacher: Src,
        labels: *const i32,
        more_inputs: &[Span<'_>],
    ) -> FfiResult {
        non_null("loss", self.loss)?;
        aligned("row_loss", self.row_loss.cast_const().cast(), 4)?;
        aligned("labels", labels.cast(), 4)?;
        let mat = |dtype: Dtype| n.saturating_mul(c).saturating_mul(dtype.size());
        let mut outputs = vec![
            ("loss", self.loss as *const c_void, 4),
            (
                "row_loss",
                self.row_loss as *const c_void,
                n.saturating_mul(4),
            ),
            (
                "grad_teacher",
                self.grad_teacher.ptr.cast_const(),
                mat(self.grad_teacher.dtype),
            ),
        ];
        let mut inputs = vec![
            ("teacher", teacher.ptr, mat(teacher.dtype)),
            ("labels", labels as *const c_void, n.saturating_mul(4)),
        ];
        inputs.extend_from_slice(more_inputs);
        if self.in_place(student) {
            if self.grad_student.dtype != student.dtype {
                return Err(Fail::new(
                    DST_ERR_INVALID_ARGUMENT,
                    format!(
                        "grad_student is the student (an in-place gradient) but grad_student_dtype \
                         is {} and student_dtype {}: an in-place gradient has the student's dtype",
                        self.grad_student.dtype, student.dtype
                    ),
                ));
            }
            // The student is written: it is an output, which nothing else may overlap.
            outputs.push((
                "grad_student (in place over student)",
                student.ptr,
                mat(student.dtype),
            ));
        } else {
            outputs.push((
                "grad_student",
                self.grad_student.ptr.cast_const(),
                mat(self.grad_student.dtype),
            ));
            inputs.push(("student", student.ptr, mat(student.dtype)));
        }
        check_no_alias(&inputs, &outputs)
    }
}
