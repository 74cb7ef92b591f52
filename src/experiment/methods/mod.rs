//! The distillation methods: one file each, a [`Distill`] implementation, and one line in the
//! registry below, which makes it a [`Method`] with its `--method` name, help line and checks.
//!
//! A method says what it needs from a fold ([`Needs`]: teachers, generations, the teacher's
//! architecture for the student, the teacher features it matches), where its soft targets come
//! from ([`Distill::soft_targets`]), which networks it trains beside the student
//! ([`Distill::Modules`]), and which weighted loss terms it adds to each batch's tape
//! ([`Distill::terms`], through a [`Step`]). The training loop itself (`experiment/distil.rs`)
//! knows no method by name.
//!
//! To add a method: a file here with a type implementing [`Distill`], a `mod` line, and a line in
//! `registry!`.

use serde::Serialize;

use super::config::Config;
use crate::backend::Backend;
use crate::data::Dataset;
use crate::error::Result;
use crate::ops::TeacherInput;

mod attention;
mod born_again;
mod cached;
mod dkd;
mod ensemble;
mod fitnets;
mod kd;
mod mutual;
mod rkd;
mod sp;
mod step;

pub use step::{Features, Setup, SoftTargets, Step, Term, Trainable};

/// What a method needs from a fold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needs {
    /// Teachers trained on every fold (at least one: the table always reports the first).
    pub teachers: usize,
    /// Distillation rounds: each round's student is the next round's only teacher.
    pub generations: usize,
    /// The student (and so the simple model it is compared with) takes the teacher's
    /// architecture.
    pub teacher_architecture: bool,
    /// The frozen teacher's features the method matches ([`Step::teacher_features`]).
    pub features: Option<Features>,
}

impl Default for Needs {
    /// One frozen teacher, one round, the student's own architecture, no features.
    fn default() -> Self {
        Needs {
            teachers: 1,
            generations: 1,
            teacher_architecture: false,
            features: None,
        }
    }
}

/// A distillation method.
pub trait Distill: Sync {
    /// The networks the method trains beside the student, with the same optimizer (`()` for
    /// none).
    type Modules<B: Backend>: Trainable<B>;

    /// The `--method` name.
    fn name(&self) -> &'static str;

    /// One line for `--help`.
    fn about(&self) -> &'static str;

    /// What the method needs from a fold.
    fn needs(&self, _cfg: &Config) -> Needs {
        Needs::default()
    }

    /// The method's own checks of a configuration, after the general ones.
    fn validate(&self, _cfg: &Config, _data: &Dataset) -> Result<()> {
        Ok(())
    }

    /// The soft targets of every example the student trains on, computed once per round before
    /// training (the teachers are frozen), or `None` for a method without a frozen teacher's
    /// targets. The default: the first teacher's logits.
    fn soft_targets<B: Backend>(&self, cx: &Setup<'_, B>) -> Result<Option<SoftTargets>> {
        Ok(Some(SoftTargets {
            values: cx.teacher_logits(0)?,
            form: TeacherInput::Logits,
        }))
    }

    /// Adds the method's weighted loss terms for one batch to the tape; the student's
    /// cross-entropy on the labelled rows (weight `alpha`) is already there. The default: the
    /// soft-target term [`Step::distil_from_teacher`].
    fn terms<'a, B: Backend + 'a>(
        &self,
        _modules: &Self::Modules<B>,
        step: &mut Step<'a, '_, B>,
    ) -> Result<()> {
        step.distil_from_teacher()
    }
}

/// Runs generic code on a method's implementation ([`Method::visit`]).
pub(crate) trait Visit {
    type Output;
    fn visit<M: Distill>(self, method: &M) -> Self::Output;
}

