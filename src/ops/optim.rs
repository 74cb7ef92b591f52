//! Optimizer updates, one kernel each on the GPU (`shaders/optim.wgsl`); CPU references here.
//!
//! - SGD with momentum (PyTorch's form): `v = mu v + (g + wd w)`, `w -= lr v`.
//! - Adam (Kingma and Ba): `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`,
//!   `w -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`, with L2 `g += wd w`.

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
        let t = self.step as i32;
        let c1 = 1.0 - (self.beta1 as f64).powi(t);
        let c2 = 1.0 - (self.beta2 as f64).powi(t);
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

/// One SGD step on `w` with velocity `v`.
pub fn sgd_reference(spec: &SgdSpec, w: &mut [f64], g: &[f64], v: &mut [f64]) {
    for i in 0..w.len() {
        let gi = g[i] + spec.weight_decay as f64 * w[i];
        v[i] = spec.momentum as f64 * v[i] + gi;
        w[i] -= spec.lr as f64 * v[i];
    }
}

/// One Adam step on `w` with moments `m`, `v`.
pub fn adam_reference(spec: &AdamSpec, w: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64]) {
    let (b1, b2) = (spec.beta1 as f64, spec.beta2 as f64);
    let t = spec.step as i32;
    let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
    for i in 0..w.len() {
        let gi = g[i] + spec.weight_decay as f64 * w[i];
        m[i] = b1 * m[i] + (1.0 - b1) * gi;
        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
        w[i] -= spec.lr as f64 * (m[i] / c1) / ((v[i] / c2).sqrt() + spec.eps as f64);
    }
}
