//! Input checks shared by every backend and by the record-into-encoder API: specs, buffer lengths,
//! output combinations. Each returns an `Err` that says what to fix.

use super::{Backend, GradOut, LossOut};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::ops::conv::{ConvSpec, PoolSpec};
use crate::ops::dense::{CopySpec, MatmulSpec};
use crate::ops::index_len;
use crate::ops::{
    AttentionSpec, CrossEntropySpec, DivergenceSpec, DkdSpec, HintonSpec, MseSpec, SoftmaxSpec,
    SparseSpec, TeacherInput,
};

fn check_len<B: Backend + ?Sized>(
    b: &B,
    what: &'static str,
    buf: &B::Buffer,
    n: usize,
    hint: &str,
) -> Result<()> {
    let got = b.len(buf);
    if got != n {
        return Err(Error::shape(what, got, n, hint));
    }
    Ok(())
}

/// Every buffer is f32: the ops other than the row losses take no other dtype.
pub fn f32_only<B: Backend + ?Sized>(b: &B, bufs: &[(&'static str, &B::Buffer)]) -> Result<()> {
    for (what, buf) in bufs {
        let d = b.dtype(buf);
        if d != Dtype::F32 {
            return Err(Error::Unsupported(format!(
                "{what} is a {d} buffer, but this op takes f32 buffers only (bf16 and f16 are \
                 accepted by the row losses: softmax, the divergences, cross-entropy, Hinton, \
                 DKD); upload it as f32 (Backend::upload or upload_as::<f32>)"
            )));
        }
    }
    Ok(())
}

/// Rejects outputs that share memory with each other or with an input of the same call
/// ([`Backend::overlaps`]): no kernel supports that (the one supported in-place form, the
/// student gradient over the student, is [`GradOut::InPlace`] and is not passed here as an input).
pub fn no_alias<B: Backend + ?Sized>(
    b: &B,
    outputs: &[(&'static str, &B::Buffer)],
    inputs: &[(&'static str, &B::Buffer)],
) -> Result<()> {
    for (i, (name, out)) in outputs.iter().enumerate() {
        for (other, o) in &outputs[..i] {
            if b.overlaps(out, o) {
                return Err(Error::Alias(format!(
                    "{other} and {name} are the same buffer (or overlap): each output needs its \
                     own buffer"
                )));
            }
        }
        for (input, x) in inputs {
            if b.overlaps(out, x) {
                return Err(Error::Alias(format!(
                    "{name} is also the input {input} (or overlaps it): this kernel cannot write \
                     over its input; pass a separate output buffer"
                )));
            }
        }
    }
    Ok(())
}

/// [`no_alias`] for a row loss's outputs; with [`GradOut::InPlace`] the student is an output.
fn loss_out_alias<B: Backend + ?Sized>(
    b: &B,
    out: &LossOut<'_, B>,
    student: &B::Buffer,
    teacher: Option<&B::Buffer>,
) -> Result<()> {
    let mut outputs = vec![("loss", out.loss)];
    if let Some(r) = out.row_loss {
        outputs.push(("row_loss", r));
    }
    let mut inputs = Vec::new();
    match out.grad_student {
        GradOut::Into(g) => {
            outputs.push(("grad_student", g));
            inputs.push(("student", student));
        }
        GradOut::InPlace => outputs.push(("grad_student (in place over the student)", student)),
        GradOut::None => inputs.push(("student", student)),
    }
    if let Some(g) = out.grad_teacher {
        outputs.push(("grad_teacher", g));
    }
    if let Some(t) = teacher {
        inputs.push(("teacher", t));
    }
    no_alias(b, &outputs, &inputs)
}

/// Labels (or a sparse teacher's indices) that share memory with an output would be overwritten
/// while the kernel reads them (device windows of one caller buffer).
fn labels_alias<B: Backend + ?Sized>(
    b: &B,
    what: &str,
    labels: &B::Labels,
    out: &LossOut<'_, B>,
    student: &B::Buffer,
) -> Result<()> {
    let mut outputs = vec![("loss", out.loss)];
    outputs.extend(out.row_loss.map(|r| ("row_loss", r)));
    match out.grad_student {
        GradOut::Into(g) => outputs.push(("grad_student", g)),
        GradOut::InPlace => outputs.push(("grad_student (in place over the student)", student)),
        GradOut::None => {}
    }
    outputs.extend(out.grad_teacher.map(|g| ("grad_teacher", g)));
    for (name, o) in outputs {
        if b.labels_overlap(labels, o) {
            return Err(Error::Alias(format!(
                "{what} overlap the output {name}: the kernel would overwrite them while it \
                 reads them; pass them in memory of their own"
            )));
        }
    }
    Ok(())
}

fn check_labels_len<B: Backend + ?Sized>(b: &B, labels: &B::Labels, rows: usize) -> Result<()> {
    let got = b.labels_len(labels);
    if got != rows {
        return Err(Error::shape("labels", got, rows, "one i32 label per row"));
    }
    Ok(())
}

fn loss_out<B: Backend + ?Sized>(
    b: &B,
    out: &LossOut<'_, B>,
    rows: usize,
    len: usize,
) -> Result<()> {
    check_len(b, "loss", out.loss, 1, "the loss output holds one f32")?;
    f32_only(b, &[("loss", out.loss)])?;
    if let Some(r) = out.row_loss {
        check_len(b, "row_loss", r, rows, "one f32 per row")?;
        f32_only(b, &[("row_loss", r)])?;
    }
    if let GradOut::Into(g) = out.grad_student {
        check_len(
            b,
            "grad_student",
            g,
            len,
            "same shape as the student logits",
        )?;
    }
    if let Some(g) = out.grad_teacher {
        check_len(
            b,
            "grad_teacher",
            g,
            len,
            "same shape as the teacher logits",
        )?;
    }
    Ok(())
}

pub fn softmax<B: Backend + ?Sized>(
    b: &B,
    spec: &SoftmaxSpec,
    x: &B::Buffer,
    y: &B::Buffer,
) -> Result<()> {
    spec.validate()?;
    let hint = "[rows, cols] row-major";
    check_len(b, "x", x, spec.shape.len(), hint)?;
    check_len(b, "y", y, spec.shape.len(), hint)?;
    no_alias(b, &[("y", y)], &[("x", x)])
}

pub fn softmax_backward<B: Backend + ?Sized>(
    b: &B,
    spec: &SoftmaxSpec,
    y: &B::Buffer,
    dy: &B::Buffer,
    dx: &B::Buffer,
) -> Result<()> {
    spec.validate()?;
    let hint = "[rows, cols] row-major";
    check_len(b, "y", y, spec.shape.len(), hint)?;
    check_len(b, "dy", dy, spec.shape.len(), hint)?;
    check_len(b, "dx", dx, spec.shape.len(), hint)?;
    no_alias(b, &[("dx", dx)], &[("y", y), ("dy", dy)])
}

pub fn divergence<B: Backend + ?Sized>(
    b: &B,
    spec: &DivergenceSpec,
    student: &B::Buffer,
    teacher: &B::Buffer,
    labels: Option<&B::Labels>,
    out: &LossOut<'_, B>,
) -> Result<()> {
    spec.validate()?;
    spec.shape.check_len("student", b.len(student))?;
    spec.shape.check_len("teacher", b.len(teacher))?;
    if let Some(l) = labels {
        check_labels_len(b, l, spec.shape.rows)?;
    }
    if out.grad_teacher.is_some() && spec.teacher != TeacherInput::Logits {
        return Err(Error::Unsupported(
            "the teacher's gradient needs the teacher as logits (TeacherInput::Logits); \
             probabilities and log-probabilities are constants"
                .into(),
        ));
    }
    loss_out(b, out, spec.shape.rows, spec.shape.len())?;
    if let Some(l) = labels {
        labels_alias(b, "labels", l, out, student)?;
    }
    loss_out_alias(b, out, student, Some(teacher))
}

pub fn cross_entropy<B: Backend + ?Sized>(
    b: &B,
    spec: &CrossEntropySpec,
    student: &B::Buffer,
    labels: &B::Labels,
    out: &LossOut<'_, B>,
) -> Result<()> {
    spec.validate()?;
    spec.shape.check_len("student", b.len(student))?;
    check_labels_len(b, labels, spec.shape.rows)?;
    if out.grad_teacher.is_some() {
        return Err(Error::Unsupported(
            "cross-entropy has no teacher: pass grad_teacher: None".into(),
        ));
    }
    loss_out(b, out, spec.shape.rows, spec.shape.len())?;
    labels_alias(b, "labels", labels, out, student)?;
    loss_out_alias(b, out, student, None)
}

pub fn hinton<B: Backend + ?Sized>(
    b: &B,
    spec: &HintonSpec,
    student: &B::Buffer,
    teacher: &B::Buffer,
    labels: &B::Labels,
    out: &LossOut<'_, B>,
) -> Result<()> {
    spec.validate()?;
    spec.shape.check_len("student", b.len(student))?;
    spec.shape.check_len("teacher", b.len(teacher))?;
    check_labels_len(b, labels, spec.shape.rows)?;
    loss_out(b, out, spec.shape.rows, spec.shape.len())?;
    labels_alias(b, "labels", labels, out, student)?;
    loss_out_alias(b, out, student, Some(teacher))
}

pub fn dkd<B: Backend + ?Sized>(
    b: &B,
    spec: &DkdSpec,
    student: &B::Buffer,
    teacher: &B::Buffer,
    labels: &B::Labels,
    out: &LossOut<'_, B>,
) -> Result<()> {
    spec.validate()?;
    spec.shape.check_len("student", b.len(student))?;
    spec.shape.check_len("teacher", b.len(teacher))?;
    check_labels_len(b, labels, spec.shape.rows)?;
    if out.grad_teacher.is_some() {
        return Err(Error::Unsupported(
            "DKD's teacher is detached: pass no grad_teacher (grad_teacher: None)".into(),
        ));
    }
    loss_out(b, out, spec.shape.rows, spec.shape.len())?;
    labels_alias(b, "labels", labels, out, student)?;
    loss_out_alias(b, out, student, Some(teacher))
}

/// A sparse teacher's call: the spec, the `[N, C]` student, `[N, k]` indices and values, the
/// labels (required when `alpha > 0`), no teacher gradient. The indices' and values' contents are
/// the CPU backends' and the host API's check ([`crate::ops::sparse::check_sparse_teacher`]).
pub fn sparse_kd<B: Backend + ?Sized>(
    b: &B,
    spec: &SparseSpec,
    student: &B::Buffer,
    indices: &B::Labels,
    values: &B::Buffer,
    labels: Option<&B::Labels>,
    out: &LossOut<'_, B>,
) -> Result<()> {
    spec.validate()?;
    spec.shape.check_len("student", b.len(student))?;
    let hint = format!("[N, k] = [{}, {}] row-major", spec.shape.rows, spec.k);
    let got = b.labels_len(indices);
    if got != spec.entries() {
        return Err(Error::shape("indices", got, spec.entries(), &hint));
    }
    check_len(b, "values", values, spec.entries(), &hint)?;
    match labels {
        Some(l) => check_labels_len(b, l, spec.shape.rows)?,
        None if spec.alpha > 0.0 => {
            return Err(Error::Unsupported(
                "alpha > 0 weighs a hard-label cross-entropy: pass the labels (or alpha = 0 for \
                 the divergence alone)"
                    .into(),
            ))
        }
        None => {}
    }
    if out.grad_teacher.is_some() {
        return Err(Error::Unsupported(
            "a sparse teacher is a constant: pass no grad_teacher (grad_teacher: None)".into(),
        ));
    }
    loss_out(b, out, spec.shape.rows, spec.shape.len())?;
    labels_alias(b, "the sparse teacher's indices", indices, out, student)?;
    if let Some(l) = labels {
        labels_alias(b, "labels", l, out, student)?;
    }
    loss_out_alias(b, out, student, Some(values))
}

pub fn mse<B: Backend + ?Sized>(
    b: &B,
    spec: &MseSpec,
    a: &B::Buffer,
    bb: &B::Buffer,
    loss: &B::Buffer,
    grad_a: Option<&B::Buffer>,
    grad_b: Option<&B::Buffer>,
) -> Result<()> {
    spec.validate()?;
    f32_only(b, &[("a", a), ("b", bb), ("loss", loss)])?;
    f32_only(
        b,
        &grad_a
            .map(|g| ("grad_a", g))
            .into_iter()
            .chain(grad_b.map(|g| ("grad_b", g)))
            .collect::<Vec<_>>(),
    )?;
    let hint = "both feature maps have the same number of elements";
    check_len(b, "a", a, spec.len, hint)?;
    check_len(b, "b", bb, spec.len, hint)?;
    check_len(b, "loss", loss, 1, "the loss output holds one f32")?;
    if let Some(g) = grad_a {
        check_len(b, "grad_a", g, spec.len, hint)?;
    }
    if let Some(g) = grad_b {
        check_len(b, "grad_b", g, spec.len, hint)?;
    }
    let mut outputs = vec![("loss", loss)];
    outputs.extend(grad_a.map(|g| ("grad_a", g)));
    outputs.extend(grad_b.map(|g| ("grad_b", g)));
    no_alias(b, &outputs, &[("a", a), ("b", bb)])
}

pub fn attention<B: Backend + ?Sized>(
    b: &B,
    spec: &AttentionSpec,
    student: &B::Buffer,
    teacher: &B::Buffer,
    loss: &B::Buffer,
    grad_student: Option<&B::Buffer>,
    grad_teacher: Option<&B::Buffer>,
) -> Result<()> {
    spec.validate()?;
    f32_only(
        b,
        &[("student", student), ("teacher", teacher), ("loss", loss)],
    )?;
    f32_only(
        b,
        &grad_student
            .map(|g| ("grad_student", g))
            .into_iter()
            .chain(grad_teacher.map(|g| ("grad_teacher", g)))
            .collect::<Vec<_>>(),
    )?;
    let hint = "[N, C, H*W] row-major; student and teacher share N and H*W";
    check_len(b, "student", student, spec.student_len(), hint)?;
    check_len(b, "teacher", teacher, spec.teacher_len(), hint)?;
    check_len(b, "loss", loss, 1, "the loss output holds one f32")?;
    if let Some(g) = grad_student {
        check_len(b, "grad_student", g, spec.student_len(), hint)?;
    }
    if let Some(g) = grad_teacher {
        check_len(b, "grad_teacher", g, spec.teacher_len(), hint)?;
    }
    let mut outputs = vec![("loss", loss)];
    outputs.extend(grad_student.map(|g| ("grad_student", g)));
    outputs.extend(grad_teacher.map(|g| ("grad_teacher", g)));
    no_alias(b, &outputs, &[("student", student), ("teacher", teacher)])
}

pub fn matmul<B: Backend + ?Sized>(
    b: &B,
    spec: &MatmulSpec,
    a: &B::Buffer,
    bb: &B::Buffer,
    c: &B::Buffer,
) -> Result<()> {
    spec.validate()?;
    f32_only(b, &[("c", c)])?;
    if !b.matmul_reads_half() {
        f32_only(b, &[("a", a), ("b", bb)])?;
    }
    let (m, k, n) = (spec.m, spec.k, spec.n);
    let la = if spec.trans_a {
        format!("A^T: A stored [{k}, {m}]")
    } else {
        format!("A stored [{m}, {k}]")
    };
    let lb = if spec.trans_b {
        format!("B^T: B stored [{n}, {k}]")
    } else {
        format!("B stored [{k}, {n}]")
    };
    check_len(b, "a", a, m * k, &la)?;
    check_len(b, "b", bb, k * n, &lb)?;
    check_len(b, "c", c, m * n, &format!("C is [{m}, {n}]"))?;
    no_alias(b, &[("c", c)], &[("a", a), ("b", bb)])
}

/// A [`CopySpec`]: the block inside both buffers, `dst` not `src`.
pub fn copy_rows<B: Backend + ?Sized>(
    b: &B,
    spec: &CopySpec,
    src: &B::Buffer,
    dst: &B::Buffer,
) -> Result<()> {
    spec.validate()?;
    let (ls, ld) = (b.len(src), b.len(dst));
    if spec.src_end() > ls {
        return Err(Error::shape(
            "src",
            ls,
            spec.src_end(),
            format!(
                "the copy reads {} rows of {} from element {} every {} elements",
                spec.rows, spec.cols, spec.src_offset, spec.src_stride
            ),
        ));
    }
    if spec.dst_end() > ld {
        return Err(Error::shape(
            "dst",
            ld,
            spec.dst_end(),
            format!(
                "the copy writes {} rows of {} from element {} every {} elements",
                spec.rows, spec.cols, spec.dst_offset, spec.dst_stride
            ),
        ));
    }
    no_alias(b, &[("dst", dst)], &[("src", src)])
}

pub fn bias_add<B: Backend + ?Sized>(
    b: &B,
    x: &B::Buffer,
    bias: &B::Buffer,
    y: &B::Buffer,
) -> Result<()> {
    f32_only(b, &[("x", x), ("bias", bias), ("y", y)])?;
    let (lx, lb) = (b.len(x), b.len(bias));
    if lb == 0 || lx == 0 || lx % lb != 0 {
        return Err(Error::shape(
            "x",
            lx,
            lx.div_ceil(lb.max(1)) * lb,
            "x is [rows, bias.len()] with rows >= 1",
        ));
    }
    check_len(b, "y", y, lx, "same shape as x")?;
    no_alias(b, &[("y", y)], &[("x", x), ("bias", bias)])
}

pub fn sum_rows<B: Backend + ?Sized>(b: &B, x: &B::Buffer, out: &B::Buffer) -> Result<()> {
    f32_only(b, &[("x", x), ("out", out)])?;
    let (lx, lo) = (b.len(x), b.len(out));
    if lo == 0 || lx == 0 || lx % lo != 0 {
        return Err(Error::shape(
            "x",
            lx,
            lx.div_ceil(lo.max(1)) * lo,
            "x is [rows, out.len()] with rows >= 1",
        ));
    }
    no_alias(b, &[("out", out)], &[("x", x)])
}

/// Every buffer has the length of the first, which is at least 1.
pub fn same_len<B: Backend + ?Sized>(b: &B, bufs: &[(&'static str, &B::Buffer)]) -> Result<()> {
    f32_only(b, bufs)?;
    let n = b.len(bufs[0].1);
    if n == 0 {
        return Err(Error::Unsupported(format!("{} is empty", bufs[0].0)));
    }
    for (what, buf) in &bufs[1..] {
        check_len(b, what, buf, n, &format!("same length as {}", bufs[0].0))?;
    }
    Ok(())
}

pub fn im2col<B: Backend + ?Sized>(
    b: &B,
    spec: &ConvSpec,
    x: &B::Buffer,
    cols: &B::Buffer,
) -> Result<()> {
    spec.validate()?;
    f32_only(b, &[("image", x), ("cols", cols)])?;
    let (r, c) = spec.cols_shape();
    check_len(
        b,
        "image",
        x,
        spec.input_len(),
        &format!(
            "[N, H, W, C] = [{}, {}, {}, {}]",
            spec.n, spec.h, spec.w, spec.c
        ),
    )?;
    check_len(
        b,
        "cols",
        cols,
        r * c,
        &format!("[N*OH*OW, K*K*C] = [{r}, {c}]"),
    )?;
    no_alias(b, &[("cols", cols)], &[("image", x)])
}

pub fn pool<B: Backend + ?Sized>(
    b: &B,
    spec: &PoolSpec,
    x: &B::Buffer,
    y: &B::Buffer,
) -> Result<()> {
    spec.validate()?;
    f32_only(b, &[("x", x), ("y", y)])?;
    let (oh, ow) = spec.out_hw();
    check_len(
        b,
        "x",
        x,
        spec.input_len(),
        &format!(
            "[N, H, W, C] = [{}, {}, {}, {}]",
            spec.n, spec.h, spec.w, spec.c
        ),
    )?;
    check_len(
        b,
        "y",
        y,
        spec.output_len(),
        &format!("[N, H/k, W/k, C] = [{}, {oh}, {ow}, {}]", spec.n, spec.c),
    )?;
    no_alias(b, &[("y", y)], &[("x", x)])
}

pub fn transpose<B: Backend + ?Sized>(
    b: &B,
    batch: usize,
    rows: usize,
    cols: usize,
    x: &B::Buffer,
    y: &B::Buffer,
) -> Result<()> {
    f32_only(b, &[("x", x), ("y", y)])?;
    let n = index_len(&[batch, rows, cols]).ok_or_else(|| {
        Error::Limit(format!(
            "transpose of [{batch}, {rows}, {cols}]: past 2^32 elements; split the batch"
        ))
    })?;
    if n == 0 {
        return Err(Error::Unsupported("transpose of an empty tensor".into()));
    }
    check_len(b, "x", x, n, &format!("[{batch}, {rows}, {cols}]"))?;
    check_len(b, "y", y, n, &format!("[{batch}, {cols}, {rows}]"))?;
    no_alias(b, &[("y", y)], &[("x", x)])
}

/// Every buffer is `[rows, cols]` with the same number of rows >= 1.
pub fn rows_of<B: Backend + ?Sized>(
    b: &B,
    cols: usize,
    bufs: &[(&'static str, &B::Buffer)],
) -> Result<()> {
    let n = b.len(bufs[0].1);
    if cols == 0 || n == 0 || n % cols != 0 {
        return Err(Error::shape(
            bufs[0].0,
            n,
            n.div_ceil(cols.max(1)) * cols.max(1),
            format!("[rows, {cols}] with rows >= 1"),
        ));
    }
    same_len(b, bufs)
}

/// `f` is `[n, dim]` (n >= 2, dim >= 1) and every other buffer `[n, n]`.
pub fn pairwise<B: Backend + ?Sized>(
    b: &B,
    n: usize,
    dim: usize,
    f: &B::Buffer,
    others: &[(&'static str, &B::Buffer)],
) -> Result<()> {
    if n < 2 || dim == 0 {
        return Err(Error::Unsupported(format!(
            "pairwise distances need n >= 2 rows of dim >= 1 features, got n={n}, dim={dim}"
        )));
    }
    let len = index_len(&[n, dim])
        .ok_or_else(|| Error::Limit(format!("[{n}, {dim}] features pass 2^32 elements")))?;
    check_len(b, "f", f, len, &format!("[{n}, {dim}]"))?;
    f32_only(b, &[("f", f)])?;
    square(b, n, others)
}

/// Every buffer is `[n, n]` with `n >= 2`.
pub fn square<B: Backend + ?Sized>(
    b: &B,
    n: usize,
    bufs: &[(&'static str, &B::Buffer)],
) -> Result<()> {
    if n < 2 {
        return Err(Error::Unsupported(format!(
            "the off-diagonal mean needs n >= 2 rows, got {n}"
        )));
    }
    let len = index_len(&[n, n])
        .ok_or_else(|| Error::Limit(format!("[{n}, {n}] passes 2^32 elements")))?;
    for (what, buf) in bufs {
        check_len(b, what, buf, len, &format!("[{n}, {n}]"))?;
    }
    f32_only(b, bufs)
}
