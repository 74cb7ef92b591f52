//! What a method works with: [`Setup`] once per round (its modules, its soft targets), [`Step`]
//! for each batch (the tape, the student's forward pass, the batch's soft targets and the
//! teacher's features), and the [`Term`]s it adds.

use crate::backend::Backend;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::experiment::config::Config;
use crate::experiment::streams::GenerationStreams;
use crate::experiment::train::predict;
use crate::nn::{Net, NetForward, Param};
use crate::ops::softmax;
use crate::ops::{CrossEntropySpec, DivergenceSpec, RowShape, TeacherInput};
use crate::tape::{Tape, Var};

/// Which of the frozen teacher's features a method matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Features {
    /// The first hidden activation (FitNets).
    FirstHidden,
    /// The first `[N, C, H, W]` feature map (attention transfer).
    FirstMap,
    /// The last hidden activation, flattened to `[N, D]` (relation-based methods).
    LastHidden,
}

/// Soft targets of every example a round trains on, `[examples, classes]`, in the order of
/// [`Setup::examples`].
pub struct SoftTargets {
    pub values: Vec<f32>,
    /// Logits (the divergence applies the temperature; with augmentation the teacher labels the
    /// augmented inputs itself instead) or probabilities (used as they are).
    pub form: TeacherInput,
}

/// One distillation round, before training.
pub struct Setup<'r, B: Backend> {
    pub backend: &'r B,
    pub data: &'r Dataset,
    pub cfg: &'r Config,
    /// The round's teachers: the fold's (frozen), or the previous generation's student.
    pub teachers: &'r [&'r Net<B>],
    /// The examples the student trains on, labelled first: the rows of [`SoftTargets`].
    pub examples: &'r [usize],
    pub fold: usize,
    /// The round's random streams (the modules' initialisations).
    pub streams: &'r GenerationStreams,
}

impl<B: Backend> Setup<'_, B> {
    /// Teacher `k`'s logits for every example of [`Setup::examples`].
    pub fn teacher_logits(&self, k: usize) -> Result<Vec<f32>> {
        predict(self.backend, self.teachers[k], self.data, self.examples)
    }
}

