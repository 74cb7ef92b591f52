//! The vocab-sharded losses (`docs/LOSSES.md` section 9), f32 arrays: phase 1
//! (`dst_*_sharded_stats`), the combine (`dst_sharded_rescale_stats` between the caller's
//! all-reduce MAX and SUM, or `dst_sharded_combine_stats` in one process), the JSD round
//! (`dst_*_sharded_jsd_terms`) and phase 2 (`dst_*_sharded_loss_and_grad`); `dst_cpu_*` on the
//! f64 reference, `dst_fast_*` on the fast CPU backend (at most `threads` threads, 0: one per core),
//! `dst_cuda_*` on the caller's device memory (ABI 10).

use std::ffi::c_void;

use super::args::{check_no_alias, divergence, non_null, reduction, teacher_input, Span};
use super::status::{ffi, Fail, FfiResult, DST_ERR_INVALID_ARGUMENT};
use crate::ops::sharded::{
    combine_shard_stats_f32, rescale_stats_f32, Shard, ShardedLoss, ShardedSpec, JSD_TERMS, MAXIMA,
    STATS,
};
use crate::sharded::{ShardedBackend, ShardedOut};
use crate::CpuBackend;

/// `DstShardedSpec::loss`: `T^2 D(q || p)` for the divergence `divergence` (labels optional).
pub const DST_SHARDED_DIVERGENCE: i32 = 0;
/// `DstShardedSpec::loss`: cross-entropy with label smoothing (no teacher).
pub const DST_SHARDED_CROSS_ENTROPY: i32 = 1;
/// `DstShardedSpec::loss`: the Hinton loss `alpha CE + (1 - alpha) T^2 KL`.
pub const DST_SHARDED_HINTON: i32 = 2;
/// `DstShardedSpec::loss` (ABI 10): decoupled KD `ce_weight CE + T^2 (tckd_weight TCKD +
/// nckd_weight NCKD)` (section 8): the teacher as logits, labels required, no teacher gradient.
pub const DST_SHARDED_DKD: i32 = 3;

/// One shard of a vocab-sharded loss: the columns `offset..offset + width` of `[n, c]` logits
/// (stored `[n, width]`), the loss (`DST_SHARDED_*`), `divergence` (0 forward KL, 1 reverse KL,
/// 2 JSD with `beta`; for `DST_SHARDED_DIVERGENCE`), `alpha` (Hinton), `temperature`,
/// `label_smoothing`, `ignore_index`, `reduction` (0 batchmean, 1 sum, 2 none), `grad_scale` and
/// `teacher_input` (ABI 9: 0 logits, 1 probabilities, 2 log-probabilities; the temperature then
/// applies to the student only, reverse KL with a probability of exactly 0 is `DST_ERR_INPUT`,
/// and there is no teacher gradient), and (ABI 10) DKD's `ce_weight`, `tckd_weight`,
/// `nckd_weight` (for `DST_SHARDED_DKD`; ignored otherwise). Every shard of one loss passes the
/// same values except `offset` and `width`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DstShardedSpec {
    pub n: usize,
    pub c: usize,
    pub offset: usize,
    pub width: usize,
    pub loss: i32,
    pub divergence: i32,
    pub beta: f32,
    pub alpha: f32,
    pub temperature: f32,
    pub label_smoothing: f32,
    pub ignore_index: i32,
    pub reduction: i32,
    pub grad_scale: f32,
    pub teacher_input: i32,
    pub ce_weight: f32,
    pub tckd_weight: f32,
    pub nckd_weight: f32,
}

