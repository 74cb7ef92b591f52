//! Vocab-sharded row losses on host slices (`docs/LOSSES.md` section 9): a trainer whose output
//! layer is split over devices by vocabulary (Megatron-style vocab parallel) computes each
//! shard's stats, combines them with its own collective, and gets each shard's loss part and
//! gradient columns. Nothing here does networking.
//!
//! ```
//! use distillation::{CpuBackend, Divergence, ShardedKdLoss, Shard};
//! let kd = ShardedKdLoss::hinton(2.0, 0.5);
//! let (s, t, labels) = ([1.0, 2.0, 0.5, 0.0], [0.5, 2.5, 0.0, 1.0], [3]);
//! let b = CpuBackend::new();
//! // two shards of one row: columns 0..1 and 1..4
//! let (a, z) = (Shard::new(1, 4, 0, 1), Shard::new(1, 4, 1, 3));
//! let sa = kd.stats(&b, a, &s[..1], Some(&t[..1]), Some(&labels)).unwrap();
//! let sz = kd.stats(&b, z, &s[1..], Some(&t[1..]), Some(&labels)).unwrap();
//! let global = kd.combine_shard_stats(&[&sa, &sz]).unwrap();
//! let pa = kd.loss_and_grad(&b, a, &s[..1], Some(&t[..1]), Some(&labels), &global, None).unwrap();
//! let pz = kd.loss_and_grad(&b, z, &s[1..], Some(&t[1..]), Some(&labels), &global, None).unwrap();
//! let whole = kd.loss_and_grad(&b, Shard::new(1, 4, 0, 4), &s, Some(&t), Some(&labels),
//!     &kd.stats(&b, Shard::new(1, 4, 0, 4), &s, Some(&t), Some(&labels)).unwrap(), None).unwrap();
//! assert!((pa.loss + pz.loss - whole.loss).abs() < 1e-5);
//! ```

use crate::backend::cpu::CpuBackend;
use crate::error::Result;
use crate::loss::LossAndGrad;
use crate::ops::sharded::{
    self, check_host_call, reference, Phase, Shard, ShardedLoss, ShardedSpec, JSD_TERMS, STATS,
};
use crate::ops::{check_finite, Divergence, Reduction, TeacherInput, IGNORE_INDEX};

/// Phase 2's outputs: `grad_student` `[rows, width]`, `grad_teacher` `[rows, width]` where asked
/// for, `row_loss` `[rows]` (each row's part) where asked for.
pub struct ShardedOut<'a> {
    pub grad_student: &'a mut [f32],
    pub grad_teacher: Option<&'a mut [f32]>,
    pub row_loss: Option<&'a mut [f32]>,
}

/// The backends that run the sharded losses on host memory: [`CpuBackend`] (the f64 reference)
/// and [`crate::FastCpuBackend`] (f32, `backend/cpu_fast/row_losses/sharded.rs`). Every method checks its arguments ([`sharded::check_call`]).
pub trait ShardedBackend {
    /// Phase 1: the shard's stats `[rows * STATS]` relative to its own maxima.
    fn sharded_stats(
        &self,
        spec: &ShardedSpec,
        student: &[f32],
        teacher: Option<&[f32]>,
        labels: Option<&[i32]>,
        stats: &mut [f32],
    ) -> Result<()>;

    /// The JSD round: the shard's `[rows * 2]` partial `KL(q||M)`, `KL(p||M)`.
    #[allow(clippy::too_many_arguments)]
    fn sharded_jsd_terms(
        &self,
        spec: &ShardedSpec,
        student: &[f32],
        teacher: &[f32],
        labels: Option<&[i32]>,
        global: &[f32],
        terms: &mut [f32],
    ) -> Result<()>;

    /// Phase 2: returns the shard's part of the reduced loss and writes `out`.
    #[allow(clippy::too_many_arguments)]
    fn sharded_loss_and_grad(
        &self,
        spec: &ShardedSpec,
        student: &[f32],
        teacher: Option<&[f32]>,
        labels: Option<&[i32]>,
        global: &[f32],
        jsd: Option<&[f32]>,
        out: ShardedOut<'_>,
    ) -> Result<f32>;
}

