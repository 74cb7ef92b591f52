//! What a run hands back: the accuracies of every fold, their mean and spread, sizes and
//! latencies.

use std::time::Instant;

use serde::Serialize;

use super::config::Config;
use crate::backend::Backend;
use crate::error::Result;
use crate::nn::Net;

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

/// The report, and the last fold's networks for saving: its distilled student and its teacher
/// (the one trained on that fold's training part, or the loaded one).
pub struct Outcome<B: Backend> {
    pub report: Report,
    pub student: Net<B>,
    pub teacher: Net<B>,
}

/// The report: accuracies over the folds, sizes and (given) latencies of the last fold's models.
pub(super) fn finish<B: Backend>(
    backend: &B,
    cfg: &Config,
    results: Vec<FoldResult>,
    teacher_params: usize,
    (teacher, student): (Net<B>, Net<B>),
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
    Ok(Outcome {
        report,
        student,
        teacher,
    })
}
