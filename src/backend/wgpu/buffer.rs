//! The backend's buffers: windows from offset 0 of a `wgpu::Buffer` (the backend's own, or a
//! caller's wrapped without a copy).

use crate::error::{Error, Result};

/// A wgpu storage buffer of `len` f32 values (the first `len * 4` bytes of `buffer`).
#[derive(Clone, Debug)]
pub struct WgpuBuffer {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) len: usize,
}

/// A wgpu storage buffer of `len` i32 labels.
#[derive(Clone, Debug)]
pub struct WgpuLabels {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) len: usize,
}

fn check_caller_buffer(buffer: &wgpu::Buffer, len: usize, what: &str) -> Result<()> {
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::Unsupported(format!(
            "{what}: the buffer needs BufferUsages::STORAGE (add COPY_SRC too to download it)"
        )));
    }
    if len == 0 || (len as u64) * 4 > buffer.size() {
        return Err(Error::shape(
            "caller buffer",
            (buffer.size() / 4) as usize,
            len.max(1),
            format!("{what}: a wgpu buffer of at least {len} 4-byte elements (len >= 1)"),
        ));
    }
    Ok(())
}

impl WgpuBuffer {
    /// Wraps a caller's buffer (usage STORAGE) holding at least `len` f32 values.
    pub fn from_buffer(buffer: wgpu::Buffer, len: usize) -> Result<Self> {
        check_caller_buffer(&buffer, len, "f32 buffer")?;
        Ok(WgpuBuffer { buffer, len })
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

    pub(crate) fn bytes(&self) -> u64 {
        self.len as u64 * 4
    }
}

impl WgpuLabels {
    /// Wraps a caller's buffer (usage STORAGE) holding at least `len` i32 labels.
    pub fn from_buffer(buffer: wgpu::Buffer, len: usize) -> Result<Self> {
        check_caller_buffer(&buffer, len, "label buffer")?;
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
