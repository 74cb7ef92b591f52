//! Every kernel against the f64 CPU reference on random inputs drawn by proptest, on every backend:
//! N 1..70, C 1..5000 (1, primes, sizes that are not a multiple of the workgroup; DKD refuses 1),
//! T 1e-3..1e4, some logits up to |1e4|, masked rows (all rows masked too), the row losses' student
//! and teacher in f32, bf16 or f16 (the reference computing from the same rounded values; the
//! gradients here are f32, held to the f32 contract; tests/suite/half.rs checks half-precision gradients
//! against their budget). Outputs are poisoned with NaN before each launch, so a missed write shows.

use crate::common;

use common::{assert_close, assert_close_abs, to_f64, Lcg};
use distillation::half::{bf16, f16};
use distillation::ops::{self, feature, softmax};
use distillation::{
    AttentionSpec, Backend, CrossEntropySpec, Divergence, DivergenceSpec, DkdSpec, Dtype, GradOut,
    HintonSpec, LossOut, MseSpec, Reduction, RowShape, SoftmaxSpec, TeacherInput, IGNORE_INDEX,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const TOL: f64 = 1e-4;
const CASES: u32 = 24;

/// A batch of rows: logits for student and teacher, labels, temperature.
#[derive(Clone, Debug)]
struct Rows {
    n: usize,
    c: usize,
    temperature: f32,
    s: Vec<f32>,
    t: Vec<f32>,
    labels: Vec<i32>,
    /// The dtypes the student and teacher are uploaded in (`s` and `t` hold values rounded to
    /// them).
    dtype_s: Dtype,
    dtype_t: Dtype,
}

/// f32 half of the time, else bf16 or f16.
fn dtype() -> impl Strategy<Value = Dtype> {
    prop_oneof![
        2 => Just(Dtype::F32),
        1 => Just(Dtype::Bf16),
        1 => Just(Dtype::F16),
    ]
}

/// `v` (values already representable in `dtype`) uploaded as `dtype`.
fn upload_as<B: Backend>(b: &B, v: &[f32], dtype: Dtype) -> B::Buffer {
    match dtype {
        Dtype::F32 => b.upload(v),
        Dtype::Bf16 => b.upload_as(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
        Dtype::F16 => b.upload_as(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()),
    }
    .unwrap()
}

fn round_to(v: Vec<f32>, dtype: Dtype) -> Vec<f32> {
    v.into_iter().map(|x| dtype.round(x)).collect()
}

fn classes() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        2usize..=12,
        prop::sample::select(vec![31usize, 97, 127, 251, 257, 509, 1021, 1031, 4099]),
        13usize..=600,
        600usize..=5000,
    ]
}

/// Rows with a log-uniform temperature over the whole accepted range [1e-3, 1e4]; `extreme` puts ~5% of logits up to |1e4|;
/// `mask` 0: no masked row, 1: ~25% masked, 2: every row masked.
fn rows() -> impl Strategy<Value = Rows> {
    (
        1usize..70,
        classes(),
        (1e-3f64.ln()..1e4f64.ln()),
        any::<bool>(),
        0u8..3,
        any::<u64>(),
        (dtype(), dtype()),
    )
        .prop_map(|(n, c, lt, extreme, mask, seed, (dtype_s, dtype_t))| {
            let mut g = Lcg(seed);
            let draw = |g: &mut Lcg| {
                let mut v = g.vec(n * c, 5.0);
                if extreme {
                    for x in v.iter_mut() {
                        if g.next_f32().abs() > 0.95 {
                            *x = g.next_f32() * 1e4;
                        }
                    }
                }
                v
            };
            let s = round_to(draw(&mut g), dtype_s);
            let t = round_to(draw(&mut g), dtype_t);
            let labels = (0..n)
                .map(|_| {
                    let u = g.next_f32();
                    let masked = match mask {
                        0 => false,
                        1 => u.abs() < 0.25,
                        _ => true,
                    };
                    if masked {
                        IGNORE_INDEX
                    } else {
                        (((g.next_f32() + 1.0) * 0.5 * c as f32) as usize).min(c - 1) as i32
                    }
                })
                .collect();
            Rows {
                n,
                c,
                temperature: lt.exp() as f32,
                s,
                t,
                labels,
                dtype_s,
                dtype_t,
            }
        })
}

