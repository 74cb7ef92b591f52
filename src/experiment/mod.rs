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
//!
//! With a loaded teacher (`Config::teacher`, the CLI's `--teacher`) no teacher is trained: every
//! fold uses that one, and its accuracy is measured on each fold's test split, which may hold
//! examples it was trained on.
//!
//! The layout: this file runs the folds (one after another, or side by side: [`run`],
//! [`run_parallel`]); `config.rs` holds [`Config`] and its checks; `fold.rs` one fold (teachers,
//! simple model, distilled student, fine-tuning); `distil.rs` the distillation loop every method
//! shares; `train.rs` hard-label training and evaluation; `report.rs` what a run returns;
//! `streams.rs` the named random streams; `methods/` one file per method and the registry
//! ([`methods::Distill`], [`Method`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::backend::Backend;
use crate::data::{self, Dataset};
use crate::error::Result;
use crate::nn::Net;
use crate::tape::Tensor;

mod config;
mod distil;
mod fold;
pub mod methods;
mod report;
mod streams;
mod train;

pub use config::{Config, ModelKind};
pub use methods::Method;
pub use report::{FoldResult, Outcome, Report, Summary};
pub use train::{accuracy, latency};

use config::Arch;
use fold::run_fold;
use report::finish;
use streams::RunStreams;

/// Progress events for a caller's display.
pub enum Progress<'a> {
    /// A model starts training: name, fold, total steps.
    Start(&'a str, usize, usize),
    /// One step of fold `n` done.
    Step(usize),
    /// A fold finished.
    Fold(&'a FoldResult),
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
    let streams = RunStreams::new(cfg.seed);
    let folds = data::kfold(data.len(), cfg.folds, &mut streams.folds())?;
    let take = cfg.folds_to_run();
    let ctx = |fold| train::Ctx {
        backend,
        data,
        cfg,
        fold,
    };
    let mut results = Vec::new();
    let mut last = None;
    for (f, (train, test)) in folds.iter().take(take).enumerate() {
        let out = run_fold(ctx(f), &streams.fold(f), train, test, progress)?;
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
        (teacher, student),
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
    let streams = RunStreams::new(cfg.seed);
    let folds = data::kfold(data.len(), cfg.folds, &mut streams.folds())?;
    let ctx = |fold| train::Ctx {
        backend,
        data,
        cfg,
        fold,
    };
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
            let out = run_fold(ctx(f), &streams.fold(f), train, test, &mut report)?;
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
        let arch = if teacher {
            Arch::Teacher
        } else {
            cfg.student_arch()
        };
        let net = cfg.build(backend, data, arch, &mut streams.rebuild())?;
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
    let teacher = rebuild(true, &t)?;
    finish(
        backend,
        cfg,
        results,
        teacher_params,
        (teacher, student),
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
