//! The one boundary every backend implements: a method per kernel, on the backend's own buffers.
//!
//! Nothing above this module knows which backend runs. Each kernel method is a provided method
//! that validates its spec and the buffer lengths once, for every backend, then calls the backend's
//! `*_unchecked` form; a backend only writes the kernels.
//!
//! Buffers are handles (`&Self::Buffer`, interior mutability on the CPU) so that the gradient can be
//! written in place over the student logits ([`GradOut::InPlace`]).
//!
//! (Over 600 lines on purpose: the trait is the one boundary, and each kernel's validated provided
//! method sits beside its `*_unchecked` twin so that the contract of every kernel reads in one place.)

pub mod cpu;
pub mod cpu_fast;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod validate;
pub mod wgpu;

use crate::dtype::{Dtype, Element, HostSlice, HostVec};
use crate::error::{Error, Result};
use crate::ops::conv::{ConvSpec, PoolSpec};
use crate::ops::dense::{CopySpec, MatmulSpec};
use crate::ops::optim::{AdamSpec, SgdSpec};
use crate::ops::{
    AttentionSpec, CrossEntropySpec, DivergenceSpec, DkdSpec, HintonSpec, MseSpec, SoftmaxSpec,
    SparseSpec,
};

/// Where the student's gradient goes.
pub enum GradOut<'a, B: Backend + ?Sized> {
    /// Not wanted: the kernel computes the loss only.
    None,
    /// Into this `[N, C]` buffer.
    Into(&'a B::Buffer),
    /// Over the student logits themselves (saves an `[N, C]` buffer).
    InPlace,
}

impl<B: Backend + ?Sized> Clone for GradOut<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for GradOut<'_, B> {}

impl<B: Backend + ?Sized> GradOut<'_, B> {
    pub fn is_wanted(&self) -> bool {
        !matches!(self, GradOut::None)
    }
}

/// The outputs of a row loss (divergence, cross-entropy, Hinton, DKD).
pub struct LossOut<'a, B: Backend + ?Sized> {
    /// `[1]`: the reduced loss (for `Reduction::None`, the sum of the rows).
    pub loss: &'a B::Buffer,
    /// `[N]`, optional: each row's loss (masked rows 0).
    pub row_loss: Option<&'a B::Buffer>,
    /// The student's gradient.
    pub grad_student: GradOut<'a, B>,
    /// `[N, C]`, optional: the teacher's gradient (online distillation; teacher given as logits).
    pub grad_teacher: Option<&'a B::Buffer>,
}

impl<'a, B: Backend + ?Sized> LossOut<'a, B> {
    /// Loss and student gradient into `grad`.
    pub fn with_grad(loss: &'a B::Buffer, grad: &'a B::Buffer) -> Self {
        LossOut {
            loss,
            row_loss: None,
            grad_student: GradOut::Into(grad),
            grad_teacher: None,
        }
    }
}

/// A compute backend: buffers plus one method per kernel.
pub trait Backend {
    /// A device array of `f32`, `bf16` or `f16` ([`Backend::dtype`]).
    type Buffer;
    /// A device array of `i32` labels.
    type Labels;

    /// A human-readable name, e.g. `wgpu (llvmpipe, Vulkan)`.
    fn name(&self) -> String;

