//! The fast CPU backend: f32 kernels for the training path, on the reference backend's buffers.
//!
//! The dense ops that dominate training (matmul, bias, ReLU, column sums, `axpy`, Adam, SGD) run
//! in f32 here: matmul through the packed, register-blocked [`gemm`] (AVX2 + FMA when the CPU has
//! them), the rest as plain loops the compiler vectorises. The losses (softmax and its backward,
//! the divergences, cross-entropy, Hinton, MSE, attention transfer) have their own f32 kernels
//! (`row_losses.rs`, `feature.rs`) in the GPU kernels' passes, driven by [`rows`] over blocks of
//! a row, on all cores for large calls, compiled for AVX-512, AVX2 or the baseline as the CPU
//! allows (`vmath.rs`: the vectorised `exp` and `log` with their stated errors). The other ops
//! (convolution lowering, pooling, the relational primitives) call the f64 reference in
//! [`super::cpu`]. Tests run the whole suite on this backend against the reference
//! (`tests/common`); `tests/cpu_fast.rs` checks its matmul on odd shapes and that the losses give
//! the same bits for any thread count and instruction set.
//!
//! Loss calls of more than about 2^17 elements run on scoped threads (one per core, or
//! [`FastCpuBackend::with_threads`]); other calls run on the calling thread, except that a thread lent through [`Backend::help_until`]
//! (`cpu_fast/helper.rs`) takes the second half of large matmuls and Adam steps: the same bits, since
//! the halves are disjoint output columns or elements.
//!
//! Buffers are [`CpuBuffer`]s, so data moves between this backend and [`CpuBackend`] freely. An
//! output that is also an input of the same call (other than the documented in-place gradient)
//! is an [`Error::Alias`].

mod feature;
pub mod gemm;
mod helper;
mod row_losses;
pub mod rows;
pub(crate) mod vmath;

use std::cell::{Ref, RefCell, RefMut};

use self::rows::{In, Out, Simd};
use super::cpu::{CpuBackend, CpuBuffer};
use super::{Backend, GradOut, LossOut};
use crate::error::{Error, Result};
use crate::ops::conv::{ConvSpec, PoolSpec};
use crate::ops::dense::MatmulSpec;
use crate::ops::divergence::reduction_factor;
use crate::ops::optim::{AdamSpec, SgdSpec};
use crate::ops::{
    self, AttentionSpec, CrossEntropySpec, DivergenceSpec, HintonSpec, MseSpec, SoftmaxSpec,
};

/// The fast CPU backend (f32). See the module documentation for what runs in f32.
#[derive(Debug, Clone, Copy)]
pub struct FastCpuBackend {
    kernel: gemm::Kernel,
    /// The instruction set of the row and feature losses.
    simd: Simd,
    /// At most this many threads per loss call (0: one per core).
    threads: usize,
}

impl Default for FastCpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl FastCpuBackend {
    /// Picks the best matmul micro-kernel this CPU supports.
    pub fn new() -> Self {
        FastCpuBackend {
            kernel: gemm::Kernel::detect(),
            simd: Simd::detect(),
            threads: 0,
        }
    }

    /// The portable kernels only (for comparison and tests).
    pub fn portable() -> Self {
        FastCpuBackend {
            kernel: gemm::Kernel::Portable,
            simd: Simd::Portable,
            threads: 0,
        }
    }

    /// At most `threads` threads per loss call (0: one per core, the default). Results are the
    /// same bits for every thread count.
    pub fn with_threads(self, threads: usize) -> Self {
        FastCpuBackend { threads, ..self }
    }

    /// The losses compiled for `simd` instead of the widest set this CPU has; `Err` when the CPU
    /// lacks it. Every set gives the same bits.
    pub fn with_simd(self, simd: Simd) -> Result<Self> {
        if !simd.supported() {
            return Err(Error::Unsupported(format!(
                "this CPU cannot run the {simd:?} kernels; use Simd::detect()"
            )));
        }
        Ok(FastCpuBackend { simd, ..self })
    }

    /// The instruction set the losses run with.
    pub fn simd(&self) -> Simd {
        self.simd
    }

    pub fn kernel(&self) -> gemm::Kernel {
        self.kernel
    }
}