impl DstShardedSpec {
    fn spec(&self) -> FfiResult<ShardedSpec> {
        let loss = match self.loss {
            DST_SHARDED_DIVERGENCE => {
                ShardedLoss::Divergence(divergence(self.divergence, self.beta)?)
            }
            DST_SHARDED_CROSS_ENTROPY => ShardedLoss::CrossEntropy,
            DST_SHARDED_HINTON => ShardedLoss::Hinton { alpha: self.alpha },
            DST_SHARDED_DKD => ShardedLoss::Dkd {
                ce_weight: self.ce_weight,
                tckd_weight: self.tckd_weight,
                nckd_weight: self.nckd_weight,
            },
            code => {
                return Err(Fail::new(
                    DST_ERR_INVALID_ARGUMENT,
                    format!(
                        "invalid sharded loss {code}: use 0 (DST_SHARDED_DIVERGENCE), 1 \
                         (DST_SHARDED_CROSS_ENTROPY), 2 (DST_SHARDED_HINTON) or 3 \
                         (DST_SHARDED_DKD)"
                    ),
                ))
            }
        };
        let spec = ShardedSpec {
            teacher: teacher_input(self.teacher_input)?,
            label_smoothing: self.label_smoothing,
            reduction: reduction(self.reduction)?,
            ignore_index: self.ignore_index,
            grad_scale: self.grad_scale,
            ..ShardedSpec::new(
                Shard::new(self.n, self.c, self.offset, self.width),
                loss,
                self.temperature,
            )
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// A slice over a checked non-null pointer.
///
/// # Safety
/// `p` valid for `len` reads.
unsafe fn slice<'a, T>(p: *const T, len: usize) -> &'a [T] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(p, len) }
}

/// A mutable slice over a checked non-null pointer.
///
/// # Safety
/// `p` valid for `len` writes, aliasing nothing else of the call.
unsafe fn slice_mut<'a, T>(p: *mut T, len: usize) -> &'a mut [T] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

/// A call's checked spec, student, teacher and labels.
type Inputs<'a> = (ShardedSpec, &'a [f32], Option<&'a [f32]>, Option<&'a [i32]>);

/// The spec, the student, the teacher (required unless cross-entropy; NULL allowed then) and
/// the labels (NULL allowed for a divergence).
///
/// # Safety
/// As the entry points.
unsafe fn inputs<'a>(
    spec: *const DstShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
) -> FfiResult<Inputs<'a>> {
    non_null("spec", spec)?;
    // SAFETY: non-null and the caller's contract.
    let spec = unsafe { *spec }.spec()?;
    non_null("student", student)?;
    let len = spec.shard.len();
    // SAFETY: the caller's contract (`[n, width]` and `[n]` arrays).
    unsafe {
        let t = if spec.loss.needs_teacher() {
            non_null("teacher", teacher)?;
            Some(slice(teacher, len))
        } else {
            None
        };
        let l = if spec.loss.needs_labels() {
            non_null("labels", labels)?;
            Some(slice(labels, spec.shard.rows))
        } else {
            (!labels.is_null()).then(|| slice(labels, spec.shard.rows))
        };
        Ok((spec, slice(student, len), t, l))
    }
}

/// The byte spans of a call's inputs.
fn input_spans<'a>(
    spec: &ShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
) -> Vec<Span<'a>> {
    let len = spec.shard.len() * 4;
    vec![
        ("student", student as *const c_void, len),
        (
            "teacher",
            teacher as *const c_void,
            if spec.loss.needs_teacher() { len } else { 0 },
        ),
        ("labels", labels as *const c_void, spec.shard.rows * 4),
    ]
}

/// # Safety
/// As [`dst_cpu_sharded_stats`].
unsafe fn stats(
    b: &impl ShardedBackend,
    spec: *const DstShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
    stats: *mut f32,
) -> i32 {
    ffi(|| {
        // SAFETY: forwarded.
        let (spec, s, t, l) = unsafe { inputs(spec, student, teacher, labels)? };
        non_null("stats", stats)?;
        check_no_alias(
            &input_spans(&spec, student, teacher, labels),
            &[("stats", stats as *const c_void, spec.shard.rows * STATS * 4)],
        )?;
        // SAFETY: `[n * DST_SHARDED_STATS]` writable floats, aliasing no input.
        let out = unsafe { slice_mut(stats, spec.shard.rows * STATS) };
        Ok(b.sharded_stats(&spec, s, t, l, out)?)
    })
}

/// Phase 1 of a vocab-sharded loss on the reference CPU backend (f64 inside): writes the
/// shard's `stats` (`n * DST_SHARDED_STATS` floats: the maxima plane `[n, 2]`, then the sums
/// plane `[n, 9]`, relative to the shard's own maxima; `docs/LOSSES.md` section 9).
/// `student`, `teacher`: `[n, width]` (the shard's columns; `teacher` may be NULL for
/// cross-entropy); `labels`: `[n]` global classes (NULL allowed for a divergence).
///
/// # Safety
/// Every non-null pointer must be valid for the number of elements named above, `stats`
/// overlapping no input.
#[no_mangle]
pub unsafe extern "C" fn dst_cpu_sharded_stats(
    spec: *const DstShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
    stats_out: *mut f32,
) -> i32 {
    // SAFETY: this function's contract.
    unsafe {
        stats(
            &CpuBackend::new(),
            spec,
            student,
            teacher,
            labels,
            stats_out,
        )
    }
}

