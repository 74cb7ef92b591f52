//! Device arrays: a device pointer and a length, owning their memory (a cudarc slice) or wrapping
//! a caller's.

use cudarc::driver::{CudaSlice, DevicePtr};

pub(crate) fn slice_ptr<T>(slice: &CudaSlice<T>) -> u64 {
    // The guard records a read event only for contexts tracking several streams; dropping it at
    // once is what we want (our own context tracks nothing).
    let (ptr, _guard) = slice.device_ptr(slice.stream());
    ptr
}

/// A device array of `f32`: a device pointer and a length, owning its memory or not.
pub struct CudaBuffer {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    owner: Option<CudaSlice<f32>>,
}

impl CudaBuffer {
    /// A buffer of no element (no device memory).
    pub(crate) fn empty() -> Self {
        CudaBuffer {
            ptr: 0,
            len: 0,
            owner: None,
        }
    }

    /// Wraps a cudarc slice (its memory is freed when the buffer is dropped).
    pub fn from_slice(slice: CudaSlice<f32>) -> Self {
        CudaBuffer {
            ptr: slice_ptr(&slice),
            len: slice.len(),
            owner: Some(slice),
        }
    }

    /// Wraps device memory the caller owns (another library's tensor); it is not freed here.
    ///
    /// # Safety
    /// `ptr` must point to at least `len` `f32` of device memory in the context of the backend the
    /// buffer is used with, alive and not written by others for as long as the buffer is used.
    pub unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        CudaBuffer {
            ptr,
            len,
            owner: None,
        }
    }

    /// The device address.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Number of `f32` elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cudarc slice, when the buffer owns one.
    pub fn as_slice(&self) -> Option<&CudaSlice<f32>> {
        self.owner.as_ref()
    }

    /// Gives the cudarc slice back, when the buffer owns one.
    pub fn into_slice(self) -> Option<CudaSlice<f32>> {
        self.owner
    }
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBuffer")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .field("owned", &self.owner.is_some())
            .finish()
    }
}

/// A device array of `i32` labels.
pub struct CudaLabels {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    owner: Option<CudaSlice<i32>>,
}

impl CudaLabels {
    /// No labels (no device memory).
    pub(crate) fn empty() -> Self {
        CudaLabels {
            ptr: 0,
            len: 0,
            owner: None,
        }
    }

    /// Wraps a cudarc slice of labels.
    pub fn from_slice(slice: CudaSlice<i32>) -> Self {
        CudaLabels {
            ptr: slice_ptr(&slice),
            len: slice.len(),
            owner: Some(slice),
        }
    }

    /// Wraps caller-owned device memory holding `len` `i32` labels.
    ///
    /// # Safety
    /// As [`CudaBuffer::from_raw`].
    pub unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        CudaLabels {
            ptr,
            len,
            owner: None,
        }
    }

    /// The device address.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there is no label.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for CudaLabels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaLabels")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .field("owned", &self.owner.is_some())
            .finish()
    }
}
