//! Feature-based losses: FitNets MSE (`docs/LOSSES.md` section 5) and attention transfer
//! (section 6).
//!
//! - MSE: `L = (1/M) sum_i (a_i - b_i)^2`, `dL/da = 2 (a - b)/M`, `dL/db = -dL/da`.
//! - Attention transfer, per sample n: `Q = mean_c A[n,c,:]^2`, `r = max(||Q||_2, 1e-12)`,
//!   `u = Q/r`; `L = mean over N*HW of (u_s - u_t)^2`. Backward: `dL/du_s = 2(u_s - u_t)/(N HW)`;
//!   through the normalisation `dL/dQ = (dL/du - u (u . dL/du))/r` when `||Q|| > 1e-12`
//!   (else `dL/du / 1e-12`); then `dL/dA[n,c,i] = dL/dQ_i * 2 A[n,c,i] / C`.

use super::{AttentionSpec, MseSpec};

/// MSE reference: `(loss, dL/da, dL/db)`, gradients times `grad_scale`.
pub fn mse(spec: &MseSpec, a: &[f64], b: &[f64]) -> (f64, Vec<f64>, Vec<f64>) {
    let m = a.len() as f64;
    let loss = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>() / m;
    let k = spec.grad_scale as f64 * 2.0 / m;
    let ga: Vec<f64> = a.iter().zip(b).map(|(x, y)| k * (x - y)).collect();
    let gb = ga.iter().map(|g| -g).collect();
    (loss, ga, gb)
}

/// The attention-map norm floor of `F.normalize`.
pub const AT_EPS: f64 = 1e-12;

/// `u = normalize(mean_c A^2)` of one sample `[channels, hw]`, with its norm.
fn attention_map(a: &[f64], channels: usize, hw: usize) -> (Vec<f64>, f64) {
    let q: Vec<f64> = (0..hw)
        .map(|i| (0..channels).map(|c| a[c * hw + i].powi(2)).sum::<f64>() / channels as f64)
        .collect();
    let norm = q.iter().map(|v| v * v).sum::<f64>().sqrt().max(AT_EPS);
    (q.iter().map(|v| v / norm).collect(), norm)
}

/// Backpropagates `dL/du` through `u = normalize(mean_c A^2)` into `dL/dA` for one sample.
fn attention_backward(
    a: &[f64],
    u: &[f64],
    norm: f64,
    du: &[f64],
    channels: usize,
    out: &mut [f64],
) {
    let hw = u.len();
    let dq: Vec<f64> = if norm > AT_EPS {
        let dot: f64 = u.iter().zip(du).map(|(x, y)| x * y).sum();
        du.iter()
            .zip(u)
            .map(|(d, x)| (d - x * dot) / norm)
            .collect()
    } else {
        du.iter().map(|d| d / norm).collect()
    };
    for c in 0..channels {
        for i in 0..hw {
            out[c * hw + i] = dq[i] * 2.0 * a[c * hw + i] / channels as f64;
        }
    }
}

/// Attention-transfer reference: `(loss, dL/dstudent, dL/dteacher)`, gradients times `grad_scale`.
pub fn attention_transfer(spec: &AttentionSpec, s: &[f64], t: &[f64]) -> (f64, Vec<f64>, Vec<f64>) {
    let (n, hw, cs, ct) = (
        spec.n,
        spec.hw,
        spec.student_channels,
        spec.teacher_channels,
    );
    let denom = (n * hw) as f64;
    let mut loss = 0.0;
    let mut gs = vec![0.0; s.len()];
    let mut gt = vec![0.0; t.len()];
    for k in 0..n {
        let sa = &s[k * cs * hw..(k + 1) * cs * hw];
        let ta = &t[k * ct * hw..(k + 1) * ct * hw];
        let (us, ns) = attention_map(sa, cs, hw);
        let (ut, nt) = attention_map(ta, ct, hw);
        loss += us
            .iter()
            .zip(&ut)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>();
        let du: Vec<f64> = us
            .iter()
            .zip(&ut)
            .map(|(x, y)| spec.grad_scale as f64 * 2.0 * (x - y) / denom)
            .collect();
        let dut: Vec<f64> = du.iter().map(|d| -d).collect();
        attention_backward(
            sa,
            &us,
            ns,
            &du,
            cs,
            &mut gs[k * cs * hw..(k + 1) * cs * hw],
        );
        attention_backward(
            ta,
            &ut,
            nt,
            &dut,
            ct,
            &mut gt[k * ct * hw..(k + 1) * ct * hw],
        );
    }
    (loss / denom, gs, gt)
}

/// Smooth L1 (Huber, delta 1), mean over `M` elements: `(loss, dL/da, dL/db)` times `grad_scale`.
pub fn smooth_l1(a: &[f64], b: &[f64], grad_scale: f64) -> (f64, Vec<f64>, Vec<f64>) {
    let m = a.len() as f64;
    let loss = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d < 1.0 {
                0.5 * d * d
            } else {
                d - 0.5
            }
        })
        .sum::<f64>()
        / m;
    let ga: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| grad_scale * (x - y).clamp(-1.0, 1.0) / m)
        .collect();
    let gb = ga.iter().map(|g| -g).collect();
    (loss, ga, gb)
}