/// [`dst_cpu_sharded_stats`] on the fast CPU backend (f32, at most `threads` threads).
///
/// # Safety
/// As [`dst_cpu_sharded_stats`].
#[no_mangle]
pub unsafe extern "C" fn dst_fast_sharded_stats(
    threads: i32,
    spec: *const DstShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
    stats_out: *mut f32,
) -> i32 {
    let b = match super::host::fast_backend(threads) {
        Ok(b) => b,
        Err(e) => return ffi(|| Err(e)),
    };
    // SAFETY: this function's contract.
    unsafe { stats(&b, spec, student, teacher, labels, stats_out) }
}

/// The distributed combine's middle step: after the caller's all-reduce MAX of the maxima plane
/// (the first `2 n` floats of `stats`) into `global_maxima` (`[n, 2]`), rescales this shard's
/// sums to the global maxima and copies them into `stats`' maxima plane; then the caller
/// all-reduces SUM the sums plane (the last `9 n` floats). `temperature` is the spec's.
///
/// # Safety
/// `stats` valid for `n * DST_SHARDED_STATS` floats, `global_maxima` for `2 n`.
#[no_mangle]
pub unsafe extern "C" fn dst_sharded_rescale_stats(
    n: usize,
    temperature: f32,
    stats: *mut f32,
    global_maxima: *const f32,
) -> i32 {
    ffi(|| {
        non_null("stats", stats)?;
        non_null("global_maxima", global_maxima)?;
        crate::ops::check_temperature(temperature)?;
        let len = n.checked_mul(STATS * 4).ok_or_else(|| {
            Fail::new(
                DST_ERR_INVALID_ARGUMENT,
                format!("n = {n} rows of stats overflow the address space"),
            )
        })?;
        check_no_alias(
            &[(
                "global_maxima",
                global_maxima as *const c_void,
                n * MAXIMA * 4,
            )],
            &[("stats", stats as *const c_void, len)],
        )?;
        // SAFETY: the caller's contract; the two arrays do not overlap (checked).
        let (s, g) = unsafe {
            (
                slice_mut(stats, n * STATS),
                slice(global_maxima, n * MAXIMA),
            )
        };
        Ok(rescale_stats_f32(temperature, s, g)?)
    })
}

/// The in-process combine: `shards` stats arrays, `stats` of shard `k` at
/// `stats[k * n * DST_SHARDED_STATS ..]`, combined into `out` (`n * DST_SHARDED_STATS`).
///
/// # Safety
/// `stats` valid for `shards * n * DST_SHARDED_STATS` floats, `out` for `n * DST_SHARDED_STATS`.
#[no_mangle]
pub unsafe extern "C" fn dst_sharded_combine_stats(
    n: usize,
    shards: usize,
    temperature: f32,
    stats: *const f32,
    out: *mut f32,
) -> i32 {
    ffi(|| {
        non_null("stats", stats)?;
        non_null("out", out)?;
        crate::ops::check_temperature(temperature)?;
        let per = n
            .checked_mul(STATS)
            .filter(|p| p.checked_mul(shards).is_some())
            .ok_or_else(|| {
                Fail::new(
                    DST_ERR_INVALID_ARGUMENT,
                    format!("n = {n} rows of {shards} shards overflow"),
                )
            })?;
        // SAFETY: the caller's contract.
        let all = unsafe { slice(stats, shards * per) };
        let parts: Vec<&[f32]> = all.chunks_exact(per.max(1)).collect();
        let combined = combine_shard_stats_f32(temperature, &parts)?;
        // SAFETY: the caller's contract.
        unsafe { slice_mut(out, per) }.copy_from_slice(&combined);
        Ok(())
    })
}

