//! What a run depends on ([`Config`]), its checks, and the networks it builds.

use std::sync::Arc;

use serde::Serialize;

use super::methods::Method;
use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
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

/// The most epochs of any phase a configuration may ask for.
pub const MAX_EPOCHS: usize = 1_000_000;

/// The most teachers of an ensemble (the random streams' tags are distinct up to 10).
pub const MAX_TEACHERS: usize = 10;

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
    /// `Method::Cached` only: store the teacher as its top-k log-probabilities (a safetensors
    /// cache, `crate::topk_cache`) instead of dense probabilities, with this tail.
    pub top_k: Option<usize>,
    pub top_k_tail: crate::ops::SparseTail,
    /// A teacher trained elsewhere (`--teacher`), used in every fold instead of training one;
    /// set it with [`Config::with_teacher`], which also sets the teacher's architecture. In
    /// `results.json`: its file, architecture, parameter count and dtype.
    #[serde(serialize_with = "loaded_teacher")]
    pub teacher: Option<Arc<Checkpoint>>,
}

fn loaded_teacher<S: serde::Serializer>(
    t: &Option<Arc<Checkpoint>>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    t.as_deref().serialize(s)
}

/// The most entries of a layer-size list (`teacher_hidden`, ...).
pub const MAX_LAYERS: usize = 64;
/// The widest layer (or the most channels of a conv block) a configuration may ask for.
pub const MAX_LAYER_SIZE: usize = 65_536;
/// The most parameters a network of a configuration may have.
pub const MAX_PARAMETERS: usize = 100_000_000;

/// Parameters of an MLP of layer sizes `sizes`, saturating.
fn mlp_parameters(sizes: &[usize]) -> usize {
    sizes.windows(2).fold(0usize, |n, w| {
        n.saturating_add(w[0].saturating_mul(w[1]).saturating_add(w[1]))
    })
}

