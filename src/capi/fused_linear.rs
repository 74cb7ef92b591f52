//! The fused linear layer + distillation loss ([`FusedLinearKd`], `docs/LOSSES.md` section 11):
//! `dst_cpu_fused_linear_kd` (the reference CPU backend), `dst_fast_fused_linear_kd` (the fast
//! CPU backend, at most `threads` threads) and `dst_cuda_fused_linear_kd` (the caller's device
//! memory on a context's stream). The scalars are a [`DstFusedLinearSpec`]; the arrays are
//! pointers, each followed by its dtype code.
//!
//! The teacher is chosen by which of its pointers are non-NULL: `teacher_logits` (`[n, vocab]`),
//! or `teacher_hidden` and `teacher_weight` (a layer, `teacher_bias` optional), or none of them
//! (no teacher: the cross-entropy-only loss). Giving both forms is an error. The
//! `dst_*_fused_linear_sparse_kd` entry points (ABI 10) take a sparse top-k teacher instead
//! (`[n, k]` indices and values, `docs/LOSSES.md` sections 10 and 11).
//!
//! The host entry points copy the inputs into the backend's buffers (`O(n H + V H)` for the
//! student, the same for a teacher layer; never the `[n, V]` logits, which are computed a chunk
//! of rows at a time) and the gradients back.

use std::ffi::c_void;

use super::args::{
    check_no_alias, divergence, non_null, reduction, sparse_tail, sparse_values, Dst, Span, Src,
};
use super::buffers::{Buf, Buffers, Labels};
use super::cuda::dst_cuda;
#[cfg(feature = "cuda")]
use super::cuda::Device;
use super::status::{
    ffi, Fail, FfiResult, DST_ERR_INVALID_ARGUMENT, DST_ERR_LIMIT, DST_ERR_SHAPE,
    DST_ERR_UNSUPPORTED,
};
#[cfg(doc)]
use super::status::{DST_BF16, DST_ERR_ALIAS, DST_ERR_NULL_POINTER, DST_F16, DST_F32};
use crate::backend::Backend;
use crate::dtype::{Dtype, HostSlice};
use crate::ops::dense::CopySpec;
use crate::ops::fused_linear::DEFAULT_MEMORY_BUDGET;
use crate::ops::{
    FusedGrads, FusedLinearKd, Linear, Reduction, SparseTail, SparseValues, Teacher, Weighting,
};
use crate::CpuBackend;

/// `DstFusedLinearSpec::weighting`: Hinton's `alpha CE + (1 - alpha) T^2 D` (the crate's
/// default; `alpha` is read, `weight_hard` and `weight_soft` are not).
pub const DST_WEIGHTING_HINTON: i32 = 0;
/// `DstFusedLinearSpec::weighting`: Liger-Kernel's and TRL's `weight_hard CE + weight_soft D`,
/// no `T^2` (`weight_hard` and `weight_soft` are read, `alpha` is not).
pub const DST_WEIGHTING_LIGER: i32 = 1;

/// The scalars of a fused linear + distillation loss (`docs/LOSSES.md` section 11).
///
/// - `n`: rows; `hidden`: the student's hidden size `H_s`; `vocab`: its vocabulary `V`.
/// - `teacher_hidden`, `teacher_vocab`: `H_t` and `V_t >= V` of a teacher given as a layer
///   (`teacher_vocab` 0 means `V`; a larger one is a padded teacher vocabulary, whose columns past
///   `V` are dropped); ignored for a teacher given as logits or no teacher.
/// - `temperature`; `divergence`: 0 forward KL, 1 reverse KL, 2 JSD with `beta` in (0, 1).
/// - `weighting`: [`DST_WEIGHTING_HINTON`] with `alpha` in [0, 1], or [`DST_WEIGHTING_LIGER`] with
///   `weight_hard`, `weight_soft` >= 0 (not both 0).
/// - `label_smoothing` in [0, 1) (of the cross-entropy term); `ignore_index`; `reduction`: 0
///   batchmean (by the valid rows) or 1 sum (2, none, is refused: the loss is a scalar).
/// - `grad_scale`: multiplies every gradient (the upstream gradient; 1 for `d loss`).
/// - `memory_budget`: bytes of f32 scratch per chunk of rows (0: the default, 48 MiB);
///   `chunk_rows`: rows per chunk (0: from the budget).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DstFusedLinearSpec {
    pub n: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub teacher_hidden: usize,
    pub teacher_vocab: usize,
    pub temperature: f32,
    pub divergence: i32,
    pub beta: f32,
    pub weighting: i32,
    pub alpha: f32,
    pub weight_hard: f32,
    pub weight_soft: f32,
    pub label_smoothing: f32,
    pub ignore_index: i32,
    pub reduction: i32,
    pub grad_scale: f32,
    pub memory_budget: usize,
    pub chunk_rows: usize,
}

