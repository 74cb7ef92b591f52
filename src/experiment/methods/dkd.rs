//! Decoupled knowledge distillation, DKD (Zhao et al., CVPR 2022): KD split at the target class
//! into TCKD (the binary target-vs-rest KL) and NCKD (the KL among the other classes,
//! renormalised), weighed apart: `CE + warmup(epoch) (alpha TCKD + beta NCKD)` at temperature T
//! (`docs/LOSSES.md` section 8; one fused kernel computes all three terms and their gradient).
//!
//! In this pipeline (`--method dkd`):
//! - the hyper-parameters are `--dkd-alpha` (1), `--dkd-beta` (8), `--dkd-warmup` (20 epochs)
//!   and the run's `--temperature` (4: the paper's defaults); the warm-up factor is
//!   `min((epoch + 1) / warmup, 1)` (mdistiller's `min(epoch / warmup, 1)` with epochs from 1),
//!   1 throughout with `--dkd-warmup 0`;
//! - the cross-entropy weight is DKD's 1: the loop's `alpha CE` on the labelled rows plus the
//!   fused kernel's `(1 - alpha) CE` on the same rows;
//! - each batch holds labelled rows and as many unlabelled ones (the student's soft targets
//!   cover both, as for KD). DKD needs a target class per row: the label where there is one,
//!   the teacher's top class elsewhere (KD's decomposition `KD = TCKD + (1 - p_g) NCKD` holds
//!   for any class g). So one fused call runs on the labelled rows (CE, TCKD, NCKD; the
//!   unlabelled masked) and one on the unlabelled rows (TCKD and NCKD against the teacher's
//!   top class; no cross-entropy on those), each row once, the KD terms weighted as a mean
//!   over all the batch's rows like KD's.

use super::{Distill, Step, Term};
use crate::backend::Backend;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::experiment::Config;
use crate::ops::{DkdSpec, TeacherInput, IGNORE_INDEX};
use crate::tape::Tensor;

pub struct Dkd;

/// The warm-up factor of the KD terms at `epoch` (from 0).
pub(crate) fn warmup(epoch: usize, warmup_epochs: usize) -> f32 {
    if warmup_epochs == 0 {
        return 1.0;
    }
    ((epoch + 1) as f32 / warmup_epochs as f32).min(1.0)
}

impl Distill for Dkd {
    type Modules<B: Backend> = ();

    fn name(&self) -> &'static str {
        "dkd"
    }

    fn about(&self) -> &'static str {
        "Decoupled KD (Zhao et al. 2022): CE + warm-up * (alpha TCKD + beta NCKD), the target \
         class's and the other classes' parts of KD weighed apart"
    }

    fn validate(&self, cfg: &Config, _: &Dataset) -> Result<()> {
        for (flag, v) in [("--dkd-alpha", cfg.dkd_alpha), ("--dkd-beta", cfg.dkd_beta)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::Config(format!(
                    "{flag} {v}: DKD's weights (--dkd-alpha of TCKD, --dkd-beta of NCKD) must be \
                     finite and >= 0 (the paper's are 1 and 8)"
                )));
            }
        }
        Ok(())
    }

    fn terms<'a, B: Backend + 'a>(&self, _: &(), s: &mut Step<'a, '_, B>) -> Result<()> {
        let (values, form) = s.soft_targets().ok_or_else(|| {
            Error::Unsupported("DKD needs the teacher's logits as soft targets".into())
        })?;
        if form != TeacherInput::Logits {
            return Err(Error::Unsupported(
                "DKD needs the teacher's logits (its soft targets at T, and their top class)"
                    .into(),
            ));
        }
        let cfg = s.cfg;
        let shape = s.shape()?;
        let (rows, classes) = (shape.rows, shape.cols);
        let labelled = s.labelled_rows();
        let t = s.tape.constant(Tensor::from_host(
            s.tape.backend(),
            values,
            &[rows, classes],
        )?);
        let w = warmup(s.epoch, cfg.dkd_warmup);
        // The KD terms as a mean over all rows: each call's batchmean over its own rows times
        // the share of the batch they are.
        let spec = |share: usize, ce_weight: f32| DkdSpec {
            ce_weight,
            ..DkdSpec::new(
                shape,
                cfg.temperature,
                cfg.dkd_alpha * w * share as f32 / rows as f32,
                cfg.dkd_beta * w * share as f32 / rows as f32,
            )
        };
        let on_labelled = s.tape.dkd(
            s.student.logits,
            t,
            s.labels(),
            spec(labelled, 1.0 - cfg.alpha),
        )?;
        s.add(Term::objective(on_labelled));
        if labelled < rows {
            let top: Vec<i32> = (0..rows)
                .map(|r| {
                    if r < labelled {
                        IGNORE_INDEX
                    } else {
                        argmax(&values[r * classes..(r + 1) * classes]) as i32
                    }
                })
                .collect();
            let top = s.tape.backend().upload_labels(&top)?;
            let on_unlabelled =
                s.tape
                    .dkd(s.student.logits, t, &top, spec(rows - labelled, 0.0))?;
            s.add(Term::objective(on_unlabelled));
        }
        Ok(())
    }
}

/// The index of the largest value (the first of ties).
fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_linear_then_one() {
        assert_eq!(warmup(0, 20), 0.05);
        assert_eq!(warmup(9, 20), 0.5);
        assert_eq!(warmup(19, 20), 1.0);
        assert_eq!(warmup(150, 20), 1.0);
        assert_eq!(warmup(0, 0), 1.0);
        assert_eq!(argmax(&[0.0, 3.0, 3.0, -1.0]), 1);
    }
}
