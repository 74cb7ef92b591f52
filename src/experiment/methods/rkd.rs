//! RKD distance (Park et al. 2019): besides the soft targets, the student's last hidden features
//! keep the frozen teacher's pairwise distances (each side over its off-diagonal mean, compared
//! with smooth L1), weighted `rkd_weight` (`docs/LOSSES.md`, section 7).

use super::{Distill, Features, Needs, Step, Term};
use crate::backend::Backend;
use crate::error::Result;
use crate::experiment::Config;

pub struct RkdDistance;

impl Distill for RkdDistance {
    type Modules<B: Backend> = ();

    fn name(&self) -> &'static str {
        "rkd"
    }

    fn about(&self) -> &'static str {
        "RKD distance on the last hidden features"
    }

    fn needs(&self, _: &Config) -> Needs {
        Needs {
            features: Some(Features::LastHidden),
            ..Needs::default()
        }
    }

    fn terms<'a, B: Backend + 'a>(&self, _: &(), s: &mut Step<'a, '_, B>) -> Result<()> {
        s.distil_from_teacher()?;
        // A batch of one row has no pairs, so no distance term (an epoch's last batch can be
        // that short: `n % batch == 1`).
        if s.shape()?.rows < 2 {
            return Ok(());
        }
        let teacher = s.teacher_features()?;
        let student = s.student_last_hidden()?;
        let rkd = s.tape.rkd_distance(student, teacher, s.cfg.rkd_weight)?;
        s.add(Term::auxiliary(rkd));
        Ok(())
    }
}