impl DstFusedLinearSpec {
    /// The op's spec, validated.
    fn spec(&self) -> FfiResult<FusedLinearKd> {
        let weighting = match self.weighting {
            DST_WEIGHTING_HINTON => Weighting::Hinton { alpha: self.alpha },
            DST_WEIGHTING_LIGER => Weighting::Liger {
                weight_hard: self.weight_hard,
                weight_soft: self.weight_soft,
            },
            code => {
                return Err(Fail::new(
                    DST_ERR_INVALID_ARGUMENT,
                    format!(
                        "invalid spec->weighting {code}: use 0 (DST_WEIGHTING_HINTON) or 1 \
                         (DST_WEIGHTING_LIGER)"
                    ),
                ))
            }
        };
        let reduction = reduction(self.reduction)?;
        if reduction == Reduction::None {
            return Err(Fail::new(
                DST_ERR_UNSUPPORTED,
                "spec->reduction is 2 (none): a fused linear loss reduces to a scalar; use 0 \
                 (batchmean) or 1 (sum)",
            ));
        }
        let spec = FusedLinearKd {
            divergence: divergence(self.divergence, self.beta)?,
            weighting,
            label_smoothing: self.label_smoothing,
            ignore_index: self.ignore_index,
            reduction,
            grad_scale: self.grad_scale,
            memory_budget: match self.memory_budget {
                0 => DEFAULT_MEMORY_BUDGET,
                b => b,
            },
            chunk_rows: self.chunk_rows,
            ..FusedLinearKd::new(self.hidden, self.vocab, self.temperature, 0.0)
        };
        spec.validate()?;
        if self.n == 0 {
            return Err(Fail::new(
                DST_ERR_SHAPE,
                "spec->n is 0: pass at least one row",
            ));
        }
        Ok(spec)
    }
}

/// The arguments of one call, as the C caller passed them.
#[derive(Clone, Copy)]
struct FusedArgs {
    spec: *const DstFusedLinearSpec,
    hidden: *const c_void,
    hidden_dtype: i32,
    weight: *const c_void,
    weight_dtype: i32,
    bias: *const c_void,
    bias_dtype: i32,
    teacher_hidden: *const c_void,
    teacher_hidden_dtype: i32,
    teacher_weight: *const c_void,
    teacher_weight_dtype: i32,
    teacher_bias: *const c_void,
    teacher_bias_dtype: i32,
    teacher_logits: *const c_void,
    teacher_logits_dtype: i32,
    labels: *const i32,
    loss: *mut f32,
    grad_hidden: *mut c_void,
    grad_hidden_dtype: i32,
    grad_weight: *mut c_void,
    grad_weight_dtype: i32,
    grad_bias: *mut c_void,
    grad_bias_dtype: i32,
    /// A sparse top-k teacher (the `dst_*_fused_linear_sparse_kd` entry points; the dense
    /// teacher pointers are then NULL).
    sparse: Option<SparseTeacherArgs>,
}

/// A sparse top-k teacher as the C caller passed it.
#[derive(Clone, Copy)]
struct SparseTeacherArgs {
    k: usize,
    indices: *const i32,
    values: *const c_void,
    values_dtype: i32,
    values_code: i32,
    tail_code: i32,
}

/// The teacher's form, from which pointers are non-NULL.
#[derive(Clone, Copy, PartialEq)]
enum TeacherForm {
    None,
    Logits,
    /// `(H_t, V_t)`.
    Layer(usize, usize),
    /// A sparse top-k teacher: `k`, the values' kind, the tail.
    Sparse(usize, SparseValues, SparseTail),
}

/// A checked call: the spec, the arrays with their dtypes and element counts, the teacher's form.
struct Checked {
    spec: FusedLinearKd,
    n: usize,
    teacher: TeacherForm,
    /// hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
    /// teacher_values (sparse).
    inputs: [(Src, usize); 8],
    /// The sparse teacher's `[n, k]` indices (NULL otherwise).
    indices: *const i32,
    labels: *const i32,
    loss: *mut f32,
    /// grad_hidden, grad_weight, grad_bias.
    grads: [(Dst, usize); 3],
}

/// `a * b` or [`DST_ERR_LIMIT`].
fn product(what: &str, a: usize, b: usize) -> FfiResult<usize> {
    crate::ops::index_len(&[a, b]).ok_or_else(|| {
        Fail::new(
            DST_ERR_LIMIT,
            format!("{what} has {a} x {b} elements, past 2^32: split the batch or the layer"),
        )
    })
}

