//! The f64 CPU references of [`super`]'s ops, written to be read.

use super::{AdamSpec, SgdSpec};

/// One SGD step on `w` with velocity `v`.
pub fn sgd_step(spec: &SgdSpec, w: &mut [f64], g: &[f64], v: &mut [f64]) {
    for i in 0..w.len() {
        let gi = g[i] + spec.weight_decay as f64 * w[i];
        v[i] = spec.momentum as f64 * v[i] + gi;
        w[i] -= spec.lr as f64 * v[i];
    }
}

/// One Adam step on `w` with moments `m`, `v`.
pub fn adam_step(spec: &AdamSpec, w: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64]) {
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
