//! Fused linear layer + distillation loss, chunked over rows (`docs/LOSSES.md` section 11): the
//! student's logits `s = h W^T (+ b)` `[N, V]` (and the teacher's) are never held for all `N`
//! rows at once.
//!
//! For each chunk of rows the loop below computes, on any [`Backend`]:
//! 1. `s = h W^T (+ b)` and the teacher's logits (given `[N, V]`, or `h_t W_t^T (+ b_t)` with
//!    `V_t >= V`, the columns past `V` dropped) into f32 scratch; a sparse top-k teacher's `[N, k]`
//!    indices and values (section 10) are only cut to the chunk's rows;
//! 2. the existing fused row kernel (Hinton, divergence, cross-entropy or sparse) over the chunk,
//!    its gradient written in place over `s`, scaled by `grad_scale / N_valid` with `N_valid` the
//!    count of valid rows of the whole batch (the kernel runs with `Reduction::Sum`, so no chunk
//!    is normalised by its own count); the chunk's loss is added into an f32 total on the device;
//! 3. `grad_h = g W` for the chunk's rows, `grad_W += g^T h`, `grad_b += colsum(g)`.
//!
//! The loss is `w_hard CE + w_soft c_T D`, `D` the divergence at temperature `T` (forward KL,
//! reverse KL or JSD(beta), section 2) and `CE` the cross-entropy at temperature 1 (section 3),
//! both means over the same valid rows (or sums). [`Weighting::Hinton`] is our default (`w_hard =
//! alpha`, `w_soft = 1 - alpha`, `c_T = T^2`); [`Weighting::Liger`] is Liger-Kernel's and TRL's
//! (`weight_hard_loss`, `weight_soft_loss`, `c_T = 1`). Extra memory: `O(chunk x V)`, the chunk's
//! rows sized from [`FusedLinearKd::memory_budget`]; plus an f32 copy of a bf16 / f16 weight where
//! the backend's matmul reads f32 only (wgpu, CUDA: [`Backend::matmul_reads_half`]) and an f32
//! accumulator for a bf16 / f16 `grad_W` or `grad_b` (pass f32 gradient buffers to avoid both).
//!
//! | teacher | scratch per row | row kernel |
//! | --- | --- | --- |
//! | [`Teacher::None`] | — | cross-entropy |
//! | [`Teacher::Logits`] `[N, V]` | `V` | Hinton (forward KL), or divergence (+ cross-entropy) |
//! | [`Teacher::Linear`] `[N, H_t]`, `[V_t, H_t]` | `V` (+ `V_t` when padded, + `H_t`) | as logits |
//! | [`Teacher::Sparse`] `[N, k]` indices and values | `k` | sparse (section 10), both terms |
//!
//! | piece | file |
//! | --- | --- |
//! | spec, validation, the chunk loop | here |
//! | the f64 reference (the unfused composition) | `reference.rs` |
//! | the call's checks | `validate.rs` |

pub mod reference;
mod validate;

use crate::backend::{Backend, GradOut, LossOut};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::ops::dense::{CopySpec, MatmulSpec};
use crate::ops::{
    CrossEntropySpec, Divergence, DivergenceSpec, HintonSpec, Reduction, RowShape, SparseSpec,
    SparseTail, SparseValues, IGNORE_INDEX,
};

/// The default scratch budget of one chunk of rows: 48 MiB. At the CPU benchmark's shape (N =
/// 2048, H = 1024, V = 32000) that is 187 rows per chunk, a tenth of the unfused logits' memory
/// within 1.07x of their time; smaller chunks save memory and cost time (the weight is re-packed
/// per chunk), `docs/PERF.md`. GPUs run better with larger chunks: set it.
pub const DEFAULT_MEMORY_BUDGET: usize = 48 << 20;