impl FusedArgs {
    /// Every check that needs no memory: the spec, the dtype codes, the required pointers, the
    /// teacher's form, the sizes and the aliasing of the arrays.
    fn check(&self) -> FfiResult<Checked> {
        non_null("spec", self.spec)?;
        // SAFETY: non-null, and a valid `DstFusedLinearSpec` by the entry points' contract.
        let raw = unsafe { *self.spec };
        let spec = raw.spec()?;
        let (n, h, v) = (raw.n, raw.hidden, raw.vocab);
        let src = |what: &str, ptr, code| Src::new(what, ptr, code);
        let hidden = src("hidden", self.hidden, self.hidden_dtype)?;
        let weight = src("weight", self.weight, self.weight_dtype)?;
        let bias = src("bias", self.bias, self.bias_dtype)?;
        let t_hidden = src(
            "teacher_hidden",
            self.teacher_hidden,
            self.teacher_hidden_dtype,
        )?;
        let t_weight = src(
            "teacher_weight",
            self.teacher_weight,
            self.teacher_weight_dtype,
        )?;
        let t_bias = src("teacher_bias", self.teacher_bias, self.teacher_bias_dtype)?;
        let t_logits = src(
            "teacher_logits",
            self.teacher_logits,
            self.teacher_logits_dtype,
        )?;
        let dst = |what: &str, ptr, code| Dst::new(what, ptr, code);
        let g_hidden = dst("grad_hidden", self.grad_hidden, self.grad_hidden_dtype)?;
        let g_weight = dst("grad_weight", self.grad_weight, self.grad_weight_dtype)?;
        let g_bias = dst("grad_bias", self.grad_bias, self.grad_bias_dtype)?;
        non_null("hidden", self.hidden)?;
        non_null("weight", self.weight)?;
        non_null("loss", self.loss)?;

        let t_values = match self.sparse {
            Some(sp) => src("teacher_values", sp.values, sp.values_dtype)?,
            None => Src::null(),
        };
        let layer = !self.teacher_hidden.is_null() || !self.teacher_weight.is_null();
        let teacher = match (layer, self.teacher_logits.is_null()) {
            _ if self.sparse.is_some() => {
                let sp = self.sparse.expect("is_some");
                non_null("teacher_indices", sp.indices)?;
                non_null("teacher_values", sp.values)?;
                if sp.k == 0 || sp.k > v {
                    return Err(Fail::new(
                        DST_ERR_SHAPE,
                        format!(
                            "k = {} teacher classes per row: a sparse teacher needs 1 <= k <= \
                             vocab ({v}) distinct classes per row",
                            sp.k
                        ),
                    ));
                }
                TeacherForm::Sparse(
                    sp.k,
                    sparse_values(sp.values_code)?,
                    sparse_tail(sp.tail_code)?,
                )
            }
            (true, false) => return Err(Fail::new(
                DST_ERR_INVALID_ARGUMENT,
                "teacher_logits and a teacher layer (teacher_hidden / teacher_weight) are both \
                     given: pass one form of the teacher and NULL for the other",
            )),
            (true, true) => {
                non_null("teacher_hidden", self.teacher_hidden)?;
                non_null("teacher_weight", self.teacher_weight)?;
                let vt = if raw.teacher_vocab == 0 {
                    v
                } else {
                    raw.teacher_vocab
                };
                if raw.teacher_hidden == 0 {
                    return Err(Fail::new(
                        DST_ERR_SHAPE,
                        "spec->teacher_hidden is 0 but a teacher layer was given: set it to the \
                         teacher's hidden size H_t (teacher_hidden is [n, H_t])",
                    ));
                }
                if vt < v {
                    return Err(Fail::new(
                        DST_ERR_UNSUPPORTED,
                        format!(
                            "spec->teacher_vocab = {vt} is below the student's vocab {v}: a \
                             teacher vocabulary must be at least the student's (a padded one is \
                             cut to it; a smaller one is a different tokenizer, which this loss \
                             does not map)"
                        ),
                    ));
                }
                TeacherForm::Layer(raw.teacher_hidden, vt)
            }
            (false, false) => TeacherForm::Logits,
            (false, true) => TeacherForm::None,
        };
        if !self.teacher_bias.is_null() && !matches!(teacher, TeacherForm::Layer(..)) {
            return Err(Fail::new(
                DST_ERR_INVALID_ARGUMENT,
                "teacher_bias is given without a teacher layer: pass teacher_hidden and \
                 teacher_weight with it, or NULL",
            ));
        }
        if spec.has_soft() && teacher == TeacherForm::None {
            return Err(Fail::new(
                DST_ERR_UNSUPPORTED,
                "the loss has a divergence term (alpha < 1, or weight_soft > 0) but no teacher: \
                 pass teacher_logits, or teacher_hidden and teacher_weight (or a sparse teacher \
                 to dst_*_fused_linear_sparse_kd)",
            ));
        }
        if !spec.has_soft() && teacher != TeacherForm::None {
            return Err(Fail::new(
                DST_ERR_UNSUPPORTED,
                "a teacher was given to a loss without a divergence term (alpha = 1, or \
                 weight_soft = 0), where it would be ignored: pass NULL teacher pointers",
            ));
        }
        if spec.has_hard() {
            non_null("labels", self.labels)?;
        }

        let (ht, vt) = match teacher {
            TeacherForm::Layer(ht, vt) => (ht, vt),
            _ => (0, 0),
        };
        let k = match teacher {
            TeacherForm::Sparse(k, ..) => k,
            _ => 0,
        };
        product("logits [n, vocab]", n, v)?;
        let inputs = [
            (hidden, product("hidden [n, hidden]", n, h)?),
            (weight, product("weight [vocab, hidden]", v, h)?),
            (bias, v),
            (
                t_hidden,
                product("teacher_hidden [n, teacher_hidden]", n, ht)?,
            ),
            (
                t_weight,
                product("teacher_weight [teacher_vocab, teacher_hidden]", vt, ht)?,
            ),
            (t_bias, vt),
            (
                t_logits,
                if teacher == TeacherForm::Logits {
                    n * v
                } else {
                    0
                },
            ),
            (t_values, product("teacher_values [n, k]", n, k)?),
        ];
        product("teacher logits [n, teacher_vocab]", n, vt)?;
        let grads = [(g_hidden, n * h), (g_weight, v * h), (g_bias, v)];

        let names = [
            "hidden",
            "weight",
            "bias",
            "teacher_hidden",
            "teacher_weight",
            "teacher_bias",
            "teacher_logits",
            "teacher_values",
        ];
        let indices = self.sparse.map_or(std::ptr::null(), |sp| sp.indices);
        let mut in_spans: Vec<Span<'_>> = names
            .iter()
            .zip(&inputs)
            .map(|(name, (s, len))| (*name, s.ptr, len * s.dtype.size()))
            .collect();
        in_spans.push(("labels", self.labels as *const c_void, n * 4));
        in_spans.push(("teacher_indices", indices as *const c_void, n * k * 4));
        let out_names = ["grad_hidden", "grad_weight", "grad_bias"];
        let mut out_spans: Vec<Span<'_>> = vec![("loss", self.loss as *const c_void, 4)];
        out_spans.extend(
            out_names
                .iter()
                .zip(&grads)
                .map(|(name, (d, len))| (*name, d.ptr.cast_const(), len * d.dtype.size())),
        );
        check_no_alias(&in_spans, &out_spans)?;
        Ok(Checked {
            spec,
            n,
            teacher,
            inputs,
            indices,
            labels: self.labels,
            loss: self.loss,
            grads,
        })
    }

