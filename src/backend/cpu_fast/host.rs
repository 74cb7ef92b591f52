//! The row losses' dispatch: borrowing the student, its gradient (in place or not) and the
//! teacher's gradient from the backend's buffers, or from the caller's host memory (the C ABI's
//! zero-copy `dst_fast_*`), running the op's rows ([`super::row_losses`]) and storing the reduced
//! loss and the row losses.

use super::row_losses;
use super::rows::{self, In, Out};
use super::{read_any, write, write_any, FastCpuBackend};
use crate::backend::cpu::CpuBuffer;
use crate::backend::{GradOut, LossOut};
use crate::error::Result;
use crate::ops::{
    self, reduction_factor, CrossEntropySpec, DivergenceSpec, DkdSpec, HintonSpec, MseSpec,
    SparseSpec,
};

/// The factor that turns the sum of the valid rows' losses into the reduced loss.
fn scale_for(reduction: crate::ops::Reduction, rows: row_losses::Rows<'_>) -> f64 {
    let valid = match rows.labels {
        Some(l) => l.iter().filter(|&&y| y != rows.ignore_index).count(),
        None => rows.rows,
    };
    reduction_factor(reduction, valid)
}

/// A row loss's outputs in host memory (the C ABI's zero-copy path): `loss` (1 float, required),
/// `row_loss` (`[rows]` or null), `grad_student` (`[rows, cols]`, null, or equal to the student
/// for the in-place gradient), `grad_teacher` (`[rows, cols]` or null).
pub(crate) struct HostOut {
    pub loss: *mut f32,
    pub row_loss: *mut f32,
    /// The student's gradient (any dtype), or none.
    pub grad_student: Option<Out>,
    /// The teacher's gradient (any dtype), or none.
    pub grad_teacher: Option<Out>,
}

impl HostOut {
    /// The student's input and gradient arrays, and the teacher's gradient. An in-place gradient
    /// is an `Out` over the student's own array, which the kernels allow (as `In::over`).
    fn arrays(&self, student: In) -> (row_losses::Student, Option<Out>) {
        let s = row_losses::Student {
            s: student,
            g: self.grad_student,
        };
        (s, self.grad_teacher)
    }

    /// Stores the reduced loss and the row losses.
    ///
    /// # Safety
    /// `loss` writable for 1 float, `row_loss` null or writable for `losses.len()`.
    unsafe fn store(&self, losses: &[f64], scale: f64) {
        // SAFETY: the caller's contract.
        unsafe {
            self.loss.write((losses.iter().sum::<f64>() * scale) as f32);
            if !self.row_loss.is_null() {
                for (i, &v) in losses.iter().enumerate() {
                    self.row_loss.add(i).write(v as f32);
                }
            }
        }
    }
}

/// The row losses of a call (one per row, unscaled) and the factor of the reduction.
type RowLosses = (Vec<f64>, f64);

impl FastCpuBackend {
    /// Borrows a row loss's student (and its gradient, in place or not) and the teacher's
    /// gradient, runs `run`, and stores the reduced loss (the row losses summed in row order,
    /// times the reduction's factor) and the row losses.
    pub(super) fn row_loss(
        &self,
        student: &CpuBuffer,
        out: LossOut<'_, Self>,
        run: impl FnOnce(row_losses::Student, Option<Out>) -> Result<RowLosses>,
    ) -> Result<()> {
        let in_place = matches!(out.grad_student, GradOut::InPlace);
        let s_ref = if in_place {
            None
        } else {
            Some(read_any(student, "student")?)
        };
        let mut s_mut = if in_place {
            Some(write_any(student, "student (in-place gradient)")?)
        } else {
            None
        };
        let mut g_mut = match out.grad_student {
            GradOut::Into(g) => Some(write_any(g, "grad_student")?),
            _ => None,
        };
        let mut gt_mut = out
            .grad_teacher
            .map(|g| write_any(g, "grad_teacher"))
            .transpose()?;
        let st = match (&s_ref, &mut s_mut) {
            (Some(s), _) => row_losses::Student {
                s: In::of(s),
                g: g_mut.as_deref_mut().map(Out::of),
            },
            (None, Some(s)) => {
                let o = Out::of(s);
                row_losses::Student {
                    s: In::over(o),
                    g: Some(o),
                }
            }
            (None, None) => unreachable!("one of the two borrows was taken above"),
        };
        let gt = gt_mut.as_deref_mut().map(Out::of);
        let (losses, scale) = run(st, gt)?;
        drop((s_ref, s_mut, g_mut, gt_mut));
        let loss = losses.iter().sum::<f64>() * scale;
        write(out.loss, "loss")?[0] = loss as f32;
        if let Some(r) = out.row_loss {
            for (d, &v) in write(r, "row_loss")?.iter_mut().zip(&losses) {
                *d = v as f32;
            }
        }
        Ok(())
    }

