//! The losses through the [`Backend`] trait, for the memories that reach a backend through its
//! buffers: host memory copied into the reference CPU backend's buffers (`dst_cpu_*`), and the
//! caller's CUDA device memory wrapped in place (`dst_cuda_*`). One generic [`Memory`] over
//! [`Buffers`] makes the calls; each memory says only how a pointer becomes a buffer and how an
//! output gets back to the caller.

use super::args::{Dst, RawOut, Src};
use super::losses::{Memory, MseArgs, RowLoss};
use super::status::FfiResult;
use crate::backend::{Backend, GradOut, LossOut};
use crate::ops::{MseSpec, RowShape};

/// A backend's buffer (of any dtype).
pub(super) type Buf<M> = <<M as Buffers>::Backend as Backend>::Buffer;
/// A backend's label buffer.
pub(super) type Labels<M> = <<M as Buffers>::Backend as Backend>::Labels;

/// Caller memory as a backend's buffers.
pub(super) trait Buffers {
    type Backend: Backend;

    /// As [`Memory::check_handle`].
    fn check_handle(&self) -> FfiResult {
        Ok(())
    }

    /// The backend that runs the loss.
    fn backend(&self) -> FfiResult<&Self::Backend>;

    /// An input of `len` elements of `p.dtype` at `p` (non-null).
    ///
    /// # Safety
    /// `p` readable for `len` elements in this memory.
    unsafe fn input(&self, p: Src, len: usize) -> FfiResult<Buf<Self>>;

    /// `n` labels at `p` (non-null). Labels read on the host are checked against `0..classes`
    /// and `ignore_index` here; device labels are not (`dst_cuda_check_labels` does it).
    ///
    /// # Safety
    /// `p` readable for `n` labels in this memory.
    unsafe fn labels(
        &self,
        p: *const i32,
        n: usize,
        classes: usize,
        ignore_index: i32,
    ) -> FfiResult<Labels<Self>>;

    /// `len` i32 values at `p` (non-null) as a label buffer without the labels' check (a sparse
    /// teacher's indices, which the backend checks where it can read them).
    ///
    /// # Safety
    /// `p` readable for `len` values in this memory.
    unsafe fn indices(&self, p: *const i32, len: usize) -> FfiResult<Labels<Self>> {
        // SAFETY: forwarded; with no class above `usize::MAX` and no ignore_index of `i32::MIN`
        // only negative indices could fail here, and memories that check override this.
        unsafe { self.labels(p, len, usize::MAX, i32::MIN) }
    }

    /// An output of `len` elements of `p.dtype` at `p`, `None` when `p` is NULL.
    ///
    /// # Safety
    /// `p` NULL or writable for `len` elements in this memory.
    unsafe fn output(&self, p: Dst, len: usize) -> FfiResult<Option<Buf<Self>>>;

    /// Makes an output's result visible at `p`, the pointer it was made from (a copy back to the
    /// host, or nothing where the buffer is the caller's memory).
    ///
    /// # Safety
    /// `p` writable for the buffer's length in this memory.
    unsafe fn store(&self, p: Dst, buf: &Buf<Self>) -> FfiResult;
}

impl<M: Buffers> Memory for M {
    fn check_handle(&self) -> FfiResult {
        Buffers::check_handle(self)
    }

