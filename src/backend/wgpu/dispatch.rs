//! Recording dispatches: windows of buffers, one dispatch of a kernel from the table, and the
//! sequence every row loss shares (count of valid rows -> row kernel per chunk -> fixed-order
//! reduction). The op folders (`src/ops/<family>/wgpu.rs`) build their uniforms and call these.
//!
//! Row sets larger than the device's `max_storage_buffer_binding_size` are processed in chunks of
//! whole rows: each chunk binds a window of the buffers whose offset is a multiple of 64 rows (so
//! every window starts on the 256-byte storage offset alignment).

use std::num::NonZeroU64;

use bytemuck::{Pod, Zeroable};

use super::pipelines::{WgslKernel, COUNT_VALID, REDUCE_ROWS};
use super::{WgpuBackend, WgpuBuffer, WgpuLabels};
use crate::backend::{Backend, GradOut, LossOut};
use crate::error::{Error, Result};
use crate::ops::{Reduction, RowShape};

/// Invocations per workgroup of every kernel.
pub(crate) const WG: u32 = 256;

/// A backend whose buffers are wgpu buffers: [`WgpuBackend`] itself (which submits) and its
/// [`super::Recorder`] (which records into a caller's encoder). The row losses' outputs
/// ([`LossOut`]) are typed by the backend they were made for; the encoders take either.
pub trait RowBackend: Backend<Buffer = WgpuBuffer, Labels = WgpuLabels> {}
impl<B: Backend<Buffer = WgpuBuffer, Labels = WgpuLabels>> RowBackend for B {}

/// Lanes per row: a power of two, about a quarter of the row, between 1 and the workgroup size.
pub fn threads_per_row(cols: usize) -> u32 {
    (cols.div_ceil(4).next_power_of_two()).clamp(1, WG as usize) as u32
}

/// A window of a buffer to bind.
#[derive(Clone, Copy)]
pub(crate) struct Window<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    size: u64,
}

impl<'a> Window<'a> {
    pub(crate) fn whole(buffer: &'a wgpu::Buffer, size: u64) -> Self {
        Window {
            buffer,
            offset: 0,
            size,
        }
    }

    /// `size` bytes from byte `offset`.
    pub(crate) fn new(buffer: &'a wgpu::Buffer, offset: u64, size: u64) -> Self {
        Window {
            buffer,
            offset,
            size,
        }
    }

    /// Elements `first..first + count` of an f32 or i32 buffer.
    pub(crate) fn elems(buffer: &'a wgpu::Buffer, first: u64, count: u64) -> Self {
        Window {
            buffer,
            offset: first * 4,
            size: count * 4,
        }
    }
}

/// A whole buffer as a binding window.
pub(crate) fn whole(b: &WgpuBuffer) -> Option<Window<'_>> {
    Some(Window::whole(&b.buffer, b.bytes()))
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

/// The layouts of this file's uniform structs (see [`super::uniform_layouts`]).
pub(super) fn uniform_layouts() -> Vec<super::UniformLayout> {
    use super::uniform_layout as l;
    vec![l!(
        ReduceParams,
        "reduce.wgsl",
        [n, has_labels, ignore_index, cols, mode, scale]
    )]
}

/// The shaders' `grad_mode`: 0 no gradient, 1 into a buffer, 2 in place over the student.
pub(crate) fn grad_mode<B: RowBackend>(g: &GradOut<'_, B>) -> u32 {
    match g {
        GradOut::None => 0,
        GradOut::Into(_) => 1,
        GradOut::InPlace => 2,
    }
}

/// The gradient buffer of [`GradOut::Into`] (none for `None` and `InPlace`).
pub(crate) fn grad_into<'a, B: RowBackend>(g: &GradOut<'a, B>) -> Option<&'a wgpu::Buffer> {
    match g {
        GradOut::Into(b) => Some(&b.buffer),
        _ => None,
    }
}

/// The row kernel's optional outputs, bound whole or as the chunk's window.
pub(crate) struct RowBuffers<'a> {
    pub student: &'a wgpu::Buffer,
    pub teacher: Option<&'a wgpu::Buffer>,
    pub labels: Option<&'a wgpu::Buffer>,
    pub row_loss: &'a wgpu::Buffer,
    pub grad_student: Option<&'a wgpu::Buffer>,
    pub grad_teacher: Option<&'a wgpu::Buffer>,
}

impl WgpuBackend {
    /// An error when a buffer is larger than one storage binding (the kernels that bind whole
    /// buffers).
    pub(crate) fn check_binding(&self, bufs: &[&WgpuBuffer]) -> Result<()> {
        for b in bufs {
            if b.bytes() > self.max_binding {
                return Err(Error::Limit(format!(
                    "a buffer of {} bytes exceeds the device's storage binding limit of {} bytes",
                    b.bytes(),
                    self.max_binding
                )));
            }
        }
        Ok(())
    }

    /// Splits `rows` rows of `cols` f32 into chunks that fit one storage binding.
    pub(crate) fn row_chunks(&self, rows: usize, cols: usize) -> Result<Vec<(usize, usize)>> {
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
    pub(crate) fn dispatch(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        kernel: &WgslKernel,
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

    /// Records one dispatch of a kernel with a 2D grid (`dense.wgsl`'s matmul).
    pub(crate) fn dispatch_2d(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        kernel: &WgslKernel,
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
        kernel: &WgslKernel,
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
            label: Some(kernel.entry),
            layout: &compiled.layout,
            entries: &entries,
        });
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(kernel.entry),
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
    pub(crate) fn encode_row_loss(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        kernel: &WgslKernel,
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
            &COUNT_VALID,
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
            &REDUCE_ROWS,
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

    pub(crate) fn row_loss_buffer<B: RowBackend>(
        &self,
        out: &LossOut<'_, B>,
        rows: usize,
    ) -> Result<wgpu::Buffer> {
        match out.row_loss {
            Some(r) => Ok(r.buffer.clone()),
            None => self.scratch("row_loss", rows as u64 * 4),
        }
    }

    /// `loss[0] = scale * sum(values[..n])` in a fixed order.
    pub(crate) fn encode_scaled_sum(
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
            &REDUCE_ROWS,
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
}
