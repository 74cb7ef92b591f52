//! The f64 reference of [`super::FusedLinearKd`]: the unfused composition, every step in f64 over
//! the whole batch at once (the logits `[N, V]` materialised, the row losses' references with the
//! batch's own reduction, then the two backward matmuls). Every fused result is checked
//! against it. A sparse teacher's soft term is the sparse reference (`ops::sparse::reference`,
//! section 10) with `alpha = 0`, beside the same cross-entropy reference as the dense teachers'.

use super::{validate, FusedGrads, FusedLinearKd, Linear, Teacher};
use crate::backend::cpu::{CpuBackend, CpuBuffer};
use crate::backend::Backend;
use crate::error::Result;
use crate::ops::dense::{self, MatmulSpec};
use crate::ops::{
    cross_entropy, divergence, sparse, CrossEntropySpec, DivergenceSpec, RowShape, SparseSpec,
    SparseTail, SparseValues,
};

/// A layer in f64: `hidden` `[N, H]`, `weight` `[V, H]`, `bias` `[V]`.
pub struct LayerF64<'a> {
    pub hidden: &'a [f64],
    pub weight: &'a [f64],
    pub bias: Option<&'a [f64]>,
}

/// The teacher in f64.
pub enum TeacherF64<'a> {
    None,
    Logits(&'a [f64]),
    /// A layer of hidden size `hidden` and vocabulary `vocab >= V`.
    Linear {
        layer: LayerF64<'a>,
        hidden: usize,
        vocab: usize,
    },
    /// A sparse top-k teacher: `[N, k]` indices (distinct classes, checked by the caller) and
    /// values of `values_kind`, with `tail` (section 10).
    Sparse {
        indices: &'a [i32],
        values: &'a [f64],
        k: usize,
        values_kind: SparseValues,
        tail: SparseTail,
    },
}

/// Loss and gradients (`grad_weight`, `grad_bias`: this call's own, not accumulated).
#[derive(Clone, Debug, Default)]
pub struct FusedResult {
    pub loss: f64,
    pub logits: Vec<f64>,
    /// The logits' gradient `dL/ds`, `[N, V]` (what the backward matmuls multiply).
    pub grad_logits: Vec<f64>,
    pub grad_hidden: Vec<f64>,
    pub grad_weight: Vec<f64>,
    pub grad_bias: Vec<f64>,
}

/// `x W^T + b` for `x` `[n, k]`, `W` `[cols, k]`: `[n, cols]`.
fn linear(layer: &LayerF64<'_>, k: usize, cols: usize) -> Vec<f64> {
    let n = layer.hidden.len() / k;
    let mut out = vec![0.0; n * cols];
    let spec = MatmulSpec {
        trans_b: true,
        ..MatmulSpec::new(n, k, cols)
    };
    dense::reference::matmul(&spec, layer.hidden, layer.weight, &mut out);
    if let Some(b) = layer.bias {
        out = dense::reference::bias_add(&out, b);
    }
    out
}

/// The checks of [`FusedLinearKd::run`] on the f64 inputs (their f32 copies on the reference CPU
/// backend), so that the reference refuses what the fused op refuses instead of panicking.
fn check(
    spec: &FusedLinearKd,
    student: &LayerF64<'_>,
    teacher: &TeacherF64<'_>,
    labels: Option<&[i32]>,
) -> Result<()> {
    let b = CpuBackend;
    let up = |x: &[f64]| b.upload(&x.iter().map(|&v| v as f32).collect::<Vec<_>>());
    let up_layer = |l: &LayerF64<'_>| -> Result<(CpuBuffer, CpuBuffer, Option<CpuBuffer>)> {
        Ok((up(l.hidden)?, up(l.weight)?, l.bias.map(up).transpose()?))
    };
    let (sh, sw, sb) = up_layer(student)?;
    let student = Linear {
        hidden: &sh,
        weight: &sw,
        bias: sb.as_ref(),
    };
    let (th, tw, tb, tv);
    let teacher = match teacher {
        TeacherF64::None => Teacher::None,
        TeacherF64::Logits(t) => {
            tv = up(t)?;
            Teacher::Logits(&tv)
        }
        TeacherF64::Linear {
            layer,
            hidden,
            vocab,
        } => {
            (th, tw, tb) = up_layer(layer)?;
            Teacher::Linear {
                layer: Linear {
                    hidden: &th,
                    weight: &tw,
                    bias: tb.as_ref(),
                },
                hidden: *hidden,
                vocab: *vocab,
            }
        }
        TeacherF64::Sparse {
            indices,
            values,
            k,
            values_kind,
            tail,
        } => {
            tv = up(values)?;
            Teacher::Sparse {
                indices,
                values: &tv,
                k: *k,
                values_kind: *values_kind,
                tail: *tail,
            }
        }
    };
    let grads = FusedGrads {
        hidden: None,
        weight: None,
        bias: None,
    };
    validate::call(spec, &b, &student, &teacher, labels, &grads).map(|_| ())
}