fn read<'a>(buf: &'a CpuBuffer, what: &str) -> Result<Ref<'a, Vec<f32>>> {
    buf.0
        .try_borrow()
        .map_err(|_| Error::Alias(format!("{what} is also an output of this call")))
}

fn write<'a>(buf: &'a CpuBuffer, what: &str) -> Result<RefMut<'a, Vec<f32>>> {
    buf.0.try_borrow_mut().map_err(|_| {
        Error::Alias(format!(
            "{what} is also an input of this call: pass a separate output buffer"
        ))
    })
}

const REF: CpuBackend = CpuBackend;

/// Elements per half below which an Adam step is not split across threads (about a
/// microsecond of work; a spinning helper takes a half in a fraction of that).
const ADAM_SPLIT_MIN: usize = 1 << 11;

/// [`adam`], its second half offered to a helper thread when one waits and the step is large
/// (element-wise: the same bits however it is split).
fn adam_split(
    kernel: gemm::Kernel,
    spec: &AdamSpec,
    (w, g, m, v): (&mut [f32], &[f32], &mut [f32], &mut [f32]),
) {
    if w.len() < 2 * ADAM_SPLIT_MIN || !helper::available() {
        return adam(kernel, spec, w, g, m, v);
    }
    let mid = w.len() / 2;
    let (w0, w1) = w.split_at_mut(mid);
    let (g0, g1) = g.split_at(mid);
    let (m0, m1) = m.split_at_mut(mid);
    let (v0, v1) = v.split_at_mut(mid);
    helper::join(
        || adam(kernel, spec, w0, g0, m0, v0),
        || adam(kernel, spec, w1, g1, m1, v1),
    );
}