/// Checks phase 2's output lengths.
pub(crate) fn check_out(spec: &ShardedSpec, teacher: bool, out: &ShardedOut<'_>) -> Result<()> {
    let sh = spec.shard;
    sh.check("grad_student", out.grad_student.len(), sh.width)?;
    if let Some(g) = out.grad_teacher.as_deref() {
        check_teacher_grad(spec, teacher)?;
        sh.check("grad_teacher", g.len(), sh.width)?;
    }
    if let Some(r) = out.row_loss.as_deref() {
        sh.check("row_loss", r.len(), 1)?;
    }
    Ok(())
}

/// Whether a teacher gradient may be asked of `spec` (`teacher`: one was given).
pub(crate) fn check_teacher_grad(spec: &ShardedSpec, teacher: bool) -> Result<()> {
    if !teacher || !spec.loss.needs_teacher() {
        return Err(crate::Error::Unsupported(
            "a teacher gradient was asked of a loss without a teacher (cross-entropy)".into(),
        ));
    }
    if spec.loss.is_dkd() {
        return Err(crate::Error::Unsupported(
            "DKD's teacher is detached: pass no grad_teacher".into(),
        ));
    }
    if spec.given_teacher() {
        return Err(crate::Error::Unsupported(
            "the teacher's gradient needs the teacher as logits (TeacherInput::Logits); a \
             teacher given as probabilities or log-probabilities has none here: ask for no \
             teacher gradient"
                .into(),
        ));
    }
    Ok(())
}

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn store(dst: &mut [f32], src: &[f64]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = v as f32;
    }
}

impl ShardedBackend for CpuBackend {
    fn sharded_stats(
        &self,
        spec: &ShardedSpec,
        student: &[f32],
        teacher: Option<&[f32]>,
        labels: Option<&[i32]>,
        stats: &mut [f32],
    ) -> Result<()> {
        check_host_call(spec, Phase::Stats, student, teacher, labels, None, None)?;
        spec.shard.check("stats", stats.len(), STATS)?;
        let t = teacher.map(wide);
        store(
            stats,
            &reference::stats(spec, &wide(student), t.as_deref(), labels),
        );
        Ok(())
    }

    fn sharded_jsd_terms(
        &self,
        spec: &ShardedSpec,
        student: &[f32],
        teacher: &[f32],
        labels: Option<&[i32]>,
        global: &[f32],
        terms: &mut [f32],
    ) -> Result<()> {
        check_host_call(
            spec,
            Phase::JsdTerms,
            student,
            Some(teacher),
            labels,
            Some(global),
            None,
        )?;
        spec.shard.check("JSD terms", terms.len(), JSD_TERMS)?;
        let r = reference::jsd_terms(spec, &wide(student), &wide(teacher), labels, &wide(global));
        store(terms, &r);
        Ok(())
    }

    fn sharded_loss_and_grad(
        &self,
        spec: &ShardedSpec,
        student: &[f32],
        teacher: Option<&[f32]>,
        labels: Option<&[i32]>,
        global: &[f32],
        jsd: Option<&[f32]>,
        out: ShardedOut<'_>,
    ) -> Result<f32> {
        check_host_call(
            spec,
            Phase::LossAndGrad,
            student,
            teacher,
            labels,
            Some(global),
            jsd,
        )?;
        check_out(spec, teacher.is_some(), &out)?;
        let t = teacher.map(wide);
        let j = jsd.map(wide);
        let r = reference::loss_and_grad(
            spec,
            &wide(student),
            t.as_deref(),
            labels,
            &wide(global),
            j.as_deref(),
        );
        store(out.grad_student, &r.grad_student);
        if let Some(g) = out.grad_teacher {
            store(g, &r.grad_teacher);
        }
        if let Some(rl) = out.row_loss {
            store(rl, &r.row_loss);
        }
        Ok(r.loss as f32)
    }
}