/// # Safety
/// As [`dst_cpu_sharded_jsd_terms`].
unsafe fn jsd_terms(
    b: &impl ShardedBackend,
    spec: *const DstShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
    global: *const f32,
    out: *mut f32,
) -> i32 {
    ffi(|| {
        // SAFETY: forwarded.
        let (spec, s, t, l) = unsafe { inputs(spec, student, teacher, labels)? };
        non_null("global_stats", global)?;
        non_null("terms", out)?;
        let n = spec.shard.rows;
        let mut ins = input_spans(&spec, student, teacher, labels);
        ins.push(("global_stats", global as *const c_void, n * STATS * 4));
        check_no_alias(&ins, &[("terms", out as *const c_void, n * JSD_TERMS * 4)])?;
        // SAFETY: the caller's contract.
        let (g, o) = unsafe { (slice(global, n * STATS), slice_mut(out, n * JSD_TERMS)) };
        Ok(b.sharded_jsd_terms(&spec, s, t.unwrap_or(&[]), l, g, o)?)
    })
}

/// The JSD round (JSD only), reference backend: from the combined `global_stats`
/// (`n * DST_SHARDED_STATS`), the shard's `[n, 2]` partial `KL(q||M)`, `KL(p||M)` into `terms_out`,
/// to be all-reduced SUM and passed to phase 2.
///
/// # Safety
/// As [`dst_cpu_sharded_stats`]; `global_stats` valid for `n * DST_SHARDED_STATS` floats,
/// `terms_out` for `2 n`.
#[no_mangle]
pub unsafe extern "C" fn dst_cpu_sharded_jsd_terms(
    spec: *const DstShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
    global_stats: *const f32,
    terms_out: *mut f32,
) -> i32 {
    // SAFETY: this function's contract.
    unsafe {
        jsd_terms(
            &CpuBackend::new(),
            spec,
            student,
            teacher,
            labels,
            global_stats,
            terms_out,
        )
    }
}

/// [`dst_cpu_sharded_jsd_terms`] on the fast CPU backend.
///
/// # Safety
/// As [`dst_cpu_sharded_jsd_terms`].
#[no_mangle]
pub unsafe extern "C" fn dst_fast_sharded_jsd_terms(
    threads: i32,
    spec: *const DstShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
    global_stats: *const f32,
    terms_out: *mut f32,
) -> i32 {
    let b = match super::host::fast_backend(threads) {
        Ok(b) => b,
        Err(e) => return ffi(|| Err(e)),
    };
    // SAFETY: this function's contract.
    unsafe { jsd_terms(&b, spec, student, teacher, labels, global_stats, terms_out) }
}

/// # Safety
/// As [`dst_cpu_sharded_loss_and_grad`].
#[allow(clippy::too_many_arguments)]
unsafe fn loss_and_grad(
    b: &impl ShardedBackend,
    spec: *const DstShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
    global: *const f32,
    jsd: *const f32,
    loss: *mut f32,
    row_loss: *mut f32,
    grad_student: *mut f32,
    grad_teacher: *mut f32,
) -> i32 {
    ffi(|| {
        // SAFETY: forwarded.
        let (spec, s, t, l) = unsafe { inputs(spec, student, teacher, labels)? };
        non_null("global_stats", global)?;
        non_null("loss", loss)?;
        non_null("grad_student", grad_student)?;
        let (n, len) = (spec.shard.rows, spec.shard.len());
        let mut ins = input_spans(&spec, student, teacher, labels);
        ins.push(("global_stats", global as *const c_void, n * STATS * 4));
        ins.push(("jsd_terms", jsd as *const c_void, n * JSD_TERMS * 4));
        check_no_alias(
            &ins,
            &[
                ("loss", loss as *const c_void, 4),
                ("row_loss", row_loss as *const c_void, n * 4),
                ("grad_student", grad_student as *const c_void, len * 4),
                ("grad_teacher", grad_teacher as *const c_void, len * 4),
            ],
        )?;
        // SAFETY: the caller's contract: outputs writable, aliasing nothing (checked above).
        unsafe {
            let g = slice(global, n * STATS);
            let j = (!jsd.is_null()).then(|| slice(jsd, n * JSD_TERMS));
            let out = ShardedOut {
                grad_student: slice_mut(grad_student, len),
                grad_teacher: (!grad_teacher.is_null()).then(|| slice_mut(grad_teacher, len)),
                row_loss: (!row_loss.is_null()).then(|| slice_mut(row_loss, n)),
            };
            *loss = b.sharded_loss_and_grad(&spec, s, t, l, g, j, out)?;
        }
        Ok(())
    })
}