/// One Adam step in f32, the same arithmetic as `shaders/optim.wgsl` (`lr` carries
/// `1/(1 - b1^t)`). The wide forms are the same code compiled for AVX2 or AVX-512 (16 lanes: its
/// divide and square root took a fold of the default run from 2.77 s to 2.65 s): no fused
/// multiply-adds are formed (Rust does not contract `a * b + c`) and every operation is
/// element-wise IEEE, so all give the same bits.
fn adam(
    kernel: gemm::Kernel,
    spec: &AdamSpec,
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    #[inline(always)]
    fn body(spec: &AdamSpec, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (lr, inv_c2) = spec.corrections();
        let (b1, b2, eps, wd) = (spec.beta1, spec.beta2, spec.eps, spec.weight_decay);
        for (((wi, &gi), mi), vi) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let gi = gi + wd * *wi;
            *mi = b1 * *mi + (1.0 - b1) * gi;
            *vi = b2 * *vi + (1.0 - b2) * gi * gi;
            *wi -= lr * *mi / ((*vi * inv_c2).sqrt() + eps);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn wide(spec: &AdamSpec, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        body(spec, w, g, m, v)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn wider(spec: &AdamSpec, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        body(spec, w, g, m, v)
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        gemm::Kernel::Avx2Fma if std::arch::is_x86_feature_detected!("avx512f") => {
            // SAFETY: the CPU has AVX-512F (checked just above; the check is a cached load).
            unsafe { wider(spec, w, g, m, v) }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2Fma` is only chosen when the CPU has AVX2.
        gemm::Kernel::Avx2Fma => unsafe { wide(spec, w, g, m, v) },
        _ => body(spec, w, g, m, v),
    }
}

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
    pub grad_student: *mut f32,
    pub grad_teacher: *mut f32,
}

impl HostOut {
    /// The student's input and gradient arrays, and the teacher's gradient.
    ///
    /// # Safety
    /// As [`FastCpuBackend::hinton_host`].
    unsafe fn arrays(&self, student: *const f32) -> (row_losses::Student, Option<Out>) {
        // SAFETY (the raw constructors): forwarded from the caller; an in-place gradient is the
        // same array as the student, which the kernels allow (`In::over`).
        unsafe {
            let g = (!self.grad_student.is_null()).then(|| Out::from_raw(self.grad_student));
            let gt = (!self.grad_teacher.is_null()).then(|| Out::from_raw(self.grad_teacher));
            let s = row_losses::Student {
                s: In::from_raw(student),
                g,
            };
            (s, gt)
        }
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
    fn row_loss(
        &self,
        student: &CpuBuffer,
        out: LossOut<'_, Self>,
        run: impl FnOnce(row_losses::Student, Option<Out>) -> Result<RowLosses>,
    ) -> Result<()> {
        let in_place = matches!(out.grad_student, GradOut::InPlace);
        let s_ref = if in_place {
            None
        } else {
            Some(read(student, "student")?)
        };
        let mut s_mut = if in_place {
            Some(write(student, "student (in-place gradient)")?)
        } else {
            None
        };
        let mut g_mut = match out.grad_student {
            GradOut::Into(g) => Some(write(g, "grad_student")?),
            _ => None,
        };
        let mut gt_mut = out
            .grad_teacher
            .map(|g| write(g, "grad_teacher"))
            .transpose()?;
        let st = match (&s_ref, &mut s_mut) {
            (Some(s), _) => row_losses::Student {
                s: In::new(s),
                g: g_mut.as_deref_mut().map(|g| Out::new(g)),
            },
            (None, Some(s)) => {
                let o = Out::new(s);
                row_losses::Student {
                    s: In::over(o),
                    g: Some(o),
                }
            }
            (None, None) => unreachable!("one of the two borrows was taken above"),
        };
        let gt = gt_mut.as_deref_mut().map(|g| Out::new(g));
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
    fn divergence_rows(
        &self,
        spec: &DivergenceSpec,
        student: row_losses::Student,
        teacher: &[f32],
        labels: Option<&[i32]>,
        grad_teacher: Option<Out>,
    ) -> Result<RowLosses> {
        if let Some(l) = labels {
            ops::check_labels(l, spec.shape.cols, spec.ignore_index)?;
        }
        ops::check_reverse_kl_support(spec, teacher, labels)?;
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
            teacher: In::new(teacher),
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
    fn cross_entropy_rows(
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
    fn hinton_rows(
        &self,
        spec: &HintonSpec,
        student: row_losses::Student,
        teacher: &[f32],
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
            teacher: In::new(teacher),
            grad_teacher,
            temperature: spec.temperature,
            alpha: spec.alpha,
            label_smoothing: spec.label_smoothing,
            k,
        };
        Ok((rows::run(&op, self.simd, self.threads), scale))
    }

    /// The fused Hinton loss on host memory, without copies (the C ABI's `dst_fast_hinton`).
    ///
    /// # Safety
    /// `spec` is validated; `student` is readable for `spec.shape.len()` floats; `teacher` and
    /// `labels` have `spec.shape.len()` and `spec.shape.rows` elements; the non-null pointers of
    /// `out` are writable for their sizes ([`HostOut`]); no output overlaps an input except the
    /// in-place gradient (`grad_student == student`), and the outputs do not overlap each other.
    pub(crate) unsafe fn hinton_host(
        &self,
        spec: &HintonSpec,
        student: *const f32,
        teacher: &[f32],
        labels: &[i32],
        out: HostOut,
    ) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        let (st, gt) = unsafe { out.arrays(student) };
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
        student: *const f32,
        teacher: &[f32],
        labels: Option<&[i32]>,
        out: HostOut,
    ) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        let (st, gt) = unsafe { out.arrays(student) };
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
        student: *const f32,
        labels: &[i32],
        out: HostOut,
    ) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        let (st, _) = unsafe { out.arrays(student) };
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
        feature::mse(self.simd, self.threads, spec, a, b, grad_a, grad_b)
    }
}

impl Backend for FastCpuBackend {
    type Buffer = CpuBuffer;
    type Labels = Vec<i32>;

    fn name(&self) -> String {
        let k = match self.kernel {
            gemm::Kernel::Avx2Fma => "AVX2+FMA",
            gemm::Kernel::Portable => "portable",
        };
        let l = match self.simd {
            Simd::Avx512 => "AVX-512",
            Simd::Avx2 => "AVX2",
            Simd::Portable => "portable",
        };
        format!("cpu (f32, {k} matmul, {l} losses)")
    }

    fn upload(&self, data: &[f32]) -> Result<CpuBuffer> {
        REF.upload(data)
    }

    fn filled(&self, len: usize, value: f32) -> Result<CpuBuffer> {
        Ok(CpuBuffer(RefCell::new(vec![value; len])))
    }

    fn help_until(&self, stop: &dyn Fn() -> bool) {
        helper::help_until(stop)
    }

    fn upload_labels(&self, labels: &[i32]) -> Result<Vec<i32>> {
        REF.upload_labels(labels)
    }

    fn download(&self, buf: &CpuBuffer) -> Result<Vec<f32>> {
        REF.download(buf)
    }

    fn len(&self, buf: &CpuBuffer) -> usize {
        REF.len(buf)
    }

    fn overlaps(&self, a: &CpuBuffer, b: &CpuBuffer) -> bool {
        std::ptr::eq(a, b)
    }

    fn labels_len(&self, labels: &Vec<i32>) -> usize {
        labels.len()
    }

    fn check_labels(&self, labels: &Vec<i32>, classes: usize, ignore_index: i32) -> Result<()> {
        REF.check_labels(labels, classes, ignore_index)
    }

    // ---- f32 kernels ----

    unsafe fn matmul_unchecked(
        &self,
        spec: &MatmulSpec,
        a: &CpuBuffer,
        b: &CpuBuffer,
        c: &CpuBuffer,
    ) -> Result<()> {
        let (a, b) = (read(a, "a")?, read(b, "b")?);
        let mut c = write(c, "c")?;
        gemm::sgemm(self.kernel, spec, &a, &b, &mut c);
        Ok(())
    }

    unsafe fn bias_add_unchecked(
        &self,
        x: &CpuBuffer,
        bias: &CpuBuffer,
        y: &CpuBuffer,
    ) -> Result<()> {
        let (x, bias) = (read(x, "x")?, read(bias, "bias")?);
        let mut y = write(y, "y")?;
        let cols = bias.len();
        for (yr, xr) in y.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
            for ((o, &v), &b) in yr.iter_mut().zip(xr).zip(bias.iter()) {
                *o = v + b;
            }
        }
        Ok(())
    }

    unsafe fn sum_rows_unchecked(
        &self,
        x: &CpuBuffer,
        out: &CpuBuffer,
        accumulate: bool,
    ) -> Result<()> {
        let x = read(x, "x")?;
        let mut out = write(out, "out")?;
        let cols = out.len();
        // Column sums accumulated row by row (contiguous reads), in f32, rows in order.
        let mut sums = vec![0.0f32; cols];
        for row in x.chunks_exact(cols) {
            for (s, &v) in sums.iter_mut().zip(row) {
                *s += v;
            }
        }
        for (o, s) in out.iter_mut().zip(sums) {
            *o = if accumulate { *o + s } else { s };
        }
        Ok(())
    }

    unsafe fn relu_unchecked(&self, x: &CpuBuffer, y: &CpuBuffer) -> Result<()> {
        let x = read(x, "x")?;
        let mut y = write(y, "y")?;
        for (o, &v) in y.iter_mut().zip(x.iter()) {
            *o = if v > 0.0 { v } else { 0.0 };
        }
        Ok(())
    }

    unsafe fn relu_backward_unchecked(
        &self,
        y: &CpuBuffer,
        dy: &CpuBuffer,
        dx: &CpuBuffer,
    ) -> Result<()> {
        let (y, dy) = (read(y, "y")?, read(dy, "dy")?);
        let mut dx = write(dx, "dx")?;
        for ((o, &yv), &d) in dx.iter_mut().zip(y.iter()).zip(dy.iter()) {
            *o = if yv > 0.0 { d } else { 0.0 };
        }
        Ok(())
    }

    unsafe fn axpy_unchecked(&self, alpha: f32, x: &CpuBuffer, y: &CpuBuffer) -> Result<()> {
        let x = read(x, "x")?;
        let mut y = write(y, "y")?;
        for (o, &v) in y.iter_mut().zip(x.iter()) {
            *o += alpha * v;
        }
        Ok(())
    }

    unsafe fn adam_step_unchecked(
        &self,
        spec: &AdamSpec,
        w: &CpuBuffer,
        grad: &CpuBuffer,
        m: &CpuBuffer,
        v: &CpuBuffer,
    ) -> Result<()> {
        let g = read(grad, "grad")?;
        let (mut w, mut m, mut v) = (write(w, "w")?, write(m, "m")?, write(v, "v")?);
        adam_split(self.kernel, spec, (&mut w, &g, &mut m, &mut v));
        Ok(())
    }

    unsafe fn sgd_step_unchecked(
        &self,
        spec: &SgdSpec,
        w: &CpuBuffer,
        grad: &CpuBuffer,
        velocity: &CpuBuffer,
    ) -> Result<()> {
        let g = read(grad, "grad")?;
        let (mut w, mut vel) = (write(w, "w")?, write(velocity, "velocity")?);
        for ((wi, &gi), vi) in w.iter_mut().zip(g.iter()).zip(vel.iter_mut()) {
            let gi = gi + spec.weight_decay * *wi;
            *vi = spec.momentum * *vi + gi;
            *wi -= spec.lr * *vi;
        }
        Ok(())
    }

    // ---- the row losses and feature losses: f32 kernels (row_losses.rs, feature.rs) ----

    unsafe fn softmax_unchecked(
        &self,
        spec: &SoftmaxSpec,
        x: &CpuBuffer,
        y: &CpuBuffer,
    ) -> Result<()> {
        let xv = read(x, "x")?;
        let mut yv = write(y, "y")?;
        let op = row_losses::SoftmaxRows {
            rows: spec.shape.rows,
            cols: spec.shape.cols,
            inv_t: 1.0 / spec.temperature,
            log: spec.log,
            x: In::new(&xv),
            y: Out::new(&mut yv),
        };
        rows::run(&op, self.simd, self.threads);
        Ok(())
    }

    unsafe fn softmax_backward_unchecked(
        &self,
        spec: &SoftmaxSpec,
        y: &CpuBuffer,
        dy: &CpuBuffer,
        dx: &CpuBuffer,
    ) -> Result<()> {
        let (yv, dyv) = (read(y, "y")?, read(dy, "dy")?);
        let mut dxv = write(dx, "dx")?;
        let op = row_losses::SoftmaxBackwardRows {
            rows: spec.shape.rows,
            cols: spec.shape.cols,
            inv_t: 1.0 / spec.temperature as f64,
            log: spec.log,
            y: In::new(&yv),
            dy: In::new(&dyv),
            dx: Out::new(&mut dxv),
        };
        rows::run(&op, self.simd, self.threads);
        Ok(())
    }

    unsafe fn divergence_unchecked(
        &self,
        spec: &DivergenceSpec,
        student: &CpuBuffer,
        teacher: &CpuBuffer,
        labels: Option<&Vec<i32>>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        let labels = labels.map(|l| l.as_slice());
        let tv = read(teacher, "teacher")?;
        self.row_loss(student, out, |st, gt| {
            self.divergence_rows(spec, st, &tv, labels, gt)
        })
    }

    unsafe fn cross_entropy_unchecked(
        &self,
        spec: &CrossEntropySpec,
        student: &CpuBuffer,
        labels: &Vec<i32>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        self.row_loss(student, out, |st, _| {
            self.cross_entropy_rows(spec, st, labels)
        })
    }

    unsafe fn hinton_unchecked(
        &self,
        spec: &HintonSpec,
        student: &CpuBuffer,
        teacher: &CpuBuffer,
        labels: &Vec<i32>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        let tv = read(teacher, "teacher")?;
        self.row_loss(student, out, |st, gt| {
            self.hinton_rows(spec, st, &tv, labels, gt)
        })
    }

    unsafe fn mse_unchecked(
        &self,
        spec: &MseSpec,
        a: &CpuBuffer,
        b: &CpuBuffer,
        loss: &CpuBuffer,
        grad_a: Option<&CpuBuffer>,
        grad_b: Option<&CpuBuffer>,
    ) -> Result<()> {
        let (av, bv) = (read(a, "a")?, read(b, "b")?);
        let mut ga = grad_a.map(|g| write(g, "grad_a")).transpose()?;
        let mut gb = grad_b.map(|g| write(g, "grad_b")).transpose()?;
        let l = feature::mse(
            self.simd,
            self.threads,
            spec,
            &av,
            &bv,
            ga.as_deref_mut().map(|v| v.as_mut_slice()),
            gb.as_deref_mut().map(|v| v.as_mut_slice()),
        );
        write(loss, "loss")?[0] = l as f32;
        Ok(())
    }

    unsafe fn attention_transfer_unchecked(
        &self,
        spec: &AttentionSpec,
        student: &CpuBuffer,
        teacher: &CpuBuffer,
        loss: &CpuBuffer,
        grad_student: Option<&CpuBuffer>,
        grad_teacher: Option<&CpuBuffer>,
    ) -> Result<()> {
        let (sv, tv) = (read(student, "student")?, read(teacher, "teacher")?);
        let mut gs = grad_student.map(|g| write(g, "grad_student")).transpose()?;
        let mut gt = grad_teacher.map(|g| write(g, "grad_teacher")).transpose()?;
        let l = feature::attention(
            self.simd,
            self.threads,
            spec,
            &sv,
            &tv,
            gs.as_deref_mut().map(|v| v.as_mut_slice()),
            gt.as_deref_mut().map(|v| v.as_mut_slice()),
        );
        write(loss, "loss")?[0] = l as f32;
        Ok(())
    }

    // ---- the f64 reference, for the lowering and relational primitives ----

    unsafe fn im2col_unchecked(
        &self,
        spec: &ConvSpec,
        x: &CpuBuffer,
        cols: &CpuBuffer,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.im2col_unchecked(spec, x, cols) }
    }

    unsafe fn col2im_unchecked(
        &self,
        spec: &ConvSpec,
        dcols: &CpuBuffer,
        dx: &CpuBuffer,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.col2im_unchecked(spec, dcols, dx) }
    }

    unsafe fn pool_unchecked(&self, spec: &PoolSpec, x: &CpuBuffer, y: &CpuBuffer) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.pool_unchecked(spec, x, y) }
    }

    unsafe fn pool_backward_unchecked(
        &self,
        spec: &PoolSpec,
        x: &CpuBuffer,
        dy: &CpuBuffer,
        dx: &CpuBuffer,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.pool_backward_unchecked(spec, x, dy, dx) }
    }

    unsafe fn transpose_unchecked(
        &self,
        batch: usize,
        rows: usize,
        cols: usize,
        x: &CpuBuffer,
        y: &CpuBuffer,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.transpose_unchecked(batch, rows, cols, x, y) }
    }

    unsafe fn row_normalize_unchecked(
        &self,
        cols: usize,
        x: &CpuBuffer,
        y: &CpuBuffer,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.row_normalize_unchecked(cols, x, y) }
    }

    unsafe fn row_normalize_backward_unchecked(
        &self,
        cols: usize,
        x: &CpuBuffer,
        dy: &CpuBuffer,
        dx: &CpuBuffer,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.row_normalize_backward_unchecked(cols, x, dy, dx) }
    }

    unsafe fn pairwise_distance_unchecked(
        &self,
        n: usize,
        dim: usize,
        f: &CpuBuffer,
        d: &CpuBuffer,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.pairwise_distance_unchecked(n, dim, f, d) }
    }

    unsafe fn pairwise_distance_backward_unchecked(
        &self,
        n: usize,
        dim: usize,
        f: &CpuBuffer,
        d: &CpuBuffer,
        dd: &CpuBuffer,
        df: &CpuBuffer,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.pairwise_distance_backward_unchecked(n, dim, f, d, dd, df) }
    }

    unsafe fn offdiag_normalize_unchecked(
        &self,
        n: usize,
        d: &CpuBuffer,
        y: &CpuBuffer,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.offdiag_normalize_unchecked(n, d, y) }
    }

    unsafe fn offdiag_normalize_backward_unchecked(
        &self,
        n: usize,
        d: &CpuBuffer,
        dy: &CpuBuffer,
        dd: &CpuBuffer,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.offdiag_normalize_backward_unchecked(n, d, dy, dd) }
    }

    unsafe fn smooth_l1_unchecked(
        &self,
        spec: &MseSpec,
        a: &CpuBuffer,
        b: &CpuBuffer,
        loss: &CpuBuffer,
        grad_a: Option<&CpuBuffer>,
        grad_b: Option<&CpuBuffer>,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.smooth_l1_unchecked(spec, a, b, loss, grad_a, grad_b) }
    }
}
