//! The distillation loop, the same for every method: rounds (generations), and in each round the
//! student's batches, where the method adds its terms ([`Distill::terms`]) to the student's
//! cross-entropy, one backward pass, and one optimizer step for the student and the method's
//! modules.

use super::methods::{Distill, Features, Setup, SoftTargets, Step, Term, Trainable, Visit};
use super::streams::{FoldStreams, GenerationStreams};
use super::train::{gather, logits_of, Batch, Ctx};
use super::Progress;
use crate::backend::Backend;
use crate::data;
use crate::error::Result;
use crate::nn::{Net, Optimizer};
use crate::ops::TeacherInput;
use crate::rng::Rng;
use crate::tape::{Tape, Tensor};

/// Distils a student over the method's generations (one unless it asks for more) and returns the
/// last one with its curve.
pub(super) fn distil<B: Backend>(
    cx: Ctx<'_, B>,
    streams: &FoldStreams,
    teachers: &[Net<B>],
    labelled: &[usize],
    unlabelled: &[usize],
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(Net<B>, Vec<f64>)> {
    let generations = cx.cfg.method.needs(cx.cfg).generations.max(1);
    let mut previous: Option<Net<B>> = None;
    for g in 0.. {
        let current: Vec<&Net<B>> = match &previous {
            Some(t) => vec![t],
            None => teachers.iter().collect(),
        };
        let (student, curve) = cx.cfg.method.visit(Round {
            cx,
            fold_streams: streams,
            streams: streams.generation(g),
            teachers: &current,
            labelled,
            unlabelled,
            progress: &mut *progress,
        })?;
        if g + 1 == generations {
            return Ok((student, curve));
        }
        previous = Some(student);
    }
    unreachable!("the rounds end at the last generation")
}

/// One round: a new student distilled from `teachers`.
struct Round<'r, 'p, B: Backend> {
    cx: Ctx<'r, B>,
    fold_streams: &'r FoldStreams,
    streams: GenerationStreams,
    teachers: &'r [&'r Net<B>],
    labelled: &'r [usize],
    unlabelled: &'r [usize],
    progress: &'r mut (dyn FnMut(Progress<'_>) + 'p),
}

impl<B: Backend> Visit for Round<'_, '_, B> {
    type Output = Result<(Net<B>, Vec<f64>)>;

    fn visit<M: Distill>(self, method: &M) -> Self::Output {
        let cfg = self.cx.cfg;
        let mut learner = Learner::new(method, &self)?;
        let mut order = Order::new(self.streams.order(), self.unlabelled);
        (self.progress)(Progress::Start(
            "student",
            self.cx.fold,
            cfg.epochs * self.labelled.len().div_ceil(cfg.batch),
        ));
        let mut curve = Vec::with_capacity(cfg.epochs);
        for epoch in 0..cfg.epochs {
            curve.push(learner.epoch(epoch, &mut order, self.labelled, &mut *self.progress)?);
        }
        Ok((learner.student, curve))
    }
}

/// A round in training: the student, the method's modules, and what each batch reads.
struct Learner<'r, B: Backend, M: Distill> {
    method: &'r M,
    cx: Ctx<'r, B>,
    teachers: &'r [&'r Net<B>],
    student: Net<B>,
    modules: M::Modules<B>,
    targets: Option<Targets>,
    features: Option<Features>,
    opt: Optimizer,
    /// Optimizer steps so far.
    steps: u32,
}

impl<'r, B: Backend, M: Distill> Learner<'r, B, M> {
    /// The round's student (the same initialisation as the fold's simple model, so that the
    /// comparison isolates the teacher), the method's modules and its soft targets.
    fn new(method: &'r M, round: &Round<'r, '_, B>) -> Result<Self> {
        let Ctx {
            backend, data, cfg, ..
        } = round.cx;
        let student = cfg.build(
            backend,
            data,
            cfg.student_arch(),
            &mut round.fold_streams.student_init(),
        )?;
        let examples: Vec<usize> = round
            .labelled
            .iter()
            .chain(round.unlabelled)
            .copied()
            .collect();
        let setup = Setup {
            backend,
            data,
            cfg,
            teachers: round.teachers,
            examples: &examples,
            fold: round.cx.fold,
            streams: &round.streams,
        };
        let modules = M::Modules::<B>::build(&setup)?;
        let targets = method
            .soft_targets(&setup)?
            .map(|t| Targets::new(t, &examples, data.len()));
        Ok(Learner {
            method,
            cx: round.cx,
            teachers: round.teachers,
            student,
            modules,
            targets,
            features: method.needs(cfg).features,
            opt: Optimizer::adam(cfg.lr),
            steps: 0,
        })
    }

