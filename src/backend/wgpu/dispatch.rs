//! Recording dispatches: windows of buffers, one dispatch of a kernel from the table, and the
//! sequence every row loss shares (count of valid rows -> row kernel per chunk -> fixed-order
//! reduction). The op folders (`src/ops/<family>/wgpu.rs`) build their uniforms and call these.
//!
//! Row sets larger than the device's `max_storage_buffer_binding_size` are processed in chunks of
//! whole rows: each chunk binds a window of the buffers whose offset is a multiple of 64 rows (so
//! every window starts on the 256-byte storage offset alignment).

use std::num::NonZeroU64;

use bytemuck::{Pod, Zeroable};

use super::buffer::{Base, Place};
use super::pipelines::{WgslKernel, COUNT_VALID, PACK_HALF, REDUCE_ROWS};
use super::{WgpuBackend, WgpuBuffer, WgpuLabels};
use crate::backend::{Backend, GradOut, LossOut};
use crate::dtype::Dtype;
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

// Every constructor starts the window at the base's own offset (0 for the backend's buffers, a
// caller's byte for a wrapped window of a shared buffer), so a window of a wrapped buffer never
// reads before its element 0.
impl<'a> Window<'a> {
    /// The first `size` bytes.
    pub(crate) fn whole<B: Base + ?Sized>(b: &'a B, size: u64) -> Self {
        let (buffer, offset) = b.base();
        Window {
            buffer,
            offset,
            size,
        }
    }

    /// `size` bytes from byte `offset` (past the base's own offset).
    pub(crate) fn new<B: Base + ?Sized>(b: &'a B, offset: u64, size: u64) -> Self {
        let (buffer, base) = b.base();
        Window {
            buffer,
            offset: base + offset,
            size,
        }
    }

    /// Elements `first..first + count` of an f32 or i32 buffer.
    pub(crate) fn elems<B: Base + ?Sized>(b: &'a B, first: u64, count: u64) -> Self {
        let (buffer, base) = b.base();
        Window {
            buffer,
            offset: base + first * 4,
            size: count * 4,
        }
    }

    /// Elements `first..first + count` of a buffer of any dtype (`first` even for 16-bit
    /// elements; the size padded to whole 32-bit words, which the buffer's own padding covers).
    pub(crate) fn of(buf: &'a WgpuBuffer, first: u64, count: u64) -> Self {
        let size = buf.dtype.size() as u64;
        Window {
            buffer: &buf.buffer,
            offset: buf.offset + first * size,
            size: (count * size).div_ceil(4) * 4,
        }
    }
}

/// A whole buffer as a binding window.
pub(crate) fn whole(b: &WgpuBuffer) -> Option<Window<'_>> {
    Some(Window::whole(b, b.bytes()))
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
    vec![
        l!(
            ReduceParams,
            "reduce.wgsl",
            [n, has_labels, ignore_index, cols, mode, scale]
        ),
        l!(PackParams, "pack.wgsl", [words, len, dtype]),
    ]
}

/// The shaders' `grad_mode` (`row_io.wgsl`): no gradient, into a buffer, over the student.
pub(crate) const GRAD_NONE: u32 = 0;
pub(crate) const GRAD_INTO: u32 = 1;
pub(crate) const GRAD_IN_PLACE: u32 = 2;

/// Where a row loss's student gradient goes (as [`GradOut`], on wgpu buffers).
#[derive(Clone, Copy)]
pub(crate) enum GradTarget<'a> {
    None,
    Into(&'a WgpuBuffer),
    InPlace,
}

impl<'a> GradTarget<'a> {
    pub(crate) fn of<B: RowBackend>(g: &GradOut<'a, B>) -> Self {
        match g {
            GradOut::None => GradTarget::None,
            GradOut::Into(b) => GradTarget::Into(b),
            GradOut::InPlace => GradTarget::InPlace,
        }
    }
}

/// The row kernel's inputs and outputs, bound whole or as the chunk's window.
pub(crate) struct RowBuffers<'a> {
    pub student: &'a WgpuBuffer,
    pub teacher: Option<&'a WgpuBuffer>,
    pub labels: Option<&'a WgpuLabels>,
    pub row_loss: &'a Place,
    pub grad_student: GradTarget<'a>,
    pub grad_teacher: Option<&'a WgpuBuffer>,
}