/// The unfused composition of `spec` in f64 (see the module documentation). Inputs are checked
/// as [`FusedLinearKd::run`] checks them (an error, not a panic).
pub fn fused_linear_kd(
    spec: &FusedLinearKd,
    student: &LayerF64<'_>,
    teacher: &TeacherF64<'_>,
    labels: Option<&[i32]>,
) -> Result<FusedResult> {
    check(spec, student, teacher, labels)?;
    let (h, v) = (spec.hidden, spec.vocab);
    let n = student.hidden.len() / h;
    let s = linear(student, h, v);
    let t: Option<Vec<f64>> = match teacher {
        TeacherF64::None | TeacherF64::Sparse { .. } => None,
        TeacherF64::Logits(t) => Some(t.to_vec()),
        TeacherF64::Linear {
            layer,
            hidden,
            vocab,
        } => {
            let wide = linear(layer, *hidden, *vocab);
            // The columns past V dropped.
            Some(
                wide.chunks_exact(*vocab)
                    .flat_map(|row| row[..v].iter().copied())
                    .collect(),
            )
        }
    };
    let shape = RowShape::new(n, v);
    let (hard, soft) = spec.weighting.factors(spec.temperature);
    let mut loss = 0.0;
    let mut g = vec![0.0; n * v];
    if hard != 0.0 {
        let ce = CrossEntropySpec {
            label_smoothing: spec.label_smoothing,
            reduction: spec.reduction,
            ignore_index: spec.ignore_index,
            grad_scale: spec.grad_scale,
            ..CrossEntropySpec::new(shape)
        };
        let r = cross_entropy::reference::cross_entropy(&ce, &s, labels.expect("labels (checked)"));
        loss += hard * r.loss;
        for (o, x) in g.iter_mut().zip(&r.grad_student) {
            *o += hard * x;
        }
    }
    if soft != 0.0 {
        let d = DivergenceSpec {
            divergence: spec.divergence,
            reduction: spec.reduction,
            ignore_index: spec.ignore_index,
            grad_scale: spec.grad_scale,
            ..DivergenceSpec::new(shape, spec.temperature)
        };
        let r = match teacher {
            TeacherF64::Sparse {
                indices,
                values,
                k,
                values_kind,
                tail,
            } => {
                let sp = SparseSpec {
                    divergence: spec.divergence,
                    values: *values_kind,
                    tail: *tail,
                    reduction: spec.reduction,
                    ignore_index: spec.ignore_index,
                    grad_scale: spec.grad_scale,
                    ..SparseSpec::new(shape, *k, spec.temperature)
                };
                sparse::reference::sparse_kd(&sp, &s, indices, values, labels)
            }
            _ => divergence::reference::divergence(
                &d,
                &s,
                t.as_deref().expect("teacher (checked)"),
                labels,
            ),
        };
        loss += soft * r.loss;
        for (o, x) in g.iter_mut().zip(&r.grad_student) {
            *o += soft * x;
        }
    }
    let mut grad_hidden = vec![0.0; n * h];
    dense::reference::matmul(
        &MatmulSpec::new(n, v, h),
        &g,
        student.weight,
        &mut grad_hidden,
    );
    let mut grad_weight = vec![0.0; v * h];
    let spec_w = MatmulSpec {
        trans_a: true,
        ..MatmulSpec::new(v, n, h)
    };
    dense::reference::matmul(&spec_w, &g, student.hidden, &mut grad_weight);
    let mut grad_bias = vec![0.0; v];
    dense::reference::sum_rows(&g, v, &mut grad_bias, false);
    Ok(FusedResult {
        loss,
        logits: s,
        grad_logits: g,
        grad_hidden,
        grad_weight,
        grad_bias,
    })
}
