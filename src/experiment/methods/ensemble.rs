//! A teacher ensemble: `teachers` teachers trained on the fold from their own initialisations;
//! the soft target is the mean of their `softmax(t_k / T)`, given to the divergence as
//! probabilities.

use super::step::mean_soft_probs;
use super::{Distill, Needs, Setup, SoftTargets};
use crate::backend::Backend;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::experiment::Config;
use crate::ops::TeacherInput;

pub struct Ensemble;

impl Distill for Ensemble {
    type Modules<B: Backend> = ();

    fn name(&self) -> &'static str {
        "ensemble"
    }

    fn about(&self) -> &'static str {
        "A teacher ensemble: the mean soft targets of several teachers"
    }

    fn needs(&self, cfg: &Config) -> Needs {
        Needs {
            teachers: cfg.teachers,
            ..Needs::default()
        }
    }

    fn validate(&self, cfg: &Config, _: &Dataset) -> Result<()> {
        if cfg.teachers < 2 {
            return Err(Error::Config(format!(
                "an ensemble needs at least 2 teachers, the configuration has {}",
                cfg.teachers
            )));
        }
        Ok(())
    }

    fn soft_targets<B: Backend>(&self, cx: &Setup<'_, B>) -> Result<Option<SoftTargets>> {
        let all: Vec<Vec<f32>> = (0..cx.teachers.len())
            .map(|k| cx.teacher_logits(k))
            .collect::<Result<_>>()?;
        Ok(Some(SoftTargets {
            values: mean_soft_probs(&all, cx.data.classes, cx.cfg.temperature),
            form: TeacherInput::Probs,
        }))
    }
}
