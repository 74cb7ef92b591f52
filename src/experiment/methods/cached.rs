//! Offline distillation: the frozen teacher's soft targets `softmax(t / T)` are written to
//! `cache_dir/fold{f}.f32` (little-endian f32) once per fold and read back, as a trainer that
//! precomputes its teacher's targets would; the student then learns from the probabilities read.
//!
//! With `Config::top_k` the teacher is stored as its top-k log-probabilities at T = 1 in a
//! safetensors top-k cache (`crate::topk_cache`, `fold{f}.topk.safetensors`), written and read
//! in chunks of rows; the student learns from the sparse teacher of `docs/LOSSES.md` section 10
//! with the configured tail, densified per row as that section's renormalize tail (`-inf` off
//! the top-k) or uniform tail (`m / (C - k)` there), which give the dense divergence exactly the
//! sparse loss (`tests/suite/sparse.rs`); the bucket tail has no dense form and is refused here.

use super::step::mean_soft_probs;
use super::{Distill, Setup, SoftTargets};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::experiment::Config;
use crate::ops::{SparseSpec, SparseTail, SparseValues, TeacherInput};
use crate::topk_cache::{top_k_logprobs, TopKReader, TopKWriter};

/// Rows per chunk of the top-k cache's writes and reads.
const CHUNK: usize = 256;

pub struct Cached;

impl Distill for Cached {
    type Modules<B: Backend> = ();

    fn name(&self) -> &'static str {
        "cached"
    }

    fn about(&self) -> &'static str {
        "Offline: the teacher's soft targets written to disk once and read back"
    }

    fn validate(&self, cfg: &Config, data: &crate::data::Dataset) -> Result<()> {
        if let Some(k) = cfg.top_k {
            if k == 0 || k > data.classes.min(crate::ops::sparse::MAX_TOP_K) {
                return Err(Error::Config(format!(
                    "--top-k {k}: k must be in 1..={} (the classes, at most 1024)",
                    data.classes.min(crate::ops::sparse::MAX_TOP_K)
                )));
            }
            if cfg.top_k_tail == SparseTail::Bucket {
                return Err(Error::Config(
                    "--top-k-tail bucket has no dense form and the experiment trains through the \
                     dense divergence: use renormalize or uniform (the bucket tail is in the \
                     loss API: SparseKdLoss, dst_*_sparse_kd, distillation.sparse_kd_loss)"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    fn soft_targets<B: Backend>(&self, cx: &Setup<'_, B>) -> Result<Option<SoftTargets>> {
        if let Some(k) = cx.cfg.top_k {
            let logits = cx.teacher_logits(0)?;
            return Ok(Some(SoftTargets {
                values: top_k_round_trip(cx.cfg, cx.fold, &logits, cx.data.classes, k)?,
                form: TeacherInput::LogProbs,
            }));
        }
        let probs = mean_soft_probs(
            &[cx.teacher_logits(0)?],
            cx.data.classes,
            cx.cfg.temperature,
        );
        Ok(Some(SoftTargets {
            values: round_trip(&cx.cfg.cache_dir, cx.fold, &probs)?,
            form: TeacherInput::Probs,
        }))
    }
}

/// Writes the teacher's top-k log-probabilities to `dir/fold{f}.topk.safetensors` in chunks,
/// reads them back in chunks and densifies each row for the configured tail (re-tempered at
/// `cfg.temperature`, `docs/LOSSES.md` section 10): dense log-probabilities.
fn top_k_round_trip(
    cfg: &Config,
    fold: usize,
    logits: &[f32],
    classes: usize,
    k: usize,
) -> Result<Vec<f32>> {
    let dir = &cfg.cache_dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    let path = dir.join(format!("fold{fold}.topk.safetensors"));
    let rows = logits.len() / classes;
    let mut w = TopKWriter::create(&path, rows, k, classes)?;
    for chunk in logits.chunks(CHUNK * classes) {
        let (idx, val) = top_k_logprobs(chunk, classes, k)?;
        w.write_rows(&idx, &val)?;
    }
    w.finish()?;
    let spec = SparseSpec {
        tail: cfg.top_k_tail,
        values: SparseValues::LogProbs,
        ..SparseSpec::new(crate::ops::RowShape::new(rows, classes), k, cfg.temperature)
    };
    let mut r = TopKReader::open(&path)?;
    let mut dense = Vec::with_capacity(rows * classes);
    for start in (0..rows).step_by(CHUNK) {
        let n = CHUNK.min(rows - start);
        let (idx, val) = r.read_rows(start, n)?;
        let vals: Vec<f32> = val.iter().map(|v| v.to_f32()).collect();
        let chunk = SparseSpec {
            shape: crate::ops::RowShape::new(n, classes),
            ..spec
        };
        crate::ops::sparse::check_sparse_teacher(&chunk, &idx, &vals, None)?;
        for (ri, rv) in idx.chunks(k).zip(vals.chunks(k)) {
            let v64: Vec<f64> = rv.iter().map(|&v| v as f64).collect();
            let (lq, m) = crate::ops::sparse::teacher_row(&spec, &v64)
                .ok_or_else(|| Error::io("read", &path, "a row of the cache is not valid"))?;
            let fill = if spec.tail == SparseTail::Uniform && classes > k {
                (m / (classes - k) as f64).ln() as f32
            } else {
                f32::NEG_INFINITY
            };
            let at = dense.len();
            dense.resize(at + classes, fill);
            for (&j, &l) in ri.iter().zip(&lq) {
                dense[at + j as usize] = l as f32;
            }
        }
    }
    Ok(dense)
}

/// Writes soft targets to `dir/fold{f}.f32` (little-endian f32) and reads them back.
fn round_trip(dir: &std::path::Path, fold: usize, probs: &[f32]) -> Result<Vec<f32>> {
    let fix = "the soft-target cache folder, Config::cache_dir (the CLI's <--out>/soft-targets), \
               must be writable";
    let io = |action, path: &std::path::Path, e: std::io::Error| {
        Error::io(action, path, format!("{e} ({fix})"))
    };
    std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
    let path = dir.join(format!("fold{fold}.f32"));
    std::fs::write(&path, bytemuck::cast_slice::<f32, u8>(probs))
        .map_err(|e| io("write", &path, e))?;
    let bytes = std::fs::read(&path).map_err(|e| io("read", &path, e))?;
    if bytes.len() != probs.len() * 4 {
        return Err(Error::io(
            "read",
            &path,
            format!(
                "{} bytes read back, {} written: another process may be writing the same \
                 cache; give each run its own cache folder",
                bytes.len(),
                probs.len() * 4
            ),
        ));
    }
    Ok(bytemuck::pod_collect_to_vec(&bytes))
}