/// How the hard (cross-entropy) and soft (divergence) terms are weighted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Weighting {
    /// `alpha CE + (1 - alpha) T^2 D` (Hinton et al. 2015; the crate's default, section 4).
    /// `alpha = 1` is cross-entropy only (no teacher), `alpha = 0` the divergence only.
    Hinton { alpha: f32 },
    /// `weight_hard CE + weight_soft D`, no `T^2` (Liger-Kernel's `LigerFusedLinear*Loss`,
    /// `weight_hard_loss` / `weight_soft_loss`, and TRL's trainers that call it).
    Liger { weight_hard: f32, weight_soft: f32 },
}

impl Weighting {
    /// `(w_hard, w_soft_kernel)`: the factors of CE and of the divergence kernels' own loss
    /// `T^2 D` (section 2), so that `L = w_hard CE + w_soft_kernel T^2 D`.
    pub(crate) fn factors(self, temperature: f32) -> (f64, f64) {
        match self {
            Weighting::Hinton { alpha } => (alpha as f64, 1.0 - alpha as f64),
            Weighting::Liger {
                weight_hard,
                weight_soft,
            } => (
                weight_hard as f64,
                weight_soft as f64 / (temperature as f64).powi(2),
            ),
        }
    }
}

/// A fused linear layer + loss (see the module documentation): `FusedLinearKd::new` is the
/// Hinton form with forward KL; [`FusedLinearKd::divergence_only`] and
/// [`FusedLinearKd::cross_entropy_only`] the one-term forms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FusedLinearKd {
    /// `H_s`: the student's hidden size (columns of `hidden` and `weight`).
    pub hidden: usize,
    /// `V`: the student's vocabulary (rows of `weight`, columns of the logits).
    pub vocab: usize,
    pub temperature: f32,
    pub divergence: Divergence,
    pub weighting: Weighting,
    /// Of the cross-entropy term, in [0, 1).
    pub label_smoothing: f32,
    pub ignore_index: i32,
    /// `BatchMean` (by the valid rows of the whole batch) or `Sum`.
    pub reduction: Reduction,
    /// The upstream gradient `g`, multiplied into every gradient.
    pub grad_scale: f32,
    /// Bytes of f32 scratch one chunk of rows may take (at least one row runs).
    pub memory_budget: usize,
    /// Rows per chunk; 0 (the default): from `memory_budget`.
    pub chunk_rows: usize,
}

impl FusedLinearKd {
    /// `alpha CE + (1 - alpha) T^2 KL(q || p)` over `[N, hidden]` states and a `[vocab, hidden]`
    /// weight, batchmean.
    pub fn new(hidden: usize, vocab: usize, temperature: f32, alpha: f32) -> Self {
        FusedLinearKd {
            hidden,
            vocab,
            temperature,
            divergence: Divergence::ForwardKl,
            weighting: Weighting::Hinton { alpha },
            label_smoothing: 0.0,
            ignore_index: IGNORE_INDEX,
            reduction: Reduction::BatchMean,
            grad_scale: 1.0,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            chunk_rows: 0,
        }
    }

    /// `T^2 D(q || p)` only (the loss of `Backend::divergence`, section 2); labels optional (they
    /// only mask rows).
    pub fn divergence_only(
        hidden: usize,
        vocab: usize,
        temperature: f32,
        divergence: Divergence,
    ) -> Self {
        FusedLinearKd {
            divergence,
            ..Self::new(hidden, vocab, temperature, 0.0)
        }
    }

    /// Cross-entropy only (fused linear cross-entropy, section 3): no teacher.
    pub fn cross_entropy_only(hidden: usize, vocab: usize) -> Self {
        Self::new(hidden, vocab, 1.0, 1.0)
    }

    /// Liger-Kernel's weighting (`weight_hard CE + weight_soft D`, no `T^2`).
    pub fn liger(self, weight_hard: f32, weight_soft: f32) -> Self {
        FusedLinearKd {
            weighting: Weighting::Liger {
                weight_hard,
                weight_soft,
            },
            ..self
        }
    }

    /// Whether the loss has a cross-entropy term (labels required).
    pub fn has_hard(&self) -> bool {
        self.weighting.factors(self.temperature).0 != 0.0
    }