/// Phase 2 of a vocab-sharded loss, reference backend: from the combined `global_stats`
/// (`n * DST_SHARDED_STATS`) and, for JSD, the all-reduced `jsd_terms` (`[n, 2]`; NULL
/// otherwise), writes `loss` (the shard's part of the reduced loss: the parts sum over the
/// shards to the loss), `row_loss` (`[n]` parts, optional), `grad_student` (`[n, width]`, the
/// shard's gradient columns) and `grad_teacher` (`[n, width]`, optional; not for cross-entropy).
///
/// # Safety
/// Every non-null pointer valid for the number of elements named above; no output overlaps an
/// input or another output.
#[no_mangle]
pub unsafe extern "C" fn dst_cpu_sharded_loss_and_grad(
    spec: *const DstShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
    global_stats: *const f32,
    jsd_terms: *const f32,
    loss: *mut f32,
    row_loss: *mut f32,
    grad_student: *mut f32,
    grad_teacher: *mut f32,
) -> i32 {
    // SAFETY: this function's contract.
    unsafe {
        loss_and_grad(
            &CpuBackend::new(),
            spec,
            student,
            teacher,
            labels,
            global_stats,
            jsd_terms,
            loss,
            row_loss,
            grad_student,
            grad_teacher,
        )
    }
}

/// [`dst_cpu_sharded_loss_and_grad`] on the fast CPU backend.
///
/// # Safety
/// As [`dst_cpu_sharded_loss_and_grad`].
#[no_mangle]
pub unsafe extern "C" fn dst_fast_sharded_loss_and_grad(
    threads: i32,
    spec: *const DstShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
    global_stats: *const f32,
    jsd_terms: *const f32,
    loss: *mut f32,
    row_loss: *mut f32,
    grad_student: *mut f32,
    grad_teacher: *mut f32,
) -> i32 {
    let b = match super::host::fast_backend(threads) {
        Ok(b) => b,
        Err(e) => return ffi(|| Err(e)),
    };
    // SAFETY: this function's contract.
    unsafe {
        loss_and_grad(
            &b,
            spec,
            student,
            teacher,
            labels,
            global_stats,
            jsd_terms,
            loss,
            row_loss,
            grad_student,
            grad_teacher,
        )
    }
}

/// Floats of stats per row (`DST_SHARDED_STATS`): 2 maxima, then 9 sums.
pub const DST_SHARDED_STATS: usize = 11;
const _: () = assert!(DST_SHARDED_STATS == STATS);

// ---- device memory (CUDA) ----

/// A device call's checked spec and the lengths of its arrays; the labels read back to the host
/// (they are checked, and phase 2 counts the valid rows).
#[cfg(feature = "cuda")]
struct DeviceCall<'a> {
    backend: &'a crate::CudaBackend,
    spec: ShardedSpec,
    labels: Option<Vec<i32>>,
    /// The kernels' pointers (0 for an absent array; the teacher 0 for cross-entropy).
    ptrs: crate::ops::sharded::cuda::DevicePtrs,
}

/// The checks of a device call that need no device: the required pointers, the aliasing of
/// `outs` with the inputs (`extra` inputs beside student, teacher, labels); returns the teacher
/// pointer the kernels get (NULL for cross-entropy).
fn device_check(
    spec: &ShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
    extra: &[Span<'_>],
    outs: &[Span<'_>],
) -> FfiResult<*const f32> {
    non_null("student", student)?;
    let teacher = if spec.loss.needs_teacher() {
        non_null("teacher", teacher)?;
        teacher
    } else {
        std::ptr::null()
    };
    if spec.loss.needs_labels() {
        non_null("labels", labels)?;
    }
    let mut ins = input_spans(spec, student, teacher, labels);
    ins.extend_from_slice(extra);
    check_no_alias(&ins, outs)?;
    Ok(teacher)
}

/// A device call's host spec, checked first: its validated sizes bound every array's.
///
/// # Safety
/// `spec` NULL or a valid host `DstShardedSpec`.
unsafe fn device_spec(spec: *const DstShardedSpec) -> FfiResult<ShardedSpec> {
    non_null("spec", spec)?;
    // SAFETY: non-null and the caller's contract.
    unsafe { *spec }.spec()
}

/// The arrays of a `dst_cuda_sharded_*` call: the three inputs, the other inputs (`extra`, for
/// the aliasing check) and the outputs.
struct DeviceArgs<'s> {
    ctx: *const super::cuda::dst_cuda,
    spec: ShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
    extra: &'s [Span<'s>],
    outs: &'s [Span<'s>],
}

