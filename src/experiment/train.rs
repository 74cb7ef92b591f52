//! The pieces every model's training shares: batches on the device, hard-label training, and
//! evaluation (logits, accuracy, latency).

use std::time::Instant;

use super::config::Config;
use super::Progress;
use crate::backend::Backend;
use crate::data::{self, Dataset};
use crate::error::{Error, Result};
use crate::nn::{Net, Optimizer};
use crate::ops::{CrossEntropySpec, RowShape, IGNORE_INDEX};
use crate::rng::Rng;
use crate::tape::{Tape, Tensor};

/// What the training of one fold works in: the backend, the data, the configuration and the
/// fold's number (for progress).
pub(super) struct Ctx<'r, B: Backend> {
    pub backend: &'r B,
    pub data: &'r Dataset,
    pub cfg: &'r Config,
    pub fold: usize,
}

impl<B: Backend> Clone for Ctx<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Ctx<'_, B> {}

/// One batch on the device: inputs `[rows, dim]` and labels (rows past the labelled ones masked).
pub(super) struct Batch<B: Backend> {
    pub x: Tensor<B>,
    pub labels: B::Labels,
    pub rows: usize,
}

/// The rows `idx` of the data as a batch whose first `labelled` rows keep their labels, with the
/// inputs on the host too; `augment` (a stream and the noise level) shifts and perturbs them.
pub(super) fn gather<B: Backend>(
    backend: &B,
    data: &Dataset,
    idx: &[usize],
    labelled: usize,
    augment: Option<(&mut Rng, f32)>,
) -> Result<(Batch<B>, Vec<f32>)> {
    let mut x = Vec::with_capacity(idx.len() * data.dim);
    for &i in idx {
        x.extend_from_slice(&data.x[i * data.dim..(i + 1) * data.dim]);
    }
    if let (Some((rng, noise)), Some(image)) = (augment, data.image) {
        data::augment(&mut x, image, true, noise, rng)?;
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
pub(super) fn train_supervised<B: Backend>(
    cx: Ctx<'_, B>,
    model: &mut Net<B>,
    idx: &[usize],
    epochs: usize,
    rng: &mut Rng,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<f64>> {
    let (backend, data) = (cx.backend, cx.data);
    let mut curve = Vec::with_capacity(epochs);
    let mut step = 0u32;
    let opt = Optimizer::adam(cx.cfg.lr);
    for _ in 0..epochs {
        let total = Tensor::zeros(backend, &[1])?;
        let batches = data::batches(idx, cx.cfg.batch, rng);
        for b in &batches {
            let (batch, _) = gather(backend, data, b, b.len(), None)?;
            let tape = Tape::new(backend);
            let x = tape.constant(batch.x);
            let fwd = model.forward(&tape, x)?;
            let spec = CrossEntropySpec::new(RowShape::new(batch.rows, data.classes));
            let loss = tape.cross_entropy(fwd.logits, &batch.labels, spec)?;
            tape.backward(&[loss])?;
            step += 1;
            opt.step(&tape, model.params_mut().into_iter().zip(fwd.params), step)?;
            tape.add_weighted_loss(loss, &total)?;
            progress(Progress::Step(cx.fold));
        }
        curve.push(total.to_host(backend)?[0] as f64 / batches.len() as f64);
    }
    Ok(curve)
}

/// The logits of `model` for `idx`, on the host (a frozen teacher's soft targets are computed
/// once this way).
pub(super) fn predict<B: Backend>(
    backend: &B,
    model: &Net<B>,
    data: &Dataset,
    idx: &[usize],
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(idx.len() * data.classes);
    for chunk in idx.chunks(1024) {
        let (batch, _) = gather(backend, data, chunk, 0, None)?;
        let tape = Tape::new(backend);
        let x = tape.constant(batch.x);
        let logits = model.forward(&tape, x)?.logits;
        out.extend(tape.value(logits)?.to_host(backend)?);
    }
    Ok(out)
}

/// The logits of `model` for inputs `x` `[rows, dim]` given on the host (augmented ones).
pub(super) fn logits_of<B: Backend>(
    backend: &B,
    model: &Net<B>,
    x: &[f32],
    rows: usize,
    dim: usize,
) -> Result<Vec<f32>> {
    let tape = Tape::new(backend);
    let xv = tape.constant(Tensor::from_host(backend, x, &[rows, dim])?);
    let logits = model.forward(&tape, xv)?.logits;
    tape.value(logits)?.to_host(backend)
}

/// `idx` names at least one example of `data`, each in range.
fn check_idx(data: &Dataset, idx: &[usize]) -> Result<()> {
    if idx.is_empty() {
        return Err(Error::Empty(
            "no examples to evaluate: pass at least one index".into(),
        ));
    }
    if let Some(&i) = idx.iter().find(|&&i| i >= data.len()) {
        return Err(Error::Config(format!(
            "example {i} of a data set of {}: indices must be in 0..{}",
            data.len(),
            data.len()
        )));
    }
    Ok(())
}

/// Accuracy of `model` on `idx` (its outputs one per class of `data`).
pub fn accuracy<B: Backend>(
    backend: &B,
    model: &Net<B>,
    data: &Dataset,
    idx: &[usize],
) -> Result<f64> {
    check_idx(data, idx)?;
    let logits = predict(backend, model, data, idx)?;
    if logits.len() != idx.len() * data.classes {
        return Err(Error::shape(
            "logits",
            logits.len(),
            idx.len() * data.classes,
            format!(
                "the model's outputs per example must be the data set's {} classes",
                data.classes
            ),
        ));
    }
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
    check_idx(data, idx)?;
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
