//! Cross-entropy with hard labels, label smoothing and `ignore_index` (`docs/LOSSES.md`
//! section 3). The math and the gradient are in `reference.rs`.
//!
//! | piece | file |
//! | --- | --- |
//! | spec and validation | here |
//! | f64 reference | `reference.rs` |
//! | fast CPU (f32) | `fast.rs` |
//! | WGSL and its dispatch | `cross_entropy.wgsl`, `wgpu.rs` |
//! | CUDA and its launch | `cross_entropy.cu`, `cuda.rs` |

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod wgpu;

use super::{check_grad_scale, check_unit, Reduction, RowShape, IGNORE_INDEX};
use crate::error::Result;

/// Cross-entropy with hard labels (section 3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropySpec {
    pub shape: RowShape,
    pub label_smoothing: f32,
    pub reduction: Reduction,
    pub ignore_index: i32,
    pub grad_scale: f32,
}

impl CrossEntropySpec {
    pub fn new(shape: RowShape) -> Self {
        CrossEntropySpec {
            shape,
            label_smoothing: 0.0,
            reduction: Reduction::BatchMean,
            ignore_index: IGNORE_INDEX,
            grad_scale: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
        check_grad_scale(self.grad_scale)?;
        check_unit(
            "label_smoothing",
            self.label_smoothing,
            false,
            true,
            "label smoothing must be in [0, 1) (0 disables it; 0.1 is common)",
        )
    }
}
