//! Convolution and pooling for the CNN path of the tape, channels-last (`[N, H, W, C]`). Conv2d is
//! im2col + matmul: `cols[(n, oy, ox), (ky, kx, c)] = x[n, oy*s - p + ky, ox*s - p + kx, c]` (0 out
//! of the image), then `cols @ W[(ky, kx, c), oc]` is the `[N, OH, OW, OC]` output directly.
//! col2im is its adjoint, written as a gather (each input element sums the columns that read it,
//! in a fixed order) so the GPU needs no atomics. Pooling windows are `k x k` with stride `k`.
//! `transpose` turns `[N, R, C]` into `[N, C, R]` (channels-last to `[N, C, H*W]` for attention
//! transfer). CPU references in `reference.rs`.
//!
//! | piece | file |
//! | --- | --- |
//! | specs and validation | here |
//! | f64 reference | `reference.rs` |
//! | WGSL and its dispatch | `conv.wgsl`, `wgpu.rs` |
//! | CUDA and its launch | `conv.cu`, `cuda.rs` |

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod wgpu;

use crate::error::{Error, Result};
use crate::ops::index_len;

/// A 2-D convolution's geometry (square kernel, same stride and padding on both axes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvSpec {
    pub fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.k) / self.stride + 1,
            (self.w + 2 * self.pad - self.k) / self.stride + 1,
        )
    }

    /// `[N * OH * OW, K * K * C]`.
    pub fn cols_shape(&self) -> (usize, usize) {
        let (oh, ow) = self.out_hw();
        (self.n * oh * ow, self.k * self.k * self.c)
    }

    pub fn input_len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }

    pub fn validate(&self) -> Result<()> {
        if self.n == 0
            || self.h == 0
            || self.w == 0
            || self.c == 0
            || self.k == 0
            || self.stride == 0
        {
            return Err(Error::Unsupported(format!(
                "convolution {self:?}: sizes, kernel and stride must be >= 1"
            )));
        }
        // Every size product checked before the unchecked accessors (out_hw, cols_shape,
        // input_len) are used.
        let limit = || Error::Limit(format!("convolution {self:?}: a size past 2^32 elements"));
        let padded = |x: usize| self.pad.checked_mul(2).and_then(|p| x.checked_add(p));
        let (hp, wp) = match (padded(self.h), padded(self.w)) {
            (Some(hp), Some(wp)) => (hp, wp),
            _ => return Err(limit()),
        };
        if index_len(&[self.n, self.h, self.w, self.c]).is_none() {
            return Err(limit());
        }
        if self.k > hp || self.k > wp {
            return Err(Error::Unsupported(format!(
                "a {k}x{k} kernel does not fit a {}x{} image padded by {}",
                self.h,
                self.w,
                self.pad,
                k = self.k
            )));
        }
        let (oh, ow) = self.out_hw();
        if index_len(&[self.n, oh, ow, self.k, self.k, self.c]).is_none() {
            return Err(Error::Limit(
                "im2col buffer over 2^32 elements: use a smaller batch".into(),
            ));
        }
        Ok(())
    }
}

/// `k x k` pooling with stride `k` over `[N, H, W, C]` (H and W multiples of k are not required:
/// the last partial window is dropped, as PyTorch's default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub k: usize,
    /// Max pooling, else average pooling.
    pub max: bool,
}

impl PoolSpec {
    pub fn out_hw(&self) -> (usize, usize) {
        (self.h / self.k, self.w / self.k)
    }

    pub fn input_len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }

    pub fn output_len(&self) -> usize {
        let (oh, ow) = self.out_hw();
        self.n * oh * ow * self.c
    }

    pub fn validate(&self) -> Result<()> {
        if self.n == 0 || self.c == 0 || self.k == 0 || self.h < self.k || self.w < self.k {
            return Err(Error::Unsupported(format!(
                "pooling {self:?}: needs a k x k window inside the image, k >= 1"
            )));
        }
        if index_len(&[self.n, self.h, self.w, self.c]).is_none() {
            return Err(Error::Limit(format!(
                "pooling {self:?}: the input passes 2^32 elements; use a smaller batch"
            )));
        }
        Ok(())
    }
}