/// Parameters of the crate's CNN on `image` with conv blocks `channels`, saturating.
fn cnn_parameters(image: (usize, usize, usize), channels: &[usize], classes: usize) -> usize {
    let (mut c, mut h, mut w) = image;
    let mut n = 0usize;
    for &oc in channels {
        n = n.saturating_add(
            9usize
                .saturating_mul(c)
                .saturating_mul(oc)
                .saturating_add(oc),
        );
        c = oc;
        if h >= 2 && w >= 2 {
            h /= 2;
            w /= 2;
        }
    }
    let head = c.saturating_mul(h).saturating_mul(w);
    n.saturating_add(head.saturating_mul(classes).saturating_add(classes))
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
            top_k: None,
            top_k_tail: crate::ops::SparseTail::Renormalize,
            teacher: None,
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
        // Epoch counts are bounded (a run's history is allocated up front).
        for (name, e) in [
            ("epochs", self.epochs),
            ("teacher_epochs", self.teacher_epochs),
            ("finetune_epochs", self.finetune_epochs),
        ] {
            if e > MAX_EPOCHS {
                return Err(Error::Config(format!("{name} = {e}: at most {MAX_EPOCHS}")));
            }
        }
        // The loss terms' weights: a negative one would maximise its term, a NaN fail late.
        for (name, w) in [
            ("hint_weight", self.hint_weight),
            ("at_weight", self.at_weight),
            ("sp_weight", self.sp_weight),
            ("rkd_weight", self.rkd_weight),
        ] {
            if !(w.is_finite() && (0.0..=1e6).contains(&w)) {
                return Err(Error::Param {
                    name,
                    value: w as f64,
                    hint: "a loss term's weight must be in [0, 1e6]",
                });
            }
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(Error::Param {
                name: "noise",
                value: self.noise as f64,
                hint: "the augmentation's noise is a standard deviation: finite and >= 0",
            });
        }
        if self.teachers > MAX_TEACHERS {
            return Err(Error::Config(format!(
                "{} teachers: at most {MAX_TEACHERS} (each teacher has its own random streams)",
                self.teachers
            )));
        }
        if self.top_k.is_some() && self.method != Method::Cached {
            return Err(Error::Config(format!(
                "top_k is the cached teacher's (--method cached), not {}'s: drop --top-k or use \
                 --method cached",
                self.method.name()
            )));
        }
        self.check_sizes(data)?;
        if self.folds < 2 || self.folds > data.len() {
            return Err(Error::Config(format!(
                "{} folds of {} examples: folds must be in 2..={}",
                self.folds,
                data.len(),
                data.len()
            )));
        }
        if let Some(r) = self.run_folds {
            if r == 0 || r > self.folds {
                return Err(Error::Config(format!(
                    "run_folds = {r}: run 1..={} of the {} folds",
                    self.folds, self.folds
                )));
            }
        }
        if self.model == ModelKind::Cnn && data.image.is_none() {
            return Err(Error::Config(
                "the CNN needs image data (a data set with an image shape): use the MLP model, \
                 or image data (with --data FILE.csv, give --image-shape HxW or CxHxW)"
                    .into(),
            ));
        }
        if self.augment && data.image.is_none() {
            return Err(Error::Config(
                "augmentation shifts images: this data set has no image shape; drop --augment \
                 (or, with --data FILE.csv, give --image-shape HxW or CxHxW)"
                    .into(),
            ));
        }
        self.check_teacher(data)?;
        self.method.validate(self, data)
    }

    /// This configuration with a teacher read from a checkpoint: the model family must be the
    /// checkpoint's, and `teacher_hidden` (MLP) or `teacher_channels` (CNN) become its sizes.
    pub fn with_teacher(mut self, teacher: Checkpoint) -> Result<Self> {
        if teacher.kind() != self.model {
            let (is, flag) = match teacher.kind() {
                ModelKind::Mlp => ("an MLP", "mlp"),
                ModelKind::Cnn => ("a CNN", "cnn"),
            };
            return Err(Error::Config(format!(
                "teacher {} is {is} ({}), but the model is {:?}: pass --model {flag}",
                teacher.file().display(),
                teacher.describe(),
                self.model
            )));
        }
        match self.model {
            ModelKind::Mlp => self.teacher_hidden = teacher.hidden(),
            ModelKind::Cnn => self.teacher_channels = teacher.hidden(),
        }
        self.teacher = Some(Arc::new(teacher));
        Ok(self)
    }

    /// The layer-size lists: none empty, none with a 0, none absurd, and networks of at most
    /// [`MAX_PARAMETERS`] parameters (a loaded teacher's sizes are the file's).
    fn check_sizes(&self, data: &Dataset) -> Result<()> {
        let loaded = self.teacher.is_some();
        let lists = [
            (
                "teacher_hidden",
                "--teacher-hidden",
                &self.teacher_hidden,
                !loaded,
            ),
            (
                "student_hidden",
                "--student-hidden",
                &self.student_hidden,
                true,
            ),
            (
                "teacher_channels",
                "--teacher-channels",
                &self.teacher_channels,
                !loaded,
            ),
            (
                "student_channels",
                "--student-channels",
                &self.student_channels,
                true,
            ),
        ];
        for (field, flag, list, check) in lists {
            if !check {
                continue;
            }
            let problem = if list.is_empty() {
                "is empty: give at least one size".to_string()
            } else if list.len() > MAX_LAYERS {
                format!("has {} layers, more than {MAX_LAYERS}", list.len())
            } else if list.contains(&0) {
                format!("{list:?} has a size 0: every size must be at least 1")
            } else if let Some(s) = list.iter().find(|&&s| s > MAX_LAYER_SIZE) {
                format!("{list:?} has a layer of {s}, more than {MAX_LAYER_SIZE}")
            } else {
                continue;
            };
            return Err(Error::Config(format!(
                "{field} ({flag}) {problem}: give comma-separated sizes such as {flag} 256,256"
            )));
        }
        let nets = [
            ("teacher", "--teacher-hidden", "--teacher-channels", !loaded),
            ("student", "--student-hidden", "--student-channels", true),
        ];
        for (which, mlp_flag, cnn_flag, check) in nets {
            if !check {
                continue;
            }
            let teacher = which == "teacher";
            let (n, flag) = match self.model {
                ModelKind::Mlp => {
                    let hidden = if teacher {
                        &self.teacher_hidden
                    } else {
                        &self.student_hidden
                    };
                    (mlp_parameters(&self.sizes(data, hidden)), mlp_flag)
                }
                ModelKind::Cnn => {
                    let Some(image) = data.image else { continue };
                    let ch = if teacher {
                        &self.teacher_channels
                    } else {
                        &self.student_channels
                    };
                    (cnn_parameters(image, ch, data.classes), cnn_flag)
                }
            };
            if n > MAX_PARAMETERS {
                return Err(Error::Config(format!(
                    "the {which} would have {n} parameters, more than {MAX_PARAMETERS}: give \
                     smaller sizes with {flag}"
                )));
            }
        }
        Ok(())
    }

    /// A loaded teacher: the model family and sizes it was set with, one teacher for the
    /// method, and shapes that fit the data.
    fn check_teacher(&self, data: &Dataset) -> Result<()> {
        let Some(t) = &self.teacher else {
            return Ok(());
        };
        let file = t.file().display();
        let sizes = match self.model {
            ModelKind::Mlp => &self.teacher_hidden,
            ModelKind::Cnn => &self.teacher_channels,
        };
        if t.kind() != self.model || *sizes != t.hidden() {
            return Err(Error::Config(format!(
                "the configuration ({:?}, teacher sizes {sizes:?}) does not describe the loaded \
                 teacher {file} ({}): set it with Config::with_teacher",
                self.model,
                t.describe()
            )));
        }
        let teachers = self.method.needs(self).teachers;
        if teachers > 1 {
            return Err(Error::Config(format!(
                "method {} trains {teachers} teachers, but a loaded teacher (--teacher {file}) is \
                 one: choose another method, or drop --teacher",
                self.method.name()
            )));
        }
        t.check(data)
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
