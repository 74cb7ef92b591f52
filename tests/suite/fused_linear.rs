//! The fused linear + loss (`FusedLinearKd`, `docs/LOSSES.md` section 11) on every backend against
//! the unfused composition computed by the f64 reference (`ops::fused_linear::reference`): the
//! Hinton and the Liger weightings, the three divergences, the divergence-only and
//! cross-entropy-only forms, a teacher as logits or as a (padded) layer, biases, masked rows
//! (all of them too), N = 1, H = 1, V not a multiple of anything, chunks of 1, 7 and N rows and
//! from a memory budget; f32 within 1e-4, bf16 / f16 inputs within the half-precision budget;
//! `grad_W` and `grad_b` accumulate. Bad input: `tests/suite/fused_linear_errors.rs`.

use crate::common;

use common::{assert_close, Lcg};
use distillation::half::{bf16, f16};
use distillation::ops::fused_linear::reference::{fused_linear_kd, LayerF64, TeacherF64};
use distillation::{
    Backend, Divergence, Dtype, FusedGrads, FusedLinearKd, Linear, Reduction, Teacher, IGNORE_INDEX,
};

/// How the teacher is given in a case.
#[derive(Clone, Copy, Debug)]
enum TeacherKind {
    None,
    Logits,
    /// A layer of hidden size `ht` and vocabulary `V + pad`.
    Layer {
        ht: usize,
        pad: usize,
    },
}

#[derive(Clone, Debug)]
struct Case {
    n: usize,
    spec: FusedLinearKd,
    teacher: TeacherKind,
    bias: bool,
    /// Every `mask_every`-th row masked (0: none; 1: all).
    mask_every: usize,
    labels: bool,
}

/// The inputs of a case as f32 values (rounded to `dtype`) and f64 copies.
struct Inputs {
    h: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    t_logits: Vec<f32>,
    th: Vec<f32>,
    tw: Vec<f32>,
    tb: Vec<f32>,
    labels: Vec<i32>,
    grad_w0: Vec<f32>,
    grad_b0: Vec<f32>,
}

fn rounded(g: &mut Lcg, len: usize, scale: f32, dtype: Dtype) -> Vec<f32> {
    g.vec(len, scale)
        .into_iter()
        .map(|x| dtype.round(x))
        .collect()
}