    /// Checks the call and runs it on `m`.
    ///
    /// # Safety
    /// The entry points' contract: every non-null pointer valid in `m`'s memory for the sizes the
    /// spec names.
    unsafe fn run<M: FusedMemory>(&self, m: &M) -> FfiResult {
        m.check_handle()?;
        let c = self.check()?;
        let b = m.backend()?;
        let [hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, t_values] = c.inputs;
        // SAFETY (the block): each pointer is non-null where it is wrapped and valid for the
        // length checked above, by this function's contract.
        unsafe {
            let opt = |(p, len): (Src, usize)| -> FfiResult<Option<Buf<M>>> {
                match p.ptr.is_null() {
                    true => Ok(None),
                    false => m.input(p, len).map(Some),
                }
            };
            let h = m.input(hidden.0, hidden.1)?;
            let w = m.input(weight.0, weight.1)?;
            let bb = opt(bias)?;
            let student = Linear {
                hidden: &h,
                weight: &w,
                bias: bb.as_ref(),
            };
            let (th, tw, tb, tl) = (opt(t_hidden)?, opt(t_weight)?, opt(t_bias)?, opt(t_logits)?);
            let tv = opt(t_values)?;
            // The sparse teacher's indices on the host (the op uploads each chunk's rows).
            let idx = match c.teacher {
                TeacherForm::Sparse(k, ..) => m.host_labels(c.indices, c.n * k)?,
                _ => Vec::new(),
            };
            let teacher = match c.teacher {
                TeacherForm::None => Teacher::None,
                TeacherForm::Logits => Teacher::Logits(tl.as_ref().expect("checked non-null")),
                TeacherForm::Layer(ht, vt) => Teacher::Linear {
                    layer: Linear {
                        hidden: th.as_ref().expect("checked non-null"),
                        weight: tw.as_ref().expect("checked non-null"),
                        bias: tb.as_ref(),
                    },
                    hidden: ht,
                    vocab: vt,
                },
                TeacherForm::Sparse(k, values_kind, tail) => Teacher::Sparse {
                    indices: &idx,
                    values: tv.as_ref().expect("checked non-null"),
                    k,
                    values_kind,
                    tail,
                },
            };
            let labels = match c.labels.is_null() {
                true => None,
                false => Some(m.host_labels(c.labels, c.n)?),
            };
            let [(gh, gh_len), (gw, gw_len), (gb, gb_len)] = c.grads;
            let grad_h = m.output(gh, gh_len)?;
            // grad_weight and grad_bias are added to: their current values are read.
            let accumulator = |d: Dst, len: usize| -> FfiResult<Option<Buf<M>>> {
                match d.is_null() {
                    true => Ok(None),
                    false => {
                        let src = Src {
                            ptr: d.ptr.cast_const(),
                            dtype: d.dtype,
                        };
                        m.input(src, len).map(Some)
                    }
                }
            };
            let (grad_w, grad_b) = (accumulator(gw, gw_len)?, accumulator(gb, gb_len)?);
            let grads = FusedGrads {
                hidden: grad_h.as_ref(),
                weight: grad_w.as_ref(),
                bias: grad_b.as_ref(),
            };
            let loss = c
                .spec
                .run(b, &student, &teacher, labels.as_deref(), &grads)?;
            for (d, buf) in [(gh, &grad_h), (gw, &grad_w), (gb, &grad_b)] {
                if let Some(buf) = buf {
                    m.store(d, buf)?;
                }
            }
            // The loss into the caller's `loss` (host or device memory): a one-element copy.
            let out = m
                .output(Dst::f32(c.loss), 1)?
                .expect("loss is checked non-null");
            let value = b.upload(&[loss])?;
            b.copy_rows(&CopySpec::contiguous(1, 0, 0), &value, &out)?;
            m.store(Dst::f32(c.loss), &out)?;
        }
        Ok(())
    }
}