    /// The soft-target divergence over arrays (after the spec's validation).
    pub(super) fn divergence_rows(
        &self,
        spec: &DivergenceSpec,
        student: row_losses::Student,
        teacher: In,
        labels: Option<&[i32]>,
        grad_teacher: Option<Out>,
    ) -> Result<RowLosses> {
        if let Some(l) = labels {
            ops::check_labels(l, spec.shape.cols, spec.ignore_index)?;
        }
        if ops::divergence::needs_support_check(spec) {
            // SAFETY: the teacher holds the shape's elements (the caller's validation).
            let values: Vec<f32> = (0..spec.shape.len())
                .map(|i| unsafe { teacher.at(i) })
                .collect();
            ops::check_reverse_kl_support(spec, &values, labels)?;
        }
        let rows = row_losses::Rows {
            rows: spec.shape.rows,
            cols: spec.shape.cols,
            labels,
            ignore_index: spec.ignore_index,
        };
        let scale = scale_for(spec.reduction, rows);
        let k = (spec.grad_scale as f64 * scale * spec.temperature as f64) as f32;
        let op = row_losses::DivergenceRows {
            rows,
            student,
            teacher,
            grad_teacher,
            divergence: spec.divergence,
            form: spec.teacher,
            temperature: spec.temperature,
            teacher_eps: spec.teacher_eps,
            k,
        };
        Ok((rows::run(&op, self.simd, self.threads), scale))
    }

    /// Cross-entropy over arrays (after the spec's validation).
    pub(super) fn cross_entropy_rows(
        &self,
        spec: &CrossEntropySpec,
        student: row_losses::Student,
        labels: &[i32],
    ) -> Result<RowLosses> {
        ops::check_labels(labels, spec.shape.cols, spec.ignore_index)?;
        let rows = row_losses::Rows {
            rows: spec.shape.rows,
            cols: spec.shape.cols,
            labels: Some(labels),
            ignore_index: spec.ignore_index,
        };
        let scale = scale_for(spec.reduction, rows);
        let k = (spec.grad_scale as f64 * scale) as f32;
        let op = row_losses::CrossEntropyRows {
            rows,
            student,
            label_smoothing: spec.label_smoothing,
            k,
        };
        Ok((rows::run(&op, self.simd, self.threads), scale))
    }

    /// The fused Hinton loss over arrays (after the spec's validation).
    pub(super) fn hinton_rows(
        &self,
        spec: &HintonSpec,
        student: row_losses::Student,
        teacher: In,
        labels: &[i32],
        grad_teacher: Option<Out>,
    ) -> Result<RowLosses> {
        ops::check_labels(labels, spec.shape.cols, spec.ignore_index)?;
        let rows = row_losses::Rows {
            rows: spec.shape.rows,
            cols: spec.shape.cols,
            labels: Some(labels),
            ignore_index: spec.ignore_index,
        };
        let scale = scale_for(spec.reduction, rows);
        let k = (spec.grad_scale as f64 * scale) as f32;
        let op = row_losses::HintonRows {
            rows,
            student,
            teacher,
            grad_teacher,
            temperature: spec.temperature,
            alpha: spec.alpha,
            label_smoothing: spec.label_smoothing,
            k,
        };
        Ok((rows::run(&op, self.simd, self.threads), scale))
    }

    /// Decoupled knowledge distillation over arrays (after the spec's validation).
    pub(super) fn dkd_rows(
        &self,
        spec: &DkdSpec,
        student: row_losses::Student,
        teacher: In,
        labels: &[i32],
    ) -> Result<RowLosses> {
        ops::check_labels(labels, spec.shape.cols, spec.ignore_index)?;
        let rows = row_losses::Rows {
            rows: spec.shape.rows,
            cols: spec.shape.cols,
            labels: Some(labels),
            ignore_index: spec.ignore_index,
        };
        let scale = scale_for(spec.reduction, rows);
        let k = (spec.grad_scale as f64 * scale) as f32;
        let op = row_losses::DkdRows {
            rows,
            student,
            teacher,
            temperature: spec.temperature,
            ce_weight: spec.ce_weight,
            tckd_weight: spec.tckd_weight,
            nckd_weight: spec.nckd_weight,
            label_smoothing: spec.label_smoothing,
            k,
        };
        Ok((rows::run(&op, self.simd, self.threads), scale))
    }