    /// Epoch `epoch` over the labelled examples; returns the mean of the student's objective.
    fn epoch(
        &mut self,
        epoch: usize,
        order: &mut Order,
        labelled: &[usize],
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<f64> {
        let (backend, cfg) = (self.cx.backend, self.cx.cfg);
        let total = Tensor::zeros(backend, &[1])?;
        let batches = data::batches(labelled, cfg.batch, &mut order.rng);
        for b in &batches {
            let idx = order.fill(b);
            let augment = cfg.augment.then_some((&mut order.augment, cfg.noise));
            let (batch, x_host) = gather(backend, self.cx.data, &idx, b.len(), augment)?;
            let targets = self.batch_targets(&idx, &x_host, batch.rows)?;
            self.step(epoch, (batch, b.len()), targets.as_ref(), &total)?;
            progress(Progress::Step(self.cx.fold));
        }
        Ok(total.to_host(backend)?[0] as f64 / batches.len() as f64)
    }

    /// The batch's soft targets: from the table, or (augmented inputs) from the teacher itself.
    fn batch_targets(
        &self,
        idx: &[usize],
        x_host: &[f32],
        rows: usize,
    ) -> Result<Option<(Vec<f32>, TeacherInput)>> {
        let Some(t) = &self.targets else {
            return Ok(None);
        };
        let (backend, data) = (self.cx.backend, self.cx.data);
        let values = if self.cx.cfg.augment && t.form == TeacherInput::Logits {
            logits_of(backend, self.teachers[0], x_host, rows, data.dim)?
        } else {
            t.rows(idx, data.classes)
        };
        Ok(Some((values, t.form)))
    }

    /// One step (a batch whose first `labelled` rows have labels): the student's cross-entropy
    /// and the method's terms on one tape, backward, the optimizer on the student and the
    /// modules; adds the student's objective to `total`.
    fn step(
        &mut self,
        epoch: usize,
        (batch, labelled): (Batch<B>, usize),
        targets: Option<&(Vec<f32>, TeacherInput)>,
        total: &Tensor<B>,
    ) -> Result<()> {
        let (backend, cfg) = (self.cx.backend, self.cx.cfg);
        let tape = Tape::new(backend);
        let x = tape.constant(batch.x);
        let fwd = self.student.forward(&tape, x)?;
        let mut s = Step::new(
            &tape,
            cfg,
            x,
            &fwd,
            epoch,
            (&batch.labels, labelled),
            self.teachers,
            targets.map(|(v, form)| (v.as_slice(), *form)),
            self.features,
        );
        let ce = s.cross_entropy(fwd.logits)?;
        s.add(Term::objective(ce));
        self.method.terms(&self.modules, &mut s)?;
        let (terms, trained) = s.finish();
        tape.backward(&terms.iter().map(|t| t.loss).collect::<Vec<_>>())?;
        self.steps += 1;
        let student = self.student.params_mut().into_iter().zip(fwd.params);
        self.opt.step(&tape, student, self.steps)?;
        let modules = self.modules.params_mut().into_iter().zip(trained);
        self.opt.step(&tape, modules, self.steps)?;
        for t in terms.iter().filter(|t| t.in_objective) {
            tape.add_weighted_loss(t.loss, total)?;
        }
        Ok(())
    }
}

/// A round's soft targets and where each example's row is.
struct Targets {
    values: Vec<f32>,
    form: TeacherInput,
    /// `position[i]`: example `i`'s row in `values`.
    position: Vec<usize>,
}

impl Targets {
    fn new(t: SoftTargets, examples: &[usize], n: usize) -> Self {
        let mut position = vec![usize::MAX; n];
        for (p, &i) in examples.iter().enumerate() {
            position[i] = p;
        }
        Targets {
            values: t.values,
            form: t.form,
            position,
        }
    }

    /// The rows of examples `idx`, `[idx.len(), classes]`.
    fn rows(&self, idx: &[usize], classes: usize) -> Vec<f32> {
        idx.iter()
            .flat_map(|&i| {
                let p = self.position[i];
                self.values[p * classes..(p + 1) * classes].iter().copied()
            })
            .collect()
    }
}

/// The student's batch order: each labelled batch, then as many unlabelled examples, cycling
/// through a pool that is reshuffled at each wrap.
struct Order {
    /// The batch-order stream (labelled batches and the pool's shuffles).
    rng: Rng,
    pool: Vec<usize>,
    cursor: usize,
    /// The augmentation stream.
    augment: Rng,
}

impl Order {
    fn new(mut rng: Rng, unlabelled: &[usize]) -> Self {
        let pool = data::batches(unlabelled, usize::MAX, &mut rng).concat();
        let augment = GenerationStreams::augment(&rng);
        Order {
            rng,
            pool,
            cursor: 0,
            augment,
        }
    }

    /// The labelled batch `b`, then `b.len()` unlabelled examples (fewer if the pool is smaller).
    fn fill(&mut self, b: &[usize]) -> Vec<usize> {
        let mut idx = b.to_vec();
        for _ in 0..b.len().min(self.pool.len()) {
            if self.cursor == self.pool.len() {
                self.rng.shuffle(&mut self.pool);
                self.cursor = 0;
            }
            idx.push(self.pool[self.cursor]);
            self.cursor += 1;
        }
        idx
    }
}