    unsafe fn row_loss(&self, loss: RowLoss<'_>, student: Src, out: RawOut) -> FfiResult {
        let b = self.backend()?;
        let shape = loss.shape();
        let (n, c, len) = (shape.rows, shape.cols, shape.len());
        // SAFETY: every pointer is non-null where it is read and valid for the size it is read
        // with, by `Memory::row_loss`'s contract.
        unsafe {
            match loss {
                RowLoss::Hinton {
                    spec,
                    teacher,
                    labels,
                } => {
                    let t = self.input(teacher, len)?;
                    let l = self.labels(labels, n, c, spec.ignore_index)?;
                    rows(self, shape, student, out, |s, o| {
                        b.hinton(spec, s, &t, &l, o)
                    })
                }
                RowLoss::Divergence {
                    spec,
                    teacher,
                    labels,
                } => {
                    let t = self.input(teacher, len)?;
                    let l = match labels.is_null() {
                        true => None,
                        false => Some(self.labels(labels, n, c, spec.ignore_index)?),
                    };
                    rows(self, shape, student, out, |s, o| {
                        b.divergence(spec, s, &t, l.as_ref(), o)
                    })
                }
                RowLoss::CrossEntropy { spec, labels } => {
                    let l = self.labels(labels, n, c, spec.ignore_index)?;
                    rows(self, shape, student, out, |s, o| {
                        b.cross_entropy(spec, s, &l, o)
                    })
                }
                RowLoss::Dkd {
                    spec,
                    teacher,
                    labels,
                } => {
                    let t = self.input(teacher, len)?;
                    let l = self.labels(labels, n, c, spec.ignore_index)?;
                    rows(self, shape, student, out, |s, o| b.dkd(spec, s, &t, &l, o))
                }
                RowLoss::Sparse {
                    spec,
                    indices,
                    values,
                    labels,
                } => {
                    let idx = self.indices(indices, spec.entries())?;
                    let v = self.input(values, spec.entries())?;
                    let l = match labels.is_null() {
                        true => None,
                        false => Some(self.labels(labels, n, c, spec.ignore_index)?),
                    };
                    rows(self, shape, student, out, |s, o| {
                        b.sparse_kd(spec, s, &idx, &v, l.as_ref(), o)
                    })
                }
            }
        }
    }

    unsafe fn mse(&self, spec: &MseSpec, args: &MseArgs) -> FfiResult {
        let be = self.backend()?;
        let len = spec.len;
        // SAFETY: by `Memory::mse`'s contract.
        unsafe {
            let a = self.input(Src::f32(args.a), len)?;
            let b = self.input(Src::f32(args.b), len)?;
            let loss = self
                .output(Dst::f32(args.loss), 1)?
                .expect("loss is checked non-null");
            let ga = self.output(Dst::f32(args.grad_a), len)?;
            let gb = self.output(Dst::f32(args.grad_b), len)?;
            be.mse(spec, &a, &b, &loss, ga.as_ref(), gb.as_ref())?;
            self.store(Dst::f32(args.loss), &loss)?;
            if let Some(g) = &ga {
                self.store(Dst::f32(args.grad_a), g)?;
            }
            if let Some(g) = &gb {
                self.store(Dst::f32(args.grad_b), g)?;
            }
        }
        Ok(())
    }
}

/// Runs a row loss on `student` and the outputs of `out` as buffers of `m`: `run` gets the
/// student's buffer and the outputs; the outputs are then stored back to their pointers.
///
/// # Safety
/// As [`Memory::row_loss`].
unsafe fn rows<M: Buffers>(
    m: &M,
    shape: RowShape,
    student: Src,
    out: RawOut,
    run: impl FnOnce(&Buf<M>, LossOut<'_, M::Backend>) -> crate::Result<()>,
) -> FfiResult {
    let len = shape.len();
    let in_place = out.in_place(student);
    // SAFETY (all buffers and stores): forwarded from this function's contract; each pointer is
    // used with the size the contract names, and NULL outputs are skipped.
    unsafe {
        let s = m.input(student, len)?;
        let loss = m
            .output(Dst::f32(out.loss), 1)?
            .expect("loss is checked non-null");
        let row = m.output(Dst::f32(out.row_loss), shape.rows)?;
        let gs = match in_place {
            true => None,
            false => m.output(out.grad_student, len)?,
        };
        let gt = m.output(out.grad_teacher, len)?;
        let grad_student = match (&gs, in_place) {
            (_, true) => GradOut::InPlace,
            (Some(g), false) => GradOut::Into(g),
            (None, false) => GradOut::None,
        };
        run(
            &s,
            LossOut {
                loss: &loss,
                row_loss: row.as_ref(),
                grad_student,
                grad_teacher: gt.as_ref(),
            },
        )?;
        m.store(Dst::f32(out.loss), &loss)?;
        if let Some(r) = &row {
            m.store(Dst::f32(out.row_loss), r)?;
        }
        if in_place {
            let s_out = Dst {
                ptr: student.ptr.cast_mut(),
                dtype: student.dtype,
            };
            m.store(s_out, &s)?;
        } else if let Some(g) = &gs {
            m.store(out.grad_student, g)?;
        }
        if let Some(g) = &gt {
            m.store(out.grad_teacher, g)?;
        }
    }
    Ok(())
}
