//! Device arrays: a device pointer and a length, owning their memory (a cudarc slice) or wrapping
//! a caller's.

use cudarc::driver::{CudaSlice, DevicePtr};

use crate::dtype::Dtype;
use crate::error::{Error, Result};

pub(crate) fn slice_ptr<T>(slice: &CudaSlice<T>) -> u64 {
    // The guard records a read event only for contexts tracking several streams; dropping it at
    // once is what we want (our own context tracks nothing).
    let (ptr, _guard) = slice.device_ptr(slice.stream());
    ptr
}

/// The device memory a buffer owns: f32 elements, or 16-bit ones (bf16, f16).
enum Owner {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>),
}

/// A device array of `f32`, `bf16` or `f16`: a device pointer, a length and a [`Dtype`], owning
/// its memory or not.
pub struct CudaBuffer {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
    owner: Option<Owner>,
}

impl CudaBuffer {
    /// A buffer of no element (no device memory).
    pub(crate) fn empty(dtype: Dtype) -> Self {
        CudaBuffer {
            ptr: 0,
            len: 0,
            dtype,
            owner: None,
        }
    }

    /// Wraps a cudarc slice (its memory is freed when the buffer is dropped).
    pub fn from_slice(slice: CudaSlice<f32>) -> Self {
        CudaBuffer {
            ptr: slice_ptr(&slice),
            len: slice.len(),
            dtype: Dtype::F32,
            owner: Some(Owner::F32(slice)),
        }
    }

    /// Wraps a cudarc slice of 16-bit elements holding `dtype` (bf16 or f16) values.
    pub fn from_half_slice(slice: CudaSlice<u16>, dtype: Dtype) -> Result<Self> {
        if dtype == Dtype::F32 {
            return Err(Error::Unsupported(
                "a u16 slice holds bf16 or f16 elements: use CudaBuffer::from_slice for f32".into(),
            ));
        }
        Ok(CudaBuffer {
            ptr: slice_ptr(&slice),
            len: slice.len(),
            dtype,
            owner: Some(Owner::Half(slice)),
        })
    }

    /// Wraps f32 device memory the caller owns (another library's tensor); it is not freed here.
    ///
    /// # Safety
    /// `ptr` must point to at least `len` `f32` of device memory in the context of the backend the
    /// buffer is used with, alive and not written by others for as long as the buffer is used.
    pub unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        // SAFETY: forwarded.
        unsafe { Self::from_raw_as(ptr, len, Dtype::F32) }
    }

    /// Wraps device memory the caller owns holding `len` elements of `dtype`.
    ///
    /// # Safety
    /// As [`CudaBuffer::from_raw`], for `len` elements of `dtype`.
    pub unsafe fn from_raw_as(ptr: u64, len: usize, dtype: Dtype) -> Self {
        CudaBuffer {
            ptr,
            len,
            dtype,
            owner: None,
        }
    }

    /// The device address.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Bytes the elements take.
    pub(crate) fn bytes(&self) -> u64 {
        (self.len * self.dtype.size()) as u64
    }

    /// The cudarc slice, when the buffer owns an f32 one.
    pub fn as_slice(&self) -> Option<&CudaSlice<f32>> {
        match &self.owner {
            Some(Owner::F32(s)) => Some(s),
            _ => None,
        }
    }

    /// The cudarc slice of 16-bit elements, when the buffer owns a bf16 or f16 one.
    pub fn as_half_slice(&self) -> Option<&CudaSlice<u16>> {
        match &self.owner {
            Some(Owner::Half(s)) => Some(s),
            _ => None,
        }
    }

    /// Gives the cudarc slice back, when the buffer owns an f32 one.
    pub fn into_slice(self) -> Option<CudaSlice<f32>> {
        match self.owner {
            Some(Owner::F32(s)) => Some(s),
            _ => None,
        }
    }
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBuffer")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .field("dtype", &self.dtype)
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
