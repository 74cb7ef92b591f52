//! FitNets (Romero et al. 2015): besides the soft targets, a hint: a regressor trained with the
//! student maps its first hidden layer onto the frozen teacher's, `hint_weight * MSE` (a Linear
//! for MLPs, a 1x1 convolution for CNNs).

use super::{Distill, Features, Needs, Setup, Step, Term, Trainable};
use crate::backend::Backend;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::experiment::{Config, ModelKind};
use crate::nn::{Conv2d, Mlp, Param};
use crate::tape::{Tape, Var};

pub struct FitNets;

impl Distill for FitNets {
    type Modules<B: Backend> = Regressor<B>;

    fn name(&self) -> &'static str {
        "fitnets"
    }

    fn about(&self) -> &'static str {
        "FitNets: a hint on the first hidden layer through a learned regressor"
    }

    fn needs(&self, _: &Config) -> Needs {
        Needs {
            features: Some(Features::FirstHidden),
            ..Needs::default()
        }
    }

    fn validate(&self, cfg: &Config, _: &Dataset) -> Result<()> {
        if cfg.student_layers().is_empty() {
            return Err(Error::Config(
                "FitNets needs a hidden layer in the student and the teacher: give both at least \
                 one (Config::student_hidden / teacher_hidden, or the CNN's channels)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn terms<'a, B: Backend + 'a>(
        &self,
        regressor: &Regressor<B>,
        s: &mut Step<'a, '_, B>,
    ) -> Result<()> {
        s.distil_from_teacher()?;
        // regressor(student hidden) ~ teacher hidden (first layer or block).
        let teacher = s.teacher_features()?;
        let (r, params) = regressor.forward(s.tape, s.student.hidden[0])?;
        let hint = s.tape.mse(r, teacher, s.cfg.hint_weight)?;
        s.add(Term::auxiliary(hint));
        s.train(params);
        Ok(())
    }
}

/// The FitNets regressor from the student's hint layer to the teacher's.
pub enum Regressor<B: Backend> {
    Linear(Mlp<B>),
    Conv(Box<Conv2d<B>>),
}

impl<B: Backend> Regressor<B> {
    fn forward<'a>(&self, tape: &Tape<'a, B>, h: Var) -> Result<(Var, Vec<Var>)>
    where
        B: 'a,
    {
        match self {
            Regressor::Linear(m) => {
                let f = m.forward(tape, h)?;
                Ok((f.logits, f.params))
            }
            Regressor::Conv(c) => {
                let (y, p) = c.forward(tape, h)?;
                Ok((y, p.to_vec()))
            }
        }
    }
}

impl<B: Backend> Trainable<B> for Regressor<B> {
    /// Student hidden -> teacher hidden, from the round's regressor stream.
    fn build(cx: &Setup<'_, B>) -> Result<Self> {
        let cfg = cx.cfg;
        let rng = &mut cx.streams.regressor_init();
        Ok(match cfg.model {
            ModelKind::Mlp => Regressor::Linear(Mlp::new(
                cx.backend,
                &[cfg.student_hidden[0], cfg.teacher_hidden[0]],
                rng,
            )?),
            ModelKind::Cnn => Regressor::Conv(Box::new(Conv2d::new(
                cx.backend,
                "regressor",
                cfg.student_channels[0],
                cfg.teacher_channels[0],
                1,
                rng,
            )?)),
        })
    }

    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        match self {
            Regressor::Linear(m) => m.params_mut(),
            Regressor::Conv(c) => vec![&mut c.weight, &mut c.bias],
        }
    }
}
