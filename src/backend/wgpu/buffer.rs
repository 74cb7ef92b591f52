//! The backend's buffers: windows of a `wgpu::Buffer` (the backend's own from offset 0, or a
//! caller's wrapped without a copy, from any offset on the device's storage offset alignment,
//! e.g. a burn tensor's slice of a cubecl memory page).

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// `len` elements of `size` bytes, padded to a multiple of 4 bytes.
pub(crate) fn padded_bytes(len: usize, size: u64) -> u64 {
    (len as u64 * size).div_ceil(4) * 4
}

/// A wgpu storage buffer of `len` elements of its [`Dtype`] (the `len * size` bytes of `buffer`
/// from byte `offset`, padded to a multiple of 4: bf16 and f16 are packed two to a 32-bit word,
/// the element of even index in the low half).
#[derive(Clone, Debug)]
pub struct WgpuBuffer {
    pub(crate) buffer: wgpu::Buffer,
    /// The byte where element 0 is (0 for the backend's own buffers).
    pub(crate) offset: u64,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
}

/// A wgpu storage buffer of `len` i32 labels (from byte `offset`).
#[derive(Clone, Debug)]
pub struct WgpuLabels {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) offset: u64,
    pub(crate) len: usize,
}

/// A buffer and the byte its elements start at: what a binding window is cut from.
pub(crate) trait Base {
    fn base(&self) -> (&wgpu::Buffer, u64);
}

impl Base for wgpu::Buffer {
    fn base(&self) -> (&wgpu::Buffer, u64) {
        (self, 0)
    }
}

impl Base for WgpuBuffer {
    fn base(&self) -> (&wgpu::Buffer, u64) {
        (&self.buffer, self.offset)
    }
}

impl Base for WgpuLabels {
    fn base(&self) -> (&wgpu::Buffer, u64) {
        (&self.buffer, self.offset)
    }
}

/// An owned buffer and offset (a caller's window or a scratch buffer from 0).
#[derive(Clone, Debug)]
pub(crate) struct Place {
    pub buffer: wgpu::Buffer,
    pub offset: u64,
}

impl Place {
    pub(crate) fn of(b: &impl Base) -> Place {
        let (buffer, offset) = b.base();
        Place {
            buffer: buffer.clone(),
            offset,
        }
    }
}

impl Base for Place {
    fn base(&self) -> (&wgpu::Buffer, u64) {
        (&self.buffer, self.offset)
    }
}

fn check_caller_buffer(
    buffer: &wgpu::Buffer,
    offset: u64,
    len: usize,
    size: u64,
    what: &str,
) -> Result<()> {
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::Unsupported(format!(
            "{what}: the buffer needs BufferUsages::STORAGE (add COPY_SRC too to download it)"
        )));
    }
    if !offset.is_multiple_of(4) {
        return Err(Error::Unsupported(format!(
            "{what}: the offset {offset} is not a multiple of 4 bytes (bind a window that starts \
             on the device's min_storage_buffer_offset_alignment)"
        )));
    }
    if len == 0 || offset.saturating_add(padded_bytes(len, size)) > buffer.size() {
        return Err(Error::shape(
            "caller buffer",
            (buffer.size().saturating_sub(offset) / 4) as usize,
            len.max(1),
            format!(
                "{what}: a wgpu buffer of at least {len} {size}-byte elements after byte {offset}, \
                 padded to a multiple of 4 bytes (len >= 1)"
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
        Self::from_buffer_at(buffer, 0, len, dtype)
    }

    /// Wraps `len` elements of `dtype` of a caller's buffer (usage STORAGE) from byte `offset`,
    /// e.g. a tensor's slice of a framework's memory page. The kernels bind windows from that
    /// byte: [`crate::WgpuBackend::wrap_buffer`] also checks the offset against the device's
    /// `min_storage_buffer_offset_alignment`, which binding needs. Windows of one buffer may be
    /// the inputs and outputs of one row loss (its shaders bind every caller buffer read_write);
    /// other kernels bind their inputs read-only, and wgpu refuses one buffer bound read-only
    /// and read-write in one dispatch (an `Err`).
    pub fn from_buffer_at(
        buffer: wgpu::Buffer,
        offset: u64,
        len: usize,
        dtype: Dtype,
    ) -> Result<Self> {
        check_caller_buffer(&buffer, offset, len, dtype.size() as u64, "buffer")?;
        Ok(WgpuBuffer {
            buffer,
            offset,
            len,
            dtype,
        })
    }

    /// The byte of `buffer()` where element 0 is.
    pub fn offset(&self) -> u64 {
        self.offset
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

    /// Whether the byte ranges of two buffers intersect.
    pub(crate) fn overlaps(&self, other: &WgpuBuffer) -> bool {
        self.buffer == other.buffer
            && self.offset < other.offset + other.bytes()
            && other.offset < self.offset + self.bytes()
    }
}

impl WgpuLabels {
    /// Wraps a caller's buffer (usage STORAGE) holding at least `len` i32 labels.
    pub fn from_buffer(buffer: wgpu::Buffer, len: usize) -> Result<Self> {
        Self::from_buffer_at(buffer, 0, len)
    }

    /// Wraps `len` i32 labels of a caller's buffer (usage STORAGE) from byte `offset` (see
    /// [`WgpuBuffer::from_buffer_at`]).
    pub fn from_buffer_at(buffer: wgpu::Buffer, offset: u64, len: usize) -> Result<Self> {
        check_caller_buffer(&buffer, offset, len, 4, "label buffer")?;
        Ok(WgpuLabels {
            buffer,
            offset,
            len,
        })
    }

    /// The byte of `buffer()` where label 0 is.
    pub fn offset(&self) -> u64 {
        self.offset
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