/// The registry: `Variant => implementation`, one line per method (with its doc comment). It
/// generates [`Method`], [`Method::ALL`] and the dispatch to the implementations.
macro_rules! registry {
    ($($(#[$doc:meta])* $variant:ident => $imp:expr,)+) => {
        /// How the student learns from the teacher: one variant per registered method.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
        pub enum Method {
            $($(#[$doc])* $variant,)+
        }

        impl Method {
            /// Every method, in registry order.
            pub const ALL: &'static [Method] = &[$(Method::$variant,)+];

            /// The `--method` name.
            pub fn name(self) -> &'static str {
                match self {
                    $(Method::$variant => Distill::name(&$imp),)+
                }
            }

            /// One line for `--help`.
            pub fn about(self) -> &'static str {
                match self {
                    $(Method::$variant => Distill::about(&$imp),)+
                }
            }

            /// What the method needs from a fold under `cfg`.
            pub fn needs(self, cfg: &Config) -> Needs {
                match self {
                    $(Method::$variant => Distill::needs(&$imp, cfg),)+
                }
            }

            /// The method's own checks of `cfg` (`Config::validate` runs them after its own).
            pub fn validate(self, cfg: &Config, data: &Dataset) -> Result<()> {
                match self {
                    $(Method::$variant => Distill::validate(&$imp, cfg, data),)+
                }
            }

            /// Calls `v` with the method's implementation.
            pub(crate) fn visit<V: Visit>(self, v: V) -> V::Output {
                match self {
                    $(Method::$variant => v.visit(&$imp),)+
                }
            }
        }
    };
}

registry! {
    /// Response-based KD (Hinton): soft targets of a frozen teacher.
    Kd => kd::Kd,
    /// Decoupled KD (Zhao et al. 2022): TCKD and NCKD weighed apart, with a warm-up.
    Dkd => dkd::Dkd,
    /// FitNets: also match the teacher's first hidden layer through a learned regressor (MSE).
    FitNets => fitnets::FitNets,
    /// A teacher ensemble: the target is the mean of several teachers' `softmax(t/T)`.
    Ensemble => ensemble::Ensemble,
    /// Deep mutual learning (Zhang et al. 2018): two students learn together, each from the
    /// other's detached predictions.
    Mutual => mutual::Mutual { coupled: false },
    /// Mutual learning with the gradient through both sides of both divergences (the form
    /// `mutual` had before it became standard DML).
    MutualCoupled => mutual::Mutual { coupled: true },
    /// Born-again networks: the student has the teacher's architecture, over several generations.
    BornAgain => born_again::BornAgain,
    /// Offline distillation from the teacher's soft targets, written to disk once and read back.
    Cached => cached::Cached,
    /// Attention transfer (CNN): also match the normalised spatial attention maps of the first
    /// conv block (Zagoruyko and Komodakis 2017).
    AttentionTransfer => attention::AttentionTransfer,
    /// Similarity-preserving KD (Tung and Mori 2019) on the last hidden features.
    SimilarityPreserving => sp::SimilarityPreserving,
    /// RKD distance (Park et al. 2019) on the last hidden features.
    RkdDistance => rkd::RkdDistance,
}

impl Method {
    /// The method of a `--method` name.
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.iter().copied().find(|m| m.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_round_trip() {
        for (i, m) in Method::ALL.iter().enumerate() {
            assert_eq!(Method::from_name(m.name()), Some(*m));
            assert!(!m.about().is_empty(), "{m:?} has no help line");
            assert!(
                Method::ALL[..i].iter().all(|o| o.name() != m.name()),
                "{m:?}: name {} taken",
                m.name()
            );
        }
        assert_eq!(Method::from_name("no-such-method"), None);
    }

    #[test]
    fn needs_follow_the_configuration() {
        let cfg = Config {
            teachers: 4,
            generations: 3,
            ..Config::default()
        };
        assert_eq!(Method::Kd.needs(&cfg), Needs::default());
        assert_eq!(Method::Ensemble.needs(&cfg).teachers, 4);
        let ba = Method::BornAgain.needs(&cfg);
        assert!(ba.teacher_architecture && ba.generations == 3);
        assert_eq!(
            Method::FitNets.needs(&cfg).features,
            Some(Features::FirstHidden)
        );
    }
}
