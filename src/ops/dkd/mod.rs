//! Decoupled knowledge distillation, DKD (Zhao et al., CVPR 2022; `docs/LOSSES.md` section 8), as
//! one fused row loss.
//!
//! Per valid row, with student logits `s`, teacher logits `t`, the label `g`,
//! `p = softmax(s / T)`, `q = softmax(t / T)`, and over the non-target classes `j != g` the
//! renormalised `p^_j = p_j / (1 - p_g)` (`q^` likewise):
//! - `TCKD_r = q_g log(q_g / p_g) + (1 - q_g) log((1 - q_g) / (1 - p_g))` (target vs the rest);
//! - `NCKD_r = sum_{j != g} q^_j log(q^_j / p^_j)`;
//! - `CE_r` the cross-entropy at T = 1 with optional label smoothing (section 3);
//! - `L_r = w_ce CE_r + T^2 (w_tc TCKD_r + w_nc NCKD_r)`, reduced over the valid rows like the
//!   other row losses (batchmean, sum, none).
//!
//! The gradients (`k` = `grad_scale` times the reduction's factor):
//! `dL/ds_g = k [w_ce (p^1_g - target_g) + w_tc T (p_g - q_g)]` and, for `j != g`,
//! `dL/ds_j = k [w_ce (p^1_j - target_j) + T (w_nc (p^_j - q^_j) - w_tc (p_g - q_g) p^_j)]`.
//! The teacher is detached: DKD has no teacher gradient (asking for one is an error).
//!
//! DKD's own hyper-parameters map onto the weights as `w_tc = alpha * warmup`,
//! `w_nc = beta * warmup` (the paper's defaults alpha 1, beta 8, T 4, and a linear warm-up of the
//! two KD terms over 20 epochs, `warmup = min(epoch / 20, 1)`, which the caller computes:
//! `experiment::methods::dkd`).
//!
//! | piece | file |
//! | --- | --- |
//! | spec and validation | here |
//! | f64 reference | `reference.rs` |
//! | fast CPU (f32) | `backend/cpu_fast/row_losses/dkd.rs` |
//! | WGSL and its dispatch | `dkd.wgsl`, `wgpu.rs` |
//! | CUDA and its launch | `dkd.cu`, `cuda.rs` |
//!
//! Numerics (every backend): the non-target mass `1 - p_g` comes from the non-target classes'
//! own statistics (their max and sum), never as `1 - p_g`, so a confident student keeps it; the
//! binary distributions are `sigmoid(-+D)` of `D = log(Z_rest) - x_g` and their log-ratios come
//! from `e = D_s - D_t` (the rest's `log(Zs / Zt)` from a `dz` summed through `expm1`, the
//! target's logit difference taken before dividing by T), so that at high T both divergences
//! are sums of non-negative second-order terms `q phi(u)` (section 2's forms).

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod wgpu;

use super::{check_grad_scale, check_temperature, check_unit, Reduction, RowShape, IGNORE_INDEX};
use crate::error::{Error, Result};

/// The paper's defaults: `alpha` (the TCKD weight), `beta` (the NCKD weight), the temperature and
/// the warm-up of the two KD terms in epochs.
pub const DEFAULT_ALPHA: f32 = 1.0;
/// See [`DEFAULT_ALPHA`].
pub const DEFAULT_BETA: f32 = 8.0;
/// See [`DEFAULT_ALPHA`].
pub const DEFAULT_TEMPERATURE: f32 = 4.0;
/// See [`DEFAULT_ALPHA`].
pub const DEFAULT_WARMUP_EPOCHS: usize = 20;

/// Decoupled knowledge distillation `w_ce CE + T^2 (w_tc TCKD + w_nc NCKD)` (section 8).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DkdSpec {
    pub shape: RowShape,
    pub temperature: f32,
    /// The weight of the hard-label cross-entropy (1 in the paper).
    pub ce_weight: f32,
    /// The weight of TCKD: the paper's `alpha` times the warm-up factor.
    pub tckd_weight: f32,
    /// The weight of NCKD: the paper's `beta` times the warm-up factor.
    pub nckd_weight: f32,
    /// Label smoothing of the cross-entropy term (section 3); the KD terms use the label as is.
    pub label_smoothing: f32,
    pub reduction: Reduction,
    pub ignore_index: i32,
    pub grad_scale: f32,
}

impl DkdSpec {
    /// DKD with `ce_weight` 1, no label smoothing, batchmean, `ignore_index` -100.
    pub fn new(shape: RowShape, temperature: f32, tckd_weight: f32, nckd_weight: f32) -> Self {
        DkdSpec {
            shape,
            temperature,
            ce_weight: 1.0,
            tckd_weight,
            nckd_weight,
            label_smoothing: 0.0,
            reduction: Reduction::BatchMean,
            ignore_index: IGNORE_INDEX,
            grad_scale: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
        if self.shape.cols < 2 {
            return Err(Error::Param {
                name: "classes",
                value: self.shape.cols as f64,
                hint: "DKD splits the classes into the target and the non-target ones, so it \
                       needs at least 2 classes (with 1 class both KD terms are undefined)",
            });
        }
        check_temperature(self.temperature)?;
        check_grad_scale(self.grad_scale)?;
        for (name, w) in [
            ("ce_weight", self.ce_weight),
            ("tckd_weight", self.tckd_weight),
            ("nckd_weight", self.nckd_weight),
        ] {
            check_weight(name, w)?;
        }
        check_unit(
            "label_smoothing",
            self.label_smoothing,
            false,
            true,
            "label smoothing must be in [0, 1) (0 disables it)",
        )
    }
}

/// The largest DKD weight accepted.
pub(crate) const MAX_WEIGHT: f32 = 1e6;

pub(crate) fn check_weight(name: &'static str, w: f32) -> Result<()> {
    // The bound keeps `w T^2` (T <= 1e4) finite in f32 on every backend: an overflow to `inf`
    // would turn a zero KL term into NaN on the f32 kernels but not in the f64 reference.
    if !(w.is_finite() && (0.0..=MAX_WEIGHT).contains(&w)) {
        return Err(Error::Param {
            name,
            value: w as f64,
            hint: "DKD's weights must be in [0, 1e6] (the paper: ce 1, tckd alpha = 1, \
                   nckd beta = 8, each KD weight times the warm-up factor; 0 drops a term; \
                   scale the whole loss with grad_scale instead)",
        });
    }
    Ok(())
}
