//! The fused Hinton loss `alpha CE + (1 - alpha) T^2 KL` (`docs/LOSSES.md` section 4). The math
//! and the gradients are in `reference.rs`.
//!
//! | piece | file |
//! | --- | --- |
//! | spec and validation | here |
//! | f64 reference | `reference.rs` |
//! | fast CPU (f32) | `fast.rs` |
//! | WGSL and its dispatch | `hinton.wgsl`, `wgpu.rs` |
//! | CUDA and its launch | `hinton.cu`, `cuda.rs` |

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod wgpu;

use super::{check_grad_scale, check_temperature, check_unit, Reduction, RowShape, IGNORE_INDEX};
use crate::error::Result;

/// The fused Hinton loss `alpha*CE + (1-alpha)*T^2*KL` (section 4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HintonSpec {
    pub shape: RowShape,
    pub temperature: f32,
    pub alpha: f32,
    pub label_smoothing: f32,
    pub reduction: Reduction,
    pub ignore_index: i32,
    pub grad_scale: f32,
}

impl HintonSpec {
    pub fn new(shape: RowShape, temperature: f32, alpha: f32) -> Self {
        HintonSpec {
            shape,
            temperature,
            alpha,
            label_smoothing: 0.0,
            reduction: Reduction::BatchMean,
            ignore_index: IGNORE_INDEX,
            grad_scale: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
        check_temperature(self.temperature)?;
        check_grad_scale(self.grad_scale)?;
        check_unit(
            "alpha",
            self.alpha,
            false,
            false,
            "alpha weighs hard-label CE against the soft-target KL and must be in [0, 1]",
        )?;
        check_unit(
            "label_smoothing",
            self.label_smoothing,
            false,
            true,
            "label smoothing must be in [0, 1) (0 disables it)",
        )
    }
}
