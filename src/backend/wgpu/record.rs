//! Recording the kernels into a command encoder, on any [`WgpuBuffer`]s, including the caller's own
//! (`WgpuBuffer::from_buffer`). The `record_*` methods validate their inputs, then record every
//! dispatch of the op (count of valid rows, row kernel, fixed-order reduction) into the caller's
//! encoder: no submit and no readback of their own. The [`Backend`](super::Backend) methods use the
//! same `encode_*` functions and submit.
//!
//! Row sets larger than the device's `max_storage_buffer_binding_size` are processed in chunks of
//! whole rows: each chunk binds a window of the buffers whose offset is a multiple of 64 rows (so
//! every window starts on the 256-byte storage offset alignment).

use std::num::NonZeroU64;

use bytemuck::{Pod, Zeroable};

use super::pipelines::Kernel;
use super::{WgpuBackend, WgpuBuffer, WgpuLabels};
use crate::backend::{validate, GradOut, LossOut};
use crate::error::{Error, Result};
use crate::ops::{
    AttentionSpec, CrossEntropySpec, DivergenceSpec, HintonSpec, MseSpec, Reduction, RowShape,
    SoftmaxSpec, TeacherInput,
};

const WG: u32 = 256;

/// The highest temperature the wgpu divergence kernel accepts for a teacher given as
/// probabilities or log-probabilities: measured on lavapipe, the loss and gradients stay within
/// 1e-4 of the f64 reference up to T = 30 (7e-5 worst), not at T = 100 (8e-4). Teacher logits
/// are accurate over the whole accepted range (to T = 1e4).
pub const GIVEN_TEACHER_MAX_TEMPERATURE: f32 = 30.0;
/// Elements one MSE workgroup reduces (`PER_LANE` in `shaders/mse.wgsl`).
const MSE_ELEMS_PER_GROUP: u64 = 256 * 16;

/// Lanes per row: a power of two, about a quarter of the row, between 1 and the workgroup size.
pub fn threads_per_row(cols: usize) -> u32 {
    (cols.div_ceil(4).next_power_of_two()).clamp(1, WG as usize) as u32
}

/// A window of a buffer to bind.
#[derive(Clone, Copy)]
pub(super) struct Window<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    size: u64,
}

impl<'a> Window<'a> {
    pub(super) fn whole(buffer: &'a wgpu::Buffer, size: u64) -> Self {
        Window {
            buffer,
            offset: 0,
            size,
        }
    }