impl DeviceArgs<'_> {
    /// Everything before a launch: [`device_check`], the context, the labels read back (the call
    /// waits for the stream) and `phase`'s checks, with the combined stats (`stats`) and JSD
    /// terms (`terms`) given or not. `grad_teacher`: whether the caller asks for the teacher's
    /// gradient (refused for a given teacher and DKD).
    ///
    /// # Safety
    /// `ctx` NULL or a live handle; `labels` NULL or `[n]` device memory of its device.
    #[cfg(feature = "cuda")]
    unsafe fn open(
        &self,
        phase: crate::ops::sharded::Phase,
        stats: bool,
        terms: bool,
        grad_teacher: bool,
    ) -> FfiResult<DeviceCall<'_>> {
        let spec = self.spec;
        let teacher = device_check(
            &spec,
            self.student,
            self.teacher,
            self.labels,
            self.extra,
            self.outs,
        )?;
        if grad_teacher {
            crate::sharded::check_teacher_grad(&spec, !teacher.is_null())?;
        }
        // SAFETY: the caller's contract.
        let backend = unsafe { super::cuda::cuda_ref(self.ctx)? };
        let (n, len) = (spec.shard.rows, spec.shard.len());
        let labels = match self.labels.is_null() {
            true => None,
            false => Some(backend.copy_to_host::<i32>(self.labels as u64, n)?),
        };
        crate::ops::sharded::check_call(
            &spec,
            phase,
            len,
            (!teacher.is_null()).then_some(len),
            labels.as_deref(),
            stats.then_some(n * STATS),
            terms.then_some(n * JSD_TERMS),
        )?;
        let ptrs = crate::ops::sharded::cuda::DevicePtrs {
            student: self.student as u64,
            teacher: teacher as u64,
            labels: self.labels as u64,
        };
        Ok(DeviceCall {
            backend,
            spec,
            labels,
            ptrs,
        })
    }

    /// Without the `cuda` feature: the host checks, then the error that says so.
    #[cfg(not(feature = "cuda"))]
    fn unavailable(&self) -> FfiResult {
        device_check(
            &self.spec,
            self.student,
            self.teacher,
            self.labels,
            self.extra,
            self.outs,
        )?;
        non_null("ctx", self.ctx)?;
        Err(Fail::new(
            super::status::DST_ERR_UNAVAILABLE,
            "backend cuda unavailable: this library was built without the `cuda` feature",
        ))
    }
}

/// [`dst_cpu_sharded_stats`] on device memory (every array on the context's device; `spec` on
/// the host): the kernel runs on the context's stream. The labels are read back to the host and
/// checked (the call waits for the stream there). A given teacher's values are not read back: a
/// probability of exactly 0 under reverse KL gives `+inf` (the device contract), not an error.
///
/// # Safety
/// `ctx` NULL or a live handle; every non-null array device memory valid for the sizes of
/// [`dst_cpu_sharded_stats`].
#[no_mangle]
pub unsafe extern "C" fn dst_cuda_sharded_stats(
    ctx: *const super::cuda::dst_cuda,
    spec: *const DstShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
    stats_out: *mut f32,
) -> i32 {
    ffi(|| {
        // SAFETY: the caller's contract.
        let spec = unsafe { device_spec(spec)? };
        non_null("stats", stats_out)?;
        let n = spec.shard.rows;
        let outs = [("stats", stats_out as *const c_void, n * STATS * 4)];
        let args = DeviceArgs {
            ctx,
            spec,
            student,
            teacher,
            labels,
            extra: &[],
            outs: &outs,
        };
        #[cfg(feature = "cuda")]
        {
            use crate::ops::sharded::Phase;
            // SAFETY: the caller's contract.
            let c = unsafe { args.open(Phase::Stats, false, false, false)? };
            Ok(c.backend
                .sharded_stats_raw(&c.spec, c.ptrs, stats_out as u64)?)
        }
        #[cfg(not(feature = "cuda"))]
        args.unavailable()
    })
}

