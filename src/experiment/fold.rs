//! One fold: the teacher(s) on every label of the training part (or the loaded one), the simple
//! model and the distilled student on its labelled part, each scored on the test part.

use super::config::Arch;
use super::distil::distil;
use super::report::FoldResult;
use super::streams::FoldStreams;
use super::train::{accuracy, train_supervised, Ctx};
use super::Progress;
use crate::backend::Backend;
use crate::data;
use crate::error::Result;
use crate::nn::Net;

/// What one fold leaves: its accuracies and curves, its (first) teacher and its student.
pub(super) struct FoldOutput<B: Backend> {
    pub result: FoldResult,
    pub teacher: Net<B>,
    pub student: Net<B>,
}

/// Runs fold `cx.fold` on its `train` / `test` split, drawing from `streams`.
pub(super) fn run_fold<B: Backend>(
    cx: Ctx<'_, B>,
    streams: &FoldStreams,
    train: &[usize],
    test: &[usize],
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<FoldOutput<B>> {
    let (backend, data, cfg, f) = (cx.backend, cx.data, cx.cfg, cx.fold);
    let (labelled, unlabelled) =
        data::label_split(data, train, cfg.label_fraction, &mut streams.label_split())?;

    let (mut teachers, teacher_curve) = train_teachers(cx, streams, train, progress)?;
    let teacher_acc = accuracy(backend, &teachers[0], data, test)?;

    // Simple: the student's architecture on the labelled part only, same epochs.
    let mut simple = cfg.build(
        backend,
        data,
        cfg.student_arch(),
        &mut streams.student_init(),
    )?;
    let simple_curve = hard_labels(
        cx,
        "simple",
        &mut simple,
        &labelled,
        cfg.epochs,
        &mut streams.simple_order(),
        progress,
    )?;
    let simple_acc = accuracy(backend, &simple, data, test)?;

    // Distilled student, same initialisation as the simple model.
    let (mut student, student_curve) =
        distil(cx, streams, &teachers, &labelled, &unlabelled, progress)?;
    if cfg.finetune_epochs > 0 {
        hard_labels(
            cx,
            "fine-tune",
            &mut student,
            &labelled,
            cfg.finetune_epochs,
            &mut streams.finetune_order(),
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

/// The method's teachers (one unless it asks for more), each on every label of `train`, and the
/// first one's curve; or the loaded teacher (`Config::teacher`), not trained, with no curve.
fn train_teachers<B: Backend>(
    cx: Ctx<'_, B>,
    streams: &FoldStreams,
    train: &[usize],
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(Vec<Net<B>>, Vec<f64>)> {
    let cfg = cx.cfg;
    if let Some(loaded) = &cfg.teacher {
        return Ok((vec![loaded.build(cx.backend, cx.data)?], Vec::new()));
    }
    let mut teachers = Vec::new();
    let mut first_curve = Vec::new();
    for k in 0..cfg.method.needs(cfg).teachers.max(1) {
        let mut t = cfg.build(
            cx.backend,
            cx.data,
            Arch::Teacher,
            &mut streams.teacher_init(k),
        )?;
        let curve = hard_labels(
            cx,
            "teacher",
            &mut t,
            train,
            cfg.teacher_epochs,
            &mut streams.teacher_order(k),
            progress,
        )?;
        if k == 0 {
            first_curve = curve;
        }
        teachers.push(t);
    }
    Ok((teachers, first_curve))
}

/// Announces and runs hard-label training of `model` (named `name` in the progress display).
fn hard_labels<B: Backend>(
    cx: Ctx<'_, B>,
    name: &str,
    model: &mut Net<B>,
    idx: &[usize],
    epochs: usize,
    order: &mut crate::rng::Rng,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<f64>> {
    progress(Progress::Start(
        name,
        cx.fold,
        epochs * idx.len().div_ceil(cx.cfg.batch),
    ));
    train_supervised(cx, model, idx, epochs, order, progress)
}