fn inputs(case: &Case, seed: u64, dtype: Dtype) -> Inputs {
    let mut g = Lcg(seed);
    let (n, h, v) = (case.n, case.spec.hidden, case.spec.vocab);
    let (ht, vt) = match case.teacher {
        TeacherKind::Layer { ht, pad } => (ht, v + pad),
        _ => (1, v),
    };
    let labels = (0..n)
        .map(|r| {
            if case.mask_every > 0 && r % case.mask_every == 0 {
                IGNORE_INDEX
            } else {
                (g.next_f32().abs() * v as f32) as i32 % v as i32
            }
        })
        .collect();
    Inputs {
        h: rounded(&mut g, n * h, 1.0, dtype),
        w: rounded(&mut g, v * h, 2.0 / (h as f32).sqrt(), dtype),
        bias: rounded(&mut g, v, 0.5, dtype),
        t_logits: rounded(&mut g, n * v, 3.0, dtype),
        th: rounded(&mut g, n * ht, 1.0, dtype),
        tw: rounded(&mut g, vt * ht, 3.0 / (ht as f32).sqrt(), dtype),
        tb: rounded(&mut g, vt, 0.5, dtype),
        labels,
        grad_w0: rounded(&mut g, v * h, 0.1, dtype),
        grad_b0: rounded(&mut g, v, 0.1, dtype),
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The f64 reference of a case: loss, grad_h, and grad_W / grad_b added to their initial values
/// `times` times.
fn expected(case: &Case, x: &Inputs, times: f64) -> (f64, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (h, w, bias) = (f64s(&x.h), f64s(&x.w), f64s(&x.bias));
    let (tl, th, tw, tb) = (f64s(&x.t_logits), f64s(&x.th), f64s(&x.tw), f64s(&x.tb));
    let student = LayerF64 {
        hidden: &h,
        weight: &w,
        bias: case.bias.then_some(&bias[..]),
    };
    let teacher = match case.teacher {
        TeacherKind::None => TeacherF64::None,
        TeacherKind::Logits => TeacherF64::Logits(&tl),
        TeacherKind::Layer { ht, pad } => TeacherF64::Linear {
            layer: LayerF64 {
                hidden: &th,
                weight: &tw,
                bias: case.bias.then_some(&tb[..]),
            },
            hidden: ht,
            vocab: case.spec.vocab + pad,
        },
    };
    let labels = case.labels.then_some(&x.labels[..]);
    let r = fused_linear_kd(&case.spec, &student, &teacher, labels);
    let add = |init: &[f32], g: &[f64]| -> Vec<f64> {
        init.iter()
            .zip(g)
            .map(|(&a, &b)| a as f64 + times * b)
            .collect()
    };
    (
        r.loss,
        r.grad_hidden,
        add(&x.grad_w0, &r.grad_weight),
        add(&x.grad_b0, &r.grad_bias),
    )
}

/// What a backend returned.
struct Got {
    loss: f32,
    grad_h: Vec<f32>,
    grad_w: Vec<f32>,
    grad_b: Vec<f32>,
}

fn upload<B: Backend>(b: &B, v: &[f32], dtype: Dtype) -> B::Buffer {
    match dtype {
        Dtype::F32 => b.upload(v),
        Dtype::Bf16 => b.upload_as(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
        Dtype::F16 => b.upload_as(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()),
    }
    .unwrap()
}

/// Runs a case `times` times into the same gradient buffers; inputs in `dtype`, gradients in
/// `grad_dtype` (grad_h poisoned with NaN).
fn run<B: Backend>(
    b: &B,
    case: &Case,
    x: &Inputs,
    dtype: Dtype,
    grad_dtype: Dtype,
    times: usize,
) -> distillation::Result<Got> {
    let (n, h) = (case.n, case.spec.hidden);
    let (hb, wb, bb) = (
        upload(b, &x.h, dtype),
        upload(b, &x.w, dtype),
        upload(b, &x.bias, dtype),
    );
    let (tl, th, tw, tb) = (
        upload(b, &x.t_logits, dtype),
        upload(b, &x.th, dtype),
        upload(b, &x.tw, dtype),
        upload(b, &x.tb, dtype),
    );
    let gh = b.filled_as(grad_dtype, n * h, f32::NAN)?;
    let gw = upload(b, &x.grad_w0, grad_dtype);
    let gb = upload(b, &x.grad_b0, grad_dtype);
    let student = Linear {
        hidden: &hb,
        weight: &wb,
        bias: case.bias.then_some(&bb),
    };
    let teacher = match case.teacher {
        TeacherKind::None => Teacher::None,
        TeacherKind::Logits => Teacher::Logits(&tl),
        TeacherKind::Layer { ht, pad } => Teacher::Linear {
            layer: Linear {
                hidden: &th,
                weight: &tw,
                bias: case.bias.then_some(&tb),
            },
            hidden: ht,
            vocab: case.spec.vocab + pad,
        },
    };
    let grads = FusedGrads {
        hidden: Some(&gh),
        weight: Some(&gw),
        bias: case.bias.then_some(&gb),
    };
    let labels = case.labels.then_some(&x.labels[..]);
    let mut loss = f32::NAN;
    for _ in 0..times {
        loss = case.spec.run(b, &student, &teacher, labels, &grads)?;
    }
    Ok(Got {
        loss,
        grad_h: b.download(&gh)?,
        grad_w: b.download(&gw)?,
        grad_b: if case.bias {
            b.download(&gb)?
        } else {
            x.grad_b0.clone()
        },
    })
}

/// The half-precision budget of `docs/LOSSES.md` on a gradient returned in `dtype`: mean and norm
/// error at most 1.5x those of rounding the exact gradient once (with a floor of 1e-6 of the norm
/// for exactly representable values), at least 99.9% faithfully rounded.
fn check_budget(what: &str, dtype: Dtype, got: &[f32], want: &[f64]) -> Result<(), String> {
    let (mut e_sum, mut r_sum, mut e_sq, mut r_sq, mut w_sq) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut unfaithful = 0usize;
    for (&g, &w) in got.iter().zip(want) {
        let e = (g as f64 - w).abs();
        let r = (dtype.round_f64(w) - w).abs();
        e_sum += e;
        r_sum += r;
        e_sq += e * e;
        r_sq += r * r;
        w_sq += w * w;
        if e / dtype.ulp(w) > 1.0 || !e.is_finite() {
            unfaithful += 1;
        }
    }
    let n = got.len().max(1) as f64;
    let floor = 1e-6 * f64::sqrt(w_sq);
    let mean_ratio = e_sum / (r_sum + floor * n.sqrt());
    let norm_ratio = e_sq.sqrt() / (r_sq.sqrt() + floor);
    if mean_ratio > 1.5 || norm_ratio > 1.5 || unfaithful as f64 > 1e-3 * n {
        return Err(format!(
            "{what} ({dtype}): mean {mean_ratio:.3}x, norm {norm_ratio:.3}x of the rounding \
             error, {unfaithful} of {} not faithfully rounded",
            got.len()
        ));
    }
    Ok(())
}

fn check_case<B: Backend>(b: &B, case: &Case, seed: u64, dtype: Dtype, grad_dtype: Dtype) {
    let x = inputs(case, seed, dtype);
    let got = run(b, case, &x, dtype, grad_dtype, 1).unwrap_or_else(|e| panic!("{case:?}: {e}"));
    let (loss, gh, gw, gb) = expected(case, &x, 1.0);
    let ctx = format!(
        "{} {case:?} inputs {dtype}, gradients {grad_dtype}",
        b.name()
    );
    let l = ((got.loss as f64 - loss).abs()) / loss.abs().max(1e-30);
    assert!(
        l <= 1e-4 || (got.loss as f64 - loss).abs() < 1e-7,
        "{ctx}: loss {} vs {loss}",
        got.loss
    );
    let check = |what: &str, g: &[f32], w: &[f64]| {
        if grad_dtype == Dtype::F32 {
            assert_close(what, g, w, 1e-4)
        } else {
            check_budget(what, grad_dtype, g, w)
        }
    };
    let mut outputs = vec![("grad_h", &got.grad_h, &gh), ("grad_W", &got.grad_w, &gw)];
    if case.bias {
        outputs.push(("grad_b", &got.grad_b, &gb));
    }
    for (what, g, w) in outputs {
        if let Err(e) = check(what, g, w) {
            panic!("{ctx}: {e}");
        }
    }
}

/// Hinton's form at T = 2, alpha = 0.3, label smoothing 0.1, `chunk` rows per chunk.
fn base(h: usize, v: usize, chunk: usize) -> FusedLinearKd {
    FusedLinearKd {
        chunk_rows: chunk,
        label_smoothing: 0.1,
        ..FusedLinearKd::new(h, v, 2.0, 0.3)
    }
}

/// The cases every backend runs: each loss form over shapes and chunkings.
fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let kd = |n, h, v, chunk, teacher, mask_every| Case {
        n,
        spec: base(h, v, chunk),
        teacher,
        bias: true,
        mask_every,
        labels: true,
    };
    let layer = TeacherKind::Layer { ht: 5, pad: 3 };
    for (n, h, v) in [
        (1, 1, 1),
        (1, 4, 37),
        (9, 1, 13),
        (23, 7, 61),
        (16, 33, 131),
    ] {
        for chunk in [1, 7, n] {
            out.push(kd(n, h, v, chunk, TeacherKind::Logits, 3));
            out.push(kd(n, h, v, chunk, layer, 0));
        }
    }
    // Weightings and divergences.
    let (n, h, v) = (19, 6, 53);
    for divergence in [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.3 },
    ] {
        for liger in [false, true] {
            let mut spec = FusedLinearKd {
                divergence,
                temperature: 3.0,
                ..base(h, v, 7)
            };
            if liger {
                spec = spec.liger(0.4, 0.7);
            }
            out.push(Case {
                n,
                spec,
                teacher: layer,
                bias: false,
                mask_every: 4,
                labels: true,
            });
        }
        // Divergence only, no labels; then with labels masking rows.
        let spec = FusedLinearKd {
            chunk_rows: 5,
            ..FusedLinearKd::divergence_only(h, v, 1.5, divergence)
        };
        for labels in [false, true] {
            out.push(Case {
                n,
                spec,
                teacher: TeacherKind::Logits,
                bias: true,
                mask_every: 2,
                labels,
            });
        }
    }
    // Cross-entropy only, with label smoothing.
    out.push(Case {
        n,
        spec: FusedLinearKd {
            chunk_rows: 4,
            label_smoothing: 0.2,
            ..FusedLinearKd::cross_entropy_only(h, v)
        },
        teacher: TeacherKind::None,
        bias: true,
        mask_every: 5,
        labels: true,
    });
    // All rows masked: loss 0, grad_h 0, grad_W and grad_b unchanged.
    out.push(kd(8, 3, 11, 3, TeacherKind::Logits, 1));
    // Sum reduction, an upstream gradient, chunks from a tiny budget (one row each).
    out.push(Case {
        n: 10,
        spec: FusedLinearKd {
            reduction: Reduction::Sum,
            grad_scale: 0.5,
            memory_budget: 64,
            chunk_rows: 0,
            ..base(4, 29, 0)
        },
        teacher: layer,
        bias: true,
        mask_every: 3,
        labels: true,
    });
    out
}

fn matches_the_f64_composition<B: Backend>(b: &B) {
    for (i, case) in cases().iter().enumerate() {
        check_case(b, case, 100 + i as u64, Dtype::F32, Dtype::F32);
    }
}

/// Half inputs (states, weights, biases, teacher): gradients returned in the inputs' dtype meet
/// the half budget, returned in f32 the f32 contract.
fn half_inputs<B: Backend>(b: &B) {
    let layer = TeacherKind::Layer { ht: 24, pad: 5 };
    let cases = [
        Case {
            n: 33,
            spec: base(40, 300, 7),
            teacher: layer,
            bias: true,
            mask_every: 4,
            labels: true,
        },
        Case {
            n: 20,
            spec: FusedLinearKd {
                divergence: Divergence::Jsd { beta: 0.5 },
                chunk_rows: 6,
                ..FusedLinearKd::divergence_only(16, 257, 2.0, Divergence::ForwardKl)
            }
            .liger(0.0, 1.0),
            teacher: TeacherKind::Logits,
            bias: false,
            mask_every: 0,
            labels: false,
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        for dtype in [Dtype::Bf16, Dtype::F16] {
            check_case(b, case, 500 + i as u64, dtype, dtype);
            check_case(b, case, 500 + i as u64, dtype, Dtype::F32);
        }
    }
}

/// Two calls into the same `grad_W` / `grad_b` add two gradients (gradient accumulation);
/// `grad_h` is overwritten.
fn accumulates<B: Backend>(b: &B) {
    let case = Case {
        n: 12,
        spec: base(5, 41, 5),
        teacher: TeacherKind::Logits,
        bias: true,
        mask_every: 3,
        labels: true,
    };
    let x = inputs(&case, 7, Dtype::F32);
    let got = run(b, &case, &x, Dtype::F32, Dtype::F32, 2).unwrap();
    let (_, gh, gw, gb) = expected(&case, &x, 2.0);
    assert_close("grad_h", &got.grad_h, &gh, 1e-4).unwrap();
    assert_close("grad_W (twice)", &got.grad_w, &gw, 1e-4).unwrap();
    assert_close("grad_b (twice)", &got.grad_b, &gb, 1e-4).unwrap();
}

/// `copy_rows` between every pair of dtypes, at odd offsets and strides (a 16-bit destination's
/// words shared with elements outside the block keep them), and with a source stride of 0 (a
/// broadcast): each element converted exactly and rounded once.
fn copy_rows_between_dtypes<B: Backend>(b: &B) {
    use distillation::ops::dense::CopySpec;
    let mut g = Lcg(11);
    let specs = [
        CopySpec {
            rows: 3,
            cols: 5,
            src_offset: 1,
            src_stride: 7,
            dst_offset: 3,
            dst_stride: 9,
        },
        CopySpec {
            rows: 4,
            cols: 3,
            src_offset: 2,
            src_stride: 0,
            dst_offset: 1,
            dst_stride: 3,
        },
        CopySpec::contiguous(17, 4, 5),
    ];
    for spec in specs {
        for sd in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
            for dd in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
                let src: Vec<f32> = g.vec(spec.src_end() + 2, 3.0);
                let src: Vec<f32> = src.into_iter().map(|x| sd.round(x)).collect();
                let dst0: Vec<f32> = g.vec(spec.dst_end() + 3, 1.0);
                let dst0: Vec<f32> = dst0.into_iter().map(|x| dd.round(x)).collect();
                let (sb, db) = (upload(b, &src, sd), upload(b, &dst0, dd));
                b.copy_rows(&spec, &sb, &db).unwrap();
                let got = b.download(&db).unwrap();
                let mut want = dst0.clone();
                for r in 0..spec.rows {
                    for c in 0..spec.cols {
                        want[spec.dst_offset + r * spec.dst_stride + c] =
                            dd.round(src[spec.src_offset + r * spec.src_stride + c]);
                    }
                }
                assert_eq!(got, want, "{} {spec:?} {sd} -> {dd}", b.name());
            }
        }
    }
    // A block past the end of a buffer is an error.
    let small = b.filled(4, 0.0).unwrap();
    let big = b.filled(8, 0.0).unwrap();
    assert!(b
        .copy_rows(&CopySpec::contiguous(5, 0, 0), &small, &big)
        .is_err());
    assert!(b
        .copy_rows(&CopySpec::contiguous(5, 0, 0), &big, &small)
        .is_err());
}

