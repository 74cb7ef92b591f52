//! The fast CPU backend: f32 kernels for the training path, on the reference backend's buffers.
//!
//! The dense ops that dominate training (matmul, bias, ReLU, column sums, `axpy`, Adam, SGD) run
//! in f32 here: matmul through the packed, register-blocked [`gemm`] (AVX2 + FMA when the CPU has
//! them), the rest as plain loops the compiler vectorises. Every other op (the losses, softmax,
//! convolution lowering, pooling, the relational primitives) calls the f64 reference in
//! [`super::cpu`]: they cost `O(N C)` against the matmuls' `O(N C K)` and are not worth a second
//! implementation. Tests run the whole suite on this backend against the reference
//! (`tests/common`), and `tests/cpu_fast.rs` checks its matmul on odd shapes.
//!
//! Calls run on the calling thread, except that a thread lent through [`Backend::help_until`]
//! (`cpu_fast/helper.rs`) takes the second half of large matmuls and Adam steps: the same bits, since
//! the halves are disjoint output columns or elements.
//!
//! Buffers are [`CpuBuffer`]s, so data moves between this backend and [`CpuBackend`] freely. An
//! output that is also an input of the same call (other than the documented in-place gradient)
//! is an [`Error::Alias`].

pub mod gemm;
mod helper;

use std::cell::{Ref, RefCell, RefMut};

use super::cpu::{CpuBackend, CpuBuffer};
use super::{Backend, GradOut, LossOut};
use crate::error::{Error, Result};
use crate::ops::conv::{ConvSpec, PoolSpec};
use crate::ops::dense::MatmulSpec;
use crate::ops::optim::{AdamSpec, SgdSpec};
use crate::ops::{
    AttentionSpec, CrossEntropySpec, DivergenceSpec, HintonSpec, MseSpec, SoftmaxSpec,
};

/// The fast CPU backend (f32). See the module documentation for what runs in f32.
#[derive(Debug, Clone, Copy)]
pub struct FastCpuBackend {
    kernel: gemm::Kernel,
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
        }
    }

    /// The portable micro-kernel only (for comparison and tests).
    pub fn portable() -> Self {
        FastCpuBackend {
            kernel: gemm::Kernel::Portable,
        }
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

/// The same outputs, typed for the reference backend (whose buffers these are).
fn as_reference(out: LossOut<'_, FastCpuBackend>) -> LossOut<'_, CpuBackend> {
    LossOut {
        loss: out.loss,
        row_loss: out.row_loss,
        grad_student: match out.grad_student {
            GradOut::None => GradOut::None,
            GradOut::Into(g) => GradOut::Into(g),
            GradOut::InPlace => GradOut::InPlace,
        },
        grad_teacher: out.grad_teacher,
    }
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

impl Backend for FastCpuBackend {
    type Buffer = CpuBuffer;
    type Labels = Vec<i32>;

    fn name(&self) -> String {
        let k = match self.kernel {
            gemm::Kernel::Avx2Fma => "AVX2+FMA",
            gemm::Kernel::Portable => "portable",
        };
        format!("cpu (f32, {k} matmul)")
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

    // ---- the f64 reference, for the O(N C) ops ----

    unsafe fn softmax_unchecked(
        &self,
        spec: &SoftmaxSpec,
        x: &CpuBuffer,
        y: &CpuBuffer,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.softmax_unchecked(spec, x, y) }
    }

    unsafe fn softmax_backward_unchecked(
        &self,
        spec: &SoftmaxSpec,
        y: &CpuBuffer,
        dy: &CpuBuffer,
        dx: &CpuBuffer,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.softmax_backward_unchecked(spec, y, dy, dx) }
    }

    unsafe fn divergence_unchecked(
        &self,
        spec: &DivergenceSpec,
        student: &CpuBuffer,
        teacher: &CpuBuffer,
        labels: Option<&Vec<i32>>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.divergence_unchecked(spec, student, teacher, labels, as_reference(out)) }
    }

    unsafe fn cross_entropy_unchecked(
        &self,
        spec: &CrossEntropySpec,
        student: &CpuBuffer,
        labels: &Vec<i32>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.cross_entropy_unchecked(spec, student, labels, as_reference(out)) }
    }

    unsafe fn hinton_unchecked(
        &self,
        spec: &HintonSpec,
        student: &CpuBuffer,
        teacher: &CpuBuffer,
        labels: &Vec<i32>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.hinton_unchecked(spec, student, teacher, labels, as_reference(out)) }
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
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe { REF.mse_unchecked(spec, a, b, loss, grad_a, grad_b) }
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
        // SAFETY: the caller's contract, forwarded (the same buffers and spec).
        unsafe {
            REF.attention_transfer_unchecked(
                spec,
                student,
                teacher,
                loss,
                grad_student,
                grad_teacher,
            )
        }
    }

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