    /// Whether the loss has a divergence term (a teacher required).
    pub fn has_soft(&self) -> bool {
        self.weighting.factors(self.temperature).1 != 0.0
    }

    /// The spec's own checks (the call's shapes are checked by [`FusedLinearKd::run`]).
    pub fn validate(&self) -> Result<()> {
        validate::spec(self)
    }

    /// Rows per chunk for `rows` rows with this call's scratch (see [`Scratch::bytes_per_row`]).
    fn rows_per_chunk(&self, rows: usize, per_row: usize) -> usize {
        let by_budget = (self.memory_budget / per_row.max(1)).max(1);
        let chunk = if self.chunk_rows > 0 {
            self.chunk_rows
        } else {
            by_budget
        };
        chunk.min(rows).max(1)
    }

    /// The sparse row kernel's spec for `rows` rows of a sparse teacher (`k`, its values and
    /// tail): `s (alpha' CE + (1 - alpha') T^2 D)` with `s alpha' = w_hard` and `s (1 - alpha') =
    /// w_soft_kernel` ([`Weighting::factors`]), so that the weighting applies as for a dense
    /// teacher. Returns the spec (`Reduction::Sum`, `grad_scale` unset) and `s`.
    pub(crate) fn sparse_spec(
        &self,
        rows: usize,
        k: usize,
        values: SparseValues,
        tail: SparseTail,
    ) -> (SparseSpec, f64) {
        let (hard, soft) = self.weighting.factors(self.temperature);
        let s = hard + soft;
        let alpha = if s > 0.0 {
            (hard / s).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let spec = SparseSpec {
            divergence: self.divergence,
            values,
            tail,
            alpha: alpha as f32,
            label_smoothing: self.label_smoothing,
            reduction: Reduction::Sum,
            ignore_index: self.ignore_index,
            ..SparseSpec::new(RowShape::new(rows, self.vocab), k, self.temperature)
        };
        (spec, s)
    }

    /// Whether the two terms run as two kernels (cross-entropy's, then the divergence, or the
    /// sparse kernel with `alpha' = 0`) rather than one fused kernel (Hinton's for forward KL, the
    /// sparse one): when the soft term's share `1 - alpha'` is below 1/64 (Liger's weighting at a
    /// high temperature, `w_soft / T^2` beside `w_hard`), where the one kernel's f32 `alpha'`
    /// would leave `1 - alpha'` with a relative error above 2e-6 (at T = 1e4, `alpha'` rounds to
    /// 1 and the soft term vanishes).
    pub(crate) fn split_terms(&self) -> bool {
        let (hard, soft) = self.weighting.factors(self.temperature);
        hard != 0.0 && soft != 0.0 && soft / (hard + soft) < 1.0 / 64.0
    }

    /// Loss, `grad_h` (overwritten), `grad_W` and `grad_b` (added to) for `student`'s states and
    /// weight against `teacher`; `labels` `[N]` (required with a cross-entropy term; otherwise
    /// optional, masking rows). Returns the loss (one download at the end).
    pub fn run<B: Backend>(
        &self,
        b: &B,
        student: &Linear<'_, B>,
        teacher: &Teacher<'_, B>,
        labels: Option<&[i32]>,
        grads: &FusedGrads<'_, B>,
    ) -> Result<f32> {
        let dims = validate::call(self, b, student, teacher, labels, grads)?;
        let n = dims.rows;
        let valid = labels.map_or(n, |l| l.iter().filter(|&&y| y != self.ignore_index).count());
        let f = match self.reduction {
            Reduction::BatchMean if valid == 0 => 0.0,
            Reduction::BatchMean => 1.0 / valid as f64,
            _ => 1.0,
        };
        let (h, v) = (self.hidden, self.vocab);
        let weight = f32_operand(b, student.weight)?;
        let t_weight = match teacher {
            Teacher::Linear { layer, .. } => Some(f32_operand(b, layer.weight)?),
            _ => None,
        };
        let gw = Accumulator::new(b, grads.weight)?;
        let gb = Accumulator::new(b, grads.bias)?;
        let total = b.filled(1, 0.0)?;
        let per_row = Scratch::<B>::bytes_per_row(self, &dims, grads);
        let chunk = self.rows_per_chunk(n, per_row);
        let mut scratch: Option<Scratch<B>> = None;
        for r0 in (0..n).step_by(chunk) {
            let c = chunk.min(n - r0);
            if scratch.as_ref().is_none_or(|s| s.rows != c) {
                drop(scratch.take()); // free the full-size chunk before the last, smaller one
                scratch = Some(Scratch::new(b, self, &dims, grads, c)?);
            }
            let sc = scratch.as_ref().expect("scratch");
            // 1. Logits.
            let bias_rows = |cols: usize| CopySpec {
                rows: c,
                cols,
                src_offset: 0,
                src_stride: 0,
                dst_offset: 0,
                dst_stride: cols,
            };
            b.copy_rows(
                &CopySpec::contiguous(c * h, r0 * h, 0),
                student.hidden,
                &sc.h,
            )?;
            if let Some(bias) = student.bias {
                b.copy_rows(&bias_rows(v), bias, &sc.logits)?;
            }
            let forward = |m: usize, k: usize, n: usize, acc: bool| MatmulSpec {
                m,
                k,
                n,
                trans_a: false,
                trans_b: true,
                accumulate: acc,
            };
            b.matmul(
                &forward(c, h, v, student.bias.is_some()),
                &sc.h,
                weight.get(),
                &sc.logits,
            )?;
            match teacher {
                Teacher::None | Teacher::Sparse { .. } => {}
                Teacher::Logits(t) => {
                    let dst = sc.teacher.as_ref().expect("teacher scratch");
                    b.copy_rows(&CopySpec::contiguous(c * v, r0 * v, 0), t, dst)?;
                }
                Teacher::Linear {
                    layer,
                    hidden,
                    vocab,
                } => {
                    let (ht, vt) = (*hidden, *vocab);
                    let th = sc.teacher_hidden.as_ref().expect("teacher hidden scratch");
                    b.copy_rows(&CopySpec::contiguous(c * ht, r0 * ht, 0), layer.hidden, th)?;
                    let narrow = sc.teacher.as_ref().expect("teacher scratch");
                    let dst = sc.teacher_wide.as_ref().unwrap_or(narrow);
                    if let Some(bias) = layer.bias {
                        b.copy_rows(&bias_rows(vt), bias, dst)?;
                    }
                    let tw = t_weight.as_ref().expect("teacher weight").get();
                    b.matmul(&forward(c, ht, vt, layer.bias.is_some()), th, tw, dst)?;
                    if vt > v {
                        // The padded teacher vocabulary: columns past V dropped.
                        let keep = CopySpec {
                            rows: c,
                            cols: v,
                            src_offset: 0,
                            src_stride: vt,
                            dst_offset: 0,
                            dst_stride: v,
                        };
                        b.copy_rows(&keep, dst, narrow)?;
                    }
                }
            }
            // 2. The row loss, its gradient in place over the logits.
            let chunk_labels = match labels {
                Some(l) => Some(b.upload_labels(&l[r0..r0 + c])?),
                None => None,
            };
            match teacher {
                Teacher::Sparse {
                    indices,
                    values,
                    k,
                    values_kind,
                    tail,
                } => {
                    let k = *k;
                    let vals = sc.sparse_values.as_ref().expect("sparse values scratch");
                    b.copy_rows(&CopySpec::contiguous(c * k, r0 * k, 0), values, vals)?;
                    let idx = b.upload_labels(&indices[r0 * k..(r0 + c) * k])?;
                    let (mut spec, mut s) = self.sparse_spec(c, k, *values_kind, *tail);
                    let split = self.split_terms();
                    if split {
                        // Cross-entropy's gradient aside; the sparse kernel for the divergence
                        // alone (alpha' = 0), weighted exactly.
                        let (hard, soft) = self.weighting.factors(self.temperature);
                        let gce = sc.grad_ce.as_ref().expect("cross-entropy gradient scratch");
                        let labels = chunk_labels.as_ref().ok_or_else(|| {
                            Error::Unsupported("a cross-entropy term needs labels".into())
                        })?;
                        let ce = CrossEntropySpec {
                            label_smoothing: self.label_smoothing,
                            reduction: Reduction::Sum,
                            ignore_index: self.ignore_index,
                            grad_scale: (self.grad_scale as f64 * hard * f) as f32,
                            ..CrossEntropySpec::new(RowShape::new(c, v))
                        };
                        let out = LossOut::<B> {
                            loss: &sc.part,
                            row_loss: None,
                            grad_student: GradOut::Into(gce),
                            grad_teacher: None,
                        };
                        b.cross_entropy(&ce, &sc.logits, labels, out)?;
                        b.axpy((hard * f) as f32, &sc.part, &total)?;
                        spec.alpha = 0.0;
                        s = soft;
                    }
                    spec.grad_scale = (self.grad_scale as f64 * s * f) as f32;
                    let out = LossOut::<B> {
                        loss: &sc.part,
                        row_loss: None,
                        grad_student: GradOut::InPlace,
                        grad_teacher: None,
                    };
                    b.sparse_kd(&spec, &sc.logits, &idx, vals, chunk_labels.as_ref(), out)
                        .map_err(|e| batch_row(e, r0))?;
                    b.axpy((s * f) as f32, &sc.part, &total)?;
                    if split {
                        let gce = sc.grad_ce.as_ref().expect("cross-entropy gradient scratch");
                        b.axpy(1.0, gce, &sc.logits)?;
                    }
                }
                _ => self.chunk_loss(b, sc, chunk_labels.as_ref(), f, &total)?,
            }
            // 3. The layer's gradients.
            if let Some(gh) = grads.hidden {
                let spec = MatmulSpec::new(c, v, h);
                b.matmul(&spec, &sc.logits, weight.get(), &sc.grad_h)?;
                b.copy_rows(&CopySpec::contiguous(c * h, 0, r0 * h), &sc.grad_h, gh)?;
            }
            if let Some(acc) = gw.get() {
                let spec = MatmulSpec {
                    trans_a: true,
                    accumulate: true,
                    ..MatmulSpec::new(v, c, h)
                };
                b.matmul(&spec, &sc.logits, &sc.h, acc)?;
            }
            if let Some(acc) = gb.get() {
                b.sum_rows(&sc.logits, acc, true)?;
            }
        }
        drop(scratch);
        gw.finish(b, grads.weight)?;
        gb.finish(b, grads.bias)?;
        Ok(b.download(&total)?[0])
    }

    /// The row loss of one chunk: its gradient in place over `sc.logits` and its loss added to
    /// `total`, both scaled by the global factor `f` (`1 / N_valid` or 1).
    fn chunk_loss<B: Backend>(
        &self,
        b: &B,
        sc: &Scratch<B>,
        labels: Option<&B::Labels>,
        f: f64,
        total: &B::Buffer,
    ) -> Result<()> {
        let shape = RowShape::new(sc.rows, self.vocab);
        let g = self.grad_scale as f64;
        let (hard, soft) = self.weighting.factors(self.temperature);
        let out = |loss, grad| LossOut::<B> {
            loss,
            row_loss: None,
            grad_student: grad,
            grad_teacher: None,
        };
        let ce = |scale: f64| CrossEntropySpec {
            label_smoothing: self.label_smoothing,
            reduction: Reduction::Sum,
            ignore_index: self.ignore_index,
            grad_scale: (g * scale * f) as f32,
            ..CrossEntropySpec::new(shape)
        };
        let div = |scale: f64| DivergenceSpec {
            divergence: self.divergence,
            reduction: Reduction::Sum,
            ignore_index: self.ignore_index,
            grad_scale: (g * scale * f) as f32,
            ..DivergenceSpec::new(shape, self.temperature)
        };
        let labels_required =
            || labels.ok_or_else(|| Error::Unsupported("a cross-entropy term needs labels".into()));
        let teacher = || sc.teacher.as_ref().expect("teacher scratch");
        if soft == 0.0 {
            b.cross_entropy(
                &ce(hard),
                &sc.logits,
                labels_required()?,
                out(&sc.part, GradOut::InPlace),
            )?;
            return b.axpy((hard * f) as f32, &sc.part, total);
        }
        if hard == 0.0 {
            b.divergence(
                &div(soft),
                &sc.logits,
                teacher(),
                labels,
                out(&sc.part, GradOut::InPlace),
            )?;
            return b.axpy((soft * f) as f32, &sc.part, total);
        }
        if self.divergence == Divergence::ForwardKl && !self.split_terms() {
            // One pass of the Hinton kernel: s (alpha' CE + (1 - alpha') T^2 KL) with
            // s alpha' = hard and s (1 - alpha') = soft.
            let s = hard + soft;
            let spec = HintonSpec {
                label_smoothing: self.label_smoothing,
                reduction: Reduction::Sum,
                ignore_index: self.ignore_index,
                grad_scale: (g * s * f) as f32,
                ..HintonSpec::new(shape, self.temperature, (hard / s).clamp(0.0, 1.0) as f32)
            };
            b.hinton(
                &spec,
                &sc.logits,
                teacher(),
                labels_required()?,
                out(&sc.part, GradOut::InPlace),
            )?;
            return b.axpy((s * f) as f32, &sc.part, total);
        }
        // Reverse KL, JSD, or a soft share too small for one kernel's f32 alpha': cross-entropy's
        // gradient aside, the divergence's in place, summed.
        let gce = sc.grad_ce.as_ref().expect("cross-entropy gradient scratch");
        b.cross_entropy(
            &ce(hard),
            &sc.logits,
            labels_required()?,
            out(&sc.part, GradOut::Into(gce)),
        )?;
        b.axpy((hard * f) as f32, &sc.part, total)?;
        b.divergence(
            &div(soft),
            &sc.logits,
            teacher(),
            labels,
            out(&sc.part, GradOut::InPlace),
        )?;
        b.axpy((soft * f) as f32, &sc.part, total)?;
        b.axpy(1.0, gce, &sc.logits)
    }
}

/// A linear layer's input and parameters: `hidden` `[N, H]`, `weight` `[V, H]`, `bias` `[V]`,
/// each of any dtype.
pub struct Linear<'a, B: Backend + ?Sized> {
    pub hidden: &'a B::Buffer,
    pub weight: &'a B::Buffer,
    pub bias: Option<&'a B::Buffer>,
}