/// `mean_k softmax(t_k / T)` of the rows of several teachers' logits, `[n, classes]`.
pub(super) fn mean_soft_probs(logits: &[Vec<f32>], classes: usize, t: f32) -> Vec<f32> {
    let k = logits.len() as f64;
    let mut acc = vec![0.0f64; logits[0].len()];
    for l in logits {
        let p = softmax::reference::softmax(
            &l.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            classes,
            t as f64,
            false,
        );
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v / k;
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

/// Networks a method trains beside the student: built once per round, stepped with the
/// student's optimizer on the gradients of the parameters the method hands to [`Step::train`].
pub trait Trainable<B: Backend>: Sized {
    fn build(cx: &Setup<'_, B>) -> Result<Self>;
    /// The parameters, in the order of the variables given to [`Step::train`].
    fn params_mut(&mut self) -> Vec<&mut Param<B>>;
}

impl<B: Backend> Trainable<B> for () {
    fn build(_: &Setup<'_, B>) -> Result<Self> {
        Ok(())
    }

    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        Vec::new()
    }
}

impl<B: Backend> Trainable<B> for Net<B> {
    /// A second student: the student's architecture, from the round's peer stream.
    fn build(cx: &Setup<'_, B>) -> Result<Self> {
        cx.cfg.build(
            cx.backend,
            cx.data,
            cx.cfg.student_arch(),
            &mut cx.streams.peer_init(),
        )
    }

    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        Net::params_mut(self)
    }
}

/// A loss root of one batch. The root carries its weight (the gradient scale its op was given,
/// [`Tape::loss_weight`]), for the gradients and for the curve alike.
#[derive(Clone, Copy, Debug)]
pub struct Term {
    pub loss: Var,
    /// Part of the student's objective, logged in the curve as `weight * loss` (the response
    /// terms `alpha CE + (1 - alpha) T^2 KL`); otherwise trained, not logged (hints, feature
    /// terms, a peer's own terms).
    pub in_objective: bool,
}

impl Term {
    /// A term of the student's objective.
    pub fn objective(loss: Var) -> Term {
        Term {
            loss,
            in_objective: true,
        }
    }

    /// A term the curve leaves out.
    pub fn auxiliary(loss: Var) -> Term {
        Term {
            loss,
            in_objective: false,
        }
    }
}

/// One batch of a round: what a method reads to add its terms, and the terms it added.
pub struct Step<'a, 'r, B: Backend> {
    pub tape: &'r Tape<'a, B>,
    pub cfg: &'r Config,
    /// The batch's inputs (a constant on the tape): the labelled rows, then the unlabelled ones.
    pub x: Var,
    /// The student's forward pass on `x`.
    pub student: &'r NetForward,
    /// The epoch, from 0 (for terms with a schedule, such as a warm-up).
    pub epoch: usize,
    labels: &'r B::Labels,
    /// The batch's labelled rows (its first rows).
    labelled: usize,
    teachers: &'r [&'r Net<B>],
    /// The batch's soft targets, `[rows, classes]`, when the method has them.
    targets: Option<(&'r [f32], TeacherInput)>,
    features: Option<Features>,
    terms: Vec<Term>,
    trained: Vec<Var>,
}

impl<'a, 'r, B: Backend + 'a> Step<'a, 'r, B> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        tape: &'r Tape<'a, B>,
        cfg: &'r Config,
        x: Var,
        student: &'r NetForward,
        epoch: usize,
        (labels, labelled): (&'r B::Labels, usize),
        teachers: &'r [&'r Net<B>],
        targets: Option<(&'r [f32], TeacherInput)>,
        features: Option<Features>,
    ) -> Self {
        Step {
            tape,
            cfg,
            x,
            student,
            epoch,
            labels,
            labelled,
            teachers,
            targets,
            features,
            terms: Vec::new(),
            trained: Vec::new(),
        }
    }

    /// The batch's shape, `[rows, classes]`.
    pub fn shape(&self) -> Result<RowShape> {
        let (rows, classes) = self.tape.value(self.student.logits)?.rows_cols();
        Ok(RowShape::new(rows, classes))
    }

    /// The batch's labels on the device: the labelled rows' classes, then `IGNORE_INDEX` for the
    /// unlabelled rows.
    pub fn labels(&self) -> &'r B::Labels {
        self.labels
    }

    /// How many of the batch's rows are labelled: the first ones (the others' labels are
    /// `IGNORE_INDEX`).
    pub fn labelled_rows(&self) -> usize {
        self.labelled
    }

    /// The batch's soft targets, `[rows, classes]` on the host, and their form (`None` for a
    /// method without them).
    pub fn soft_targets(&self) -> Option<(&'r [f32], TeacherInput)> {
        self.targets
    }

    /// Cross-entropy of `logits` against the batch's labels (the unlabelled rows masked), of
    /// weight `alpha`.
    pub fn cross_entropy(&self, logits: Var) -> Result<Var> {
        let spec = CrossEntropySpec {
            grad_scale: self.cfg.alpha,
            ..CrossEntropySpec::new(self.shape()?)
        };
        self.tape.cross_entropy(logits, self.labels, spec)
    }

    /// `T^2 KL(teacher || student)` at the configured temperature, of weight `1 - alpha`; a
    /// `teacher` variable that requires a gradient (logits) gets one too.
    pub fn divergence(&self, student: Var, teacher: Var, form: TeacherInput) -> Result<Var> {
        let spec = DivergenceSpec {
            teacher: form,
            grad_scale: 1.0 - self.cfg.alpha,
            ..DivergenceSpec::new(self.shape()?, self.cfg.temperature)
        };
        self.tape.divergence(student, teacher, None, spec)
    }

    /// `v`'s value as a constant: no gradient flows back through it.
    pub fn detach(&self, v: Var) -> Result<Var> {
        Ok(self.tape.constant(self.tape.value(v)?))
    }

    /// The soft-target term of response-based KD, `(1 - alpha) T^2 KL(teacher || student)`
    /// against the round's soft targets, in the student's objective.
    pub fn distil_from_teacher(&mut self) -> Result<()> {
        let (values, form) = self.targets.ok_or_else(|| {
            Error::Unsupported("this method has no soft targets to distil from".into())
        })?;
        let shape = self.shape()?;
        let t = self.tape.constant(crate::tape::Tensor::from_host(
            self.tape.backend(),
            values,
            &[shape.rows, shape.cols],
        )?);
        let kd = self.divergence(self.student.logits, t, form)?;
        self.add(Term::objective(kd));
        Ok(())
    }

    /// The first teacher's features that the method's [`super::Needs::features`] names, for
    /// this batch, as a constant (the teacher is frozen).
    pub fn teacher_features(&self) -> Result<Var> {
        let which = self.features.ok_or_else(|| {
            Error::Unsupported("the method's needs name no teacher features".into())
        })?;
        let inner = Tape::new(self.tape.backend());
        let xv = inner.constant(self.tape.value(self.x)?);
        let f = self.teachers[0].forward(&inner, xv)?;
        let missing =
            || Error::Config("the teacher has no hidden layer to match: give it one".into());
        let v = match which {
            Features::FirstHidden => *f.hidden.first().ok_or_else(missing)?,
            Features::FirstMap => *f.maps.first().ok_or_else(missing)?,
            Features::LastHidden => flatten(&inner, *f.hidden.last().ok_or_else(missing)?)?,
        };
        Ok(self.tape.constant(inner.value(v)?))
    }

    /// The student's last hidden activation, flattened to `[N, D]`.
    pub fn student_last_hidden(&self) -> Result<Var> {
        let last = *self.student.hidden.last().ok_or_else(|| {
            Error::Config(
                "relation-based KD needs a hidden layer in the student: give it one".into(),
            )
        })?;
        flatten(self.tape, last)
    }

    /// Adds a loss term.
    pub fn add(&mut self, term: Term) {
        self.terms.push(term);
    }

    /// Hands the method's modules' parameter variables (in the order of their
    /// [`Trainable::params_mut`]) to the optimizer.
    pub fn train(&mut self, params: impl IntoIterator<Item = Var>) {
        self.trained.extend(params);
    }

    /// The terms added, and the modules' parameter variables.
    pub(crate) fn finish(self) -> (Vec<Term>, Vec<Var>) {
        (self.terms, self.trained)
    }
}

/// `[N, ...]` to `[N, D]`.
fn flatten<'a, B: Backend + 'a>(tape: &Tape<'a, B>, v: Var) -> Result<Var> {
    let t = tape.value(v)?;
    let n = t.shape[0];
    tape.reshape(v, &[n, t.len() / n])
}
