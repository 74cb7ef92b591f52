//! Temperature softmax and log-softmax over rows (`docs/LOSSES.md` section 1).
//!
//! - forward: `y = softmax(x/T)`, backward `dx_j = (1/T) y_j (dy_j - sum_k dy_k y_k)`;
//! - forward: `y = log_softmax(x/T)`, backward `dx_j = (1/T) (dy_j - softmax(x/T)_j sum_k dy_k)`.
//!
//! | piece | file |
//! | --- | --- |
//! | spec and validation | here |
//! | f64 reference | `reference.rs` |
//! | fast CPU (f32) | `fast.rs` |
//! | WGSL and its dispatch | `softmax.wgsl`, `wgpu.rs` |
//! | CUDA and its launch | `softmax.cu`, `cuda.rs` |

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod wgpu;

use super::{check_temperature, RowShape};
use crate::error::Result;

/// Temperature softmax or log-softmax over rows (section 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftmaxSpec {
    pub shape: RowShape,
    pub temperature: f32,
    /// `log_softmax` instead of `softmax`.
    pub log: bool,
}

impl SoftmaxSpec {
    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
        check_temperature(self.temperature)
    }
}