/// A memory the fused loss runs on: [`Buffers`], and the labels read to the host (the op counts
/// the valid rows and uploads each chunk's labels itself).
trait FusedMemory: Buffers {
    /// `n` labels at `p` (non-null), on the host.
    ///
    /// # Safety
    /// `p` readable for `n` labels in this memory.
    unsafe fn host_labels(&self, p: *const i32, n: usize) -> FfiResult<Vec<i32>>;
}

/// Host memory copied into a backend's buffers (the reference and the fast CPU backends).
struct Host<B>(B);

impl<B: Backend> Buffers for Host<B> {
    type Backend = B;

    fn backend(&self) -> FfiResult<&B> {
        Ok(&self.0)
    }

    unsafe fn input(&self, p: Src, len: usize) -> FfiResult<Buf<Self>> {
        // SAFETY: `p` readable for `len` elements of its dtype by this function's contract; the
        // slice lives only for the copy.
        let data = unsafe {
            match p.dtype {
                Dtype::F32 => HostSlice::F32(std::slice::from_raw_parts(p.ptr.cast(), len)),
                Dtype::Bf16 => HostSlice::Bf16(std::slice::from_raw_parts(p.ptr.cast(), len)),
                Dtype::F16 => HostSlice::F16(std::slice::from_raw_parts(p.ptr.cast(), len)),
            }
        };
        Ok(self.0.upload_host(data)?)
    }

    unsafe fn labels(&self, p: *const i32, n: usize, _: usize, _: i32) -> FfiResult<Labels<Self>> {
        // SAFETY: forwarded from this function's contract (the op checks the labels).
        Ok(self.0.upload_labels(&unsafe { self.host_labels(p, n) }?)?)
    }

    unsafe fn output(&self, p: Dst, len: usize) -> FfiResult<Option<Buf<Self>>> {
        match p.is_null() {
            true => Ok(None),
            false => Ok(Some(self.0.filled_as(p.dtype, len, 0.0)?)),
        }
    }

    unsafe fn store(&self, p: Dst, buf: &Buf<Self>) -> FfiResult {
        let v = self.0.download_host(buf)?;
        let slice = v.as_slice();
        let bytes = slice.bytes();
        // SAFETY: `p` is writable for the buffer's length in its dtype (the buffer was made with
        // that dtype and length from `p`) by the contract; `v` is our own copy, so the ranges
        // cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.ptr.cast::<u8>(), bytes.len()) };
        Ok(())
    }
}

impl<B: Backend> FusedMemory for Host<B> {
    unsafe fn host_labels(&self, p: *const i32, n: usize) -> FfiResult<Vec<i32>> {
        // SAFETY: the contract.
        Ok(unsafe { std::slice::from_raw_parts(p, n) }.to_vec())
    }
}

#[cfg(feature = "cuda")]
impl FusedMemory for Device {
    unsafe fn host_labels(&self, p: *const i32, n: usize) -> FfiResult<Vec<i32>> {
        // Reads the labels back on the context's stream (after the caller's earlier work on it).
        Ok(self.backend()?.copy_to_host::<i32>(p as u64, n)?)
    }
}

