//! The fast CPU backend: f32 kernels for the training path, on the reference backend's buffers.
//!
//! The dense ops that dominate training (matmul, bias, ReLU, column sums, `axpy`, Adam, SGD) run
//! in f32 here: matmul through the packed, register-blocked [`gemm`] (AVX2 + FMA when the CPU has
//! them), the rest as plain loops the compiler vectorises. The losses (softmax and its backward,
//! the divergences, cross-entropy, Hinton, DKD, MSE, attention transfer) have their own f32 kernels
//! (`row_losses/`, one file per op family, and `feature.rs`) in the GPU kernels' passes, driven by [`rows`] over blocks of
//! a row, on all cores for large calls, compiled for AVX-512, AVX2 or the baseline as the CPU
//! allows (`vmath.rs`: the vectorised `exp` and `log` with their stated errors). The other ops
//! (convolution lowering, pooling, the relational primitives) call the f64 reference in
//! [`super::cpu`]. Tests run the whole suite on this backend against the reference
//! (`tests/suite/common.rs`); `tests/suite/cpu_fast.rs` checks its matmul on odd shapes and that the losses give
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

mod adam;
mod buffers;
mod feature;
pub mod gemm;
mod helper;
mod host;
pub(crate) mod row_losses;
pub mod rows;
pub(crate) mod vmath;

use self::adam::adam_split;
use self::buffers::{copy_from, gemm_b, read, read_any, write, write_any};
pub(crate) use self::host::HostOut;
use self::rows::{In, Out, Simd};
use super::cpu::{CpuBackend, CpuBuffer};
use super::{Backend, LossOut};
use crate::dtype::{Dtype, HostSlice, HostVec};
use crate::error::{Error, Result};
use crate::ops::conv::{ConvSpec, PoolSpec};
use crate::ops::dense::{CopySpec, MatmulSpec};
use crate::ops::optim::{AdamSpec, SgdSpec};
use crate::ops::{
    AttentionSpec, CrossEntropySpec, DivergenceSpec, DkdSpec, HintonSpec, MseSpec, SoftmaxSpec,
    SparseSpec,
};

/// The most threads a [`FastCpuBackend`] runs a call on (a larger request is capped).
pub(crate) const MAX_THREADS: usize = 256;

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

    /// At most `threads` threads per loss call (0: one per core, the default; at most
    /// 256). Results are the same bits for every thread count.
    pub fn with_threads(self, threads: usize) -> Self {
        FastCpuBackend {
            // (a cap on what a caller may ask for: each thread holds a row's scratch)
            threads: threads.min(MAX_THREADS),
            ..self
        }
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

const REF: CpuBackend = CpuBackend;

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

    fn upload_host(&self, data: HostSlice<'_>) -> Result<CpuBuffer> {
        REF.upload_host(data)
    }

    fn download_host(&self, buf: &CpuBuffer) -> Result<HostVec> {
        REF.download_host(buf)
    }

    fn dtype(&self, buf: &CpuBuffer) -> Dtype {
        buf.dtype()
    }

    fn filled(&self, len: usize, value: f32) -> Result<CpuBuffer> {
        Ok(CpuBuffer::new(HostVec::F32(super::host_filled(
            len, value,
        )?)))
    }

    fn help_until(&self, stop: &dyn Fn() -> bool) {
        helper::help_until(stop)
    }

    fn upload_labels(&self, labels: &[i32]) -> Result<Vec<i32>> {
        REF.upload_labels(labels)
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
        let (a, b) = (read_any(a, "a")?, read_any(b, "b")?);
        let mut c = write(c, "c")?;
        match &*a {
            HostVec::F32(a) => gemm_b(self.kernel, spec, a, &b, &mut c),
            HostVec::Bf16(a) => gemm_b(self.kernel, spec, a, &b, &mut c),
            HostVec::F16(a) => gemm_b(self.kernel, spec, a, &b, &mut c),
        }
        Ok(())
    }

    fn matmul_reads_half(&self) -> bool {
        true
    }

    unsafe fn copy_rows_unchecked(
        &self,
        spec: &CopySpec,
        src: &CpuBuffer,
        dst: &CpuBuffer,
    ) -> Result<()> {
        let src = read_any(src, "src")?;
        let mut dst = write_any(dst, "dst")?;
        match &mut *dst {
            HostVec::F32(d) => copy_from(spec, &src, d),
            HostVec::Bf16(d) => copy_from(spec, &src, d),
            HostVec::F16(d) => copy_from(spec, &src, d),
        }
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
        let xv = read_any(x, "x")?;
        let mut yv = write_any(y, "y")?;
        let op = row_losses::SoftmaxRows {
            rows: spec.shape.rows,
            cols: spec.shape.cols,
            inv_t: 1.0 / spec.temperature,
            log: spec.log,
            x: In::of(&xv),
            y: Out::of(&mut yv),
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
        let (yv, dyv) = (read_any(y, "y")?, read_any(dy, "dy")?);
        let mut dxv = write_any(dx, "dx")?;
        let op = row_losses::SoftmaxBackwardRows {
            rows: spec.shape.rows,
            cols: spec.shape.cols,
            inv_t: 1.0 / spec.temperature as f64,
            log: spec.log,
            y: In::of(&yv),
            dy: In::of(&dyv),
            dx: Out::of(&mut dxv),
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
        let tv = read_any(teacher, "teacher")?;
        self.row_loss(student, out, |st, gt| {
            self.divergence_rows(spec, st, In::of(&tv), labels, gt)
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
        let tv = read_any(teacher, "teacher")?;
        self.row_loss(student, out, |st, gt| {
            self.hinton_rows(spec, st, In::of(&tv), labels, gt)
        })
    }

    unsafe fn dkd_unchecked(
        &self,
        spec: &DkdSpec,
        student: &CpuBuffer,
        teacher: &CpuBuffer,
        labels: &Vec<i32>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        let tv = read_any(teacher, "teacher")?;
        self.row_loss(student, out, |st, _| {
            self.dkd_rows(spec, st, In::of(&tv), labels)
        })
    }

    unsafe fn sparse_kd_unchecked(
        &self,
        spec: &SparseSpec,
        student: &CpuBuffer,
        indices: &Vec<i32>,
        values: &CpuBuffer,
        labels: Option<&Vec<i32>>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        let vv = read_any(values, "values")?;
        self.row_loss(student, out, |st, _| {
            self.sparse_rows(spec, st, indices, In::of(&vv), labels.map(|l| l.as_slice()))
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
