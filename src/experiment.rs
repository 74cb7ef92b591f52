//! The teacher-student pipeline: train a teacher on the training fold, distil a student from it,
//! train the same student architecture without a teacher ("simple") on the same labelled data and
//! steps, optionally fine-tune the student on hard labels, evaluate all three on the held-out fold;
//! repeat over k folds and report mean and standard deviation of accuracy, parameter counts and
//! inference latency per example.
//!
//! The default mirrors a PyTorch run: teacher MLP 64-256-256-10, student 64-32-10, ReLU, Adam lr
//! 1e-3, batch 32; the student sees 5% of each training fold with labels, and each step adds a batch
//! of the same size from the unlabelled rest, which gets only the soft-target term:
//! `alpha * CE(labelled) + (1 - alpha) * T^2 * KL(teacher || student)(labelled and unlabelled)`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::backend::Backend;
use crate::data::{self, Dataset};
use crate::error::{Error, Result};
use crate::nn::{Cnn, Conv2d, Mlp, Net, Optimizer};
use crate::ops::softmax;
use crate::ops::{CrossEntropySpec, DivergenceSpec, RowShape, TeacherInput, IGNORE_INDEX};
use crate::rng::Rng;
use crate::tape::{Tape, Tensor};

/// How the student learns from the teacher.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Method {
    /// Response-based KD (Hinton): soft targets of a frozen teacher.
    Kd,
    /// FitNets: also match the teacher's first hidden layer through a learned regressor (MSE).
    FitNets,
    /// A teacher ensemble: the target is the mean of several teachers' `softmax(t/T)`.
    Ensemble,
    /// Deep mutual learning: two students learn together, each distilling from the other, with the
    /// gradient flowing through both sides of the divergence.
    Mutual,
    /// Born-again networks: the student has the teacher's architecture, over several generations.
    BornAgain,
    /// Offline distillation from the teacher's soft targets, written to disk once and read back.
    Cached,
    /// Attention transfer (CNN): also match the normalised spatial attention maps of the first
    /// conv block (Zagoruyko and Komodakis 2017).
    AttentionTransfer,
    /// Similarity-preserving KD (Tung and Mori 2019) on the last hidden features.
    SimilarityPreserving,
    /// RKD distance (Park et al. 2019) on the last hidden features.
    RkdDistance,
}

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
            cache_dir: std::env::temp_dir().join("distillation-cache"),
        }
    }
}