/// The teacher of a [`FusedLinearKd`].
pub enum Teacher<'a, B: Backend + ?Sized> {
    /// None (cross-entropy only).
    None,
    /// Logits `[N, V]`, any dtype.
    Logits(&'a B::Buffer),
    /// The teacher's last hidden states `[N, hidden]` and output layer `[vocab, hidden]`, with
    /// `vocab >= V`: a padded teacher vocabulary, whose columns past `V` are dropped (the
    /// teacher's softmax is over the student's `V` classes; `docs/LOSSES.md` section 11).
    Linear {
        layer: Linear<'a, B>,
        hidden: usize,
        vocab: usize,
    },
    /// A sparse top-k teacher (`docs/LOSSES.md` sections 10 and 11): per row `k` distinct class
    /// indices in `0..V` (`indices`, `[N, k]` row-major on the host, as the labels; each chunk's
    /// rows are uploaded as it runs) and their `k` values (`values`, `[N, k]`, any dtype on the
    /// device): log-probabilities at T = 1 as a top-k cache stores them, or logits
    /// (`values_kind`). The soft term is section 10's `T^2 D(Q || P)` with the student's full
    /// softmax `p` over `V`, the teacher `Q` from its top-k and `tail`:
    /// [`SparseTail::Renormalize`] (the top-k is the whole distribution), `Bucket` (one extra
    /// event of mass `1 - sum e^l`) or `Uniform` (that mass spread over the other `V - k`
    /// classes); the tails need log-probabilities. The tail only changes `D`: the weighting
    /// applies as for a dense teacher (`w_hard CE + w_soft c_T D`, CE at T = 1 with label
    /// smoothing). The whole `[N, k]` teacher is checked before anything runs (one download of
    /// the values on a device backend): indices distinct and in `0..V`, values valid for their
    /// kind, with an error naming the row.
    Sparse {
        indices: &'a [i32],
        values: &'a B::Buffer,
        k: usize,
        values_kind: SparseValues,
        tail: SparseTail,
    },
}