    /// A sparse top-k teacher's loss over arrays (after the spec's validation): checks the
    /// labels, the indices and the values first (`ops::sparse::check_sparse_teacher`).
    pub(super) fn sparse_rows(
        &self,
        spec: &SparseSpec,
        student: row_losses::Student,
        indices: &[i32],
        values: In,
        labels: Option<&[i32]>,
    ) -> Result<RowLosses> {
        if let Some(l) = labels {
            ops::check_labels(l, spec.shape.cols, spec.ignore_index)?;
        }
        // SAFETY: the values hold `[N, k]` elements (the caller's validation).
        let vals: Vec<f32> = (0..spec.entries())
            .map(|i| unsafe { values.at(i) })
            .collect();
        ops::sparse::check_sparse_teacher(spec, indices, &vals, labels)?;
        let rows = row_losses::Rows {
            rows: spec.shape.rows,
            cols: spec.shape.cols,
            labels,
            ignore_index: spec.ignore_index,
        };
        let scale = scale_for(spec.reduction, rows);
        let op = row_losses::SparseRows {
            spec,
            student,
            indices,
            values,
            labels,
            k: spec.grad_scale as f64 * scale,
        };
        Ok((op.run(self.simd, self.threads), scale))
    }

    /// A sparse teacher's loss on host memory, without copies (the C ABI's
    /// `dst_fast_sparse_kd`).
    ///
    /// # Safety
    /// As [`FastCpuBackend::hinton_host`] (`out.grad_teacher` null); `indices` and `values` hold
    /// `spec.entries()` elements.
    pub(crate) unsafe fn sparse_host(
        &self,
        spec: &SparseSpec,
        student: In,
        indices: &[i32],
        values: In,
        labels: Option<&[i32]>,
        out: HostOut,
    ) -> Result<()> {
        let (st, _) = out.arrays(student);
        let (losses, scale) = self.sparse_rows(spec, st, indices, values, labels)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { out.store(&losses, scale) };
        Ok(())
    }

    /// DKD on host memory, without copies (the C ABI's `dst_fast_dkd`).
    ///
    /// # Safety
    /// As [`FastCpuBackend::hinton_host`] (`out.grad_teacher` null).
    pub(crate) unsafe fn dkd_host(
        &self,
        spec: &DkdSpec,
        student: In,
        teacher: In,
        labels: &[i32],
        out: HostOut,
    ) -> Result<()> {
        let (st, _) = out.arrays(student);
        let (losses, scale) = self.dkd_rows(spec, st, teacher, labels)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { out.store(&losses, scale) };
        Ok(())
    }

    /// The fused Hinton loss on host memory, without copies (the C ABI's `dst_fast_hinton`).
    ///
    /// # Safety
    /// `spec` is validated; `student` and `teacher` are readable for `spec.shape.len()` elements
    /// of their dtypes, `labels` has `spec.shape.rows`; the arrays of `out` are writable for their
    /// sizes ([`HostOut`]); no output overlaps an input except the in-place gradient (the
    /// student's own array, same dtype), and the outputs do not overlap each other.
    pub(crate) unsafe fn hinton_host(
        &self,
        spec: &HintonSpec,
        student: In,
        teacher: In,
        labels: &[i32],
        out: HostOut,
    ) -> Result<()> {
        let (st, gt) = out.arrays(student);
        let (losses, scale) = self.hinton_rows(spec, st, teacher, labels, gt)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { out.store(&losses, scale) };
        Ok(())
    }

    /// A soft-target divergence on host memory, without copies (`dst_fast_divergence`).
    ///
    /// # Safety
    /// As [`FastCpuBackend::hinton_host`] (`labels`, when given, has `spec.shape.rows` elements).
    pub(crate) unsafe fn divergence_host(
        &self,
        spec: &DivergenceSpec,
        student: In,
        teacher: In,
        labels: Option<&[i32]>,
        out: HostOut,
    ) -> Result<()> {
        let (st, gt) = out.arrays(student);
        let (losses, scale) = self.divergence_rows(spec, st, teacher, labels, gt)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { out.store(&losses, scale) };
        Ok(())
    }

    /// Cross-entropy on host memory, without copies (`dst_fast_cross_entropy`).
    ///
    /// # Safety
    /// As [`FastCpuBackend::hinton_host`] (`out.grad_teacher` null).
    pub(crate) unsafe fn cross_entropy_host(
        &self,
        spec: &CrossEntropySpec,
        student: In,
        labels: &[i32],
        out: HostOut,
    ) -> Result<()> {
        let (st, _) = out.arrays(student);
        let (losses, scale) = self.cross_entropy_rows(spec, st, labels)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { out.store(&losses, scale) };
        Ok(())
    }

    /// Feature MSE on host slices (`dst_fast_mse`; `spec` validated, lengths `spec.len`).
    pub(crate) fn mse_host(
        &self,
        spec: &MseSpec,
        a: &[f32],
        b: &[f32],
        grad_a: Option<&mut [f32]>,
        grad_b: Option<&mut [f32]>,
    ) -> f64 {
        super::feature::mse(self.simd, self.threads, spec, a, b, grad_a, grad_b)
    }
}