backend_tests!(
    matches_the_f64_composition,
    half_inputs,
    accumulates,
    copy_rows_between_dtypes
);

/// The reference composition itself against finite differences of its loss (grad_h, grad_W).
#[test]
fn reference_gradients_match_finite_differences() {
    let case = Case {
        n: 5,
        spec: FusedLinearKd {
            divergence: Divergence::Jsd { beta: 0.4 },
            ..base(3, 7, 0)
        }
        .liger(0.6, 0.9),
        teacher: TeacherKind::Layer { ht: 2, pad: 2 },
        bias: true,
        mask_every: 3,
        labels: true,
    };
    let x = inputs(&case, 3, Dtype::F32);
    let (_, gh, gw, _) = expected(&case, &x, 1.0);
    let loss_at = |hv: &[f32], wv: &[f32]| {
        let y = Inputs {
            h: hv.to_vec(),
            w: wv.to_vec(),
            bias: x.bias.clone(),
            t_logits: x.t_logits.clone(),
            th: x.th.clone(),
            tw: x.tw.clone(),
            tb: x.tb.clone(),
            labels: x.labels.clone(),
            grad_w0: vec![0.0; x.grad_w0.len()],
            grad_b0: vec![0.0; x.grad_b0.len()],
        };
        expected(&case, &y, 1.0).0
    };
    let eps = 1e-3f32;
    for i in 0..x.h.len() {
        let (mut p, mut m) = (x.h.clone(), x.h.clone());
        p[i] += eps;
        m[i] -= eps;
        let fd = (loss_at(&p, &x.w) - loss_at(&m, &x.w)) / (2.0 * eps as f64);
        assert!(
            (fd - gh[i]).abs() < 1e-4 + 1e-3 * gh[i].abs(),
            "grad_h[{i}]: {fd} vs {}",
            gh[i]
        );
    }
    for i in 0..x.w.len() {
        let (mut p, mut m) = (x.w.clone(), x.w.clone());
        p[i] += eps;
        m[i] -= eps;
        let fd = (loss_at(&x.h, &p) - loss_at(&x.h, &m)) / (2.0 * eps as f64);
        let want = gw[i] - x.grad_w0[i] as f64;
        assert!(
            (fd - want).abs() < 1e-4 + 1e-3 * want.abs(),
            "grad_W[{i}]: {fd} vs {want}"
        );
    }
}
