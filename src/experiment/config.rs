//! What a run depends on ([`Config`]), its checks, and the networks it builds.

use serde::Serialize;

use super::methods::Method;
use crate::backend::Backend;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::nn::{Cnn, Mlp, Net};
use crate::rng::Rng;

/// The networks' family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ModelKind {
    /// MLPs of `teacher_hidden` / `student_hidden` layers.
    Mlp,
    /// CNNs of `teacher_channels` / `student_channels` conv blocks (3x3 conv, ReLU, 2x2 max-pool).
    Cnn,
}

/// Everything a run depends on.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub model: ModelKind,
    pub teacher_hidden: Vec<usize>,
    pub student_hidden: Vec<usize>,
    pub teacher_channels: Vec<usize>,
    pub student_channels: Vec<usize>,
    pub method: Method,
    pub temperature: f32,
    pub alpha: f32,
    /// Fraction of each training fold whose labels the student (and the simple model) see.
    pub label_fraction: f64,
    /// Epochs over the labelled part for the student and the simple model.
    pub epochs: usize,
    /// Epochs over the whole training fold for the teacher.
    pub teacher_epochs: usize,
    /// Extra epochs of hard-label training for the distilled student (0: none).
    pub finetune_epochs: usize,
    pub folds: usize,
    /// Run only the first this-many folds (all when `None`): for quick runs and tests.
    pub run_folds: Option<usize>,
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
    /// Random +-1 pixel shifts and Gaussian noise on the student's inputs (the teacher labels the
    /// augmented inputs itself).
    pub augment: bool,
    pub noise: f32,
    /// Teachers in an ensemble; generations of born-again networks.
    pub teachers: usize,
    pub generations: usize,
    /// Weight of the FitNets hint.
    pub hint_weight: f32,
    /// Weight of the attention-transfer term.
    pub at_weight: f32,
    /// Weights of the similarity-preserving and RKD-distance terms (the papers' 3000 and 25).
    pub sp_weight: f32,
    pub rkd_weight: f32,
    /// DKD's weights of TCKD and NCKD (the paper's alpha 1 and beta 8) and the epochs of the
    /// linear warm-up of both (20).
    pub dkd_alpha: f32,
    pub dkd_beta: f32,
    pub dkd_warmup: usize,
    /// Where `Method::Cached` writes the soft targets.
    pub cache_dir: std::path::PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            model: ModelKind::Mlp,
            teacher_hidden: vec![256, 256],
            student_hidden: vec![32],
            teacher_channels: vec![32, 64],
            student_channels: vec![8, 16],
            method: Method::Kd,
            temperature: 4.0,
            alpha: 0.2,
            label_fraction: 0.05,
            epochs: 200,
            teacher_epochs: 200,
            finetune_epochs: 0,
            folds: 5,
            run_folds: None,
            batch: 32,
            lr: 1e-3,
            seed: 0,
            augment: false,
            noise: 0.05,
            teachers: 3,
            generations: 2,
            hint_weight: 1.0,
            at_weight: 100.0,
            sp_weight: 3000.0,
            rkd_weight: 25.0,
            dkd_alpha: crate::ops::dkd::DEFAULT_ALPHA,
            dkd_beta: crate::ops::dkd::DEFAULT_BETA,
            dkd_warmup: crate::ops::dkd::DEFAULT_WARMUP_EPOCHS,
            cache_dir: std::env::temp_dir().join("distillation-cache"),
        }
    }
}

/// Which of the two architectures of a configuration a network takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Teacher,
    Student,
}

impl Config {
    /// How many folds a run trains: `run_folds`, else all (a validated configuration).
    pub(super) fn folds_to_run(&self) -> usize {
        self.run_folds.unwrap_or(self.folds).clamp(1, self.folds)
    }

    /// Checks the configuration against the data: the general settings, then the method's own
    /// needs ([`super::methods::Distill::validate`]).
    pub fn validate(&self, data: &Dataset) -> Result<()> {
        crate::ops::check_temperature(self.temperature)?;
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(Error::Param {
                name: "alpha",
                value: self.alpha as f64,
                hint: "alpha must be in [0, 1]",
            });
        }
        if !(self.label_fraction > 0.0 && self.label_fraction <= 1.0) {
            return Err(Error::Param {
                name: "label_fraction",
                value: self.label_fraction,
                hint: "must be in (0, 1]",
            });
        }
        if self.batch == 0 || self.epochs == 0 || self.teacher_epochs == 0 {
            return Err(Error::Config(format!(
                "batch size {}, epochs {} and teacher epochs {}: each must be at least 1",
                self.batch, self.epochs, self.teacher_epochs
            )));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Param {
                name: "lr",
                value: self.lr as f64,
                hint: "the learning rate must be > 0",
            });
        }
        if self.folds < 2 || self.folds > data.len() {
            return Err(Error::Config(format!(
                "{} folds of {} examples: folds must be in 2..={}",
                self.folds,
                data.len(),
                data.len()
            )));
        }
        if self.model == ModelKind::Cnn && data.image.is_none() {
            return Err(Error::Config(
                "the CNN needs image data (a data set with an image shape): use the MLP model, \
                 or image data"
                    .into(),
            ));
        }
        if self.augment && data.image.is_none() {
            return Err(Error::Config(
                "augmentation shifts images: this data set has no image shape; drop --augment"
                    .into(),
            ));
        }
        self.method.validate(self, data)
    }

    /// The student's hidden layers (MLP) or conv blocks (CNN), as configured.
    pub fn student_layers(&self) -> &[usize] {
        match self.model {
            ModelKind::Mlp => &self.student_hidden,
            ModelKind::Cnn => &self.student_channels,
        }
    }

    /// The architecture of the distilled student and of the simple model: the student's, unless
    /// the method trains students of the teacher's architecture (born-again networks).
    pub(super) fn student_arch(&self) -> Arch {
        if self.method.needs(self).teacher_architecture {
            Arch::Teacher
        } else {
            Arch::Student
        }
    }

    fn sizes(&self, data: &Dataset, hidden: &[usize]) -> Vec<usize> {
        [vec![data.dim], hidden.to_vec(), vec![data.classes]].concat()
    }

    /// A new network of architecture `arch`, initialised from `rng`.
    pub(super) fn build<B: Backend>(
        &self,
        backend: &B,
        data: &Dataset,
        arch: Arch,
        rng: &mut Rng,
    ) -> Result<Net<B>> {
        let teacher = arch == Arch::Teacher;
        match self.model {
            ModelKind::Mlp => {
                let hidden = if teacher {
                    &self.teacher_hidden
                } else {
                    &self.student_hidden
                };
                Ok(Net::Mlp(Mlp::new(backend, &self.sizes(data, hidden), rng)?))
            }
            ModelKind::Cnn => {
                let image = data
                    .image
                    .ok_or_else(|| Error::Config("the CNN needs image data".into()))?;
                let ch = if teacher {
                    &self.teacher_channels
                } else {
                    &self.student_channels
                };
                Ok(Net::Cnn(Box::new(Cnn::new(
                    backend,
                    image,
                    ch,
                    data.classes,
                    rng,
                )?)))
            }
        }
    }
}
