//! Similarity-preserving KD (Tung and Mori 2019): besides the soft targets, the student's last
//! hidden features keep the frozen teacher's batch similarities, `||normalize(Fs Fs^T) -
//! normalize(Ft Ft^T)||^2 / N^2`, weighted `sp_weight` (`docs/LOSSES.md`, section 7).

use super::{Distill, Features, Needs, Step, Term};
use crate::backend::Backend;
use crate::error::Result;
use crate::experiment::Config;

pub struct SimilarityPreserving;

impl Distill for SimilarityPreserving {
    type Modules<B: Backend> = ();

    fn name(&self) -> &'static str {
        "sp"
    }

    fn about(&self) -> &'static str {
        "Similarity-preserving KD on the last hidden features"
    }

    fn needs(&self, _: &Config) -> Needs {
        Needs {
            features: Some(Features::LastHidden),
            ..Needs::default()
        }
    }

    fn terms<'a, B: Backend + 'a>(&self, _: &(), s: &mut Step<'a, '_, B>) -> Result<()> {
        s.distil_from_teacher()?;
        let teacher = s.teacher_features()?;
        let student = s.student_last_hidden()?;
        let sp = s
            .tape
            .similarity_preserving(student, teacher, s.cfg.sp_weight)?;
        s.add(Term::auxiliary(sp));
        Ok(())
    }
}
