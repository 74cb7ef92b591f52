//! Born-again networks (Furlanello et al. 2018): the student has the teacher's architecture and
//! is distilled over `generations` rounds, each round's student teaching the next; the last one
//! is the result. Every round's student starts from the fold's student initialisation.

use super::{Distill, Needs};
use crate::backend::Backend;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::experiment::Config;

pub struct BornAgain;

impl Distill for BornAgain {
    type Modules<B: Backend> = ();

    fn name(&self) -> &'static str {
        "born-again"
    }

    fn about(&self) -> &'static str {
        "Born-again networks: students of the teacher's architecture, over generations"
    }

    fn needs(&self, cfg: &Config) -> Needs {
        Needs {
            generations: cfg.generations,
            teacher_architecture: true,
            ..Needs::default()
        }
    }

    fn validate(&self, cfg: &Config, _: &Dataset) -> Result<()> {
        if cfg.generations < 1 {
            return Err(Error::Config(
                "born-again training needs at least 1 generation (Config::generations is 0)".into(),
            ));
        }
        Ok(())
    }
}
