//! Adam in f32, the same arithmetic as `optim.wgsl` (one loop, compiled for AVX-512 / AVX2 or
//! the baseline: the same bits for each), split with a helper thread for large parameters.

use super::{gemm, helper};
use crate::ops::optim::AdamSpec;

/// Elements per half below which an Adam step is not split across threads (about a
/// microsecond of work; a spinning helper takes a half in a fraction of that).
const ADAM_SPLIT_MIN: usize = 1 << 11;

/// [`adam`], its second half offered to a helper thread when one waits and the step is large
/// (element-wise: the same bits however it is split).
pub(super) fn adam_split(
    kernel: gemm::Kernel,
    spec: &AdamSpec,
    (w, g, m, v): (&mut [f32], &[f32], &mut [f32], &mut [f32]),
) {
    if w.len() < 2 * ADAM_SPLIT_MIN || !helper::available() {
        return adam(kernel, spec, w, g, m, v);
    }
    let mid = w.len() / 2;
    let (w0, w1) = w.split_at_mut(mid);
    let (g0, g1) = g.split_at(mid);
    let (m0, m1) = m.split_at_mut(mid);
    let (v0, v1) = v.split_at_mut(mid);
    helper::join(
        || adam(kernel, spec, w0, g0, m0, v0),
        || adam(kernel, spec, w1, g1, m1, v1),
    );
}

/// One Adam step in f32, the same arithmetic as `optim.wgsl` (`lr` carries
/// `1/(1 - b1^t)`). The wide forms are the same code compiled for AVX2 or AVX-512 (16 lanes: its
/// divide and square root took a fold of the default run from 2.77 s to 2.65 s): no fused
/// multiply-adds are formed (Rust does not contract `a * b + c`) and every operation is
/// element-wise IEEE, so all give the same bits.
fn adam(
    kernel: gemm::Kernel,
    spec: &AdamSpec,
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    #[inline(always)]
    fn body(spec: &AdamSpec, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (lr, inv_c2) = spec.corrections();
        let (b1, b2, eps, wd) = (spec.beta1, spec.beta2, spec.eps, spec.weight_decay);
        for (((wi, &gi), mi), vi) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let gi = gi + wd * *wi;
            *mi = b1 * *mi + (1.0 - b1) * gi;
            *vi = b2 * *vi + (1.0 - b2) * gi * gi;
            *wi -= lr * *mi / ((*vi * inv_c2).sqrt() + eps);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn wide(spec: &AdamSpec, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        body(spec, w, g, m, v)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn wider(spec: &AdamSpec, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        body(spec, w, g, m, v)
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        gemm::Kernel::Avx2Fma if std::arch::is_x86_feature_detected!("avx512f") => {
            // SAFETY: the CPU has AVX-512F (checked just above; the check is a cached load).
            unsafe { wider(spec, w, g, m, v) }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2Fma` is only chosen when the CPU has AVX2.
        gemm::Kernel::Avx2Fma => unsafe { wide(spec, w, g, m, v) },
        _ => body(spec, w, g, m, v),
    }
}