impl Config {
    /// How many folds a run trains: `run_folds`, else all (a validated configuration).
    fn folds_to_run(&self) -> usize {
        self.run_folds.unwrap_or(self.folds).clamp(1, self.folds)
    }

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
            return Err(Error::Unsupported(
                "batch size, epochs and teacher epochs must be at least 1".into(),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Param {
                name: "lr",
                value: self.lr as f64,
                hint: "the learning rate must be > 0",
            });
        }
        if self.folds < 2 || self.folds > data.len() {
            return Err(Error::Unsupported(format!(
                "{} folds of {} examples: folds must be in 2..={}",
                self.folds,
                data.len(),
                data.len()
            )));
        }
        if self.method == Method::Ensemble && self.teachers < 2 {
            return Err(Error::Unsupported(
                "an ensemble needs at least 2 teachers".into(),
            ));
        }
        if self.method == Method::BornAgain && self.generations < 1 {
            return Err(Error::Unsupported(
                "born-again training needs at least 1 generation".into(),
            ));
        }
        if self.model == ModelKind::Cnn && data.image.is_none() {
            return Err(Error::Unsupported(
                "the CNN needs image data (a data set with an image shape)".into(),
            ));
        }
        if self.method == Method::AttentionTransfer && self.model != ModelKind::Cnn {
            return Err(Error::Unsupported(
                "attention transfer matches conv feature maps: use the CNN model".into(),
            ));
        }
        let layers = if self.model == ModelKind::Cnn {
            &self.student_channels
        } else {
            &self.student_hidden
        };
        if self.method == Method::FitNets && layers.is_empty() {
            return Err(Error::Unsupported(
                "FitNets needs a hidden layer in the student and the teacher".into(),
            ));
        }
        if self.augment && data.image.is_none() {
            return Err(Error::Unsupported(
                "augmentation shifts images: this data set has no image shape".into(),
            ));
        }
        Ok(())
    }

    fn teacher_sizes(&self, data: &Dataset) -> Vec<usize> {
        [
            vec![data.dim],
            self.teacher_hidden.clone(),
            vec![data.classes],
        ]
        .concat()
    }

    fn student_sizes(&self, data: &Dataset) -> Vec<usize> {
        [
            vec![data.dim],
            self.student_hidden.clone(),
            vec![data.classes],
        ]
        .concat()
    }

    /// A new network for `role` (born-again students take the teacher's architecture).
    fn build<B: Backend>(
        &self,
        backend: &B,
        data: &Dataset,
        teacher: bool,
        rng: &mut Rng,
    ) -> Result<Net<B>> {
        let teacher = teacher || self.method == Method::BornAgain;
        match self.model {
            ModelKind::Mlp => {
                let sizes = if teacher {
                    self.teacher_sizes(data)
                } else {
                    self.student_sizes(data)
                };
                Ok(Net::Mlp(Mlp::new(backend, &sizes, rng)?))
            }
            ModelKind::Cnn => {
                let image = data
                    .image
                    .ok_or_else(|| Error::Unsupported("the CNN needs image data".into()))?;
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

/// Accuracies of one fold, and the training curves (mean loss per epoch).
#[derive(Clone, Debug, Serialize)]
pub struct FoldResult {
    pub fold: usize,
    pub teacher: f64,
    pub student: f64,
    pub simple: f64,
    pub teacher_curve: Vec<f64>,
    pub student_curve: Vec<f64>,
    pub simple_curve: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub mean: f64,
    pub std: f64,
}

fn summary(v: &[f64]) -> Summary {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64;
    Summary {
        mean,
        std: var.sqrt(),
    }
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub backend: String,
    pub config: Config,
    pub folds: Vec<FoldResult>,
    pub teacher: Summary,
    pub student: Summary,
    pub simple: Summary,
    pub teacher_params: usize,
    pub student_params: usize,
    /// Inference time per example (batch of the test fold), seconds.
    pub teacher_latency: f64,
    pub student_latency: f64,
    pub seconds: f64,
}

/// Progress events for a caller's display.
pub enum Progress<'a> {
    /// A model starts training: name, fold, total steps.
    Start(&'a str, usize, usize),
    /// One step of fold `n` done.
    Step(usize),
    /// A fold finished.
    Fold(&'a FoldResult),
}

/// The trained student of the last fold, for saving.
pub struct Outcome<B: Backend> {
    pub report: Report,
    pub student: Net<B>,
}

/// What one fold leaves: its accuracies and curves, its (first) teacher and its student.
struct FoldOutput<B: Backend> {
    result: FoldResult,
    teacher: Net<B>,
    student: Net<B>,
}

/// Runs the experiment on `backend`, one fold after another.
pub fn run<B: Backend>(
    backend: &B,
    data: &Dataset,
    cfg: &Config,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Outcome<B>> {
    cfg.validate(data)?;
    run_in_order(backend, data, cfg, progress)
}

/// [`run`] on a validated configuration.
fn run_in_order<B: Backend>(
    backend: &B,
    data: &Dataset,
    cfg: &Config,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Outcome<B>> {
    let start = Instant::now();
    let root = Rng::new(cfg.seed);
    let folds = data::kfold(data.len(), cfg.folds, &mut root.fork(1))?;
    let take = cfg.folds_to_run();
    let mut results = Vec::new();
    let mut last = None;
    for (f, (train, test)) in folds.iter().take(take).enumerate() {
        let out = run_fold(backend, data, cfg, &root, f, train, test, progress)?;
        progress(Progress::Fold(&out.result));
        results.push(out.result);
        last = Some((out.teacher, out.student, test));
    }
    let (teacher, student, test) = last.expect("at least one fold");
    let latencies = (
        latency(backend, &teacher, data, test)?,
        latency(backend, &student, data, test)?,
    );
    let teacher_params = teacher.parameter_count();
    finish(
        backend,
        cfg,
        results,
        teacher_params,
        student,
        latencies,
        start,
    )
}

/// Runs the experiment with up to `jobs` folds at a time, each on its own thread (for backends
/// that are `Sync`, such as the CPU ones, where one fold does not fill the machine); a thread
/// with no fold left to start helps the others through [`Backend::help_until`]. Every fold
/// draws from its own random stream and help never changes an element's arithmetic, so the
/// results are the same bits as [`run`]'s; the latencies are measured after training, on one
/// thread, with nothing else running.
pub fn run_parallel<B: Backend + Sync>(
    backend: &B,
    data: &Dataset,
    cfg: &Config,
    jobs: usize,
    progress: &mut (dyn FnMut(Progress<'_>) + Send),
) -> Result<Outcome<B>> {
    cfg.validate(data)?;
    let take = cfg.folds_to_run();
    if jobs <= 1 {
        return run_in_order(backend, data, cfg, progress);
    }
    let start = Instant::now();
    let root = Rng::new(cfg.seed);
    let folds = data::kfold(data.len(), cfg.folds, &mut root.fork(1))?;
    let next = AtomicUsize::new(0);
    let progress = Mutex::new(progress);
    // Networks hold `Rc` handles and stay on their thread: each worker returns host copies.
    type Done = (FoldResult, Vec<Vec<f32>>, Vec<Vec<f32>>);
    // A worker with no fold left to start lends its thread to the backend's own splitting
    // (`Backend::help_until`) until no worker trains, so the last folds do not leave cores idle;
    // one spare worker when there are fewer folds than jobs. Helpers spin: only when the
    // workers do not outnumber the cores.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let lend = jobs <= cores;
    let workers = jobs.min(if lend { take + 1 } else { take });
    let training = AtomicUsize::new(workers);
    struct Leaving<'a>(&'a AtomicUsize);
    impl Drop for Leaving<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let worker = || -> Result<Vec<(usize, Done)>> {
        let leaving = Leaving(&training);
        let mut mine = Vec::new();
        let mut report = |p: Progress<'_>| {
            let mut guard = progress.lock().unwrap_or_else(|e| e.into_inner());
            (*guard)(p)
        };
        loop {
            let f = next.fetch_add(1, Ordering::Relaxed);
            if f >= take {
                drop(leaving);
                if lend {
                    backend.help_until(&|| training.load(Ordering::Acquire) == 0);
                }
                return Ok(mine);
            }
            let (train, test) = &folds[f];
            let out = run_fold(backend, data, cfg, &root, f, train, test, &mut report)?;
            report(Progress::Fold(&out.result));
            let (t, s) = (
                host_params(backend, &out.teacher)?,
                host_params(backend, &out.student)?,
            );
            mine.push((f, (out.result, t, s)));
        }
    };
    let mut done: Vec<(usize, Done)> = Vec::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers).map(|_| scope.spawn(worker)).collect();
        let mut first_err = None;
        for h in handles {
            match h.join() {
                Ok(Ok(mine)) => done.extend(mine),
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        first_err.map_or(Ok(()), Err)
    })?;
    done.sort_by_key(|(f, _)| *f);
    let (mut results, mut last) = (Vec::new(), None);
    for (_, (result, t, s)) in done {
        results.push(result);
        last = Some((t, s));
    }
    // Rebuild the last fold's teacher and student from their weights. Their latencies are
    // measured on a thread of their own, like the one that trained them: on the calling thread,
    // whose allocator arena saw none of the training, fresh pages for every batch inflated the
    // teacher's time 2.5x.
    let (t, s) = last.expect("at least one fold");
    let rebuild = |teacher: bool, values: &[Vec<f32>]| {
        let net = cfg.build(backend, data, teacher, &mut root.fork(u64::MAX))?;
        with_params(backend, net, values)
    };
    let test = &folds[take - 1].1;
    let latencies = std::thread::scope(|scope| {
        let timed = scope.spawn(|| -> Result<(f64, f64)> {
            Ok((
                latency(backend, &rebuild(true, &t)?, data, test)?,
                latency(backend, &rebuild(false, &s)?, data, test)?,
            ))
        });
        timed
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    let teacher_params = t.iter().map(Vec::len).sum();
    let student = rebuild(false, &s)?;
    finish(
        backend,
        cfg,
        results,
        teacher_params,
        student,
        latencies,
        start,
    )
}

fn host_params<B: Backend>(backend: &B, net: &Net<B>) -> Result<Vec<Vec<f32>>> {
    net.params()
        .iter()
        .map(|p| p.value.to_host(backend))
        .collect()
}

fn with_params<B: Backend>(backend: &B, mut net: Net<B>, values: &[Vec<f32>]) -> Result<Net<B>> {
    for (p, v) in net.params_mut().into_iter().zip(values) {
        p.value = Tensor::from_host(backend, v, &p.value.shape.clone())?;
    }
    Ok(net)
}

/// The report: accuracies over the folds, sizes and (given) latencies of the last fold's models.
fn finish<B: Backend>(
    backend: &B,
    cfg: &Config,
    results: Vec<FoldResult>,
    teacher_params: usize,
    student: Net<B>,
    (teacher_latency, student_latency): (f64, f64),
    start: Instant,
) -> Result<Outcome<B>> {
    let pick = |g: fn(&FoldResult) -> f64| summary(&results.iter().map(g).collect::<Vec<_>>());
    let report = Report {
        backend: backend.name(),
        config: cfg.clone(),
        teacher: pick(|r| r.teacher),
        student: pick(|r| r.student),
        simple: pick(|r| r.simple),
        teacher_params,
        student_params: student.parameter_count(),
        folds: results,
        teacher_latency,
        student_latency,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok(Outcome { report, student })
}

/// One fold: the teacher(s) on every label of `train`, the simple model and the distilled
/// student on the labelled part, each scored on `test`.
#[allow(clippy::too_many_arguments)]
fn run_fold<B: Backend>(
    backend: &B,
    data: &Dataset,
    cfg: &Config,
    root: &Rng,
    f: usize,
    train: &[usize],
    test: &[usize],
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<FoldOutput<B>> {
    let mut rng = root.fork(100 + f as u64);
    let (labelled, unlabelled) =
        data::label_split(data, train, cfg.label_fraction, &mut rng.fork(2))?;

    // Teacher(s): every label of the training fold.
    let n_teachers = if cfg.method == Method::Ensemble {
        cfg.teachers
    } else {
        1
    };
    let mut teachers = Vec::new();
    let mut teacher_curve = Vec::new();
    for k in 0..n_teachers {
        let mut t = cfg.build(backend, data, true, &mut rng.fork(10 + k as u64))?;
        progress(Progress::Start(
            "teacher",
            f,
            cfg.teacher_epochs * train.len().div_ceil(cfg.batch),
        ));
        let curve = train_supervised(
            backend,
            &mut t,
            data,
            train,
            cfg.teacher_epochs,
            cfg,
            &mut rng.fork(20 + k as u64),
            f,
            progress,
        )?;
        if k == 0 {
            teacher_curve = curve;
        }
        teachers.push(t);
    }
    let teacher_acc = accuracy(backend, &teachers[0], data, test)?;

    // Simple: the student's architecture on the labelled part only, same epochs.
    let mut simple = cfg.build(backend, data, false, &mut rng.fork(30))?;
    progress(Progress::Start(
        "simple",
        f,
        cfg.epochs * labelled.len().div_ceil(cfg.batch),
    ));
    let simple_curve = train_supervised(
        backend,
        &mut simple,
        data,
        &labelled,
        cfg.epochs,
        cfg,
        &mut rng.fork(31),
        f,
        progress,
    )?;
    let simple_acc = accuracy(backend, &simple, data, test)?;

    // Distilled student, same initialisation as the simple model.
    let (mut student, student_curve) = distil(
        backend,
        data,
        cfg,
        &teachers,
        &labelled,
        &unlabelled,
        f,
        &mut rng,
        progress,
    )?;
    if cfg.finetune_epochs > 0 {
        progress(Progress::Start(
            "fine-tune",
            f,
            cfg.finetune_epochs * labelled.len().div_ceil(cfg.batch),
        ));
        train_supervised(
            backend,
            &mut student,
            data,
            &labelled,
            cfg.finetune_epochs,
            cfg,
            &mut rng.fork(50),
            f,
            progress,
        )?;
    }
    let student_acc = accuracy(backend, &student, data, test)?;
    Ok(FoldOutput {
        result: FoldResult {
            fold: f,
            teacher: teacher_acc,
            student: student_acc,
            simple: simple_acc,
            teacher_curve,
            student_curve,
            simple_curve,
        },
        teacher: teachers.swap_remove(0),
        student,
    })
}

/// One batch on the device: inputs `[b, dim]` and labels.
struct Batch<B: Backend> {
    x: Tensor<B>,
    labels: B::Labels,
    rows: usize,
}

fn gather<B: Backend>(
    backend: &B,
    data: &Dataset,
    idx: &[usize],
    labelled: usize,
    augment: Option<&mut Rng>,
    cfg: &Config,
) -> Result<(Batch<B>, Vec<f32>)> {
    let mut x = Vec::with_capacity(idx.len() * data.dim);
    for &i in idx {
        x.extend_from_slice(&data.x[i * data.dim..(i + 1) * data.dim]);
    }
    if let (Some(rng), Some(image)) = (augment, data.image) {
        data::augment(&mut x, image, true, cfg.noise, rng);
    }
    // Rows past `labelled` are unlabelled: masked for cross-entropy.
    let y: Vec<i32> = idx
        .iter()
        .enumerate()
        .map(|(r, &i)| {
            if r < labelled {
                data.y[i]
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Ok((
        Batch {
            x: Tensor::from_host(backend, &x, &[idx.len(), data.dim])?,
            labels: backend.upload_labels(&y)?,
            rows: idx.len(),
        },
        x,
    ))
}

/// Hard-label training with cross-entropy; returns the mean loss of each epoch.
#[allow(clippy::too_many_arguments)]
fn train_supervised<B: Backend>(
    backend: &B,
    model: &mut Net<B>,
    data: &Dataset,
    idx: &[usize],
    epochs: usize,
    cfg: &Config,
    rng: &mut Rng,
    fold: usize,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<f64>> {
    let mut curve = Vec::with_capacity(epochs);
    let mut step = 0u32;
    let opt = Optimizer::adam(cfg.lr);
    for _ in 0..epochs {
        let total = Tensor::zeros(backend, &[1])?;
        let batches = data::batches(idx, cfg.batch, rng);
        for b in &batches {
            let (batch, _) = gather(backend, data, b, b.len(), None, cfg)?;
            let tape = Tape::new(backend);
            let x = tape.constant(batch.x);
            let fwd = model.forward(&tape, x)?;
            let spec = CrossEntropySpec::new(RowShape::new(batch.rows, data.classes));
            let loss = tape.cross_entropy(fwd.logits, &batch.labels, spec)?;
            tape.backward(&[loss])?;
            step += 1;
            opt.step(&tape, model.params_mut().into_iter().zip(fwd.params), step)?;
            backend.axpy(1.0, &tape.value(loss).buf, &total.buf)?;
            progress(Progress::Step(fold));
        }
        curve.push(total.to_host(backend)?[0] as f64 / batches.len() as f64);
    }
    Ok(curve)
}

/// The teacher's logits for `idx`, on the host (the frozen teacher's soft targets are cached).
fn predict<B: Backend>(
    backend: &B,
    model: &Net<B>,
    data: &Dataset,
    idx: &[usize],
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(idx.len() * data.classes);
    for chunk in idx.chunks(1024) {
        let (batch, _) = gather(backend, data, chunk, 0, None, &Config::default())?;
        let tape = Tape::new(backend);
        let x = tape.constant(batch.x);
        let logits = model.forward(&tape, x)?.logits;
        out.extend(tape.value(logits).to_host(backend)?);
    }
    Ok(out)
}

fn logits_of<B: Backend>(
    backend: &B,
    model: &Net<B>,
    x: &[f32],
    rows: usize,
    dim: usize,
) -> Result<Vec<f32>> {
    let tape = Tape::new(backend);
    let xv = tape.constant(Tensor::from_host(backend, x, &[rows, dim])?);
    let logits = model.forward(&tape, xv)?.logits;
    tape.value(logits).to_host(backend)
}

/// Accuracy of `model` on `idx`.
pub fn accuracy<B: Backend>(
    backend: &B,
    model: &Net<B>,
    data: &Dataset,
    idx: &[usize],
) -> Result<f64> {
    let logits = predict(backend, model, data, idx)?;
    let correct = logits
        .chunks(data.classes)
        .zip(idx)
        .filter(|(row, &i)| {
            let arg = row
                .iter()
                .enumerate()
                .fold(0, |best, (j, &v)| if v > row[best] { j } else { best });
            arg as i32 == data.y[i]
        })
        .count();
    Ok(correct as f64 / idx.len() as f64)
}

/// Seconds per example of a batched forward pass over `idx` (median of 21 after 3 warm-ups).
pub fn latency<B: Backend>(
    backend: &B,
    model: &Net<B>,
    data: &Dataset,
    idx: &[usize],
) -> Result<f64> {
    for _ in 0..3 {
        predict(backend, model, data, idx)?;
    }
    let mut times: Vec<f64> = (0..21)
        .map(|_| {
            let t = Instant::now();
            predict(backend, model, data, idx).map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2] / idx.len() as f64)
}

/// Soft targets `mean_k softmax(t_k / T)` of an ensemble, `[n, C]`.
fn ensemble_probs(logits: &[Vec<f32>], classes: usize, t: f32) -> Vec<f32> {
    let k = logits.len() as f64;
    let mut acc = vec![0.0f64; logits[0].len()];
    for l in logits {
        let p = softmax::reference_forward(
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

/// Writes soft targets to `dir/fold{f}.f32` (little-endian f32) and reads them back.
fn cache_round_trip(dir: &std::path::Path, fold: usize, probs: &[f32]) -> Result<Vec<f32>> {
    let io = |e: std::io::Error| {
        Error::Unsupported(format!("soft-target cache in {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let path = dir.join(format!("fold{fold}.f32"));
    std::fs::write(&path, bytemuck::cast_slice::<f32, u8>(probs)).map_err(io)?;
    let bytes = std::fs::read(&path).map_err(io)?;
    if bytes.len() != probs.len() * 4 {
        return Err(Error::Unsupported(format!(
            "{}: {} bytes, expected {}",
            path.display(),
            bytes.len(),
            probs.len() * 4
        )));
    }
    Ok(bytemuck::pod_collect_to_vec(&bytes))
}

/// Distils a student (or, for born-again, several generations) and returns it with its curve.
#[allow(clippy::too_many_arguments)]
fn distil<B: Backend>(
    backend: &B,
    data: &Dataset,
    cfg: &Config,
    teachers: &[Net<B>],
    labelled: &[usize],
    unlabelled: &[usize],
    fold: usize,
    rng: &mut Rng,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(Net<B>, Vec<f64>)> {
    let generations = if cfg.method == Method::BornAgain {
        cfg.generations
    } else {
        1
    };
    let mut teacher_ref: Option<Net<B>> = None;
    let mut result = None;
    for g in 0..generations {
        let current_teachers: Vec<&Net<B>> = match &teacher_ref {
            Some(t) => vec![t],
            None => teachers.iter().collect(),
        };
        let out = distil_once(
            backend,
            data,
            cfg,
            &current_teachers,
            labelled,
            unlabelled,
            fold,
            &mut rng.fork(60 + g as u64),
            progress,
        )?;
        if g + 1 < generations {
            teacher_ref = Some(out.0);
        } else {
            result = Some(out);
        }
    }
    Ok(result.expect("one generation"))
}

#[allow(clippy::too_many_arguments)]
fn distil_once<B: Backend>(
    backend: &B,
    data: &Dataset,
    cfg: &Config,
    teachers: &[&Net<B>],
    labelled: &[usize],
    unlabelled: &[usize],
    fold: usize,
    rng: &mut Rng,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(Net<B>, Vec<f64>)> {
    let classes = data.classes;
    // The same initialisation as the fold's simple model, so the comparison isolates the teacher.
    let mut student = cfg.build(
        backend,
        data,
        false,
        &mut Rng::new(cfg.seed).fork(100 + fold as u64).fork(30),
    )?;
    // The second network of mutual learning, and the FitNets regressor (student hidden -> teacher
    // hidden: a Linear for MLPs, a 1x1 convolution for CNNs), trained with the student.
    let mut peer = if cfg.method == Method::Mutual {
        Some(cfg.build(backend, data, false, &mut rng.fork(33))?)
    } else {
        None
    };
    let mut regressor = if cfg.method == Method::FitNets {
        Some(match cfg.model {
            ModelKind::Mlp => Regressor::Linear(Mlp::new(
                backend,
                &[cfg.student_hidden[0], cfg.teacher_hidden[0]],
                &mut rng.fork(34),
            )?),
            ModelKind::Cnn => Regressor::Conv(Box::new(Conv2d::new(
                backend,
                "regressor",
                cfg.student_channels[0],
                cfg.teacher_channels[0],
                1,
                &mut rng.fork(34),
            )?)),
        })
    } else {
        None
    };

    // Cached soft targets for every example of the fold (the teacher is frozen), as logits, or
    // as probabilities for ensembles and the on-disk cache.
    let fold_idx: Vec<usize> = labelled.iter().chain(unlabelled).copied().collect();
    let mut position = vec![usize::MAX; data.len()];
    for (p, &i) in fold_idx.iter().enumerate() {
        position[i] = p;
    }
    let (targets, form) = match cfg.method {
        Method::Ensemble => {
            let all: Vec<Vec<f32>> = teachers
                .iter()
                .map(|t| predict(backend, t, data, &fold_idx))
                .collect::<Result<_>>()?;
            (
                ensemble_probs(&all, classes, cfg.temperature),
                TeacherInput::Probs,
            )
        }
        Method::Cached => {
            let logits = predict(backend, teachers[0], data, &fold_idx)?;
            let probs = ensemble_probs(&[logits], classes, cfg.temperature);
            (
                cache_round_trip(&cfg.cache_dir, fold, &probs)?,
                TeacherInput::Probs,
            )
        }
        _ => (
            predict(backend, teachers[0], data, &fold_idx)?,
            TeacherInput::Logits,
        ),
    };

    let opt = Optimizer::adam(cfg.lr);
    let mut curve = Vec::with_capacity(cfg.epochs);
    let mut step = 0u32;
    let mut pool = data::batches(unlabelled, usize::MAX, rng).concat();
    let mut cursor = 0usize;
    let steps = cfg.epochs * labelled.len().div_ceil(cfg.batch);
    progress(Progress::Start("student", fold, steps));
    let mut aug_rng = rng.fork(77);
    for _ in 0..cfg.epochs {
        let total = Tensor::zeros(backend, &[1])?;
        let batches = data::batches(labelled, cfg.batch, rng);
        for b in &batches {
            // The labelled batch, then as many unlabelled examples (cycling through the pool).
            let mut idx = b.clone();
            for _ in 0..b.len().min(pool.len()) {
                if cursor == pool.len() {
                    rng.shuffle(&mut pool);
                    cursor = 0;
                }
                idx.push(pool[cursor]);
                cursor += 1;
            }
            let augment = cfg.augment.then_some(&mut aug_rng);
            let (batch, x_host) = gather(backend, data, &idx, b.len(), augment, cfg)?;
            let rows = batch.rows;
            let shape = RowShape::new(rows, classes);
            // Teacher soft targets: from the cache, or (augmented inputs) from the teacher itself.
            let t_host: Vec<f32> = if cfg.augment && form == TeacherInput::Logits {
                logits_of(backend, teachers[0], &x_host, rows, data.dim)?
            } else {
                idx.iter()
                    .flat_map(|&i| {
                        targets[position[i] * classes..(position[i] + 1) * classes]
                            .iter()
                            .copied()
                    })
                    .collect()
            };
            let tape = Tape::new(backend);
            let x = tape.constant(batch.x);
            let fwd = student.forward(&tape, x)?;
            let ce = CrossEntropySpec {
                grad_scale: cfg.alpha,
                ..CrossEntropySpec::new(shape)
            };
            let kd = DivergenceSpec {
                teacher: form,
                grad_scale: 1.0 - cfg.alpha,
                ..DivergenceSpec::new(shape, cfg.temperature)
            };
            let mut losses = vec![tape.cross_entropy(fwd.logits, &batch.labels, ce)?];
            let mut extra_params = Vec::new();
            if let Some(peer) = &peer {
                // Mutual learning: each network distils from the other; the divergence's teacher-side
                // gradient trains the peer through the same term.
                let pf = peer.forward(&tape, x)?;
                losses.push(tape.cross_entropy(pf.logits, &batch.labels, ce)?);
                losses.push(tape.divergence(fwd.logits, pf.logits, None, kd)?);
                losses.push(tape.divergence(pf.logits, fwd.logits, None, kd)?);
                extra_params = pf.params;
            } else {
                let t = tape.constant(Tensor::from_host(backend, &t_host, &[rows, classes])?);
                losses.push(tape.divergence(fwd.logits, t, None, kd)?);
            }
            if let Some(reg) = &regressor {
                // FitNets hint: regressor(student hidden) ~ teacher hidden (first layer or block).
                let th = teacher_features(backend, &tape, teachers[0], x, Features::FirstHidden)?;
                let (r, p) = reg.forward(&tape, fwd.hidden[0])?;
                losses.push(tape.mse(r, th, cfg.hint_weight)?);
                extra_params = p;
            }
            match cfg.method {
                Method::AttentionTransfer => {
                    let tm = teacher_features(backend, &tape, teachers[0], x, Features::FirstMap)?;
                    losses.push(tape.attention_transfer(fwd.maps[0], tm, cfg.at_weight)?);
                }
                Method::SimilarityPreserving | Method::RkdDistance => {
                    let tf =
                        teacher_features(backend, &tape, teachers[0], x, Features::LastHidden)?;
                    let last = *fwd.hidden.last().ok_or_else(|| {
                        Error::Unsupported("relation-based KD needs a hidden layer".into())
                    })?;
                    let sf = flatten(&tape, last)?;
                    losses.push(if cfg.method == Method::RkdDistance {
                        tape.rkd_distance(sf, tf, cfg.rkd_weight)?
                    } else {
                        tape.similarity_preserving(sf, tf, cfg.sp_weight)?
                    });
                }
                _ => {}
            }
            tape.backward(&losses)?;
            step += 1;
            opt.step(
                &tape,
                student.params_mut().into_iter().zip(fwd.params),
                step,
            )?;
            if let Some(peer) = peer.as_mut() {
                opt.step(
                    &tape,
                    peer.params_mut()
                        .into_iter()
                        .zip(extra_params.iter().copied()),
                    step,
                )?;
            } else if let Some(reg) = regressor.as_mut() {
                opt.step(
                    &tape,
                    reg.params_mut()
                        .into_iter()
                        .zip(extra_params.iter().copied()),
                    step,
                )?;
            }
            // The student's objective: alpha CE + (1 - alpha) T^2 KL (losses[0] and the first
            // divergence on the student's logits).
            let kd_loss = if peer.is_some() { losses[2] } else { losses[1] };
            backend.axpy(cfg.alpha, &tape.value(losses[0]).buf, &total.buf)?;
            backend.axpy(1.0 - cfg.alpha, &tape.value(kd_loss).buf, &total.buf)?;
            progress(Progress::Step(fold));
        }
        curve.push(total.to_host(backend)?[0] as f64 / batches.len() as f64);
    }
    Ok((student, curve))
}

/// Which of the frozen teacher's features a method matches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Features {
    /// The first hidden activation (FitNets).
    FirstHidden,
    /// The first `[N, C, H, W]` feature map (attention transfer).
    FirstMap,
    /// The last hidden activation, flattened to `[N, D]` (relation-based methods).
    LastHidden,
}

/// `[N, ...]` to `[N, D]`.
fn flatten<'a, B: Backend + 'a>(
    tape: &Tape<'a, B>,
    v: crate::tape::Var,
) -> Result<crate::tape::Var> {
    let t = tape.value(v);
    let n = t.shape[0];
    tape.reshape(v, &[n, t.len() / n])
}

/// The frozen teacher's features for the batch already on the tape, as a constant.
fn teacher_features<'a, B: Backend + 'a>(
    backend: &B,
    tape: &Tape<'a, B>,
    teacher: &Net<B>,
    x: crate::tape::Var,
    which: Features,
) -> Result<crate::tape::Var> {
    let inner = Tape::new(backend);
    let xv = inner.constant(tape.value(x));
    let f = teacher.forward(&inner, xv)?;
    let missing = || Error::Unsupported("the teacher has no hidden layer to match".into());
    let v = match which {
        Features::FirstHidden => *f.hidden.first().ok_or_else(missing)?,
        Features::FirstMap => *f.maps.first().ok_or_else(missing)?,
        Features::LastHidden => flatten(&inner, *f.hidden.last().ok_or_else(missing)?)?,
    };
    Ok(tape.constant(inner.value(v)))
}

/// The FitNets regressor from the student's hint layer to the teacher's.
enum Regressor<B: Backend> {
    Linear(Mlp<B>),
    Conv(Box<Conv2d<B>>),
}

impl<B: Backend> Regressor<B> {
    fn forward<'a>(
        &self,
        tape: &Tape<'a, B>,
        h: crate::tape::Var,
    ) -> Result<(crate::tape::Var, Vec<crate::tape::Var>)>
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

    fn params_mut(&mut self) -> Vec<&mut crate::nn::Param<B>> {
        match self {
            Regressor::Linear(m) => m.params_mut(),
            Regressor::Conv(c) => vec![&mut c.weight, &mut c.bias],
        }
    }
}