/// A sparse teacher's extra shape (`ops/sparse`): the teacher buffer holds `k` values per row,
/// and `indices` (`[N, k]` i32) is bound after the row-loss bindings (slot 8); one workgroup per
/// row.
#[derive(Clone, Copy)]
pub(crate) struct SparseTeacher<'a> {
    pub k: usize,
    pub indices: &'a WgpuLabels,
}

/// A gradient the row kernel writes in f32 into scratch, to be packed into a bf16 / f16 buffer.
struct Pending {
    scratch: wgpu::Buffer,
    dst: Place,
    dtype: Dtype,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct PackParams {
    words: u32,
    len: u32,
    dtype: u32,
    pad0: u32,
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

    /// Splits `rows` rows of `cols` elements into chunks that fit one storage binding (at 4 bytes
    /// an element, the widest). `min_size` is the smallest element bound (2 for bf16 / f16): chunk
    /// starts keep `r0 * C * min_size` (and `r0 * 4`) on the storage offset alignment.
    pub(crate) fn row_chunks(
        &self,
        rows: usize,
        cols: usize,
        min_size: usize,
    ) -> Result<Vec<(usize, usize)>> {
        let row_bytes = cols as u64 * 4;
        let fit = (self.max_binding / row_bytes) as usize;
        if fit >= rows {
            return Ok(vec![(0, rows)]);
        }
        // Chunk starts must keep every window on the storage offset alignment, for the [N, C]
        // buffers (r0 * C * 4 bytes) and the per-row ones (r0 * 4 bytes) alike.
        let align = (self.limits.min_storage_buffer_offset_alignment as usize / min_size).max(1);
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

    /// count_valid -> row kernel per chunk -> reduce_rows. `params(rows, grad_mode)` gives the
    /// row kernel's uniform bytes for a chunk of `rows` rows and the student gradient's mode.
    ///
    /// The kernels write f32 gradients: a gradient that goes to a bf16 or f16 buffer (or in place
    /// over a half-precision student) is written into an f32 scratch buffer and packed into its
    /// buffer afterwards (`pack.wgsl`), one invocation per 32-bit word.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn encode_row_loss(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        kernel: &WgslKernel,
        shape: RowShape,
        reduction: Reduction,
        ignore_index: i32,
        bufs: RowBuffers<'_>,
        loss: &WgpuBuffer,
        params: impl Fn(u32, u32) -> Vec<u8>,
    ) -> Result<()> {
        self.encode_rows(
            encoder,
            kernel,
            shape,
            reduction,
            ignore_index,
            bufs,
            None,
            loss,
            params,
        )
    }

    /// [`Self::encode_row_loss`] for a sparse teacher: the teacher window is `k` values per row
    /// and the indices are bound in slot 8.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn encode_sparse_row_loss(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        kernel: &WgslKernel,
        shape: RowShape,
        reduction: Reduction,
        ignore_index: i32,
        bufs: RowBuffers<'_>,
        sparse: SparseTeacher<'_>,
        loss: &WgpuBuffer,
        params: impl Fn(u32, u32) -> Vec<u8>,
    ) -> Result<()> {
        self.encode_rows(
            encoder,
            kernel,
            shape,
            reduction,
            ignore_index,
            bufs,
            Some(sparse),
            loss,
            params,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn encode_rows(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        kernel: &WgslKernel,
        shape: RowShape,
        reduction: Reduction,
        ignore_index: i32,
        bufs: RowBuffers<'_>,
        sparse: Option<SparseTeacher<'_>>,
        loss: &WgpuBuffer,
        params: impl Fn(u32, u32) -> Vec<u8>,
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
        let len = shape.len();
        let half = |b: &WgpuBuffer| b.dtype != Dtype::F32;
        let mut pending = Vec::new();
        // The student gradient: (buffer the kernel writes, grad_mode).
        let (gs, grad_mode) = match bufs.grad_student {
            GradTarget::None => (None, GRAD_NONE),
            GradTarget::Into(g) if !half(g) => (Some(Place::of(g)), GRAD_INTO),
            GradTarget::InPlace if !half(bufs.student) => (None, GRAD_IN_PLACE),
            GradTarget::Into(g) => {
                let scratch = self.scratch("grad_student_f32", len as u64 * 4)?;
                pending.push(Pending {
                    scratch: scratch.clone(),
                    dst: Place::of(g),
                    dtype: g.dtype,
                });
                (Some(Place::of(&scratch)), GRAD_INTO)
            }
            GradTarget::InPlace => {
                let scratch = self.scratch("grad_student_f32", len as u64 * 4)?;
                pending.push(Pending {
                    scratch: scratch.clone(),
                    dst: Place::of(bufs.student),
                    dtype: bufs.student.dtype,
                });
                (Some(Place::of(&scratch)), GRAD_INTO)
            }
        };
        let gt = match bufs.grad_teacher {
            Some(g) if half(g) => {
                let scratch = self.scratch("grad_teacher_f32", len as u64 * 4)?;
                pending.push(Pending {
                    scratch: scratch.clone(),
                    dst: Place::of(g),
                    dtype: g.dtype,
                });
                Some(Place::of(&scratch))
            }
            Some(g) => Some(Place::of(g)),
            None => None,
        };
        let any_half = half(bufs.student) || bufs.teacher.is_some_and(half);
        let chunks = self.row_chunks(n, c, if any_half { 2 } else { 4 })?;
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
        let tpr = if sparse.is_some() {
            WG
        } else {
            threads_per_row(c)
        };
        let rows_per_group = (WG / tpr) as usize;
        for (r0, rows) in chunks {
            let (first, count) = ((r0 * c) as u64, (rows * c) as u64);
            // A sparse teacher's [N, k] windows (their starts aligned as the [N, C] ones: r0 is
            // a multiple of the alignment in rows).
            let (t_first, t_count) = match sparse {
                Some(sp) => ((r0 * sp.k) as u64, (rows * sp.k) as u64),
                None => (first, count),
            };
            let bytes = params(rows as u32, grad_mode);
            let mut windows = vec![
                Some(Window::of(bufs.student, first, count)),
                bufs.teacher.map(|t| Window::of(t, t_first, t_count)),
                bufs.labels
                    .map(|l| Window::elems(l, r0 as u64, rows as u64)),
                Some(counts_w),
                Some(Window::elems(bufs.row_loss, r0 as u64, rows as u64)),
                gs.as_ref().map(|b| Window::elems(b, first, count)),
                gt.as_ref().map(|b| Window::elems(b, first, count)),
            ];
            if let Some(sp) = sparse {
                windows.push(Some(Window::elems(sp.indices, t_first, t_count)));
            }
            self.dispatch(
                encoder,
                kernel,
                tpr,
                &bytes,
                &windows,
                rows.div_ceil(rows_per_group) as u32,
            )?;
        }
        for p in &pending {
            self.encode_pack(encoder, &p.scratch, &p.dst, p.dtype, len)?;
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

    /// Rounds `len` f32 values of `src` to `dtype` (bf16 or f16) and packs them into `dst`, in
    /// chunks of whole words that fit one storage binding.
    pub(crate) fn encode_pack(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        dst: &Place,
        dtype: Dtype,
        len: usize,
    ) -> Result<()> {
        let words = len.div_ceil(2) as u64;
        // Window starts on multiples of 64 words: 256 bytes of dst, 512 of src.
        let chunk = (self.max_binding / 8) / 64 * 64;
        if chunk == 0 {
            return Err(Error::Limit(
                "the storage binding limit is too small to pack a half-precision gradient".into(),
            ));
        }
        let mut w0 = 0u64;
        while w0 < words {
            let count = chunk.min(words - w0);
            let elems = (len as u64 - 2 * w0).min(2 * count);
            let params = PackParams {
                words: count as u32,
                len: elems as u32,
                dtype: dtype.code(),
                pad0: 0,
            };
            self.dispatch(
                encoder,
                &PACK_HALF,
                WG,
                bytemuck::bytes_of(&params),
                &[
                    Some(Window::elems(src, 2 * w0, elems)),
                    Some(Window::elems(dst, w0, count)),
                ],
                count.div_ceil(WG as u64) as u32,
            )?;
            w0 += count;
        }
        Ok(())
    }

    /// The row-loss buffer: the caller's, or scratch.
    pub(crate) fn row_loss_buffer<B: RowBackend>(
        &self,
        out: &LossOut<'_, B>,
        rows: usize,
    ) -> Result<Place> {
        match out.row_loss {
            Some(r) => Ok(Place::of(r)),
            None => Ok(Place::of(&self.scratch("row_loss", rows as u64 * 4)?)),
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
                Some(Window::whole(loss, 4)),
            ],
            1,
        )
    }
}