/// A vocab-sharded loss (`docs/LOSSES.md` section 9) on host slices: [`ShardedKdLoss::stats`]
/// per shard, [`ShardedKdLoss::combine_shard_stats`] (or the caller's all-reduce MAX, then
/// [`ShardedKdLoss::rescale_stats`], then all-reduce SUM), [`ShardedKdLoss::jsd_terms`] for JSD
/// (all-reduced SUM), then [`ShardedKdLoss::loss_and_grad`] per shard.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShardedKdLoss {
    pub loss: ShardedLoss,
    /// How the teacher is given: logits (the default), probabilities or log-probabilities
    /// (the temperature then applies to the student only; section 2).
    pub teacher: TeacherInput,
    pub temperature: f32,
    /// Label smoothing of the cross-entropy term, in [0, 1).
    pub label_smoothing: f32,
    pub ignore_index: i32,
    pub reduction: Reduction,
    /// Also return the teacher's gradient (online distillation; teacher logits only).
    pub teacher_grad: bool,
    /// Check the inputs first and return an error naming the first bad one: logits finite; a
    /// given teacher's values (probabilities finite and `>= 0`, log-probabilities not NaN nor
    /// above 0) in every phase and, in phase 2, each row's sum over every shard 1 within `1e-3`
    /// (from the combined stats).
    pub check_inputs: bool,
}

impl ShardedKdLoss {
    /// Any sharded loss at temperature `temperature`, batchmean.
    pub fn new(loss: ShardedLoss, temperature: f32) -> Self {
        ShardedKdLoss {
            loss,
            teacher: TeacherInput::Logits,
            temperature,
            label_smoothing: 0.0,
            ignore_index: IGNORE_INDEX,
            reduction: Reduction::BatchMean,
            teacher_grad: false,
            check_inputs: false,
        }
    }

    /// The Hinton loss `alpha CE + (1 - alpha) T^2 KL`.
    pub fn hinton(temperature: f32, alpha: f32) -> Self {
        Self::new(ShardedLoss::Hinton { alpha }, temperature)
    }

    /// `T^2 D(q || p)` for a divergence of section 2.
    pub fn divergence(divergence: Divergence, temperature: f32) -> Self {
        Self::new(ShardedLoss::Divergence(divergence), temperature)
    }

    /// Decoupled KD `CE + T^2 (tckd_weight TCKD + nckd_weight NCKD)` (section 8; the CE weight
    /// is 1, set `loss` for another). The teacher as logits.
    pub fn dkd(temperature: f32, tckd_weight: f32, nckd_weight: f32) -> Self {
        Self::new(
            ShardedLoss::Dkd {
                ce_weight: 1.0,
                tckd_weight,
                nckd_weight,
            },
            temperature,
        )
    }

    /// Cross-entropy (temperature 1 is its only use of `temperature`: none).
    pub fn cross_entropy() -> Self {
        Self::new(ShardedLoss::CrossEntropy, 1.0)
    }

    /// The spec for one shard.
    pub fn spec(&self, shard: Shard) -> ShardedSpec {
        ShardedSpec {
            teacher: self.teacher,
            label_smoothing: self.label_smoothing,
            reduction: self.reduction,
            ignore_index: self.ignore_index,
            ..ShardedSpec::new(shard, self.loss, self.temperature)
        }
    }

    /// The call's checks before anything is allocated ([`sharded::check_host_call`]: the spec,
    /// every length, the labels, reverse KL's support), then the opt-in value checks.
    #[allow(clippy::too_many_arguments)]
    fn check_inputs(
        &self,
        spec: &ShardedSpec,
        phase: Phase,
        student: &[f32],
        teacher: Option<&[f32]>,
        labels: Option<&[i32]>,
        global: Option<&[f32]>,
        jsd: Option<&[f32]>,
    ) -> Result<()> {
        let teacher = teacher.filter(|_| self.loss.needs_teacher());
        check_host_call(spec, phase, student, teacher, labels, global, jsd)?;
        if self.check_inputs {
            check_finite("student", student)?;
            if let Some(t) = teacher {
                spec.check_teacher_values(t, labels)?;
            }
            if let Some(g) = global.filter(|_| phase == Phase::LossAndGrad) {
                spec.check_teacher_sums(g, labels)?;
            }
        }
        Ok(())
    }

