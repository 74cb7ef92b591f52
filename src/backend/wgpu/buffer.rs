//! The backend's buffers: windows from offset 0 of a `wgpu::Buffer` (the backend's own, or a
//! caller's wrapped without a copy).

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// `len` elements of `size` bytes, padded to a multiple of 4 bytes.
pub(crate) fn padded_bytes(len: usize, size: u64) -> u64 {
    (len as u64 * size).div_ceil(4) * 4
}

/// A wgpu storage buffer of `len` elements of its [`Dtype`] (the first `len * size` bytes of
/// `buffer`, padded to a multiple of 4: bf16 and f16 are packed two to a 32-bit word, the
/// element of even index in the low half).
#[derive(Clone, Debug)]
pub struct WgpuBuffer {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
}

/// A wgpu storage buffer of `len` i32 labels.
#[derive(Clone, Debug)]
pub struct WgpuLabels {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) len: usize,
}

fn check_caller_buffer(buffer: &wgpu::Buffer, len: usize, size: u64, what: &str) -> Result<()> {
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::Unsupported(format!(
            "{what}: the buffer needs BufferUsages::STORAGE (add COPY_SRC too to download it)"
        )));
    }
    if len == 0 || padded_bytes(len, size) > buffer.size() {
        return Err(Error::shape(
            "caller buffer",
            (buffer.size() / 4) as usize,
            len.max(1),
            format!(
                "{what}: a wgpu buffer of at least {len} {size}-byte elements, padded to a \
                 multiple of 4 bytes (len >= 1)"
            ),
        ));
    }
    Ok(())
}

impl WgpuBuffer {
    /// Wraps a caller's buffer (usage STORAGE) holding at least `len` f32 values.
    pub fn from_buffer(buffer: wgpu::Buffer, len: usize) -> Result<Self> {
        Self::from_buffer_as(buffer, len, Dtype::F32)
    }

    /// Wraps a caller's buffer (usage STORAGE) holding at least `len` elements of `dtype` (bf16
    /// and f16 packed two to a 32-bit word, even index low; the size padded to 4 bytes).
    pub fn from_buffer_as(buffer: wgpu::Buffer, len: usize, dtype: Dtype) -> Result<Self> {
        check_caller_buffer(&buffer, len, dtype.size() as u64, "buffer")?;
        Ok(WgpuBuffer { buffer, len, dtype })
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes the elements take, padded to a multiple of 4.
    pub(crate) fn bytes(&self) -> u64 {
        padded_bytes(self.len, self.dtype.size() as u64)
    }
}

impl WgpuLabels {
    /// Wraps a caller's buffer (usage STORAGE) holding at least `len` i32 labels.
    pub fn from_buffer(buffer: wgpu::Buffer, len: usize) -> Result<Self> {
        check_caller_buffer(&buffer, len, 4, "label buffer")?;
        Ok(WgpuLabels { buffer, len })
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