/// Where the gradients go (each optional): `hidden` `[N, H]` is overwritten; `weight` `[V, H]`
/// and `bias` `[V]` are added to (gradient accumulation: zero them for a fresh gradient). Any
/// dtype; a half buffer is accumulated in f32 scratch and rounded once at the end.
pub struct FusedGrads<'a, B: Backend + ?Sized> {
    pub hidden: Option<&'a B::Buffer>,
    pub weight: Option<&'a B::Buffer>,
    pub bias: Option<&'a B::Buffer>,
}

/// The checked sizes of one call.
pub(crate) struct Dims {
    pub rows: usize,
    /// `(H_t, V_t)` of a teacher given as a layer.
    pub teacher_layer: Option<(usize, usize)>,
    /// `k` of a sparse teacher.
    pub sparse_k: Option<usize>,
    pub teacher: bool,
}

/// An error of a chunk's row kernel naming the row within the chunk, renamed to the batch's row
/// (the chunk starts at row `r0`).
fn batch_row(e: Error, r0: usize) -> Error {
    match e {
        Error::Input { what, row, problem } => Error::Input {
            what,
            row: row + r0,
            problem,
        },
        e => e,
    }
}

/// A borrowed buffer, or an owned f32 copy of it.
enum Operand<'a, B: Backend> {
    Borrowed(&'a B::Buffer),
    Owned(B::Buffer),
}