fn run_cases<S: Strategy>(strategy: S, check: impl Fn(S::Value) -> Result<(), String>)
where
    S::Value: std::fmt::Debug,
{
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |v| check(v).map_err(TestCaseError::fail))
        .unwrap();
}

/// Uploads `data`, or a NaN-poisoned buffer of `len` elements.
fn poisoned<B: Backend>(b: &B, len: usize) -> B::Buffer {
    b.filled(len, f32::NAN).unwrap()
}

struct RowOut {
    loss: f32,
    rows: Vec<f32>,
    grad_s: Vec<f32>,
    grad_t: Option<Vec<f32>>,
}

/// Runs a row loss with poisoned outputs; the student gradient goes in place when asked.
fn run_row_loss<B: Backend>(
    b: &B,
    s: &[f32],
    dtype_s: Dtype,
    n: usize,
    in_place: bool,
    want_gt: bool,
    kernel: impl FnOnce(&B, &B::Buffer, LossOut<'_, B>) -> distillation::Result<()>,
) -> Result<RowOut, String> {
    let len = s.len();
    let sb = upload_as(b, s, dtype_s);
    // An in-place gradient takes the student's dtype: with a bf16 / f16 student it is checked
    // against the half-precision budget in tests/suite/half.rs, here the gradient goes to f32.
    let in_place = in_place && dtype_s == Dtype::F32;
    let loss = poisoned(b, 1);
    let rows = poisoned(b, n);
    let gs = poisoned(b, len);
    let gt = poisoned(b, len);
    let out = LossOut {
        loss: &loss,
        row_loss: Some(&rows),
        grad_student: if in_place {
            GradOut::InPlace
        } else {
            GradOut::Into(&gs)
        },
        grad_teacher: want_gt.then_some(&gt),
    };
    kernel(b, &sb, out).map_err(|e| e.to_string())?;
    Ok(RowOut {
        loss: b.download(&loss).unwrap()[0],
        rows: b.download(&rows).unwrap(),
        grad_s: b.download(if in_place { &sb } else { &gs }).unwrap(),
        grad_t: want_gt.then(|| b.download(&gt).unwrap()),
    })
}

/// Compares a row loss with its reference. `grad_unit` is the gradient's natural scale
/// (`g * T / N_valid` or `g * T`): gradient entries whose exact value is far below
/// `1e-6 * grad_unit` (p and q both 0 or 1 to f32 precision) are compared absolutely.
///
/// Row losses get a floor of `4e-7 T^2 (1 + ln C)`: the f32 resolution of log-probabilities near
/// `-ln C`, which the `T^2` factor scales (at T = 100 a KL of 1e-3 is a loss of 10).
fn compare(
    got: &RowOut,
    want: &ops::RowLossResult,
    want_gt: bool,
    grad_unit: f64,
    rows: &Rows,
) -> Result<(), String> {
    let t2 = (rows.temperature as f64).powi(2).max(1.0);
    let row_atol = 4e-7 * t2 * (1.0 + (rows.c as f64).ln());
    assert_close_abs(
        "loss",
        &[got.loss],
        &[want.loss],
        TOL,
        row_atol * rows.n as f64,
    )?;
    assert_close_abs("row_loss", &got.rows, &want.row_loss, TOL, row_atol)?;
    if want.loss.is_infinite() {
        // A teacher probability of exactly 0 where the student's is not: reverse KL is +inf and
        // its gradient undefined; the loss said so, nothing more to compare.
        return Ok(());
    }
    let atol = 1e-6 * grad_unit;
    assert_close_abs("grad_student", &got.grad_s, &want.grad_student, TOL, atol)?;
    if want_gt {
        assert_close_abs(
            "grad_teacher",
            got.grad_t.as_ref().unwrap(),
            &want.grad_teacher,
            TOL,
            atol,
        )?;
    }
    Ok(())
}

/// `g * max(T, 1) * (1 / N_valid for batchmean, else 1)`, times the largest `|logit| / T` of the
/// batch (at least 1): gradients such as `q (log q - log p - KL)` subtract terms of that size, so
/// f32 resolves them only to about 1e-7 of it.
fn grad_unit(r: &Rows, g: f32, t: f32, reduction: Reduction, labels: Option<&[i32]>) -> f64 {
    let n = r.n;
    let range =
        r.s.iter()
            .chain(&r.t)
            .fold(0f64, |m, v| m.max(v.abs() as f64))
            / t as f64;
    let valid = labels.map_or(n, |l| l.iter().filter(|&&y| y != IGNORE_INDEX).count());
    let r = match reduction {
        Reduction::BatchMean => 1.0 / valid.max(1) as f64,
        _ => 1.0,
    };
    g as f64 * (t as f64).max(1.0) * r * range.max(1.0)
}

fn teacher_as(form: TeacherInput, t: &[f32], c: usize, temperature: f32) -> Vec<f32> {
    match form {
        TeacherInput::Logits => t.to_vec(),
        TeacherInput::Probs | TeacherInput::LogProbs => {
            let lq = softmax::reference::softmax(&to_f64(t), c, temperature as f64, true);
            // GPUs may flush subnormal f32 to zero, so probabilities below f32::MIN_POSITIVE are
            // given as exact zeros (documented in docs/ARCHITECTURE.md, numerics).
            let flush = |v: f32| if v < f32::MIN_POSITIVE { 0.0 } else { v };
            lq.iter()
                .map(|&l| {
                    if form == TeacherInput::Probs {
                        flush(l.exp() as f32)
                    } else {
                        l as f32
                    }
                })
                .collect()
        }
    }
}

fn softmax_matches_reference<B: Backend>(b: &B) {
    run_cases((rows(), any::<bool>()), |(r, log)| {
        let spec = SoftmaxSpec {
            shape: RowShape::new(r.n, r.c),
            temperature: r.temperature,
            log,
        };
        let x = upload_as(b, &r.s, r.dtype_s);
        let y = poisoned(b, r.s.len());
        b.softmax(&spec, &x, &y).map_err(|e| e.to_string())?;
        let want = softmax::reference::softmax(&to_f64(&r.s), r.c, r.temperature as f64, log);
        let got = b.download(&y).unwrap();
        assert_close("softmax forward", &got, &want, TOL)?;
        // Backward from the reference output (rounded to f32) and a random upstream gradient.
        let y32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        let dy = r.t.iter().map(|v| v * 0.1).collect::<Vec<_>>();
        let (yb, dyb, dx) = (
            b.upload(&y32).unwrap(),
            b.upload(&dy).unwrap(),
            poisoned(b, r.s.len()),
        );
        b.softmax_backward(&spec, &yb, &dyb, &dx)
            .map_err(|e| e.to_string())?;
        let want = softmax::reference::softmax_backward(
            &to_f64(&y32),
            &to_f64(&dy),
            r.c,
            r.temperature as f64,
            log,
        );
        // One-hot rows give exact zeros: compare them on the scale of dy / T.
        let atol = 1e-6 * dy.iter().fold(0f64, |m, v| m.max(v.abs() as f64))
            / (r.temperature as f64).min(1.0);
        assert_close_abs(
            "softmax backward",
            &b.download(&dx).unwrap(),
            &want,
            TOL,
            atol,
        )
    });
}

fn divergence_matches_reference<B: Backend>(b: &B) {
    let options = (
        0u8..3,
        0.05f32..0.95,
        0u8..3,
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    );
    run_cases(
        (rows(), options),
        |(r, (div, beta, form, red, use_labels, in_place, gt))| {
            let divergence = [
                Divergence::ForwardKl,
                Divergence::ReverseKl,
                Divergence::Jsd { beta },
            ][div as usize];
            let teacher = [
                TeacherInput::Logits,
                TeacherInput::Probs,
                TeacherInput::LogProbs,
            ][form as usize];
            let want_gt = gt && teacher == TeacherInput::Logits;
            let spec = DivergenceSpec {
                divergence,
                teacher,
                reduction: [Reduction::BatchMean, Reduction::Sum, Reduction::None][red as usize],
                grad_scale: 0.75,
                ..DivergenceSpec::new(RowShape::new(r.n, r.c), r.temperature)
            };
            let t = round_to(teacher_as(teacher, &r.t, r.c, r.temperature), r.dtype_t);
            let labels = use_labels.then_some(r.labels.as_slice());
            let tb = upload_as(b, &t, r.dtype_t);
            let lb = labels.map(|l| b.upload_labels(l).unwrap());
            let want =
                ops::divergence::reference::divergence(&spec, &to_f64(&r.s), &to_f64(&t), labels);
            let got = match run_row_loss(b, &r.s, r.dtype_s, r.n, in_place, want_gt, |b, s, out| {
                b.divergence(&spec, s, &tb, lb.as_ref(), out)
            }) {
                // Reverse KL where the teacher gives 0 is +inf: the CPU backends say so with an
                // Err (tests/suite/contract.rs), device backends with a +inf loss.
                Err(e) if want.loss == f64::INFINITY && e.contains("reverse KL teacher") => {
                    return Ok(())
                }
                // wgpu's stated limit for given teachers (tests/suite/contract.rs checks the message).
                Err(e)
                    if teacher != TeacherInput::Logits
                        && r.temperature
                            > distillation::backend::wgpu::GIVEN_TEACHER_MAX_TEMPERATURE
                        && e.contains("the wgpu kernels meet 1e-4 there only up to") =>
                {
                    return Ok(())
                }
                other => other?,
            };
            let unit = grad_unit(&r, spec.grad_scale, r.temperature, spec.reduction, labels);
            compare(&got, &want, want_gt, unit, &r)
        },
    );
}

fn cross_entropy_matches_reference<B: Backend>(b: &B) {
    run_cases(
        (rows(), 0f32..0.5, any::<bool>(), any::<bool>()),
        |(r, eps, smooth, in_place)| {
            let spec = CrossEntropySpec {
                label_smoothing: if smooth { eps } else { 0.0 },
                grad_scale: 1.5,
                ..CrossEntropySpec::new(RowShape::new(r.n, r.c))
            };
            let lb = b.upload_labels(&r.labels).unwrap();
            let got = run_row_loss(b, &r.s, r.dtype_s, r.n, in_place, false, |b, s, out| {
                b.cross_entropy(&spec, s, &lb, out)
            })?;
            let want =
                ops::cross_entropy::reference::cross_entropy(&spec, &to_f64(&r.s), &r.labels);
            let unit = grad_unit(&r, spec.grad_scale, 1.0, spec.reduction, Some(&r.labels));
            compare(&got, &want, false, unit, &r)
        },
    );
}

fn hinton_matches_reference<B: Backend>(b: &B) {
    let options = (
        0f32..=1.0,
        0f32..0.3,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    );
    run_cases(
        (rows(), options),
        |(r, (alpha, eps, sum, in_place, want_gt))| {
            let spec = HintonSpec {
                label_smoothing: eps,
                reduction: if sum {
                    Reduction::Sum
                } else {
                    Reduction::BatchMean
                },
                ..HintonSpec::new(RowShape::new(r.n, r.c), r.temperature, alpha)
            };
            let tb = upload_as(b, &r.t, r.dtype_t);
            let lb = b.upload_labels(&r.labels).unwrap();
            let got = run_row_loss(b, &r.s, r.dtype_s, r.n, in_place, want_gt, |b, s, out| {
                b.hinton(&spec, s, &tb, &lb, out)
            })?;
            let want =
                ops::hinton::reference::hinton(&spec, &to_f64(&r.s), &to_f64(&r.t), &r.labels);
            let unit = grad_unit(&r, 1.0, r.temperature, spec.reduction, Some(&r.labels));
            compare(&got, &want, want_gt, unit, &r)
        },
    );
}

/// DKD's weights: the paper's (1, 1, 8), one term alone, or random (0 allowed).
fn dkd_weights() -> impl Strategy<Value = (f32, f32, f32)> {
    prop_oneof![
        Just((1.0f32, 1.0f32, 8.0f32)),
        Just((0.0, 1.0, 0.0)),
        Just((0.0, 0.0, 1.0)),
        (0f32..2.0, 0f32..3.0, 0f32..10.0),
    ]
}

fn dkd_matches_reference<B: Backend>(b: &B) {
    let options = (dkd_weights(), 0f32..0.3, 0u8..3, any::<bool>(), -2f32..2.0);
    run_cases(
        (rows(), options),
        |(r, ((w_ce, w_tc, w_nc), eps, red, in_place, grad_scale))| {
            let spec = DkdSpec {
                ce_weight: w_ce,
                label_smoothing: eps,
                reduction: [Reduction::BatchMean, Reduction::Sum, Reduction::None][red as usize],
                grad_scale,
                ..DkdSpec::new(RowShape::new(r.n, r.c), r.temperature, w_tc, w_nc)
            };
            let tb = upload_as(b, &r.t, r.dtype_t);
            let lb = b.upload_labels(&r.labels).unwrap();
            let got = run_row_loss(b, &r.s, r.dtype_s, r.n, in_place, false, |b, s, out| {
                b.dkd(&spec, s, &tb, &lb, out)
            });
            if r.c < 2 {
                // One class: no non-target class, an error that says so.
                return match got {
                    Err(e) if e.contains("at least 2 classes") => Ok(()),
                    other => Err(format!("C = 1 must be refused: {:?}", other.err())),
                };
            }
            let got = got?;
            let want = ops::dkd::reference::dkd(&spec, &to_f64(&r.s), &to_f64(&r.t), &r.labels);
            let weight = w_ce.max(w_tc).max(w_nc).max(1e-3) * grad_scale.abs().max(1e-3);
            let unit = grad_unit(&r, weight, r.temperature, spec.reduction, Some(&r.labels));
            compare(&got, &want, false, unit, &r)
        },
    );
}

fn mse_matches_reference<B: Backend>(b: &B) {
    run_cases((1usize..20000, any::<u64>(), 0u8..4), |(m, seed, mode)| {
        let mut g = Lcg(seed);
        let (a, bb) = (g.vec(m, 3.0), g.vec(m, 3.0));
        let spec = MseSpec {
            len: m,
            grad_scale: 2.0,
        };
        let (ab, bbuf) = (b.upload(&a).unwrap(), b.upload(&bb).unwrap());
        let (loss, ga, gb) = (poisoned(b, 1), poisoned(b, m), poisoned(b, m));
        let want_a = mode & 1 != 0;
        let want_b = mode & 2 != 0;
        b.mse(
            &spec,
            &ab,
            &bbuf,
            &loss,
            want_a.then_some(&ga),
            want_b.then_some(&gb),
        )
        .map_err(|e| e.to_string())?;
        let (l, wa, wb) = feature::reference::mse(&spec, &to_f64(&a), &to_f64(&bb));
        assert_close("mse loss", &b.download(&loss).unwrap(), &[l], TOL)?;
        if want_a {
            assert_close("mse grad_a", &b.download(&ga).unwrap(), &wa, TOL)?;
        }
        if want_b {
            assert_close("mse grad_b", &b.download(&gb).unwrap(), &wb, TOL)?;
        }
        Ok(())
    });
}

fn attention_matches_reference<B: Backend>(b: &B) {
    let shape = (
        1usize..9,
        1usize..12,
        1usize..12,
        prop_oneof![1usize..=20, 20usize..700],
    );
    run_cases(
        (shape, any::<u64>(), any::<bool>()),
        |((n, cs, ct, hw), seed, zero)| {
            let mut g = Lcg(seed);
            let spec = AttentionSpec::new(n, cs, ct, hw);
            let mut s = g.vec(spec.student_len(), 2.0);
            let t = g.vec(spec.teacher_len(), 2.0);
            if zero {
                // An all-zero map exercises the norm floor (1e-12) of F.normalize.
                s[..cs * hw].fill(0.0);
            }
            let (sb, tb) = (b.upload(&s).unwrap(), b.upload(&t).unwrap());
            let (loss, gs, gt) = (poisoned(b, 1), poisoned(b, s.len()), poisoned(b, t.len()));
            b.attention_transfer(&spec, &sb, &tb, &loss, Some(&gs), Some(&gt))
                .map_err(|e| e.to_string())?;
            let (l, ws, wt) =
                feature::reference::attention_transfer(&spec, &to_f64(&s), &to_f64(&t));
            assert_close("at loss", &b.download(&loss).unwrap(), &[l], TOL)?;
            // Exact zeros (a map equal to its own normalisation) compare absolutely.
            assert_close_abs("at grad_student", &b.download(&gs).unwrap(), &ws, TOL, 1e-6)?;
            assert_close_abs("at grad_teacher", &b.download(&gt).unwrap(), &wt, TOL, 1e-6)
        },
    );
}

backend_tests!(
    softmax_matches_reference,
    divergence_matches_reference,
    cross_entropy_matches_reference,
    hinton_matches_reference,
    dkd_matches_reference,
    mse_matches_reference,
    attention_matches_reference,
);
