//! The checks of a [`FusedLinearKd`] call: the spec's values, then every buffer's length against
//! the shapes, the labels, which inputs the loss's terms need, and aliasing. Each error says what
//! to fix.

use super::{Dims, FusedGrads, FusedLinearKd, Linear, Teacher, Weighting};
use crate::backend::{validate::no_alias, Backend};
use crate::error::{Error, Result};
use crate::ops::dkd::MAX_WEIGHT;
use crate::ops::index_len;
use crate::ops::sparse::check_sparse_teacher;
use crate::ops::{
    check_grad_scale, check_labels, check_temperature, check_unit, Divergence, Reduction,
};

pub(super) fn spec(s: &FusedLinearKd) -> Result<()> {
    if s.hidden == 0 || s.vocab == 0 {
        return Err(Error::Empty(format!(
            "fused linear loss with hidden size {} and vocabulary {}: both must be at least 1",
            s.hidden, s.vocab
        )));
    }
    if s.vocab > u32::MAX as usize || s.hidden > u32::MAX as usize {
        return Err(Error::Limit(
            "a hidden size or vocabulary past 2^32; split the layer".into(),
        ));
    }
    check_temperature(s.temperature)?;
    check_grad_scale(s.grad_scale)?;
    check_unit(
        "label_smoothing",
        s.label_smoothing,
        false,
        true,
        "label smoothing must be in [0, 1) (0 disables it)",
    )?;
    if let Divergence::Jsd { beta } = s.divergence {
        check_unit(
            "beta",
            beta,
            true,
            true,
            "JSD's beta must be in (0, 1); use Divergence::ForwardKl for beta = 0 and \
             Divergence::ReverseKl for beta = 1",
        )?;
    }
    match s.weighting {
        Weighting::Hinton { alpha } => check_unit(
            "alpha",
            alpha,
            false,
            false,
            "alpha weighs cross-entropy against the divergence and must be in [0, 1]",
        )?,
        Weighting::Liger {
            weight_hard,
            weight_soft,
        } => {
            for (name, w) in [("weight_hard", weight_hard), ("weight_soft", weight_soft)] {
                if !(w.is_finite() && (0.0..=MAX_WEIGHT).contains(&w)) {
                    return Err(Error::Param {
                        name,
                        value: w as f64,
                        hint: "the weights of the hard and soft terms must be in [0, 1e6] (scale \
                               the loss's gradient with grad_scale instead)",
                    });
                }
            }
            if weight_hard == 0.0 && weight_soft == 0.0 {
                return Err(Error::Param {
                    name: "weight_soft",
                    value: 0.0,
                    hint: "weight_hard and weight_soft are both 0: the loss would be 0; give \
                           one of them a positive weight",
                });
            }
        }
    }
    // The kernels' gradient factor `grad_scale (w_hard + w_soft_kernel)` in f32 (Hinton's factors
    // sum to 1; Liger's weights are at most 1e6 each).
    let (hard, soft) = s.weighting.factors(s.temperature);
    if (s.grad_scale as f64 * (hard + soft)).abs() > f32::MAX as f64 / 1e8 {
        return Err(Error::Param {
            name: "grad_scale",
            value: s.grad_scale as f64,
            hint: "grad_scale times the terms' weights must stay below 3.4e30 (the gradient \
                   would overflow f32)",
        });
    }
    if s.reduction == Reduction::None {
        return Err(Error::Unsupported(
            "a fused linear loss reduces to a scalar: use Reduction::BatchMean or \
             Reduction::Sum"
                .into(),
        ));
    }
    if s.memory_budget == 0 {
        return Err(Error::Param {
            name: "memory_budget",
            value: 0.0,
            hint: "the scratch budget is in bytes and must be at least 1 (one row runs at a \
                   time below the size of a row); the default is 48 MiB",
        });
    }
    Ok(())
}

/// `a x b` elements of `what`, which the kernels index with 32 bits: an error past 2^32 (checked
/// before anything runs, so that no chunk has written a gradient when a later copy would fail).
fn within_limit(what: &str, a: usize, b: usize, fix: &str) -> Result<usize> {
    index_len(&[a, b]).ok_or_else(|| {
        Error::Limit(format!(
            "{what} of [{a}, {b}] would pass 2^32 elements; {fix}"
        ))
    })
}

/// `rows` rows of `cols` from a buffer's length.
fn rows_of<B: Backend>(b: &B, what: &'static str, buf: &B::Buffer, cols: usize) -> Result<usize> {
    let len = b.len(buf);
    if len == 0 || len % cols != 0 {
        return Err(Error::shape(
            what,
            len,
            len.div_ceil(cols).max(1) * cols,
            format!("{what} is [N, {cols}] row-major, N >= 1"),
        ));
    }
    Ok(len / cols)
}

fn exact<B: Backend>(
    b: &B,
    what: &'static str,
    buf: &B::Buffer,
    n: usize,
    hint: String,
) -> Result<()> {
    let got = b.len(buf);
    if got != n {
        return Err(Error::shape(what, got, n, hint));
    }
    Ok(())
}