impl<B: Backend> Operand<'_, B> {
    fn get(&self) -> &B::Buffer {
        match self {
            Operand::Borrowed(x) => x,
            Operand::Owned(x) => x,
        }
    }
}

/// `x` as a matmul operand of this backend: itself, or an f32 copy of a half `x` where the
/// backend's matmul reads f32 only.
fn f32_operand<'a, B: Backend>(b: &B, x: &'a B::Buffer) -> Result<Operand<'a, B>> {
    if b.dtype(x) == Dtype::F32 || b.matmul_reads_half() {
        return Ok(Operand::Borrowed(x));
    }
    let len = b.len(x);
    let copy = b.filled(len, 0.0)?;
    b.copy_rows(&CopySpec::contiguous(len, 0, 0), x, &copy)?;
    Ok(Operand::Owned(copy))
}

/// An f32 gradient to accumulate into: the caller's f32 buffer, or an f32 copy of a half one.
struct Accumulator<'a, B: Backend>(Option<Operand<'a, B>>);

impl<'a, B: Backend> Accumulator<'a, B> {
    fn new(b: &B, grad: Option<&'a B::Buffer>) -> Result<Self> {
        Ok(Accumulator(match grad {
            Some(g) => Some(f32_accumulator(b, g)?),
            None => None,
        }))
    }

