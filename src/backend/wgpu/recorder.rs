//! [`Recorder`]: the wgpu backend's kernels recorded into a caller's `wgpu::CommandEncoder`.
//!
//! ```ignore
//! let mut encoder = backend.device().create_command_encoder(&Default::default());
//! backend.recorder(&mut encoder).hinton(&spec, &student, &teacher, &labels, out)?;
//! // ... the trainer's own passes ...
//! backend.queue().submit([encoder.finish()]);
//! ```
//!
//! A `Recorder` implements [`Backend`] with the same buffers ([`WgpuBuffer`], including the
//! caller's own through `WgpuBuffer::from_buffer`), so every kernel is recordable with the trait's
//! validation (specs, lengths, aliasing) and nothing is submitted or read back. Data movement that
//! needs a submit is the backend's: `upload` writes through the queue (visible to the recorded
//! commands when the caller submits), `download` is an error (submit the encoder, then download
//! with [`WgpuBackend`]). Two windows of one `wgpu::Buffer` cannot be buffers of one recorded
//! kernel (`Error::Alias`): wgpu would report a read-only / read-write conflict only at the
//! caller's `finish()`.

use std::cell::RefCell;

use super::{WgpuBackend, WgpuBuffer, WgpuLabels};
use crate::backend::{Backend, LossOut};
use crate::dtype::{Dtype, HostSlice, HostVec};
use crate::error::{Error, Result};
use crate::ops::conv::{ConvSpec, PoolSpec};
use crate::ops::dense::{CopySpec, MatmulSpec};
use crate::ops::optim::{AdamSpec, SgdSpec};
use crate::ops::{
    AttentionSpec, CrossEntropySpec, DivergenceSpec, DkdSpec, HintonSpec, MseSpec, SoftmaxSpec,
    SparseSpec,
};

/// Records kernels into a caller's command encoder (see the module documentation).
pub struct Recorder<'a> {
    backend: &'a WgpuBackend,
    encoder: RefCell<&'a mut wgpu::CommandEncoder>,
}

impl<'a> Recorder<'a> {
    pub(super) fn new(backend: &'a WgpuBackend, encoder: &'a mut wgpu::CommandEncoder) -> Self {
        Recorder {
            backend,
            encoder: RefCell::new(encoder),
        }
    }

    /// The backend whose device the commands are for.
    pub fn backend(&self) -> &'a WgpuBackend {
        self.backend
    }

    /// Records `f` into the caller's encoder, with the device's validation errors returned.
    fn run_kernel(
        &self,
        f: impl FnOnce(&WgpuBackend, &mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<()> {
        let mut encoder = self.encoder.try_borrow_mut().map_err(|_| {
            Error::Unsupported("a Recorder records one kernel at a time (re-entrant call)".into())
        })?;
        self.backend
            .with_error_scope(|| f(self.backend, &mut encoder))
    }
}

impl Backend for Recorder<'_> {
    type Buffer = WgpuBuffer;
    type Labels = WgpuLabels;

    fn name(&self) -> String {
        format!("{} (recording)", self.backend.name())
    }

    fn upload_host(&self, data: HostSlice<'_>) -> Result<WgpuBuffer> {
        self.backend.upload_host(data)
    }

    fn dtype(&self, buf: &WgpuBuffer) -> Dtype {
        buf.dtype()
    }

    fn upload_labels(&self, labels: &[i32]) -> Result<WgpuLabels> {
        self.backend.upload_labels(labels)
    }

    fn download_host(&self, _buf: &WgpuBuffer) -> Result<HostVec> {
        Err(Error::Unsupported(
            "a Recorder only records: finish and submit the encoder, then download with the \
             WgpuBackend"
                .into(),
        ))
    }

    fn len(&self, buf: &WgpuBuffer) -> usize {
        buf.len()
    }

    fn synchronize(&self) -> Result<()> {
        self.backend.wait()
    }

    fn overlaps(&self, a: &WgpuBuffer, b: &WgpuBuffer) -> bool {
        // Stricter than the backend's byte ranges: two windows of one wgpu::Buffer, one bound
        // read-only and one read-write, are a usage conflict that wgpu reports only at the
        // caller's `encoder.finish()` (a panic, or a silently invalid encoder), after this
        // call's error scope. A recorded kernel refuses them here instead.
        a.buffer == b.buffer
    }

    fn labels_overlap(&self, labels: &WgpuLabels, buf: &WgpuBuffer) -> bool {
        self.backend.labels_overlap(labels, buf)
    }

    fn labels_len(&self, labels: &WgpuLabels) -> usize {
        labels.len()
    }

    fn check_labels(&self, labels: &WgpuLabels, classes: usize, ignore_index: i32) -> Result<()> {
        self.backend.check_labels(labels, classes, ignore_index)
    }

    kernels!();
}
