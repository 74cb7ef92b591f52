//! Dense-network ops for the autograd tape: matmul with optional transposes, bias add and its
//! gradient (column sums), ReLU, and `y += alpha x`. CPU references here (f64 accumulation);
//! WGSL in `dense.wgsl`.
//!
//! Matmul: `C[m, n] (+)= op(A)[m, k] op(B)[k, n]`, `op(A) = A` stored `[m, k]` or, transposed,
//! `A^T` with `A` stored `[k, m]`; likewise `B` stored `[k, n]` or `[n, k]`.
//!
//! | piece | file |
//! | --- | --- |
//! | specs and validation | here |
//! | f64 reference | `reference.rs` |
//! | WGSL and its dispatch | `dense.wgsl`, `wgpu.rs` |
//! | CUDA and its launch | `dense.cu`, `cuda.rs` |

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod wgpu;

use crate::error::{Error, Result};
use crate::ops::index_len;

/// Shape and layout of a matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulSpec {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// Add into C instead of overwriting it.
    pub accumulate: bool,
}

impl MatmulSpec {
    pub fn new(m: usize, k: usize, n: usize) -> Self {
        MatmulSpec {
            m,
            k,
            n,
            trans_a: false,
            trans_b: false,
            accumulate: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.m == 0 || self.k == 0 || self.n == 0 {
            return Err(Error::Unsupported(format!(
                "matmul [{}, {}] x [{}, {}]: every dimension must be at least 1",
                self.m, self.k, self.k, self.n
            )));
        }
        let within = |a: usize, b: usize| index_len(&[a, b]).is_some();
        if !(within(self.m, self.k) && within(self.k, self.n) && within(self.m, self.n)) {
            return Err(Error::Limit("matmul operand over 2^32 elements".into()));
        }
        Ok(())
    }
}

/// A strided copy of a `rows x cols` block between buffers of any dtypes:
/// `dst[dst_offset + r * dst_stride + c] = src[src_offset + r * src_stride + c]` for `r < rows`,
/// `c < cols`, the value converted exactly to f32 and rounded once (to nearest, ties to even) when
/// `dst` is bf16 or f16. Elements of `dst` outside the block are left as they are. A
/// `src_stride` of 0 repeats one source row in every destination row (a bias broadcast).
///
/// The fused linear losses (`src/ops/fused_linear/`) move row windows of the caller's hidden
/// states, teacher logits and gradients in and out of their f32 scratch with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopySpec {
    pub rows: usize,
    pub cols: usize,
    pub src_offset: usize,
    pub src_stride: usize,
    pub dst_offset: usize,
    pub dst_stride: usize,
}

/// `offset + (rows - 1) stride + cols`, saturating (0 rows: `offset + cols`).
fn end(offset: usize, rows: usize, stride: usize, cols: usize) -> usize {
    offset
        .saturating_add(rows.saturating_sub(1).saturating_mul(stride))
        .saturating_add(cols)
}

impl CopySpec {
    /// `len` contiguous elements from `src[src_offset..]` to `dst[dst_offset..]`.
    pub fn contiguous(len: usize, src_offset: usize, dst_offset: usize) -> Self {
        CopySpec {
            rows: 1,
            cols: len,
            src_offset,
            src_stride: len,
            dst_offset,
            dst_stride: len,
        }
    }

    /// One past the last source element read.
    /// (Saturating: a spec past `usize` gives `usize::MAX`, beyond any buffer.)
    pub fn src_end(&self) -> usize {
        end(self.src_offset, self.rows, self.src_stride, self.cols)
    }

    /// One past the last destination element written.
    pub fn dst_end(&self) -> usize {
        end(self.dst_offset, self.rows, self.dst_stride, self.cols)
    }

    pub fn validate(&self) -> Result<()> {
        if self.rows == 0 || self.cols == 0 {
            return Err(Error::Unsupported(format!(
                "copy of [{}, {}]: rows and columns must both be at least 1",
                self.rows, self.cols
            )));
        }
        if self.rows > 1 && self.dst_stride < self.cols {
            return Err(Error::Unsupported(format!(
                "copy: destination rows of {} elements {} apart overlap; dst_stride must be at \
                 least cols",
                self.cols, self.dst_stride
            )));
        }
        let end = |off: usize, stride: usize| {
            (self.rows - 1)
                .checked_mul(stride)
                .and_then(|v| v.checked_add(off))
                .and_then(|v| v.checked_add(self.cols))
        };
        match (
            end(self.src_offset, self.src_stride),
            end(self.dst_offset, self.dst_stride),
        ) {
            (Some(s), Some(d)) if s <= u32::MAX as usize && d <= u32::MAX as usize => Ok(()),
            _ => Err(Error::Limit(
                "copy: an index past 2^32 elements; split the copy".into(),
            )),
        }
    }
}