    /// Phase 1: the shard's stats `[rows * STATS]` (maxima plane `[rows, 2]`, then sums plane
    /// `[rows, 9]`), relative to the shard's own maxima.
    pub fn stats<B: ShardedBackend>(
        &self,
        backend: &B,
        shard: Shard,
        student: &[f32],
        teacher: Option<&[f32]>,
        labels: Option<&[i32]>,
    ) -> Result<Vec<f32>> {
        let spec = self.spec(shard);
        self.check_inputs(&spec, Phase::Stats, student, teacher, labels, None, None)?;
        let mut out = vec![f32::NAN; shard.rows * STATS];
        backend.sharded_stats(&spec, student, teacher, labels, &mut out)?;
        Ok(out)
    }

    /// The in-process combine: every shard's stats, in shard order, into the global stats.
    pub fn combine_shard_stats(&self, shards: &[&[f32]]) -> Result<Vec<f32>> {
        sharded::combine_shard_stats_f32(self.temperature, shards)
    }

    /// The distributed combine's middle step: after an all-reduce MAX of the maxima plane
    /// (`stats[..rows * 2]`) into `global_maxima`, rescales this shard's sums to it; then the
    /// caller all-reduces SUM the sums plane (`stats[rows * 2..]`).
    pub fn rescale_stats(&self, stats: &mut [f32], global_maxima: &[f32]) -> Result<()> {
        sharded::rescale_stats_f32(self.temperature, stats, global_maxima)
    }

    /// The JSD round (JSD only): the shard's `[rows * 2]` terms, to be all-reduced SUM.
    pub fn jsd_terms<B: ShardedBackend>(
        &self,
        backend: &B,
        shard: Shard,
        student: &[f32],
        teacher: &[f32],
        labels: Option<&[i32]>,
        global: &[f32],
    ) -> Result<Vec<f32>> {
        let spec = self.spec(shard);
        let phase = Phase::JsdTerms;
        self.check_inputs(
            &spec,
            phase,
            student,
            Some(teacher),
            labels,
            Some(global),
            None,
        )?;
        let mut out = vec![f32::NAN; shard.rows * JSD_TERMS];
        backend.sharded_jsd_terms(&spec, student, teacher, labels, global, &mut out)?;
        Ok(out)
    }

    /// Phase 2: the shard's part of the loss (and of each row's loss) and its gradient columns
    /// `[rows, width]`; the teacher's when `teacher_grad` is set.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grad<B: ShardedBackend>(
        &self,
        backend: &B,
        shard: Shard,
        student: &[f32],
        teacher: Option<&[f32]>,
        labels: Option<&[i32]>,
        global: &[f32],
        jsd: Option<&[f32]>,
    ) -> Result<LossAndGrad<f32, f32>> {
        let spec = self.spec(shard);
        let phase = Phase::LossAndGrad;
        self.check_inputs(&spec, phase, student, teacher, labels, Some(global), jsd)?;
        let mut grad_student = vec![f32::NAN; shard.len()];
        let mut grad_teacher =
            (self.teacher_grad && teacher.is_some() && self.loss.needs_teacher())
                .then(|| vec![f32::NAN; shard.len()]);
        let mut row_loss = vec![f32::NAN; shard.rows];
        let loss = backend.sharded_loss_and_grad(
            &spec,
            student,
            teacher,
            labels,
            global,
            jsd,
            ShardedOut {
                grad_student: &mut grad_student,
                grad_teacher: grad_teacher.as_deref_mut(),
                row_loss: Some(&mut row_loss),
            },
        )?;
        Ok(LossAndGrad {
            loss,
            row_loss,
            grad_student,
            grad_teacher,
        })
    }
}