    fn get(&self) -> Option<&B::Buffer> {
        self.0.as_ref().map(Operand::get)
    }

    /// Rounds an f32 copy back into the caller's half buffer.
    fn finish(self, b: &B, grad: Option<&B::Buffer>) -> Result<()> {
        if let (Some(Operand::Owned(acc)), Some(g)) = (&self.0, grad) {
            b.copy_rows(&CopySpec::contiguous(b.len(g), 0, 0), acc, g)?;
        }
        Ok(())
    }
}

fn f32_accumulator<'a, B: Backend>(b: &B, g: &'a B::Buffer) -> Result<Operand<'a, B>> {
    if b.dtype(g) == Dtype::F32 {
        return Ok(Operand::Borrowed(g));
    }
    let copy = b.filled(b.len(g), 0.0)?;
    b.copy_rows(&CopySpec::contiguous(b.len(g), 0, 0), g, &copy)?;
    Ok(Operand::Owned(copy))
}

/// The f32 scratch of one chunk of `rows` rows.
struct Scratch<B: Backend> {
    rows: usize,
    /// `[rows, H]`: the chunk's student states.
    h: B::Buffer,
    /// `[rows, V]`: the student's logits, then their gradient `g`.
    logits: B::Buffer,
    /// `[rows, V]`: the teacher's logits.
    teacher: Option<B::Buffer>,
    /// `[rows, V_t]`: a padded teacher's logits before the columns past `V` are dropped.
    teacher_wide: Option<B::Buffer>,
    /// `[rows, H_t]`: the chunk's teacher states.
    teacher_hidden: Option<B::Buffer>,
    /// `[rows, V]`: cross-entropy's gradient beside a reverse KL or JSD.
    grad_ce: Option<B::Buffer>,
    /// `[rows, k]`: a sparse teacher's values for the chunk's rows.
    sparse_values: Option<B::Buffer>,
    /// `[rows, H]`: the chunk's `grad_h` before it is stored in the caller's dtype.
    grad_h: B::Buffer,
    /// `[1]`: a kernel's loss.
    part: B::Buffer,
}