/// The fused linear layer + distillation loss on host memory (the reference CPU backend;
/// [`dst_fast_fused_linear_kd`] is the fast one): the student's logits `s = hidden weight^T (+
/// bias)` and the teacher's, a chunk of rows at a time (never `[n, vocab]` at once), and `L =
/// w_hard CE(s, labels) + w_soft c_T D(q^T || p^T)` with the weighting of `spec`
/// (`docs/LOSSES.md` section 11).
///
/// Arrays (row-major, each followed by its dtype code [`DST_F32`], [`DST_BF16`] or [`DST_F16`];
/// the code of a NULL array is checked too: pass `DST_F32`):
/// - `hidden` `[n, hidden]`, `weight` `[vocab, hidden]`, `bias` `[vocab]` (optional): the
///   student's last hidden states and output layer.
/// - The teacher, by which pointers are non-NULL: `teacher_logits` `[n, vocab]`; or
///   `teacher_hidden` `[n, teacher_hidden]`, `teacher_weight` `[teacher_vocab, teacher_hidden]`
///   and `teacher_bias` `[teacher_vocab]` (optional); or none (the loss must then have no
///   divergence term). Both forms at once is [`DST_ERR_INVALID_ARGUMENT`].
/// - `labels` `[n]` int32: required with a cross-entropy term, otherwise optional (masks rows
///   equal to `ignore_index`). Labels out of range are [`DST_ERR_LABEL`].
///
/// Outputs: `loss` (1 float, required); `grad_hidden` `[n, hidden]` (optional, overwritten);
/// `grad_weight` `[vocab, hidden]` and `grad_bias` `[vocab]` (optional) are ACCUMULATED: the
/// call adds its gradient to the values already in the caller's buffers (gradient accumulation
/// over micro-batches is one call each; zero them for a fresh gradient). Each gradient is
/// multiplied by `spec->grad_scale` and rounded once to its buffer's dtype. No output may
/// overlap an input or another output ([`DST_ERR_ALIAS`]). The teacher gets no gradient.
///
/// # Safety
/// `spec` is NULL or a valid [`DstFusedLinearSpec`]; every non-null pointer is valid for the
/// number of elements named above in its dtype.
#[no_mangle]
pub unsafe extern "C" fn dst_cpu_fused_linear_kd(
    spec: *const DstFusedLinearSpec,
    hidden: *const c_void,
    hidden_dtype: i32,
    weight: *const c_void,
    weight_dtype: i32,
    bias: *const c_void,
    bias_dtype: i32,
    teacher_hidden: *const c_void,
    teacher_hidden_dtype: i32,
    teacher_weight: *const c_void,
    teacher_weight_dtype: i32,
    teacher_bias: *const c_void,
    teacher_bias_dtype: i32,
    teacher_logits: *const c_void,
    teacher_logits_dtype: i32,
    labels: *const i32,
    loss: *mut f32,
    grad_hidden: *mut c_void,
    grad_hidden_dtype: i32,
    grad_weight: *mut c_void,
    grad_weight_dtype: i32,
    grad_bias: *mut c_void,
    grad_bias_dtype: i32,
) -> i32 {
    #[rustfmt::skip]
    let args = FusedArgs { spec, hidden, hidden_dtype, weight, weight_dtype, bias, bias_dtype,
        teacher_hidden, teacher_hidden_dtype, teacher_weight, teacher_weight_dtype, teacher_bias,
        teacher_bias_dtype, teacher_logits, teacher_logits_dtype, labels, loss, grad_hidden,
        grad_hidden_dtype, grad_weight, grad_weight_dtype, grad_bias, grad_bias_dtype,
        sparse: None };
    // SAFETY: this function's contract is `run`'s.
    ffi(|| unsafe { args.run(&Host(CpuBackend::new())) })
}

/// [`dst_cpu_fused_linear_kd`] on the fast CPU backend (f32 kernels and gemm) on at most
/// `threads` threads (0: one per core). The inputs are copied into the backend's buffers (the
/// arrays named, never the `[n, vocab]` logits); the result is the same bits for any `threads`.
///
/// # Safety
/// As [`dst_cpu_fused_linear_kd`].
#[no_mangle]
pub unsafe extern "C" fn dst_fast_fused_linear_kd(
    threads: i32,
    spec: *const DstFusedLinearSpec,
    hidden: *const c_void,
    hidden_dtype: i32,
    weight: *const c_void,
    weight_dtype: i32,
    bias: *const c_void,
    bias_dtype: i32,
    teacher_hidden: *const c_void,
    teacher_hidden_dtype: i32,
    teacher_weight: *const c_void,
    teacher_weight_dtype: i32,
    teacher_bias: *const c_void,
    teacher_bias_dtype: i32,
    teacher_logits: *const c_void,
    teacher_logits_dtype: i32,
    labels: *const i32,
    loss: *mut f32,
    grad_hidden: *mut c_void,
    grad_hidden_dtype: i32,
    grad_weight: *mut c_void,
    grad_weight_dtype: i32,
    grad_bias: *mut c_void,
    grad_bias_dtype: i32,
) -> i32 {
    #[rustfmt::skip]
    let args = FusedArgs { spec, hidden, hidden_dtype, weight, weight_dtype, bias, bias_dtype,
        teacher_hidden, teacher_hidden_dtype, teacher_weight, teacher_weight_dtype, teacher_bias,
        teacher_bias_dtype, teacher_logits, teacher_logits_dtype, labels, loss, grad_hidden,
        grad_hidden_dtype, grad_weight, grad_weight_dtype, grad_bias, grad_bias_dtype,
        sparse: None };
    // SAFETY: this function's contract is `run`'s.
    ffi(|| unsafe { args.run(&Host(super::host::fast_backend(threads)?)) })
}