/// [`dst_cpu_sharded_jsd_terms`] on device memory (as [`dst_cuda_sharded_stats`]).
///
/// # Safety
/// As [`dst_cuda_sharded_stats`]; `global_stats` and `terms_out` device memory.
#[no_mangle]
pub unsafe extern "C" fn dst_cuda_sharded_jsd_terms(
    ctx: *const super::cuda::dst_cuda,
    spec: *const DstShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
    global_stats: *const f32,
    terms_out: *mut f32,
) -> i32 {
    ffi(|| {
        // SAFETY: the caller's contract.
        let spec = unsafe { device_spec(spec)? };
        non_null("global_stats", global_stats)?;
        non_null("terms", terms_out)?;
        let n = spec.shard.rows;
        let extra = [("global_stats", global_stats as *const c_void, n * STATS * 4)];
        let outs = [("terms", terms_out as *const c_void, n * JSD_TERMS * 4)];
        let args = DeviceArgs {
            ctx,
            spec,
            student,
            teacher,
            labels,
            extra: &extra,
            outs: &outs,
        };
        #[cfg(feature = "cuda")]
        {
            use crate::ops::sharded::Phase;
            // SAFETY: the caller's contract.
            let c = unsafe { args.open(Phase::JsdTerms, true, false, false)? };
            Ok(c.backend.sharded_jsd_terms_raw(
                &c.spec,
                c.ptrs,
                global_stats as u64,
                terms_out as u64,
            )?)
        }
        #[cfg(not(feature = "cuda"))]
        args.unavailable()
    })
}

/// [`dst_cpu_sharded_loss_and_grad`] on device memory: every array on the context's device
/// except `loss`, which is HOST memory (one float, the shard's part of the reduced loss: the row
/// losses are read back and summed, so the call waits for the stream). `row_loss` (optional),
/// `grad_student` and `grad_teacher` (optional; the teacher as logits, not DKD) are device
/// memory. As [`dst_cuda_sharded_stats`] for the labels and a given teacher.
///
/// # Safety
/// As [`dst_cuda_sharded_stats`]; `global_stats`, `jsd_terms` device memory; `loss` a host
/// float.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn dst_cuda_sharded_loss_and_grad(
    ctx: *const super::cuda::dst_cuda,
    spec: *const DstShardedSpec,
    student: *const f32,
    teacher: *const f32,
    labels: *const i32,
    global_stats: *const f32,
    jsd_terms: *const f32,
    loss: *mut f32,
    row_loss: *mut f32,
    grad_student: *mut f32,
    grad_teacher: *mut f32,
) -> i32 {
    ffi(|| {
        // SAFETY: the caller's contract.
        let spec = unsafe { device_spec(spec)? };
        non_null("global_stats", global_stats)?;
        non_null("loss", loss)?;
        non_null("grad_student", grad_student)?;
        let (n, len) = (spec.shard.rows, spec.shard.len());
        let extra = [
            ("global_stats", global_stats as *const c_void, n * STATS * 4),
            ("jsd_terms", jsd_terms as *const c_void, n * JSD_TERMS * 4),
        ];
        let outs = [
            ("row_loss", row_loss as *const c_void, n * 4),
            ("grad_student", grad_student as *const c_void, len * 4),
            ("grad_teacher", grad_teacher as *const c_void, len * 4),
        ];
        let args = DeviceArgs {
            ctx,
            spec,
            student,
            teacher,
            labels,
            extra: &extra,
            outs: &outs,
        };
        #[cfg(feature = "cuda")]
        {
            use crate::backend::Backend;
            use crate::ops::sharded::Phase;
            let (terms, wants_t) = (!jsd_terms.is_null(), !grad_teacher.is_null());
            // SAFETY: the caller's contract.
            let c = unsafe { args.open(Phase::LossAndGrad, true, terms, wants_t)? };
            let (b, scale) = (c.backend, c.spec.scale(c.labels.as_deref()));
            let scratch;
            let rows = if row_loss.is_null() {
                scratch = b.filled(n, f32::NAN)?;
                scratch.ptr
            } else {
                row_loss as u64
            };
            b.sharded_loss_and_grad_raw(
                &c.spec,
                c.ptrs,
                global_stats as u64,
                jsd_terms as u64,
                rows,
                grad_student as u64,
                grad_teacher as u64,
                c.spec.grad_scale as f64 * scale,
            )?;
            let parts = b.copy_to_host::<f32>(rows, n)?;
            let total = parts.iter().map(|&v| v as f64).sum::<f64>() * scale;
            // SAFETY: `loss` is a host float by the contract.
            unsafe { *loss = total as f32 };
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        args.unavailable()
    })
}