    /// Copies host data of any [`Dtype`] into a new device buffer of that dtype.
    fn upload_host(&self, data: HostSlice<'_>) -> Result<Self::Buffer>;
    /// Copies a device buffer back to the host in its own dtype (waits for the device).
    fn download_host(&self, buf: &Self::Buffer) -> Result<HostVec>;
    /// The element type of a buffer.
    fn dtype(&self, buf: &Self::Buffer) -> Dtype;

    /// Copies f32 host data into a new f32 device buffer.
    fn upload(&self, data: &[f32]) -> Result<Self::Buffer> {
        self.upload_host(HostSlice::F32(data))
    }
    /// Copies `f32`, `bf16` or `f16` host data into a new buffer of that dtype.
    fn upload_as<T: Element>(&self, data: &[T]) -> Result<Self::Buffer>
    where
        Self: Sized,
    {
        self.upload_host(T::host(data))
    }
    /// Copies labels into a new device buffer.
    fn upload_labels(&self, labels: &[i32]) -> Result<Self::Labels>;
    /// A new f32 buffer of `len` elements, each `value` (tests poison outputs with NaN this way).
    fn filled(&self, len: usize, value: f32) -> Result<Self::Buffer> {
        self.upload(&host_filled(len, value)?)
    }
    /// A new buffer of `len` elements of `dtype`, each `value` rounded to it.
    fn filled_as(&self, dtype: Dtype, len: usize, value: f32) -> Result<Self::Buffer> {
        match dtype {
            Dtype::F32 => self.filled(len, value),
            Dtype::Bf16 => self.upload_host(HostSlice::Bf16(&host_filled(
                len,
                half::bf16::from_f32(value),
            )?)),
            Dtype::F16 => self.upload_host(HostSlice::F16(&host_filled(
                len,
                half::f16::from_f32(value),
            )?)),
        }
    }
    /// Copies a device buffer back to the host as f32 (exact for every dtype; waits for the
    /// device).
    fn download(&self, buf: &Self::Buffer) -> Result<Vec<f32>> {
        Ok(self.download_host(buf)?.to_f32())
    }
    /// Copies a device buffer back as `T` (exact from a dtype no wider than `T`, else rounded to
    /// nearest even).
    fn download_as<T: Element>(&self, buf: &Self::Buffer) -> Result<Vec<T>>
    where
        Self: Sized,
    {
        Ok(T::from_host(self.download_host(buf)?))
    }
    /// Number of elements in a buffer.
    fn len(&self, buf: &Self::Buffer) -> usize;
    /// Waits until the device has finished all submitted work (a no-op on synchronous backends).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Lends the calling thread to this backend's own parallel work until `stop()` is true: the
    /// fast CPU backend runs halves of other threads' large matmuls and Adam steps on it (the
    /// same bits as without help). Backends with nothing to share return at once.
    fn help_until(&self, stop: &dyn Fn() -> bool) {
        let _ = stop;
    }
    /// Whether two buffers share any memory: the same buffer, or (where a backend wraps caller
    /// memory by address) overlapping address ranges. The kernel methods reject outputs that
    /// overlap each other or an input ([`crate::Error::Alias`]).
    fn overlaps(&self, a: &Self::Buffer, b: &Self::Buffer) -> bool;
    /// Number of labels in a label buffer.
    fn labels_len(&self, labels: &Self::Labels) -> usize;
    /// Whether a label buffer shares memory with a buffer (device backends whose labels can be
    /// windows of a caller's memory; host labels are their own vectors).
    fn labels_overlap(&self, labels: &Self::Labels, buf: &Self::Buffer) -> bool {
        let _ = (labels, buf);
        false
    }
    /// Checks labels on the device against `0..classes` / `ignore_index`. Backends whose labels live on
    /// the host check them directly; device backends read them back (only done when asked).
    fn check_labels(&self, labels: &Self::Labels, classes: usize, ignore_index: i32) -> Result<()>;

    /// `y = softmax(x / T)` or `log_softmax(x / T)` over rows (spec section 1).
    fn softmax(&self, spec: &SoftmaxSpec, x: &Self::Buffer, y: &Self::Buffer) -> Result<()> {
        validate::softmax(self, spec, x, y)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.softmax_unchecked(spec, x, y) }
    }