/// [`dst_cpu_fused_linear_kd`] on device pointers of the context's device (every array and
/// `loss` is device memory): the kernels run on the context's stream, and the call
/// SYNCHRONIZES it, unlike the other `dst_cuda_*`: it reads the labels to the host (to count
/// the valid rows, and checks them: [`DST_ERR_LABEL`]) and the loss back before writing it to
/// `loss`. Without the crate feature `cuda`: the arguments' checks, then
/// [`DST_ERR_UNAVAILABLE`](super::status::DST_ERR_UNAVAILABLE).
///
/// # Safety
/// `ctx` is NULL or a live handle; every non-null pointer is device memory of its device, valid
/// for the sizes of [`dst_cpu_fused_linear_kd`]; `spec` is NULL or host memory.
#[no_mangle]
pub unsafe extern "C" fn dst_cuda_fused_linear_kd(
    ctx: *const dst_cuda,
    spec: *const DstFusedLinearSpec,
    hidden: *const c_void,
    hidden_dtype: i32,
    weight: *const c_void,
    weight_dtype: i32,
    bias: *const c_void,
    bias_dtype: i32,
    teacher_hidden: *const c_void,
    teacher_hidden_dtype: i32,
    teacher_weight: *const c_void,
    teacher_weight_dtype: i32,
    teacher_bias: *const c_void,
    teacher_bias_dtype: i32,
    teacher_logits: *const c_void,
    teacher_logits_dtype: i32,
    labels: *const i32,
    loss: *mut f32,
    grad_hidden: *mut c_void,
    grad_hidden_dtype: i32,
    grad_weight: *mut c_void,
    grad_weight_dtype: i32,
    grad_bias: *mut c_void,
    grad_bias_dtype: i32,
) -> i32 {
    #[rustfmt::skip]
    let args = FusedArgs { spec, hidden, hidden_dtype, weight, weight_dtype, bias, bias_dtype,
        teacher_hidden, teacher_hidden_dtype, teacher_weight, teacher_weight_dtype, teacher_bias,
        teacher_bias_dtype, teacher_logits, teacher_logits_dtype, labels, loss, grad_hidden,
        grad_hidden_dtype, grad_weight, grad_weight_dtype, grad_bias, grad_bias_dtype,
        sparse: None };
    ffi(|| {
        #[cfg(feature = "cuda")]
        {
            // SAFETY: this function's contract is `run`'s and `Device`'s.
            unsafe { args.run(&Device(ctx)) }
        }
        #[cfg(not(feature = "cuda"))]
        {
            non_null("ctx", ctx)?;
            args.check()?;
            Err(Fail::new(
                super::status::DST_ERR_UNAVAILABLE,
                "backend cuda unavailable: this library was built without the `cuda` feature",
            ))
        }
    })
}

/// The null dense teacher of the sparse entry points: `(ptr, dtype)` for teacher hidden,
/// weight, bias and logits.
const NO_DENSE_TEACHER: (*const c_void, i32) = (std::ptr::null(), 0);

/// [`dst_cpu_fused_linear_kd`] with a sparse top-k teacher (ABI 10; `docs/LOSSES.md` sections
/// 10 and 11): per row `k` distinct classes `teacher_indices` (`[n, k]` int32 in `0..vocab`) and
/// their `teacher_values` (`[n, k]`, `teacher_values_dtype`): log-probabilities at T = 1 as a
/// top-k cache stores them (`values_code` 0) or logits (1). `tail_code`: 0 renormalize over the
/// top-k, 1 a tail bucket (one extra event of mass `1 - sum e^values`), 2 that mass spread
/// uniformly over the other `vocab - k` classes (1 and 2 need log-probabilities). The soft term
/// is `D(Q || P)` with the student's full softmax over `vocab` (its logits computed a chunk of
/// rows at a time, never `[n, vocab]`); the weighting, the labels and the outputs as
/// [`dst_cpu_fused_linear_kd`] (`spec->teacher_hidden` and `teacher_vocab` are ignored). The
/// whole teacher is checked before anything runs: repeated or out-of-range indices and invalid
/// values are `DST_ERR_INPUT` naming the row.
///
/// # Safety
/// As [`dst_cpu_fused_linear_kd`]; `teacher_indices` and `teacher_values` valid for `n * k`
/// elements.
#[no_mangle]
pub unsafe extern "C" fn dst_cpu_fused_linear_sparse_kd(
    spec: *const DstFusedLinearSpec,
    hidden: *const c_void,
    hidden_dtype: i32,
    weight: *const c_void,
    weight_dtype: i32,
    bias: *const c_void,
    bias_dtype: i32,
    k: usize,
    teacher_indices: *const i32,
    teacher_values: *const c_void,
    teacher_values_dtype: i32,
    values_code: i32,
    tail_code: i32,
    labels: *const i32,
    loss: *mut f32,
    grad_hidden: *mut c_void,
    grad_hidden_dtype: i32,
    grad_weight: *mut c_void,
    grad_weight_dtype: i32,
    grad_bias: *mut c_void,
    grad_bias_dtype: i32,
) -> i32 {
    let (none, none_dtype) = NO_DENSE_TEACHER;
    #[rustfmt::skip]
    let args = FusedArgs { spec, hidden, hidden_dtype, weight, weight_dtype, bias, bias_dtype,
        teacher_hidden: none, teacher_hidden_dtype: none_dtype, teacher_weight: none,
        teacher_weight_dtype: none_dtype, teacher_bias: none, teacher_bias_dtype: none_dtype,
        teacher_logits: none, teacher_logits_dtype: none_dtype, labels, loss, grad_hidden,
        grad_hidden_dtype, grad_weight, grad_weight_dtype, grad_bias, grad_bias_dtype,
        sparse: Some(SparseTeacherArgs { k, indices: teacher_indices, values: teacher_values,
            values_dtype: teacher_values_dtype, values_code, tail_code }) };
    // SAFETY: this function's contract is `run`'s.
    ffi(|| unsafe { args.run(&Host(CpuBackend::new())) })
}

