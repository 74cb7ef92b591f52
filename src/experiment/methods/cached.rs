//! Offline distillation: the frozen teacher's soft targets `softmax(t / T)` are written to
//! `cache_dir/fold{f}.f32` (little-endian f32) once per fold and read back, as a trainer that
//! precomputes its teacher's targets would; the student then learns from the probabilities read.

use super::step::mean_soft_probs;
use super::{Distill, Setup, SoftTargets};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::TeacherInput;

pub struct Cached;

impl Distill for Cached {
    type Modules<B: Backend> = ();

    fn name(&self) -> &'static str {
        "cached"
    }

    fn about(&self) -> &'static str {
        "Offline: the teacher's soft targets written to disk once and read back"
    }

    fn soft_targets<B: Backend>(&self, cx: &Setup<'_, B>) -> Result<Option<SoftTargets>> {
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