    /// The input gradient of [`Backend::softmax`] from its output `y` and upstream `dy`.
    fn softmax_backward(
        &self,
        spec: &SoftmaxSpec,
        y: &Self::Buffer,
        dy: &Self::Buffer,
        dx: &Self::Buffer,
    ) -> Result<()> {
        validate::softmax_backward(self, spec, y, dy, dx)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.softmax_backward_unchecked(spec, y, dy, dx) }
    }

    /// Soft-target divergence with loss and gradients in one call (spec section 2). `labels`, when
    /// given, mask rows whose label is `ignore_index`; other labels are not used (a label that is
    /// neither a class nor `ignore_index` gives that row a NaN loss on device backends, an `Err` on
    /// the CPU).
    fn divergence(
        &self,
        spec: &DivergenceSpec,
        student: &Self::Buffer,
        teacher: &Self::Buffer,
        labels: Option<&Self::Labels>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        validate::divergence(self, spec, student, teacher, labels, &out)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.divergence_unchecked(spec, student, teacher, labels, out) }
    }

    /// Cross-entropy with hard labels (spec section 3).
    fn cross_entropy(
        &self,
        spec: &CrossEntropySpec,
        student: &Self::Buffer,
        labels: &Self::Labels,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        validate::cross_entropy(self, spec, student, labels, &out)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.cross_entropy_unchecked(spec, student, labels, out) }
    }

    /// The fused Hinton loss `alpha*CE + (1-alpha)*T^2*KL` (spec section 4).
    fn hinton(
        &self,
        spec: &HintonSpec,
        student: &Self::Buffer,
        teacher: &Self::Buffer,
        labels: &Self::Labels,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        validate::hinton(self, spec, student, teacher, labels, &out)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.hinton_unchecked(spec, student, teacher, labels, out) }
    }

    /// Decoupled knowledge distillation `w_ce CE + T^2 (w_tc TCKD + w_nc NCKD)` (spec section 8).
    /// The teacher is detached: `out.grad_teacher` must be `None`.
    fn dkd(
        &self,
        spec: &DkdSpec,
        student: &Self::Buffer,
        teacher: &Self::Buffer,
        labels: &Self::Labels,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        validate::dkd(self, spec, student, teacher, labels, &out)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.dkd_unchecked(spec, student, teacher, labels, out) }
    }

    /// A sparse top-k teacher's loss `alpha CE + (1 - alpha) T^2 D(Q || P)` (spec section 10):
    /// `indices` and `values` are `[N, k]` (i32 classes, and log-probabilities or logits of any
    /// dtype), the student `[N, C]`; `labels` mask rows and are required when `alpha > 0`. The
    /// teacher is a constant: `out.grad_teacher` must be `None`. The CPU backends check the
    /// indices (distinct, in `0..C`) and the values and return an `Err` naming the row; device
    /// backends do not read them back.
    fn sparse_kd(
        &self,
        spec: &SparseSpec,
        student: &Self::Buffer,
        indices: &Self::Labels,
        values: &Self::Buffer,
        labels: Option<&Self::Labels>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        validate::sparse_kd(self, spec, student, indices, values, labels, &out)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.sparse_kd_unchecked(spec, student, indices, values, labels, out) }
    }

    /// Feature-map MSE (spec section 5): `loss[0]`, and `dL/da`, `dL/db` when given.
    fn mse(
        &self,
        spec: &MseSpec,
        a: &Self::Buffer,
        b: &Self::Buffer,
        loss: &Self::Buffer,
        grad_a: Option<&Self::Buffer>,
        grad_b: Option<&Self::Buffer>,
    ) -> Result<()> {
        validate::mse(self, spec, a, b, loss, grad_a, grad_b)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.mse_unchecked(spec, a, b, loss, grad_a, grad_b) }
    }

    /// Attention transfer (spec section 6).
    fn attention_transfer(
        &self,
        spec: &AttentionSpec,
        student: &Self::Buffer,
        teacher: &Self::Buffer,
        loss: &Self::Buffer,
        grad_student: Option<&Self::Buffer>,
        grad_teacher: Option<&Self::Buffer>,
    ) -> Result<()> {
        validate::attention(
            self,
            spec,
            student,
            teacher,
            loss,
            grad_student,
            grad_teacher,
        )?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe {
            self.attention_transfer_unchecked(
                spec,
                student,
                teacher,
                loss,
                grad_student,
                grad_teacher,
            )
        }
    }

    // ---- dense ops of the autograd tape (src/ops/dense/, src/ops/optim/) ----

    /// `C[m, n] (+)= op(A)[m, k] op(B)[k, n]` (see [`MatmulSpec`]).
    fn matmul(
        &self,
        spec: &MatmulSpec,
        a: &Self::Buffer,
        b: &Self::Buffer,
        c: &Self::Buffer,
    ) -> Result<()> {
        validate::matmul(self, spec, a, b, c)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.matmul_unchecked(spec, a, b, c) }
    }

    /// Whether [`Backend::matmul`] reads bf16 / f16 `a` and `b` itself (converting each element
    /// exactly to f32 as it loads it; `c` is f32 on every backend). The reference and fast CPU
    /// backends do; the GPU backends' tiled matmuls read f32 only, so a caller converts a half
    /// operand into f32 first ([`Backend::copy_rows`]).
    fn matmul_reads_half(&self) -> bool {
        false
    }

    /// A strided block copy between buffers of any dtypes (see [`CopySpec`]): converts exactly
    /// to f32 and rounds once into a bf16 / f16 destination.
    fn copy_rows(&self, spec: &CopySpec, src: &Self::Buffer, dst: &Self::Buffer) -> Result<()> {
        validate::copy_rows(self, spec, src, dst)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.copy_rows_unchecked(spec, src, dst) }
    }

    /// `y[i, j] = x[i, j] + bias[j]` over `rows` rows of `bias.len()` columns.
    fn bias_add(&self, x: &Self::Buffer, bias: &Self::Buffer, y: &Self::Buffer) -> Result<()> {
        validate::bias_add(self, x, bias, y)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.bias_add_unchecked(x, bias, y) }
    }

    /// `out[j] (+)= sum_i x[i, j]` over `[rows, out.len()]` (the bias gradient).
    fn sum_rows(&self, x: &Self::Buffer, out: &Self::Buffer, accumulate: bool) -> Result<()> {
        validate::sum_rows(self, x, out)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.sum_rows_unchecked(x, out, accumulate) }
    }

    /// `y = max(x, 0)`.
    fn relu(&self, x: &Self::Buffer, y: &Self::Buffer) -> Result<()> {
        validate::same_len(self, &[("x", x), ("y", y)])?;
        validate::no_alias(self, &[("y", y)], &[("x", x)])?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.relu_unchecked(x, y) }
    }

    /// `dx = dy * (y > 0)` from the forward output `y`.
    fn relu_backward(&self, y: &Self::Buffer, dy: &Self::Buffer, dx: &Self::Buffer) -> Result<()> {
        validate::same_len(self, &[("y", y), ("dy", dy), ("dx", dx)])?;
        validate::no_alias(self, &[("dx", dx)], &[("y", y), ("dy", dy)])?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.relu_backward_unchecked(y, dy, dx) }
    }

    /// `y += alpha x`.
    fn axpy(&self, alpha: f32, x: &Self::Buffer, y: &Self::Buffer) -> Result<()> {
        if !alpha.is_finite() {
            return Err(Error::Param {
                name: "alpha",
                value: alpha as f64,
                hint: "axpy's factor must be finite (it would fill y with NaN or inf)",
            });
        }
        validate::same_len(self, &[("x", x), ("y", y)])?;
        validate::no_alias(self, &[("y", y)], &[("x", x)])?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.axpy_unchecked(alpha, x, y) }
    }

    /// One Adam step on `w` with its moments `m` and `v`.
    fn adam_step(
        &self,
        spec: &AdamSpec,
        w: &Self::Buffer,
        grad: &Self::Buffer,
        m: &Self::Buffer,
        v: &Self::Buffer,
    ) -> Result<()> {
        spec.validate()?;
        validate::same_len(self, &[("w", w), ("grad", grad), ("m", m), ("v", v)])?;
        validate::no_alias(self, &[("w", w), ("m", m), ("v", v)], &[("grad", grad)])?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.adam_step_unchecked(spec, w, grad, m, v) }
    }

    /// One SGD step on `w` with its velocity.
    fn sgd_step(
        &self,
        spec: &SgdSpec,
        w: &Self::Buffer,
        grad: &Self::Buffer,
        velocity: &Self::Buffer,
    ) -> Result<()> {
        spec.validate()?;
        validate::same_len(self, &[("w", w), ("grad", grad), ("velocity", velocity)])?;
        validate::no_alias(self, &[("w", w), ("velocity", velocity)], &[("grad", grad)])?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.sgd_step_unchecked(spec, w, grad, velocity) }
    }

    /// im2col of a channels-last image batch: `cols` is `[N*OH*OW, K*K*C]` (see [`ConvSpec`]).
    fn im2col(&self, spec: &ConvSpec, x: &Self::Buffer, cols: &Self::Buffer) -> Result<()> {
        validate::im2col(self, spec, x, cols)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.im2col_unchecked(spec, x, cols) }
    }

    /// The adjoint of im2col: the input gradient from the columns' gradient.
    fn col2im(&self, spec: &ConvSpec, dcols: &Self::Buffer, dx: &Self::Buffer) -> Result<()> {
        validate::im2col(self, spec, dx, dcols)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.col2im_unchecked(spec, dcols, dx) }
    }

    /// Max or average pooling, `k x k` windows with stride `k`, channels-last.
    fn pool(&self, spec: &PoolSpec, x: &Self::Buffer, y: &Self::Buffer) -> Result<()> {
        validate::pool(self, spec, x, y)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.pool_unchecked(spec, x, y) }
    }

    /// The input gradient of [`Backend::pool`] from its input `x` and the output gradient `dy`.
    fn pool_backward(
        &self,
        spec: &PoolSpec,
        x: &Self::Buffer,
        dy: &Self::Buffer,
        dx: &Self::Buffer,
    ) -> Result<()> {
        validate::pool(self, spec, x, dy)?;
        validate::same_len(self, &[("x", x), ("dx", dx)])?;
        validate::no_alias(self, &[("dx", dx)], &[("x", x), ("dy", dy)])?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.pool_backward_unchecked(spec, x, dy, dx) }
    }

    /// `y[b, j, i] = x[b, i, j]` for `batch` matrices of `[rows, cols]`.
    fn transpose(
        &self,
        batch: usize,
        rows: usize,
        cols: usize,
        x: &Self::Buffer,
        y: &Self::Buffer,
    ) -> Result<()> {
        validate::transpose(self, batch, rows, cols, x, y)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.transpose_unchecked(batch, rows, cols, x, y) }
    }

    /// `y = x / max(||x_row||, 1e-12)` over rows of `cols` (src/ops/relational/).
    fn row_normalize(&self, cols: usize, x: &Self::Buffer, y: &Self::Buffer) -> Result<()> {
        validate::rows_of(self, cols, &[("x", x), ("y", y)])?;
        validate::no_alias(self, &[("y", y)], &[("x", x)])?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.row_normalize_unchecked(cols, x, y) }
    }

    /// The input gradient of [`Backend::row_normalize`] from its input `x` and `dy`.
    fn row_normalize_backward(
        &self,
        cols: usize,
        x: &Self::Buffer,
        dy: &Self::Buffer,
        dx: &Self::Buffer,
    ) -> Result<()> {
        validate::rows_of(self, cols, &[("x", x), ("dy", dy), ("dx", dx)])?;
        validate::no_alias(self, &[("dx", dx)], &[("x", x), ("dy", dy)])?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.row_normalize_backward_unchecked(cols, x, dy, dx) }
    }

    /// Pairwise Euclidean distances `[n, n]` of `n` feature rows of `dim` (diagonal 0).
    fn pairwise_distance(
        &self,
        n: usize,
        dim: usize,
        f: &Self::Buffer,
        d: &Self::Buffer,
    ) -> Result<()> {
        validate::pairwise(self, n, dim, f, &[("d", d)])?;
        validate::no_alias(self, &[("d", d)], &[("f", f)])?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.pairwise_distance_unchecked(n, dim, f, d) }
    }

    /// `dF` from the features, the distances `d` and their gradient `dd`.
    fn pairwise_distance_backward(
        &self,
        n: usize,
        dim: usize,
        f: &Self::Buffer,
        d: &Self::Buffer,
        dd: &Self::Buffer,
        df: &Self::Buffer,
    ) -> Result<()> {
        validate::pairwise(self, n, dim, f, &[("d", d), ("dd", dd)])?;
        validate::same_len(self, &[("f", f), ("df", df)])?;
        validate::no_alias(self, &[("df", df)], &[("f", f), ("d", d), ("dd", dd)])?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.pairwise_distance_backward_unchecked(n, dim, f, d, dd, df) }
    }

    /// `y = d / mean(off-diagonal of d)` for an `[n, n]` matrix, `n >= 2`.
    fn offdiag_normalize(&self, n: usize, d: &Self::Buffer, y: &Self::Buffer) -> Result<()> {
        validate::square(self, n, &[("d", d), ("y", y)])?;
        validate::no_alias(self, &[("y", y)], &[("d", d)])?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.offdiag_normalize_unchecked(n, d, y) }
    }

    /// The input gradient of [`Backend::offdiag_normalize`] from `d` and `dy`.
    fn offdiag_normalize_backward(
        &self,
        n: usize,
        d: &Self::Buffer,
        dy: &Self::Buffer,
        dd: &Self::Buffer,
    ) -> Result<()> {
        validate::square(self, n, &[("d", d), ("dy", dy), ("dd", dd)])?;
        validate::no_alias(self, &[("dd", dd)], &[("d", d), ("dy", dy)])?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.offdiag_normalize_backward_unchecked(n, d, dy, dd) }
    }

    /// Smooth L1 (Huber, delta 1), mean over all elements, with the same outputs as [`Backend::mse`].
    fn smooth_l1(
        &self,
        spec: &MseSpec,
        a: &Self::Buffer,
        b: &Self::Buffer,
        loss: &Self::Buffer,
        grad_a: Option<&Self::Buffer>,
        grad_b: Option<&Self::Buffer>,
    ) -> Result<()> {
        validate::mse(self, spec, a, b, loss, grad_a, grad_b)?;
        // SAFETY: `validate` has checked this call's spec, lengths and aliasing.
        unsafe { self.smooth_l1_unchecked(spec, a, b, loss, grad_a, grad_b) }
    }

    // ---- the kernels: each backend implements these ----
    //
    // # Safety (every `*_unchecked` method)
    // The caller guarantees what the provided method's `validate` call checks: the spec is valid,
    // every buffer has the length the spec gives it, labels one per row, and no output overlaps
    // another output or an input (except `GradOut::InPlace`). Device backends launch kernels that
    // index the buffers by those lengths without further checks, so a call that breaks this
    // contract may read or write out of bounds. Call the provided methods instead.

    #[doc(hidden)]
    unsafe fn softmax_unchecked(
        &self,
        spec: &SoftmaxSpec,
        x: &Self::Buffer,
        y: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn softmax_backward_unchecked(
        &self,
        spec: &SoftmaxSpec,
        y: &Self::Buffer,
        dy: &Self::Buffer,
        dx: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn divergence_unchecked(
        &self,
        spec: &DivergenceSpec,
        student: &Self::Buffer,
        teacher: &Self::Buffer,
        labels: Option<&Self::Labels>,
        out: LossOut<'_, Self>,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn cross_entropy_unchecked(
        &self,
        spec: &CrossEntropySpec,
        student: &Self::Buffer,
        labels: &Self::Labels,
        out: LossOut<'_, Self>,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn hinton_unchecked(
        &self,
        spec: &HintonSpec,
        student: &Self::Buffer,
        teacher: &Self::Buffer,
        labels: &Self::Labels,
        out: LossOut<'_, Self>,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn dkd_unchecked(
        &self,
        spec: &DkdSpec,
        student: &Self::Buffer,
        teacher: &Self::Buffer,
        labels: &Self::Labels,
        out: LossOut<'_, Self>,
    ) -> Result<()>;
    /// [`Backend::sparse_kd`] after validation. Every backend of the crate has a sparse kernel;
    /// a backend written outside it that has none keeps this default, an `Err` saying so.
    #[doc(hidden)]
    unsafe fn sparse_kd_unchecked(
        &self,
        spec: &SparseSpec,
        student: &Self::Buffer,
        indices: &Self::Labels,
        values: &Self::Buffer,
        labels: Option<&Self::Labels>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        let _ = (spec, student, indices, values, labels, out);
        Err(crate::Error::Unsupported(format!(
            "sparse top-k teachers (Backend::sparse_kd): {} has no sparse kernel; use one of \
             the crate's backends (CPU, fast CPU, wgpu, CUDA)",
            self.name()
        )))
    }
    #[doc(hidden)]
    unsafe fn mse_unchecked(
        &self,
        spec: &MseSpec,
        a: &Self::Buffer,
        b: &Self::Buffer,
        loss: &Self::Buffer,
        grad_a: Option<&Self::Buffer>,
        grad_b: Option<&Self::Buffer>,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn attention_transfer_unchecked(
        &self,
        spec: &AttentionSpec,
        student: &Self::Buffer,
        teacher: &Self::Buffer,
        loss: &Self::Buffer,
        grad_student: Option<&Self::Buffer>,
        grad_teacher: Option<&Self::Buffer>,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn matmul_unchecked(
        &self,
        spec: &MatmulSpec,
        a: &Self::Buffer,
        b: &Self::Buffer,
        c: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn copy_rows_unchecked(
        &self,
        spec: &CopySpec,
        src: &Self::Buffer,
        dst: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn bias_add_unchecked(
        &self,
        x: &Self::Buffer,
        bias: &Self::Buffer,
        y: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn sum_rows_unchecked(
        &self,
        x: &Self::Buffer,
        out: &Self::Buffer,
        accumulate: bool,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn relu_unchecked(&self, x: &Self::Buffer, y: &Self::Buffer) -> Result<()>;
    #[doc(hidden)]
    unsafe fn relu_backward_unchecked(
        &self,
        y: &Self::Buffer,
        dy: &Self::Buffer,
        dx: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn axpy_unchecked(&self, alpha: f32, x: &Self::Buffer, y: &Self::Buffer) -> Result<()>;
    #[doc(hidden)]
    unsafe fn adam_step_unchecked(
        &self,
        spec: &AdamSpec,
        w: &Self::Buffer,
        grad: &Self::Buffer,
        m: &Self::Buffer,
        v: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn sgd_step_unchecked(
        &self,
        spec: &SgdSpec,
        w: &Self::Buffer,
        grad: &Self::Buffer,
        velocity: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn im2col_unchecked(
        &self,
        spec: &ConvSpec,
        x: &Self::Buffer,
        cols: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn col2im_unchecked(
        &self,
        spec: &ConvSpec,
        dcols: &Self::Buffer,
        dx: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn pool_unchecked(
        &self,
        spec: &PoolSpec,
        x: &Self::Buffer,
        y: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn pool_backward_unchecked(
        &self,
        spec: &PoolSpec,
        x: &Self::Buffer,
        dy: &Self::Buffer,
        dx: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn transpose_unchecked(
        &self,
        batch: usize,
        rows: usize,
        cols: usize,
        x: &Self::Buffer,
        y: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn row_normalize_unchecked(
        &self,
        cols: usize,
        x: &Self::Buffer,
        y: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn row_normalize_backward_unchecked(
        &self,
        cols: usize,
        x: &Self::Buffer,
        dy: &Self::Buffer,
        dx: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn pairwise_distance_unchecked(
        &self,
        n: usize,
        dim: usize,
        f: &Self::Buffer,
        d: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn pairwise_distance_backward_unchecked(
        &self,
        n: usize,
        dim: usize,
        f: &Self::Buffer,
        d: &Self::Buffer,
        dd: &Self::Buffer,
        df: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn offdiag_normalize_unchecked(
        &self,
        n: usize,
        d: &Self::Buffer,
        y: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn offdiag_normalize_backward_unchecked(
        &self,
        n: usize,
        d: &Self::Buffer,
        dy: &Self::Buffer,
        dd: &Self::Buffer,
    ) -> Result<()>;
    #[doc(hidden)]
    unsafe fn smooth_l1_unchecked(
        &self,
        spec: &MseSpec,
        a: &Self::Buffer,
        b: &Self::Buffer,
        loss: &Self::Buffer,
        grad_a: Option<&Self::Buffer>,
        grad_b: Option<&Self::Buffer>,
    ) -> Result<()>;
}

/// Which backends the environment says must be present (`DISTILLATION_REQUIRE=wgpu,nvrtc,cuda`).
/// Tests fail instead of skipping when a required backend is missing.
/// `len` copies of `value` in host memory, or [`Error::Limit`] where the allocation fails (a
/// scratch sized from a caller's chunk, say): an error, not the process's abort.
pub(crate) fn host_filled<T: Copy>(len: usize, value: T) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        Error::Limit(format!(
            "could not allocate {len} elements of {} bytes in host memory; use smaller \
             chunks or a smaller batch",
            std::mem::size_of::<T>()
        ))
    })?;
    v.resize(len, value);
    Ok(v)
}

pub fn required(backend: &str) -> bool {
    std::env::var("DISTILLATION_REQUIRE")
        .map(|v| v.split(',').any(|b| b.trim().eq_ignore_ascii_case(backend)))
        .unwrap_or(false)
}