pub(super) fn call<B: Backend>(
    s: &FusedLinearKd,
    b: &B,
    student: &Linear<'_, B>,
    teacher: &Teacher<'_, B>,
    labels: Option<&[i32]>,
    grads: &FusedGrads<'_, B>,
) -> Result<Dims> {
    spec(s)?;
    let (h, v) = (s.hidden, s.vocab);
    let n = rows_of(b, "hidden", student.hidden, h)?;
    within_limit("the logits", n, v, "split the batch")?;
    within_limit("hidden", n, h, "split the batch")?;
    let vh = within_limit("weight", v, h, "split the output layer")?;
    exact(
        b,
        "weight",
        student.weight,
        vh,
        format!("the student's weight is [{v}, {h}]"),
    )?;
    if let Some(bias) = student.bias {
        exact(b, "bias", bias, v, format!("the student's bias is [{v}]"))?;
    }
    let mut dims = Dims {
        rows: n,
        teacher_layer: None,
        sparse_k: None,
        teacher: !matches!(teacher, Teacher::None),
    };
    let mut inputs = vec![("hidden", student.hidden), ("weight", student.weight)];
    inputs.extend(student.bias.map(|x| ("bias", x)));
    match teacher {
        Teacher::None => {}
        Teacher::Logits(t) => {
            exact(
                b,
                "teacher logits",
                t,
                n * v,
                format!("the teacher's logits are [{n}, {v}]"),
            )?;
            inputs.push(("teacher logits", t));
        }
        Teacher::Linear {
            layer,
            hidden,
            vocab,
        } => {
            let (ht, vt) = (*hidden, *vocab);
            if ht == 0 || vt < v {
                return Err(Error::Unsupported(format!(
                    "a teacher layer of hidden size {ht} and vocabulary {vt}: the hidden size must \
                     be at least 1 and the vocabulary at least the student's {v} (a padded \
                     teacher vocabulary is cut to the student's; a smaller one is a different \
                     tokenizer, which this loss does not map)"
                )));
            }
            within_limit("the teacher's logits", n, vt, "split the batch")?;
            within_limit("teacher hidden", n, ht, "split the batch")?;
            let vht = within_limit("teacher weight", vt, ht, "split the teacher's layer")?;
            let tn = rows_of(b, "teacher hidden", layer.hidden, ht)?;
            if tn != n {
                return Err(Error::shape(
                    "teacher hidden",
                    b.len(layer.hidden),
                    n * ht,
                    format!("the teacher's states are [{n}, {ht}]: one row per student row"),
                ));
            }
            exact(
                b,
                "teacher weight",
                layer.weight,
                vht,
                format!("the teacher's weight is [{vt}, {ht}]"),
            )?;
            if let Some(bias) = layer.bias {
                exact(
                    b,
                    "teacher bias",
                    bias,
                    vt,
                    format!("the teacher's bias is [{vt}]"),
                )?;
            }
            dims.teacher_layer = Some((ht, vt));
            inputs.push(("teacher hidden", layer.hidden));
            inputs.push(("teacher weight", layer.weight));
            inputs.extend(layer.bias.map(|x| ("teacher bias", x)));
        }
        Teacher::Sparse {
            indices,
            values,
            k,
            values_kind,
            tail,
        } => {
            // The sparse row kernel's own checks of k, the tail against the values' kind and
            // the divergence (section 10), on the whole batch; the arrays after the labels.
            let (sparse, _) = s.sparse_spec(n, *k, *values_kind, *tail);
            sparse.validate()?;
            let nk = within_limit("the sparse teacher", n, *k, "split the batch")?;
            if indices.len() != nk {
                return Err(Error::shape(
                    "sparse teacher indices",
                    indices.len(),
                    n * k,
                    format!("the sparse teacher's indices are [{n}, {k}] row-major"),
                ));
            }
            exact(
                b,
                "sparse teacher values",
                values,
                n * k,
                format!("the sparse teacher's values are [{n}, {k}] row-major"),
            )?;
            dims.sparse_k = Some(*k);
            inputs.push(("sparse teacher values", values));
        }
    }
    if s.has_soft() && !dims.teacher {
        return Err(Error::Unsupported(
            "the loss has a divergence term but no teacher was given: pass Teacher::Logits, \
             Teacher::Linear or Teacher::Sparse, or use FusedLinearKd::cross_entropy_only"
                .into(),
        ));
    }
    if !s.has_soft() && dims.teacher {
        return Err(Error::Unsupported(
            "a teacher was given to a loss without a divergence term (alpha = 1 or weight_soft \
             = 0), where it would be ignored: pass Teacher::None"
                .into(),
        ));
    }
    match labels {
        Some(l) => {
            if l.len() != n {
                return Err(Error::shape("labels", l.len(), n, "one label per row"));
            }
            check_labels(l, v, s.ignore_index)?;
        }
        None if s.has_hard() => {
            return Err(Error::Unsupported(
                "the loss has a cross-entropy term, which needs labels: pass one label per row"
                    .into(),
            ))
        }
        None => {}
    }
    if let Teacher::Sparse {
        indices,
        values,
        k,
        values_kind,
        tail,
    } = teacher
    {
        // Every row's indices (distinct, in 0..V) and the values of the rows not masked, with
        // the batch's row numbers, before anything is written (one download on a device).
        let (sparse, _) = s.sparse_spec(n, *k, *values_kind, *tail);
        check_sparse_teacher(&sparse, indices, &b.download(values)?, labels)?;
    }
    let mut outputs = Vec::new();
    if let Some(g) = grads.hidden {
        exact(
            b,
            "grad_hidden",
            g,
            n * h,
            format!("grad_hidden is [{n}, {h}], as hidden"),
        )?;
        outputs.push(("grad_hidden", g));
    }
    if let Some(g) = grads.weight {
        exact(
            b,
            "grad_weight",
            g,
            v * h,
            format!("grad_weight is [{v}, {h}], as weight"),
        )?;
        outputs.push(("grad_weight", g));
    }
    if let Some(g) = grads.bias {
        exact(b, "grad_bias", g, v, format!("grad_bias is [{v}]"))?;
        outputs.push(("grad_bias", g));
    }
    no_alias(b, &outputs, &inputs)?;
    Ok(dims)
}
