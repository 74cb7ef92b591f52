//! Attention transfer (Zagoruyko and Komodakis 2017), CNN only: besides the soft targets, the
//! student's first conv block matches the frozen teacher's through their normalised spatial
//! attention maps, weighted `at_weight` (`docs/LOSSES.md`, section 6).

use super::{Distill, Features, Needs, Step, Term};
use crate::backend::Backend;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::experiment::{Config, ModelKind};

pub struct AttentionTransfer;

impl Distill for AttentionTransfer {
    type Modules<B: Backend> = ();

    fn name(&self) -> &'static str {
        "at"
    }

    fn about(&self) -> &'static str {
        "Attention transfer between the first conv blocks (needs --model cnn)"
    }

    fn needs(&self, _: &Config) -> Needs {
        Needs {
            features: Some(Features::FirstMap),
            ..Needs::default()
        }
    }

    fn validate(&self, cfg: &Config, _: &Dataset) -> Result<()> {
        if cfg.model != ModelKind::Cnn {
            return Err(Error::Config(
                "attention transfer matches conv feature maps: use the CNN model".into(),
            ));
        }
        Ok(())
    }

    fn terms<'a, B: Backend + 'a>(&self, _: &(), s: &mut Step<'a, '_, B>) -> Result<()> {
        s.distil_from_teacher()?;
        let teacher = s.teacher_features()?;
        let map = *s.student.maps.first().ok_or_else(|| {
            Error::Config(
                "attention transfer needs a conv block in the student: give it at least one \
                 (Config::student_channels)"
                    .into(),
            )
        })?;
        let at = s.tape.attention_transfer(map, teacher, s.cfg.at_weight)?;
        s.add(Term::auxiliary(at));
        Ok(())
    }
}
