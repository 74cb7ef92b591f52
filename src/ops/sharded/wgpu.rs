//! Dispatch of `sharded.wgsl` (one workgroup per row) for the vocab-sharded losses on host
//! slices ([`ShardedBackend`] for [`WgpuBackend`]: upload, one dispatch, download). A shard
//! whose arrays exceed the device's storage binding size is refused with [`Error::Limit`].

use bytemuck::{Pod, Zeroable};

use super::{check_host_call, Phase, ShardedSpec, JSD_TERMS, STATS};
use crate::backend::wgpu::dispatch::Window;
use crate::backend::wgpu::pipelines::{Bind, WgslKernel};
use crate::backend::wgpu::{uniform_layout, UniformLayout, WgpuBackend, WgpuBuffer, WgpuLabels};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::divergence::wgpu::GIVEN_TEACHER_MAX_TEMPERATURE;
use crate::sharded::{check_out, ShardedBackend, ShardedOut};

const BINDINGS: &[Bind] = &[
    Bind::Uniform,
    Bind::Read,      // student
    Bind::Read,      // teacher
    Bind::Read,      // labels
    Bind::ReadWrite, // stats, then the JSD terms
    Bind::ReadWrite, // row_loss
    Bind::ReadWrite, // grad_student
    Bind::ReadWrite, // grad_teacher
];