    /// Elements `first..first + count` of an f32 or i32 buffer.
    fn elems(buffer: &'a wgpu::Buffer, first: u64, count: u64) -> Self {
        Window {
            buffer,
            offset: first * 4,
            size: count * 4,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SoftmaxParams {
    rows: u32,
    cols: u32,
    inv_t: f32,
    log_mode: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ReduceParams {
    n: u32,
    has_labels: u32,
    ignore_index: i32,
    cols: u32,
    mode: u32,
    scale: f32,
    pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct DivergenceParams {
    rows: u32,
    cols: u32,
    inv_t: f32,
    temperature: f32,
    divergence: u32,
    teacher_form: u32,
    beta: f32,
    grad_scale: f32,
    has_labels: u32,
    ignore_index: i32,
    reduction: u32,
    grad_mode: u32,
    want_grad_t: u32,
    teacher_eps: f32,
    pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct CrossEntropyParams {
    rows: u32,
    cols: u32,
    eps: f32,
    grad_scale: f32,
    ignore_index: i32,
    reduction: u32,
    grad_mode: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct HintonParams {
    rows: u32,
    cols: u32,
    inv_t: f32,
    temperature: f32,
    alpha: f32,
    eps: f32,
    grad_scale: f32,
    ignore_index: i32,
    reduction: u32,
    grad_mode: u32,
    want_grad_t: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MseParams {
    len: u32,
    grad_mode: u32,
    grad_k: f32,
    /// 0 squared error, 1 smooth L1.
    mode: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AttentionParams {
    n: u32,
    cs: u32,
    ct: u32,
    hw: u32,
    k: f32,
    grad_mode: u32,
    pad: [u32; 2],
}

/// The layouts of this file's uniform structs (see [`super::uniform_layouts`]).
pub(super) fn uniform_layouts() -> Vec<super::UniformLayout> {
    use super::uniform_layout as l;
    vec![
        l!(SoftmaxParams, "softmax.wgsl", [rows, cols, inv_t, log_mode]),
        l!(
            ReduceParams,
            "reduce.wgsl",
            [n, has_labels, ignore_index, cols, mode, scale]
        ),
        l!(
            DivergenceParams,
            "divergence.wgsl",
            [
                rows,
                cols,
                inv_t,
                temperature,
                divergence,
                teacher_form,
                beta,
                grad_scale,
                has_labels,
                ignore_index,
                reduction,
                grad_mode,
                want_grad_t,
                teacher_eps
            ]
        ),
        l!(
            CrossEntropyParams,
            "cross_entropy.wgsl",
            [
                rows,
                cols,
                eps,
                grad_scale,
                ignore_index,
                reduction,
                grad_mode
            ]
        ),
        l!(
            HintonParams,
            "hinton.wgsl",
            [
                rows,
                cols,
                inv_t,
                temperature,
                alpha,
                eps,
                grad_scale,
                ignore_index,
                reduction,
                grad_mode,
                want_grad_t
            ]
        ),
        l!(MseParams, "mse.wgsl", [len, grad_mode, grad_k, mode]),
        l!(
            AttentionParams,
            "attention.wgsl",
            [n, cs, ct, hw, k, grad_mode]
        ),
    ]
}

fn grad_mode(g: &GradOut<'_, WgpuBackend>) -> u32 {
    match g {
        GradOut::None => 0,
        GradOut::Into(_) => 1,
        GradOut::InPlace => 2,
    }
}

/// The row kernel's optional outputs, bound whole or as the chunk's window.
struct RowBuffers<'a> {
    student: &'a wgpu::Buffer,
    teacher: Option<&'a wgpu::Buffer>,
    labels: Option<&'a wgpu::Buffer>,
    row_loss: &'a wgpu::Buffer,
    grad_student: Option<&'a wgpu::Buffer>,
    grad_teacher: Option<&'a wgpu::Buffer>,
}

impl WgpuBackend {
    /// Splits `rows` rows of `cols` f32 into chunks that fit one storage binding.
    fn row_chunks(&self, rows: usize, cols: usize) -> Result<Vec<(usize, usize)>> {
        let row_bytes = cols as u64 * 4;
        let fit = (self.max_binding / row_bytes) as usize;
        if fit >= rows {
            return Ok(vec![(0, rows)]);
        }
        // Chunk starts must keep every window on the storage offset alignment, for the [N, C]
        // buffers (r0 * C * 4 bytes) and the per-row ones (r0 * 4 bytes) alike.
        let align = (self.limits.min_storage_buffer_offset_alignment as usize / 4).max(1);
        let chunk = fit / align * align;
        if chunk == 0 {
            return Err(Error::Limit(format!(
                "{align} rows of {cols} classes ({} bytes) exceed the device's storage binding limit \
                 of {} bytes, so the rows cannot be processed in chunks; use fewer classes per row",
                align as u64 * row_bytes,
                self.max_binding
            )));
        }
        Ok((0..rows)
            .step_by(chunk)
            .map(|r0| (r0, chunk.min(rows - r0)))
            .collect())
    }

    /// Records one dispatch of `kernel` with `groups` workgroups (split over x and y).
    pub(super) fn dispatch(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        kernel: Kernel,
        tpr: u32,
        params: &[u8],
        windows: &[Option<Window<'_>>],
        groups: u32,
    ) -> Result<()> {
        let max = self.limits.max_compute_workgroups_per_dimension.max(1);
        let groups = groups.max(1);
        let (x, y) = if groups <= max {
            (groups, 1)
        } else {
            (max, groups.div_ceil(max))
        };
        if y > max {
            return Err(Error::Limit(format!(
                "{groups} workgroups exceed the device's dispatch limit ({max} x {max})"
            )));
        }
        self.dispatch_grid(encoder, kernel, tpr, params, windows, x, y)
    }

    /// Records one dispatch of a kernel with a 2D grid (`shaders/dense.wgsl`'s matmul).
    pub(super) fn dispatch_2d(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        kernel: Kernel,
        params: &[u8],
        windows: &[Option<Window<'_>>],
        x: u32,
        y: u32,
    ) -> Result<()> {
        self.dispatch_grid(encoder, kernel, WG, params, windows, x.max(1), y.max(1))
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch_grid(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        kernel: Kernel,
        tpr: u32,
        params: &[u8],
        windows: &[Option<Window<'_>>],
        x: u32,
        y: u32,
    ) -> Result<()> {
        let compiled = self.pipelines.get(&self.device, kernel, tpr);
        let uniform = self.uniform(params);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        for (i, w) in windows.iter().enumerate() {
            let slot = i + 1;
            let resource = match w {
                Some(w) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: w.buffer,
                    offset: w.offset,
                    size: NonZeroU64::new(w.size.max(4)),
                }),
                None => self.dummies[slot].as_entire_binding(),
            };
            entries.push(wgpu::BindGroupEntry {
                binding: slot as u32,
                resource,
            });
        }
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.entry_point()),
            layout: &compiled.layout,
            entries: &entries,
        });
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(kernel.entry_point()),
            timestamp_writes: None,
        });
        pass.set_pipeline(&compiled.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(x, y, 1);
        Ok(())
    }

    /// count_valid -> row kernel per chunk -> reduce_rows. `params(rows)` gives the row kernel's
    /// uniform bytes for a chunk of `rows` rows.
    #[allow(clippy::too_many_arguments)]
    fn encode_row_loss(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        kernel: Kernel,
        shape: RowShape,
        reduction: Reduction,
        ignore_index: i32,
        bufs: RowBuffers<'_>,
        loss: &wgpu::Buffer,
        params: impl Fn(u32) -> Vec<u8>,
    ) -> Result<()> {
        let (n, c) = (shape.rows, shape.cols);
        if n as u64 * 4 > self.max_binding {
            return Err(Error::Limit(format!(
                "{n} rows need {} bytes of labels or row losses in one binding, over the device's \
                 limit of {} bytes; split the batch",
                n as u64 * 4,
                self.max_binding
            )));
        }
        let chunks = self.row_chunks(n, c)?;
        let counts = self.scratch("valid_count", 16)?;
        let counts_w = Window::whole(&counts, 16);
        let labels_w = bufs.labels.map(|l| Window::whole(l, n as u64 * 4));
        let reduce = |mode: u32| ReduceParams {
            n: n as u32,
            has_labels: bufs.labels.is_some() as u32,
            ignore_index,
            cols: c as u32,
            mode,
            scale: 1.0,
            pad: [0; 2],
        };
        self.dispatch(
            encoder,
            Kernel::CountValid,
            WG,
            bytemuck::bytes_of(&reduce(0)),
            &[labels_w, Some(counts_w), None, None],
            1,
        )?;
        let tpr = threads_per_row(c);
        let rows_per_group = (WG / tpr) as usize;
        for (r0, rows) in chunks {
            let mat = |b| Window::elems(b, (r0 * c) as u64, (rows * c) as u64);
            let vec_w = |b| Window::elems(b, r0 as u64, rows as u64);
            let bytes = params(rows as u32);
            self.dispatch(
                encoder,
                kernel,
                tpr,
                &bytes,
                &[
                    Some(mat(bufs.student)),
                    bufs.teacher.map(mat),
                    bufs.labels.map(vec_w),
                    Some(counts_w),
                    Some(vec_w(bufs.row_loss)),
                    bufs.grad_student.map(mat),
                    bufs.grad_teacher.map(mat),
                ],
                rows.div_ceil(rows_per_group) as u32,
            )?;
        }
        let mode = if reduction == Reduction::BatchMean {
            0
        } else {
            1
        };
        self.dispatch(
            encoder,
            Kernel::ReduceRows,
            WG,
            bytemuck::bytes_of(&reduce(mode)),
            &[
                None,
                Some(counts_w),
                Some(Window::whole(bufs.row_loss, n as u64 * 4)),
                Some(Window::whole(loss, 4)),
            ],
            1,
        )
    }

    fn row_loss_buffer(&self, out: &LossOut<'_, Self>, rows: usize) -> Result<wgpu::Buffer> {
        match out.row_loss {
            Some(r) => Ok(r.buffer.clone()),
            None => self.scratch("row_loss", rows as u64 * 4),
        }
    }

    pub(super) fn encode_softmax(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &SoftmaxSpec,
        x: &WgpuBuffer,
        dy: Option<&WgpuBuffer>,
        out: &WgpuBuffer,
    ) -> Result<()> {
        let c = spec.shape.cols;
        let tpr = threads_per_row(c);
        let kernel = if dy.is_some() {
            Kernel::SoftmaxBackward
        } else {
            Kernel::SoftmaxForward
        };
        for (r0, rows) in self.row_chunks(spec.shape.rows, c)? {
            let mat = |b| Window::elems(b, (r0 * c) as u64, (rows * c) as u64);
            let params = SoftmaxParams {
                rows: rows as u32,
                cols: c as u32,
                inv_t: 1.0 / spec.temperature,
                log_mode: spec.log as u32,
            };
            self.dispatch(
                encoder,
                kernel,
                tpr,
                bytemuck::bytes_of(&params),
                &[
                    Some(mat(&x.buffer)),
                    dy.map(|d| mat(&d.buffer)),
                    Some(mat(&out.buffer)),
                ],
                rows.div_ceil((WG / tpr) as usize) as u32,
            )?;
        }
        Ok(())
    }

    pub(super) fn encode_divergence(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &DivergenceSpec,
        student: &WgpuBuffer,
        teacher: &WgpuBuffer,
        labels: Option<&WgpuLabels>,
        out: &LossOut<'_, Self>,
    ) -> Result<()> {
        if spec.teacher != TeacherInput::Logits && spec.temperature > GIVEN_TEACHER_MAX_TEMPERATURE
        {
            return Err(Error::Unsupported(format!(
                "temperature {} with the teacher given as probabilities or log-probabilities: \
                 the wgpu kernels meet 1e-4 there only up to T = {GIVEN_TEACHER_MAX_TEMPERATURE} \
                 (at higher T the loss is second order in 1/T and the f32 exp / log of a given \
                 teacher decides it; docs/ARCHITECTURE.md, numerics); pass the teacher's logits \
                 (TeacherInput::Logits, accurate to T = 1e4), or use the CPU or CUDA backend",
                spec.temperature
            )));
        }
        let row_loss = self.row_loss_buffer(out, spec.shape.rows)?;
        let params = |rows: u32| {
            bytemuck::bytes_of(&DivergenceParams {
                rows,
                cols: spec.shape.cols as u32,
                inv_t: 1.0 / spec.temperature,
                temperature: spec.temperature,
                divergence: spec.divergence.code(),
                teacher_form: spec.teacher.code(),
                beta: spec.divergence.beta(),
                grad_scale: spec.grad_scale,
                has_labels: labels.is_some() as u32,
                ignore_index: spec.ignore_index,
                reduction: spec.reduction.code(),
                grad_mode: grad_mode(&out.grad_student),
                want_grad_t: out.grad_teacher.is_some() as u32,
                teacher_eps: spec.teacher_eps,
                pad: [0; 2],
            })
            .to_vec()
        };
        self.encode_row_loss(
            encoder,
            Kernel::Divergence,
            spec.shape,
            spec.reduction,
            spec.ignore_index,
            RowBuffers {
                student: &student.buffer,
                teacher: Some(&teacher.buffer),
                labels: labels.map(|l| &l.buffer),
                row_loss: &row_loss,
                grad_student: grad_into(&out.grad_student),
                grad_teacher: out.grad_teacher.map(|g| &g.buffer),
            },
            &out.loss.buffer,
            params,
        )
    }

    pub(super) fn encode_cross_entropy(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &CrossEntropySpec,
        student: &WgpuBuffer,
        labels: &WgpuLabels,
        out: &LossOut<'_, Self>,
    ) -> Result<()> {
        let row_loss = self.row_loss_buffer(out, spec.shape.rows)?;
        let params = |rows: u32| {
            bytemuck::bytes_of(&CrossEntropyParams {
                rows,
                cols: spec.shape.cols as u32,
                eps: spec.label_smoothing,
                grad_scale: spec.grad_scale,
                ignore_index: spec.ignore_index,
                reduction: spec.reduction.code(),
                grad_mode: grad_mode(&out.grad_student),
                pad: 0,
            })
            .to_vec()
        };
        self.encode_row_loss(
            encoder,
            Kernel::CrossEntropy,
            spec.shape,
            spec.reduction,
            spec.ignore_index,
            RowBuffers {
                student: &student.buffer,
                teacher: None,
                labels: Some(&labels.buffer),
                row_loss: &row_loss,
                grad_student: grad_into(&out.grad_student),
                grad_teacher: None,
            },
            &out.loss.buffer,
            params,
        )
    }

    pub(super) fn encode_hinton(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &HintonSpec,
        student: &WgpuBuffer,
        teacher: &WgpuBuffer,
        labels: &WgpuLabels,
        out: &LossOut<'_, Self>,
    ) -> Result<()> {
        let row_loss = self.row_loss_buffer(out, spec.shape.rows)?;
        let params = |rows: u32| {
            bytemuck::bytes_of(&HintonParams {
                rows,
                cols: spec.shape.cols as u32,
                inv_t: 1.0 / spec.temperature,
                temperature: spec.temperature,
                alpha: spec.alpha,
                eps: spec.label_smoothing,
                grad_scale: spec.grad_scale,
                ignore_index: spec.ignore_index,
                reduction: spec.reduction.code(),
                grad_mode: grad_mode(&out.grad_student),
                want_grad_t: out.grad_teacher.is_some() as u32,
                pad: 0,
            })
            .to_vec()
        };
        self.encode_row_loss(
            encoder,
            Kernel::Hinton,
            spec.shape,
            spec.reduction,
            spec.ignore_index,
            RowBuffers {
                student: &student.buffer,
                teacher: Some(&teacher.buffer),
                labels: Some(&labels.buffer),
                row_loss: &row_loss,
                grad_student: grad_into(&out.grad_student),
                grad_teacher: out.grad_teacher.map(|g| &g.buffer),
            },
            &out.loss.buffer,
            params,
        )
    }

    /// MSE (`smooth_l1` false) or smooth L1, mean over all elements (`shaders/mse.wgsl`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn encode_mse(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &MseSpec,
        a: &WgpuBuffer,
        b: &WgpuBuffer,
        loss: &WgpuBuffer,
        grad_a: Option<&WgpuBuffer>,
        grad_b: Option<&WgpuBuffer>,
        smooth_l1: bool,
    ) -> Result<()> {
        let m = spec.len as u64;
        let groups_total = m.div_ceil(MSE_ELEMS_PER_GROUP);
        let partial = self.scratch("mse_partial", groups_total * 4)?;
        // Chunks of whole workgroups whose partial-sum offsets stay 256-byte aligned.
        let align = MSE_ELEMS_PER_GROUP
            * (self.limits.min_storage_buffer_offset_alignment as u64 / 4).max(1);
        let chunk = if m * 4 <= self.max_binding {
            m
        } else {
            (self.max_binding / 4) / align * align
        };
        if chunk == 0 {
            return Err(Error::Limit(
                "the storage binding limit is too small for MSE".into(),
            ));
        }
        let mode = grad_a.is_some() as u32 | (grad_b.is_some() as u32) << 1;
        let mut e0 = 0u64;
        while e0 < m {
            let len = chunk.min(m - e0);
            let w = |buf| Window::elems(buf, e0, len);
            let groups = len.div_ceil(MSE_ELEMS_PER_GROUP);
            let params = MseParams {
                len: len as u32,
                grad_mode: mode,
                grad_k: (spec.grad_scale as f64 * if smooth_l1 { 1.0 } else { 2.0 } / m as f64)
                    as f32,
                mode: smooth_l1 as u32,
            };
            self.dispatch(
                encoder,
                Kernel::Mse,
                WG,
                bytemuck::bytes_of(&params),
                &[
                    Some(w(&a.buffer)),
                    Some(w(&b.buffer)),
                    Some(Window {
                        buffer: &partial,
                        offset: e0 / MSE_ELEMS_PER_GROUP * 4,
                        size: groups * 4,
                    }),
                    grad_a.map(|g| w(&g.buffer)),
                    grad_b.map(|g| w(&g.buffer)),
                ],
                groups as u32,
            )?;
            e0 += len;
        }
        self.encode_scaled_sum(
            encoder,
            &partial,
            groups_total as usize,
            (1.0 / m as f64) as f32,
            loss,
        )
    }

    /// `loss[0] = scale * sum(values[..n])` in a fixed order.
    fn encode_scaled_sum(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        values: &wgpu::Buffer,
        n: usize,
        scale: f32,
        loss: &WgpuBuffer,
    ) -> Result<()> {
        let counts = self.scratch("valid_count", 16)?;
        let params = ReduceParams {
            n: n as u32,
            has_labels: 0,
            ignore_index: 0,
            cols: 0,
            mode: 1,
            scale,
            pad: [0; 2],
        };
        self.dispatch(
            encoder,
            Kernel::ReduceRows,
            WG,
            bytemuck::bytes_of(&params),
            &[
                None,
                Some(Window::whole(&counts, 16)),
                Some(Window::whole(values, n as u64 * 4)),
                Some(Window::whole(&loss.buffer, 4)),
            ],
            1,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn encode_attention(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &AttentionSpec,
        student: &WgpuBuffer,
        teacher: &WgpuBuffer,
        loss: &WgpuBuffer,
        grad_student: Option<&WgpuBuffer>,
        grad_teacher: Option<&WgpuBuffer>,
    ) -> Result<()> {
        let biggest = student.bytes().max(teacher.bytes());
        if biggest > self.max_binding {
            return Err(Error::Limit(format!(
                "attention transfer binds whole feature maps: {biggest} bytes exceed the device's \
                 storage binding limit of {} bytes; split the batch",
                self.max_binding
            )));
        }
        let sample_loss = self.scratch("sample_loss", spec.n as u64 * 4)?;
        let params = AttentionParams {
            n: spec.n as u32,
            cs: spec.student_channels as u32,
            ct: spec.teacher_channels as u32,
            hw: spec.hw as u32,
            k: (2.0 * spec.grad_scale as f64 / (spec.n * spec.hw) as f64) as f32,
            grad_mode: grad_student.is_some() as u32 | (grad_teacher.is_some() as u32) << 1,
            pad: [0; 2],
        };
        self.dispatch(
            encoder,
            Kernel::Attention,
            WG,
            bytemuck::bytes_of(&params),
            &[
                Some(Window::whole(&student.buffer, student.bytes())),
                Some(Window::whole(&teacher.buffer, teacher.bytes())),
                Some(Window::whole(&sample_loss, spec.n as u64 * 4)),
                grad_student.map(|g| Window::whole(&g.buffer, g.bytes())),
                grad_teacher.map(|g| Window::whole(&g.buffer, g.bytes())),
            ],
            spec.n as u32,
        )?;
        self.encode_scaled_sum(
            encoder,
            &sample_loss,
            spec.n,
            (1.0 / (spec.n * spec.hw) as f64) as f32,
            loss,
        )
    }

    // ---- the public record API: validate, then record into the caller's encoder ----

    /// Records the fused Hinton loss into `encoder` (see [`crate::Backend::hinton`]).
    pub fn record_hinton(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &HintonSpec,
        student: &WgpuBuffer,
        teacher: &WgpuBuffer,
        labels: &WgpuLabels,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        validate::hinton(self, spec, student, teacher, labels, &out)?;
        self.with_error_scope(|| self.encode_hinton(encoder, spec, student, teacher, labels, &out))
    }

    /// Records a soft-target divergence into `encoder` (see [`crate::Backend::divergence`]).
    pub fn record_divergence(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &DivergenceSpec,
        student: &WgpuBuffer,
        teacher: &WgpuBuffer,
        labels: Option<&WgpuLabels>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        validate::divergence(self, spec, student, teacher, labels, &out)?;
        self.with_error_scope(|| {
            self.encode_divergence(encoder, spec, student, teacher, labels, &out)
        })
    }

    /// Records cross-entropy into `encoder` (see [`crate::Backend::cross_entropy`]).
    pub fn record_cross_entropy(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &CrossEntropySpec,
        student: &WgpuBuffer,
        labels: &WgpuLabels,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        validate::cross_entropy(self, spec, student, labels, &out)?;
        self.with_error_scope(|| self.encode_cross_entropy(encoder, spec, student, labels, &out))
    }

    /// Records softmax or log-softmax at a temperature into `encoder`.
    pub fn record_softmax(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &SoftmaxSpec,
        x: &WgpuBuffer,
        y: &WgpuBuffer,
    ) -> Result<()> {
        validate::softmax(self, spec, x, y)?;
        self.with_error_scope(|| self.encode_softmax(encoder, spec, x, None, y))
    }

    /// Records the feature MSE into `encoder`.
    #[allow(clippy::too_many_arguments)]
    pub fn record_mse(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &MseSpec,
        a: &WgpuBuffer,
        b: &WgpuBuffer,
        loss: &WgpuBuffer,
        grad_a: Option<&WgpuBuffer>,
        grad_b: Option<&WgpuBuffer>,
    ) -> Result<()> {
        validate::mse(self, spec, a, b, loss, grad_a, grad_b)?;
        self.with_error_scope(|| self.encode_mse(encoder, spec, a, b, loss, grad_a, grad_b, false))
    }
}

fn grad_into<'a>(g: &GradOut<'a, WgpuBackend>) -> Option<&'a wgpu::Buffer> {
    match g {
        GradOut::Into(b) => Some(&b.buffer),
        _ => None,
    }
}