/// [`dst_cpu_fused_linear_sparse_kd`] on the fast CPU backend on at most `threads` threads (0:
/// one per core); the same bits for any `threads`.
///
/// # Safety
/// As [`dst_cpu_fused_linear_sparse_kd`].
#[no_mangle]
pub unsafe extern "C" fn dst_fast_fused_linear_sparse_kd(
    threads: i32,
    spec: *const DstFusedLinearSpec,
    hidden: *const c_void,
    hidden_dtype: i32,
    weight: *const c_void,
    weight_dtype: i32,
    bias: *const c_void,
    bias_dtype: i32,
    k: usize,
    teacher_indices: *const i32,
    teacher_values: *const c_void,
    teacher_values_dtype: i32,
    values_code: i32,
    tail_code: i32,
    labels: *const i32,
    loss: *mut f32,
    grad_hidden: *mut c_void,
    grad_hidden_dtype: i32,
    grad_weight: *mut c_void,
    grad_weight_dtype: i32,
    grad_bias: *mut c_void,
    grad_bias_dtype: i32,
) -> i32 {
    let (none, none_dtype) = NO_DENSE_TEACHER;
    #[rustfmt::skip]
    let args = FusedArgs { spec, hidden, hidden_dtype, weight, weight_dtype, bias, bias_dtype,
        teacher_hidden: none, teacher_hidden_dtype: none_dtype, teacher_weight: none,
        teacher_weight_dtype: none_dtype, teacher_bias: none, teacher_bias_dtype: none_dtype,
        teacher_logits: none, teacher_logits_dtype: none_dtype, labels, loss, grad_hidden,
        grad_hidden_dtype, grad_weight, grad_weight_dtype, grad_bias, grad_bias_dtype,
        sparse: Some(SparseTeacherArgs { k, indices: teacher_indices, values: teacher_values,
            values_dtype: teacher_values_dtype, values_code, tail_code }) };
    // SAFETY: this function's contract is `run`'s.
    ffi(|| unsafe { args.run(&Host(super::host::fast_backend(threads)?)) })
}

/// [`dst_cpu_fused_linear_sparse_kd`] on device pointers of the context's device, as
/// [`dst_cuda_fused_linear_kd`] (it synchronizes the stream: the labels and the teacher's
/// indices are read to the host and checked, the loss read back). Without the crate feature
/// `cuda`: the arguments' checks, then
/// [`DST_ERR_UNAVAILABLE`](super::status::DST_ERR_UNAVAILABLE).
///
/// # Safety
/// `ctx` is NULL or a live handle; every non-null pointer is device memory of its device, valid
/// for the sizes of [`dst_cpu_fused_linear_sparse_kd`]; `spec` is NULL or host memory.
#[no_mangle]
pub unsafe extern "C" fn dst_cuda_fused_linear_sparse_kd(
    ctx: *const dst_cuda,
    spec: *const DstFusedLinearSpec,
    hidden: *const c_void,
    hidden_dtype: i32,
    weight: *const c_void,
    weight_dtype: i32,
    bias: *const c_void,
    bias_dtype: i32,
    k: usize,
    teacher_indices: *const i32,
    teacher_values: *const c_void,
    teacher_values_dtype: i32,
    values_code: i32,
    tail_code: i32,
    labels: *const i32,
    loss: *mut f32,
    grad_hidden: *mut c_void,
    grad_hidden_dtype: i32,
    grad_weight: *mut c_void,
    grad_weight_dtype: i32,
    grad_bias: *mut c_void,
    grad_bias_dtype: i32,
) -> i32 {
    let (none, none_dtype) = NO_DENSE_TEACHER;
    #[rustfmt::skip]
    let args = FusedArgs { spec, hidden, hidden_dtype, weight, weight_dtype, bias, bias_dtype,
        teacher_hidden: none, teacher_hidden_dtype: none_dtype, teacher_weight: none,
        teacher_weight_dtype: none_dtype, teacher_bias: none, teacher_bias_dtype: none_dtype,
        teacher_logits: none, teacher_logits_dtype: none_dtype, labels, loss, grad_hidden,
        grad_hidden_dtype, grad_weight, grad_weight_dtype, grad_bias, grad_bias_dtype,
        sparse: Some(SparseTeacherArgs { k, indices: teacher_indices, values: teacher_values,
            values_dtype: teacher_values_dtype, values_code, tail_code }) };
    ffi(|| {
        #[cfg(feature = "cuda")]
        {
            // SAFETY: this function's contract is `run`'s and `Device`'s.
            unsafe { args.run(&Device(ctx)) }
        }
        #[cfg(not(feature = "cuda"))]
        {
            non_null("ctx", ctx)?;
            args.check()?;
            Err(Fail::new(
                super::status::DST_ERR_UNAVAILABLE,
                "backend cuda unavailable: this library was built without the `cuda` feature",
            ))
        }
    })
}
