//! Optimizer updates, one kernel each on the GPU (`optim.wgsl`); CPU references here.
//!
//! - SGD with momentum (PyTorch's form): `v = mu v + (g + wd w)`, `w -= lr v`.
//! - Adam (Kingma and Ba): `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`,
//!   `w -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`, with L2 `g += wd w`.
//!
//! | piece | file |
//! | --- | --- |
//! | specs and validation | here |
//! | f64 reference | `reference.rs` |
//! | WGSL and its dispatch | `optim.wgsl`, `wgpu.rs` |
//! | CUDA and its launch | `optim.cu`, `cuda.rs` |

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod wgpu;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdSpec {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamSpec {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// The 1-based step number `t` (bias correction).
    pub step: u32,
}

impl AdamSpec {
    /// Adam with beta1 0.9, beta2 0.999, eps 1e-8.
    pub fn new(lr: f32) -> Self {
        AdamSpec {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
        }
    }

    pub fn validate(&self) -> Result<()> {
        check(
            "lr",
            self.lr,
            self.lr > 0.0,
            "the learning rate must be finite and > 0",
        )?;
        check(
            "beta1",
            self.beta1,
            (0.0..1.0).contains(&self.beta1),
            "beta1 must be in [0, 1)",
        )?;
        check(
            "beta2",
            self.beta2,
            (0.0..1.0).contains(&self.beta2),
            "beta2 must be in [0, 1)",
        )?;
        check("eps", self.eps, self.eps > 0.0, "eps must be > 0")?;
        check(
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0,
            "weight decay must be >= 0",
        )?;
        if self.step == 0 {
            return Err(Error::Param {
                name: "step",
                value: 0.0,
                hint: "Adam's step count starts at 1",
            });
        }
        Ok(())
    }

    /// `(lr / (1 - b1^t), 1 / (1 - b2^t))`, computed in f64 on the host.
    pub(crate) fn corrections(&self) -> (f32, f32) {
        // (an i32 exponent would wrap past 2^31 steps: powf there, powi below as before)
        let pow = |b: f64| match i32::try_from(self.step) {
            Ok(t) => b.powi(t),
            Err(_) => b.powf(self.step as f64),
        };
        let c1 = 1.0 - pow(self.beta1 as f64);
        let c2 = 1.0 - pow(self.beta2 as f64);
        ((self.lr as f64 / c1) as f32, (1.0 / c2) as f32)
    }
}

impl SgdSpec {
    pub fn validate(&self) -> Result<()> {
        check(
            "lr",
            self.lr,
            self.lr > 0.0,
            "the learning rate must be finite and > 0",
        )?;
        check(
            "momentum",
            self.momentum,
            (0.0..1.0).contains(&self.momentum),
            "momentum must be in [0, 1)",
        )?;
        check(
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0,
            "weight decay must be >= 0",
        )
    }
}

fn check(name: &'static str, v: f32, ok: bool, hint: &'static str) -> Result<()> {
    if v.is_finite() && ok {
        Ok(())
    } else {
        Err(Error::Param {
            name,
            value: v as f64,
            hint,
        })
    }
}
