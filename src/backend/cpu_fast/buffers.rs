//! Borrowing the fast CPU backend's buffers (an output that is also an input of the same call is
//! an [`Error::Alias`]), and the dtype dispatch of its matmul and strided copy.

use std::cell::{Ref, RefMut};

use super::gemm;
use crate::backend::cpu::CpuBuffer;
use crate::dtype::{Dtype, Element, HostVec};
use crate::error::{Error, Result};
use crate::ops::dense::{CopySpec, MatmulSpec};

/// A buffer of any dtype, borrowed to read.
pub(super) fn read_any<'a>(buf: &'a CpuBuffer, what: &str) -> Result<Ref<'a, HostVec>> {
    buf.0
        .try_borrow()
        .map_err(|_| Error::Alias(format!("{what} is also an output of this call")))
}

/// A buffer of any dtype, borrowed to write.
pub(super) fn write_any<'a>(buf: &'a CpuBuffer, what: &str) -> Result<RefMut<'a, HostVec>> {
    buf.0.try_borrow_mut().map_err(|_| {
        Error::Alias(format!(
            "{what} is also an input of this call: pass a separate output buffer"
        ))
    })
}

pub(super) fn not_f32(what: &str, dtype: Dtype) -> Error {
    Error::Unsupported(format!(
        "{what} is {dtype}: this op takes f32 buffers (half precision is for the row losses)"
    ))
}

/// An f32 buffer, borrowed to read.
pub(super) fn read<'a>(buf: &'a CpuBuffer, what: &str) -> Result<Ref<'a, [f32]>> {
    Ref::filter_map(read_any(buf, what)?, |v| v.as_f32()).map_err(|v| not_f32(what, v.dtype()))
}

/// An f32 buffer, borrowed to write.
pub(super) fn write<'a>(buf: &'a CpuBuffer, what: &str) -> Result<RefMut<'a, Vec<f32>>> {
    RefMut::filter_map(write_any(buf, what)?, |v| v.as_f32_mut())
        .map_err(|v| not_f32(what, v.dtype()))
}

/// [`gemm::sgemm`] with `b` of any dtype.
pub(super) fn gemm_b<A: Element>(
    kernel: gemm::Kernel,
    spec: &MatmulSpec,
    a: &[A],
    b: &HostVec,
    c: &mut [f32],
) {
    match b {
        HostVec::F32(b) => gemm::sgemm(kernel, spec, a, b, c),
        HostVec::Bf16(b) => gemm::sgemm(kernel, spec, a, b, c),
        HostVec::F16(b) => gemm::sgemm(kernel, spec, a, b, c),
    }
}

/// [`Backend::copy_rows`] into `dst` of type `D` from a source of any dtype.
pub(super) fn copy_from<D: Element>(spec: &CopySpec, src: &HostVec, dst: &mut [D]) {
    fn rows<S: Element, D: Element>(spec: &CopySpec, src: &[S], dst: &mut [D]) {
        for r in 0..spec.rows {
            let s = &src[spec.src_offset + r * spec.src_stride..][..spec.cols];
            let d = &mut dst[spec.dst_offset + r * spec.dst_stride..][..spec.cols];
            for (o, &v) in d.iter_mut().zip(s) {
                *o = D::from_f32(v.to_f32());
            }
        }
    }
    match src {
        HostVec::F32(s) => rows(spec, s, dst),
        HostVec::Bf16(s) => rows(spec, s, dst),
        HostVec::F16(s) => rows(spec, s, dst),
    }
}