impl<B: Backend> Scratch<B> {
    /// The columns of each scratch matrix, in the order of the fields.
    fn widths(spec: &FusedLinearKd, dims: &Dims, grads: &FusedGrads<'_, B>) -> [usize; 8] {
        let (h, v) = (spec.hidden, spec.vocab);
        let (ht, vt) = dims.teacher_layer.unwrap_or((0, 0));
        // A sparse teacher runs one kernel for both terms and has no dense teacher logits.
        let sparse = dims.sparse_k.is_some();
        let two_kernels = if sparse {
            spec.split_terms()
        } else {
            spec.has_hard()
                && spec.has_soft()
                && (spec.divergence != Divergence::ForwardKl || spec.split_terms())
        };
        [
            h,
            v,
            if dims.teacher && !sparse { v } else { 0 },
            if vt > v { vt } else { 0 },
            ht,
            if two_kernels { v } else { 0 },
            dims.sparse_k.unwrap_or(0),
            if grads.hidden.is_some() { h } else { 0 },
        ]
    }

    fn bytes_per_row(spec: &FusedLinearKd, dims: &Dims, grads: &FusedGrads<'_, B>) -> usize {
        4 * Self::widths(spec, dims, grads).iter().sum::<usize>()
    }

    fn new(
        b: &B,
        spec: &FusedLinearKd,
        dims: &Dims,
        grads: &FusedGrads<'_, B>,
        rows: usize,
    ) -> Result<Self> {
        let [h, v, t, tw, th, gce, sv, gh] = Self::widths(spec, dims, grads);
        let some = |cols: usize| -> Result<Option<B::Buffer>> {
            if cols == 0 {
                Ok(None)
            } else {
                b.filled(rows * cols, 0.0).map(Some)
            }
        };
        Ok(Scratch {
            rows,
            h: b.filled(rows * h, 0.0)?,
            logits: b.filled(rows * v, 0.0)?,
            teacher: some(t)?,
            teacher_wide: some(tw)?,
            teacher_hidden: some(th)?,
            grad_ce: some(gce)?,
            sparse_values: some(sv)?,
            grad_h: b.filled(rows * gh.max(1), 0.0)?,
            part: b.filled(1, 0.0)?,
        })
    }
}
