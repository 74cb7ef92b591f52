//! Launch of `sharded.cu` (one block of 256 threads per row) for the vocab-sharded losses on host
//! slices ([`ShardedBackend`] for [`CudaBackend`]: upload, one launch, download, synchronised).

use super::{check_host_call, Phase, ShardedSpec, JSD_TERMS, STATS};
use crate::backend::cuda::{config, inv, Arg, CudaBackend, CudaBuffer, CudaKernel, CudaSource};
use crate::backend::Backend;
use crate::error::Result;
use crate::sharded::{check_out, ShardedBackend, ShardedOut};

pub(crate) const SOURCE: CudaSource = CudaSource {
    file: "sharded.cu",
    code: include_str!("sharded.cu"),
};
pub(crate) const STATS_KERNEL: CudaKernel = kernel("sharded_stats", "ppppuuufuuifu");
pub(crate) const JSD_KERNEL: CudaKernel = kernel("sharded_jsd_terms", "pppppuufffuiu");
pub(crate) const LOSS_KERNEL: CudaKernel =
    kernel("sharded_loss_and_grad", "ppppppppuuuuffffufffuuiu");

/// The kernels' `teacher_form`: 0 logits (and any loss without a teacher), 1 probabilities,
/// 2 log-probabilities.
/// 3 DKD (its teacher as logits; the stats of the rest of the row).
fn teacher_form(spec: &ShardedSpec) -> u32 {
    if spec.loss.is_dkd() {
        3
    } else if spec.given_teacher() {
        spec.teacher.code()
    } else {
        0
    }
}

const fn kernel(name: &'static str, signature: &'static str) -> CudaKernel {
    CudaKernel {
        file: "sharded.cu",
        name,
        signature,
    }
}

const THREADS: u32 = 256;

fn ptr(b: &Option<CudaBuffer>) -> u64 {
    b.as_ref().map_or(0, |b| b.ptr)
}

impl CudaBackend {
    fn sharded_inputs(
        &self,
        student: &[f32],
        teacher: Option<&[f32]>,
        labels: Option<&[i32]>,
    ) -> Result<(
        CudaBuffer,
        Option<CudaBuffer>,
        u64,
        Option<crate::backend::cuda::CudaLabels>,
    )> {
        let s = self.upload(student)?;
        let t = teacher.map(|t| self.upload(t)).transpose()?;
        let l = labels.map(|l| self.upload_labels(l)).transpose()?;
        let lp = l.as_ref().map_or(0, |l| l.ptr);
        Ok((s, t, lp, l))
    }
}

/// A call's device pointers (0 for an absent array).
#[derive(Clone, Copy)]
pub(crate) struct DevicePtrs {
    pub student: u64,
    pub teacher: u64,
    pub labels: u64,
}

impl CudaBackend {
    /// Phase 1 on device memory: `stats` `[rows * STATS]` floats at `out` (checked spec).
    pub(crate) fn sharded_stats_raw(
        &self,
        spec: &ShardedSpec,
        p: DevicePtrs,
        out: u64,
    ) -> Result<()> {
        let sh = spec.shard;
        self.launch_one(
            &STATS_KERNEL,
            config(sh.rows as u64, THREADS),
            &[
                Arg::Ptr(p.student),
                Arg::Ptr(p.teacher),
                Arg::Ptr(p.labels),
                Arg::Ptr(out),
                Arg::U32(sh.rows as u32),
                Arg::U32(sh.width as u32),
                Arg::U32(sh.offset as u32),
                Arg::F32(inv(spec.temperature)),
                Arg::U32((p.teacher != 0) as u32),
                Arg::U32((p.labels != 0) as u32),
                Arg::I32(spec.ignore_index),
                Arg::F32(spec.temperature),
                Arg::U32(teacher_form(spec)),
            ],
        )
    }

    /// The JSD round on device memory: `[rows * 2]` floats at `out` from the combined stats at
    /// `global`.
    pub(crate) fn sharded_jsd_terms_raw(
        &self,
        spec: &ShardedSpec,
        p: DevicePtrs,
        global: u64,
        out: u64,
    ) -> Result<()> {
        let sh = spec.shard;
        let (_, beta) = spec.loss.kernel_codes();
        self.launch_one(
            &JSD_KERNEL,
            config(sh.rows as u64, THREADS),
            &[
                Arg::Ptr(p.student),
                Arg::Ptr(p.teacher),
                Arg::Ptr(p.labels),
                Arg::Ptr(global),
                Arg::Ptr(out),
                Arg::U32(sh.rows as u32),
                Arg::U32(sh.width as u32),
                Arg::F32(inv(spec.temperature)),
                Arg::F32(spec.temperature),
                Arg::F32(beta),
                Arg::U32((p.labels != 0) as u32),
                Arg::I32(spec.ignore_index),
                Arg::U32(teacher_form(spec)),
            ],
        )
    }