pub(crate) const STATS_KERNEL: WgslKernel = WgslKernel {
    file: "sharded.wgsl",
    body: include_str!("sharded.wgsl"),
    entry: "sharded_stats",
    row_io: false,
    bindings: BINDINGS,
};
pub(crate) const JSD_KERNEL: WgslKernel = WgslKernel {
    entry: "sharded_jsd_terms",
    ..STATS_KERNEL
};
pub(crate) const LOSS_KERNEL: WgslKernel = WgslKernel {
    entry: "sharded_loss_and_grad",
    ..STATS_KERNEL
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ShardedParams {
    rows: u32,
    width: u32,
    classes: u32,
    offset: u32,
    inv_t: f32,
    temperature: f32,
    has_teacher: u32,
    has_labels: u32,
    ignore_index: i32,
    w_ce: f32,
    w_div: f32,
    div: u32,
    beta: f32,
    eps: f32,
    k: f32,
    grad_teacher: u32,
    teacher_form: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

pub(crate) fn uniform_layouts() -> Vec<UniformLayout> {
    vec![uniform_layout!(
        ShardedParams,
        "sharded.wgsl",
        [
            rows,
            width,
            classes,
            offset,
            inv_t,
            temperature,
            has_teacher,
            has_labels,
            ignore_index,
            w_ce,
            w_div,
            div,
            beta,
            eps,
            k,
            grad_teacher,
            teacher_form
        ]
    )]
}

fn params(
    spec: &ShardedSpec,
    teacher: bool,
    labels: bool,
    k: f64,
    grad_teacher: bool,
) -> ShardedParams {
    let (w_ce, w_div, _) = spec.loss.weights();
    let (div, beta) = spec.loss.kernel_codes();
    let sh = spec.shard;
    ShardedParams {
        rows: sh.rows as u32,
        width: sh.width as u32,
        classes: sh.classes as u32,
        offset: sh.offset as u32,
        inv_t: 1.0 / spec.temperature,
        temperature: spec.temperature,
        has_teacher: teacher as u32,
        has_labels: labels as u32,
        ignore_index: spec.ignore_index,
        w_ce: w_ce as f32,
        w_div: w_div as f32,
        div,
        beta,
        eps: spec.label_smoothing,
        k: k as f32,
        grad_teacher: grad_teacher as u32,
        // cross-entropy reads no teacher: logits (0) keeps its teacher stats 0
        teacher_form: if spec.given_teacher() {
            spec.teacher.code()
        } else {
            0
        },
        pad0: 0,
        pad1: 0,
        pad2: 0,
    }
}

/// The device copies of a call's arrays (absent ones `None`, bound to the backend's dummies).
struct Bufs {
    student: WgpuBuffer,
    teacher: Option<WgpuBuffer>,
    labels: Option<WgpuLabels>,
    /// The stats, then (JSD) the JSD terms.
    stats: WgpuBuffer,
    row_loss: Option<WgpuBuffer>,
    grad_s: Option<WgpuBuffer>,
    grad_t: Option<WgpuBuffer>,
}

fn window(b: &Option<WgpuBuffer>) -> Option<Window<'_>> {
    b.as_ref().map(|b| Window::of(b, 0, b.len() as u64))
}

impl Bufs {
    fn run(&self, w: &WgpuBackend, kernel: &WgslKernel, p: &ShardedParams) -> Result<()> {
        let windows = [
            Some(Window::of(&self.student, 0, self.student.len() as u64)),
            window(&self.teacher),
            self.labels
                .as_ref()
                .map(|l| Window::elems(l, 0, l.len() as u64)),
            Some(Window::of(&self.stats, 0, self.stats.len() as u64)),
            window(&self.row_loss),
            window(&self.grad_s),
            window(&self.grad_t),
        ];
        w.submit(|enc| w.dispatch(enc, kernel, 256, bytemuck::bytes_of(p), &windows, p.rows))
    }
}

fn upload_labels(w: &WgpuBackend, labels: Option<&[i32]>) -> Result<Option<WgpuLabels>> {
    labels.map(|l| w.upload_labels(l)).transpose()
}

/// Refuses a shard whose arrays exceed the device's storage binding size, and a given teacher
/// above the unsharded divergence's [`GIVEN_TEACHER_MAX_TEMPERATURE`] (the same f32 limit).
fn check_size(w: &WgpuBackend, spec: &ShardedSpec) -> Result<()> {
    if spec.given_teacher() && spec.temperature > GIVEN_TEACHER_MAX_TEMPERATURE {
        return Err(Error::Unsupported(format!(
            "temperature {} with the teacher given as probabilities or log-probabilities: the \
             wgpu kernels meet 1e-4 there only up to T = {GIVEN_TEACHER_MAX_TEMPERATURE} (as the \
             unsharded divergence); pass the teacher's logits (TeacherInput::Logits), or use the \
             CPU or CUDA backend",
            spec.temperature
        )));
    }
    let bytes = (spec.shard.len().max(spec.shard.rows * STATS) * 4) as u64;
    if bytes > w.max_binding_bytes() {
        return Err(Error::Limit(format!(
            "a shard of [{}, {}] needs {bytes} bytes in one storage binding, more than this \
             device's {}: split the rows over several calls",
            spec.shard.rows,
            spec.shard.width,
            w.max_binding_bytes()
        )));
    }
    Ok(())
}

impl ShardedBackend for WgpuBackend {
    fn sharded_stats(
        &self,
        spec: &ShardedSpec,
        student: &[f32],
        teacher: Option<&[f32]>,
        labels: Option<&[i32]>,
        stats: &mut [f32],
    ) -> Result<()> {
        check_host_call(spec, Phase::Stats, student, teacher, labels, None, None)?;
        check_size(self, spec)?;
        spec.shard.check("stats", stats.len(), STATS)?;
        let bufs = Bufs {
            student: self.upload(student)?,
            teacher: teacher.map(|t| self.upload(t)).transpose()?,
            labels: upload_labels(self, labels)?,
            stats: self.filled(stats.len(), f32::NAN)?,
            row_loss: None,
            grad_s: None,
            grad_t: None,
        };
        let p = params(spec, teacher.is_some(), labels.is_some(), 0.0, false);
        bufs.run(self, &STATS_KERNEL, &p)?;
        stats.copy_from_slice(&self.download(&bufs.stats)?);
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
        check_size(self, spec)?;
        spec.shard.check("JSD terms", terms.len(), JSD_TERMS)?;
        let bufs = Bufs {
            student: self.upload(student)?,
            teacher: Some(self.upload(teacher)?),
            labels: upload_labels(self, labels)?,
            stats: self.upload(&[global, &vec![f32::NAN; terms.len()]].concat())?,
            row_loss: None,
            grad_s: None,
            grad_t: None,
        };
        let p = params(spec, true, labels.is_some(), 0.0, false);
        bufs.run(self, &JSD_KERNEL, &p)?;
        terms.copy_from_slice(&self.download(&bufs.stats)?[global.len()..]);
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
        check_size(self, spec)?;
        let len = spec.shard.len();
        let want_t = out.grad_teacher.is_some();
        let bufs = Bufs {
            student: self.upload(student)?,
            teacher: teacher.map(|t| self.upload(t)).transpose()?,
            labels: upload_labels(self, labels)?,
            stats: self.upload(&[global, jsd.unwrap_or(&[])].concat())?,
            row_loss: Some(self.filled(spec.shard.rows, f32::NAN)?),
            grad_s: Some(self.filled(len, f32::NAN)?),
            grad_t: want_t.then(|| self.filled(len, f32::NAN)).transpose()?,
        };
        let scale = spec.scale(labels);
        let k = spec.grad_scale as f64 * scale;
        let p = params(spec, teacher.is_some(), labels.is_some(), k, want_t);
        bufs.run(self, &LOSS_KERNEL, &p)?;
        out.grad_student
            .copy_from_slice(&self.download(bufs.grad_s.as_ref().expect("grad"))?);
        if let (Some(g), Some(b)) = (out.grad_teacher, bufs.grad_t.as_ref()) {
            g.copy_from_slice(&self.download(b)?);
        }
        let rows = self.download(bufs.row_loss.as_ref().expect("rows"))?;
        if let Some(r) = out.row_loss {
            r.copy_from_slice(&rows);
        }
        Ok((rows.iter().map(|&v| v as f64).sum::<f64>() * scale) as f32)
    }
}
