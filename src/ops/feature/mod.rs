//! Feature losses (`docs/LOSSES.md` sections 5 and 6): feature-map MSE (FitNets), smooth L1 (RKD;
//! the same kernels as MSE in another mode) and attention transfer. The math and the gradients
//! are in `reference.rs`.
//!
//! | piece | file |
//! | --- | --- |
//! | specs and validation | here |
//! | f64 reference | `reference.rs` |
//! | fast CPU (f32) | `fast.rs` |
//! | WGSL and its dispatch | `mse.wgsl`, `attention.wgsl`, `wgpu.rs` |
//! | CUDA and its launch | `feature.cu`, `cuda.rs` |

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod wgpu;

use super::{check_grad_scale, index_len};
use crate::error::{Error, Result};

/// Feature-map MSE over `len` elements (section 5).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MseSpec {
    pub len: usize,
    pub grad_scale: f32,
}

impl MseSpec {
    pub fn new(len: usize) -> Self {
        MseSpec {
            len,
            grad_scale: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.len == 0 {
            return Err(Error::Empty(
                "MSE over 0 elements: pass at least one element".into(),
            ));
        }
        if self.len > u32::MAX as usize {
            return Err(Error::Limit("MSE over more than 2^32 elements".into()));
        }
        check_grad_scale(self.grad_scale)
    }
}

/// Attention transfer between `[n, student_channels, hw]` and `[n, teacher_channels, hw]` feature
/// maps (section 6; `hw = H*W`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSpec {
    pub n: usize,
    pub student_channels: usize,
    pub teacher_channels: usize,
    pub hw: usize,
    pub grad_scale: f32,
}

impl AttentionSpec {
    pub fn new(n: usize, student_channels: usize, teacher_channels: usize, hw: usize) -> Self {
        AttentionSpec {
            n,
            student_channels,
            teacher_channels,
            hw,
            grad_scale: 1.0,
        }
    }

    pub fn student_len(&self) -> usize {
        self.n * self.student_channels * self.hw
    }

    pub fn teacher_len(&self) -> usize {
        self.n * self.teacher_channels * self.hw
    }

    pub fn validate(&self) -> Result<()> {
        if self.n == 0 || self.student_channels == 0 || self.teacher_channels == 0 || self.hw == 0 {
            return Err(Error::Empty(format!(
                "attention transfer needs n, channels and H*W all >= 1, got n={}, student channels={}, \
                 teacher channels={}, H*W={}",
                self.n, self.student_channels, self.teacher_channels, self.hw
            )));
        }
        let within = |ch: usize| index_len(&[self.n, ch, self.hw]).is_some();
        if !within(self.student_channels) || !within(self.teacher_channels) {
            return Err(Error::Limit(
                "attention transfer over more than 2^32 elements".into(),
            ));
        }
        check_grad_scale(self.grad_scale)
    }
}