    /// Phase 2 on device memory: each row's loss part into `rows` (`[rows]`), the gradients
    /// into `grad_s` and (non-zero) `grad_t`; `k` is `grad_scale` times the reduction's factor.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sharded_loss_and_grad_raw(
        &self,
        spec: &ShardedSpec,
        p: DevicePtrs,
        global: u64,
        jsd: u64,
        rows: u64,
        grad_s: u64,
        grad_t: u64,
        k: f64,
    ) -> Result<()> {
        let sh = spec.shard;
        let (w_ce, w_div, _) = spec.loss.weights();
        let (div, beta) = spec.loss.kernel_codes();
        self.launch_one(
            &LOSS_KERNEL,
            config(sh.rows as u64, THREADS),
            &[
                Arg::Ptr(p.student),
                Arg::Ptr(p.teacher),
                Arg::Ptr(p.labels),
                Arg::Ptr(global),
                Arg::Ptr(jsd),
                Arg::Ptr(rows),
                Arg::Ptr(grad_s),
                Arg::Ptr(grad_t),
                Arg::U32(sh.rows as u32),
                Arg::U32(sh.width as u32),
                Arg::U32(sh.classes as u32),
                Arg::U32(sh.offset as u32),
                Arg::F32(inv(spec.temperature)),
                Arg::F32(spec.temperature),
                Arg::F32(w_ce as f32),
                Arg::F32(w_div as f32),
                Arg::U32(div),
                Arg::F32(beta),
                Arg::F32(spec.label_smoothing),
                Arg::F32(k as f32),
                Arg::U32((p.teacher != 0) as u32),
                Arg::U32((p.labels != 0) as u32),
                Arg::I32(spec.ignore_index),
                Arg::U32(teacher_form(spec)),
            ],
        )
    }
}

impl ShardedBackend for CudaBackend {
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
        let (s, t, lp, _l) = self.sharded_inputs(student, teacher, labels)?;
        let out = self.filled(stats.len(), f32::NAN)?;
        let p = DevicePtrs {
            student: s.ptr,
            teacher: ptr(&t),
            labels: lp,
        };
        self.sharded_stats_raw(spec, p, out.ptr)?;
        stats.copy_from_slice(&self.download(&out)?);
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
        let (s, t, lp, _l) = self.sharded_inputs(student, Some(teacher), labels)?;
        let g = self.upload(global)?;
        let out = self.filled(terms.len(), f32::NAN)?;
        let p = DevicePtrs {
            student: s.ptr,
            teacher: ptr(&t),
            labels: lp,
        };
        self.sharded_jsd_terms_raw(spec, p, g.ptr, out.ptr)?;
        terms.copy_from_slice(&self.download(&out)?);
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
        let (s, t, lp, _l) = self.sharded_inputs(student, teacher, labels)?;
        let g = self.upload(global)?;
        let j = jsd.map(|j| self.upload(j)).transpose()?;
        let sh = spec.shard;
        let rows = self.filled(sh.rows, f32::NAN)?;
        let gs = self.filled(sh.len(), f32::NAN)?;
        let gt = out
            .grad_teacher
            .is_some()
            .then(|| self.filled(sh.len(), f32::NAN))
            .transpose()?;
        let scale = spec.scale(labels);
        let p = DevicePtrs {
            student: s.ptr,
            teacher: ptr(&t),
            labels: lp,
        };
        self.sharded_loss_and_grad_raw(
            spec,
            p,
            g.ptr,
            ptr(&j),
            rows.ptr,
            gs.ptr,
            ptr(&gt),
            spec.grad_scale as f64 * scale,
        )?;
        out.grad_student.copy_from_slice(&self.download(&gs)?);
        if let (Some(dst), Some(b)) = (out.grad_teacher, gt.as_ref()) {
            dst.copy_from_slice(&self.download(b)?);
        }
        let row = self.download(&rows)?;
        if let Some(r) = out.row_loss {
            r.copy_from_slice(&row);
        }
        Ok((row.iter().map(|&v| v as f64).sum::<f64>() * scale) as f32)
    }
}
