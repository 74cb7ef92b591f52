//! bf16 and f16 inputs and gradients on every backend: the error budget of `docs/LOSSES.md` (half
//! precision). With the student and teacher in a half dtype and the gradient returned in it, the
//! gradient is within 1.5x of the error of rounding the exact (f64) gradient of the same inputs
//! to that dtype, in the mean and in the norm, and faithfully rounded (one of the two neighbours
//! of the exact value) for at least 99.9% of the elements; the loss is within 1e-4 of the f64
//! value. Mixed dtypes (a bf16 student with an f32 teacher, f32 gradients from half inputs) are
//! checked at the f32 contract (1e-4).

use crate::common;

use common::{assert_close, assert_close_abs, Lcg};
use distillation::half::{bf16, f16};
use distillation::ops::{self, RowLossResult};
use distillation::{
    Backend, CrossEntropyLoss, CrossEntropySpec, Divergence, DivergenceSpec, DkdLoss, Dtype,
    Element, GradOut, HintonSpec, KdLoss, LossOut, Reduction, RowShape, SoftTargetLoss,
    SoftmaxSpec, TeacherInput, IGNORE_INDEX,
};

/// The budget's checks on `got` (a half-precision gradient as f32) against the exact `want`.
fn check_budget(what: &str, dtype: Dtype, got: &[f32], want: &[f64]) -> Result<(), String> {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut e_sum, mut r_sum, mut e_sq, mut r_sq, mut w_sq) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut unfaithful = 0usize;
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() || g.is_nan() {
            if w.is_nan() != g.is_nan() {
                return Err(format!(
                    "{what}: element {i}: got {g}, want {w} (NaN mismatch)"
                ));
            }
            continue;
        }
        let e = (g as f64 - w).abs();
        let r = (dtype.round_f64(w) - w).abs();
        e_sum += e;
        r_sum += r;
        e_sq += e * e;
        r_sq += r * r;
        w_sq += w * w;
        let ulps = e / dtype.ulp(w);
        if ulps > 1.0 {
            unfaithful += 1;
        }
        if ulps > worst.0 {
            worst = (ulps, i);
        }
    }
    let n = got.len().max(1) as f64;
    // A floor far below the rounding error (f32's resolution of the gradient's norm), for rows
    // whose gradient is exactly representable (masked rows: zeros).
    let floor = 1e-6 * w_sq.sqrt();
    let (mean_ratio, norm_ratio) = (
        e_sum / (r_sum + floor * n.sqrt()),
        e_sq.sqrt() / (r_sq.sqrt() + floor),
    );
    let (i, ulps) = (worst.1, worst.0);
    let detail = format!(
        "{what} ({dtype}): mean error {:.3e} vs rounding {:.3e} ({mean_ratio:.3}x), norm {:.3e} vs \
         {:.3e} ({norm_ratio:.3}x), {unfaithful} of {} not faithfully rounded, worst {ulps:.2} \
         ulp at {i} (got {}, exact {})",
        e_sum / n,
        r_sum / n,
        e_sq.sqrt(),
        r_sq.sqrt(),
        got.len(),
        got[i],
        want[i]
    );
    if mean_ratio > 1.5 || norm_ratio > 1.5 || unfaithful as f64 > 1e-3 * n {
        return Err(detail);
    }
    Ok(())
}

/// `n * c` logits of scale `scale` rounded to `E`, with their values as f64.
fn logits<E: Element>(g: &mut Lcg, len: usize, scale: f32) -> (Vec<E>, Vec<f64>) {
    let v: Vec<E> = g.vec(len, scale).into_iter().map(E::from_f32).collect();
    let d = v.iter().map(|x| x.to_f32() as f64).collect();
    (v, d)
}

fn labels(g: &mut Lcg, n: usize, c: usize) -> Vec<i32> {
    (0..n)
        .map(|i| {
            if i % 7 == 3 {
                IGNORE_INDEX
            } else {
                (((g.next_f32() + 1.0) * 0.5 * c as f32) as usize).min(c - 1) as i32
            }
        })
        .collect()
}

fn loss_close(what: &str, got: f32, want: &RowLossResult) -> Result<(), String> {
    assert_close(what, &[got], &[want.loss], 1e-4)
}

/// The Hinton loss, the three divergences (teacher logits) and cross-entropy with `E` inputs and
/// gradients, against the budget.
fn budget_for<B: Backend, E: Element>(b: &B, n: usize, c: usize, temperature: f32, seed: u64) {
    let mut g = Lcg(seed);
    let shape = RowShape::new(n, c);
    let (s, sd) = logits::<E>(&mut g, n * c, 6.0);
    let (t, td) = logits::<E>(&mut g, n * c, 6.0);
    let y = labels(&mut g, n, c);
    let dt = E::DTYPE;
    let tag = |loss: &str| format!("{loss} {n}x{c} T={temperature} on {}", b.name());

    let kd = KdLoss {
        teacher_grad: true,
        ..KdLoss::new(temperature, 0.3)
    };
    let got = kd.forward_backward(b, &s, &t, &y, c).unwrap();
    let want = ops::hinton::reference::hinton(&kd.spec(shape), &sd, &td, &y);
    let f = |v: &[E]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    let name = tag("hinton");
    loss_close(&name, got.loss, &want).unwrap();
    check_budget(&name, dt, &f(&got.grad_student), &want.grad_student).unwrap();
    check_budget(
        &format!("{name} teacher"),
        dt,
        &f(got.grad_teacher.as_ref().unwrap()),
        &want.grad_teacher,
    )
    .unwrap();

    for divergence in [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.5 },
    ] {
        let loss = SoftTargetLoss {
            teacher_grad: true,
            ..SoftTargetLoss::new(divergence, temperature)
        };
        let got = loss.forward_backward(b, &s, &t, Some(&y), c).unwrap();
        let spec = DivergenceSpec {
            divergence,
            ..DivergenceSpec::new(shape, temperature)
        };
        let want = ops::divergence::reference::divergence(&spec, &sd, &td, Some(&y));
        let name = tag(&format!("{divergence:?}"));
        loss_close(&name, got.loss, &want).unwrap();
        check_budget(&name, dt, &f(&got.grad_student), &want.grad_student).unwrap();
        check_budget(
            &format!("{name} teacher"),
            dt,
            &f(got.grad_teacher.as_ref().unwrap()),
            &want.grad_teacher,
        )
        .unwrap();
    }

    if c >= 2 {
        let dkd = DkdLoss {
            label_smoothing: 0.1,
            ..DkdLoss::new(temperature, 1.0, 8.0)
        };
        let got = dkd.forward_backward(b, &s, &t, &y, c).unwrap();
        let want = ops::dkd::reference::dkd(&dkd.spec(shape), &sd, &td, &y);
        let name = tag("dkd");
        loss_close(&name, got.loss, &want).unwrap();
        check_budget(&name, dt, &f(&got.grad_student), &want.grad_student).unwrap();
    }

    let ce = CrossEntropyLoss {
        label_smoothing: 0.1,
        ..Default::default()
    };
    let got = ce.forward_backward(b, &s, &y, c).unwrap();
    let spec = CrossEntropySpec {
        label_smoothing: 0.1,
        ..CrossEntropySpec::new(shape)
    };
    let want = ops::cross_entropy::reference::cross_entropy(&spec, &sd, &y);
    let name = tag("cross-entropy");
    loss_close(&name, got.loss, &want).unwrap();
    check_budget(&name, dt, &f(&got.grad_student), &want.grad_student).unwrap();
}

fn bf16_budget<B: Backend>(b: &B) {
    for (i, &(n, c, t)) in [
        (5usize, 3usize, 1.0f32),
        (17, 1000, 4.0),
        (9, 1031, 0.5),
        (3, 5000, 20.0),
    ]
    .iter()
    .enumerate()
    {
        budget_for::<B, bf16>(b, n, c, t, 100 + i as u64);
    }
}

fn f16_budget<B: Backend>(b: &B) {
    for (i, &(n, c, t)) in [
        (5usize, 3usize, 1.0f32),
        (17, 1000, 4.0),
        (9, 1031, 0.5),
        (3, 5000, 20.0),
    ]
    .iter()
    .enumerate()
    {
        budget_for::<B, f16>(b, n, c, t, 200 + i as u64);
    }
}

/// The large case: 16 rows of 131072 classes, bf16 and f16.
fn budget_at_16_by_131072<B: Backend>(b: &B) {
    budget_for::<B, bf16>(b, 16, 131072, 2.0, 300);
    budget_for::<B, f16>(b, 16, 131072, 2.0, 301);
}

/// bf16 student, f32 teacher, gradients in f32: the f32 contract (1e-4 of the norm) holds, the
/// inputs being exact in f32.
fn mixed_dtypes_meet_the_f32_contract<B: Backend>(b: &B) {
    let mut g = Lcg(400);
    let (n, c, temperature) = (11usize, 777usize, 3.0f32);
    let shape = RowShape::new(n, c);
    let (s, sd) = logits::<bf16>(&mut g, n * c, 5.0);
    let (t, td) = logits::<f32>(&mut g, n * c, 5.0);
    let y = labels(&mut g, n, c);
    let kd = KdLoss {
        teacher_grad: true,
        ..KdLoss::new(temperature, 0.4)
    };
    let got = kd.forward_backward_f32(b, &s, &t, &y, c).unwrap();
    let want = ops::hinton::reference::hinton(&kd.spec(shape), &sd, &td, &y);
    assert_close("loss", &[got.loss], &[want.loss], 1e-4).unwrap();
    assert_close("grad_student", &got.grad_student, &want.grad_student, 1e-4).unwrap();
    let gt = got.grad_teacher.unwrap();
    assert_close("grad_teacher", &gt, &want.grad_teacher, 1e-4).unwrap();
    // The same with the gradient in the student's dtype (bf16) and the teacher's (f32).
    let got = kd.forward_backward(b, &s, &t, &y, c).unwrap();
    let f: Vec<f32> = got.grad_student.iter().map(|x| x.to_f32()).collect();
    check_budget("mixed grad_student", Dtype::Bf16, &f, &want.grad_student).unwrap();
    assert_close(
        "mixed grad_teacher",
        got.grad_teacher.as_ref().unwrap(),
        &want.grad_teacher,
        1e-4,
    )
    .unwrap();
}

/// A gradient written in place over a bf16 / f16 student is the student's dtype; the loss and
/// row losses are f32.
fn in_place_over_a_half_student<B: Backend>(b: &B) {
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let mut g = Lcg(500);
        let (n, c) = (6usize, 301usize);
        let shape = RowShape::new(n, c);
        let (s32, t32) = (g.vec(n * c, 4.0), g.vec(n * c, 4.0));
        let y = labels(&mut g, n, c);
        let round = |v: &[f32]| v.iter().map(|&x| dtype.round(x)).collect::<Vec<f32>>();
        let (s, t) = (round(&s32), round(&t32));
        let up = |v: &[f32]| match dtype {
            Dtype::Bf16 => b.upload_as(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
            _ => b.upload_as(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()),
        };
        let (sb, tb) = (up(&s).unwrap(), up(&t).unwrap());
        assert_eq!(b.dtype(&sb), dtype);
        let lb = b.upload_labels(&y).unwrap();
        let spec = HintonSpec::new(shape, 2.0, 0.5);
        let loss = b.filled(1, f32::NAN).unwrap();
        let out = LossOut {
            loss: &loss,
            row_loss: None,
            grad_student: GradOut::InPlace,
            grad_teacher: None,
        };
        b.hinton(&spec, &sb, &tb, &lb, out).unwrap();
        let want =
            ops::hinton::reference::hinton(&spec, &common::to_f64(&s), &common::to_f64(&t), &y);
        assert_close("loss", &b.download(&loss).unwrap(), &[want.loss], 1e-4).unwrap();
        assert_eq!(b.dtype(&sb), dtype, "the student keeps its dtype");
        check_budget(
            &format!("in place on {}", b.name()),
            dtype,
            &b.download(&sb).unwrap(),
            &want.grad_student,
        )
        .unwrap();
    }
}

/// Softmax of a half input into a half output, and its backward.
fn softmax_in_half<B: Backend>(b: &B) {
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let mut g = Lcg(600);
        let (n, c, temperature) = (7usize, 513usize, 2.5f32);
        let x: Vec<f32> = g.vec(n * c, 8.0).iter().map(|&v| dtype.round(v)).collect();
        let dy: Vec<f32> = g.vec(n * c, 1.0).iter().map(|&v| dtype.round(v)).collect();
        let up = |v: &[f32]| match dtype {
            Dtype::Bf16 => b.upload_as(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
            _ => b.upload_as(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()),
        };
        for log in [false, true] {
            let spec = SoftmaxSpec {
                shape: RowShape::new(n, c),
                temperature,
                log,
            };
            let y = b.filled_as(dtype, n * c, f32::NAN).unwrap();
            b.softmax(&spec, &up(&x).unwrap(), &y).unwrap();
            let want =
                ops::softmax::reference::softmax(&common::to_f64(&x), c, temperature as f64, log);
            let got = b.download(&y).unwrap();
            check_budget(
                &format!("softmax log={log} on {}", b.name()),
                dtype,
                &got,
                &want,
            )
            .unwrap();
            // Backward from the (half) forward output.
            let dx = b.filled_as(dtype, n * c, f32::NAN).unwrap();
            b.softmax_backward(&spec, &y, &up(&dy).unwrap(), &dx)
                .unwrap();
            let want = ops::softmax::reference::softmax_backward(
                &common::to_f64(&got),
                &common::to_f64(&dy),
                c,
                temperature as f64,
                log,
            );
            check_budget(
                &format!("softmax backward log={log} on {}", b.name()),
                dtype,
                &b.download(&dx).unwrap(),
                &want,
            )
            .unwrap();
        }
    }
}

/// Half buffers are refused by the ops that take f32 only, with a message that says so; a loss
/// output must be f32.
fn half_buffers_where_f32_is_needed_are_errors<B: Backend>(b: &B) {
    let h = b.upload_as(&[bf16::from_f32(1.0); 6]).unwrap();
    let f = b.upload(&[1.0; 6]).unwrap();
    let err = b.relu(&h, &f).unwrap_err().to_string();
    assert!(err.contains("bf16") && err.contains("f32"), "{err}");
    let shape = RowShape::new(2, 3);
    let loss = b.filled_as(Dtype::F16, 1, 0.0).unwrap();
    let out = LossOut {
        loss: &loss,
        row_loss: None,
        grad_student: GradOut::None,
        grad_teacher: None,
    };
    let err = b
        .cross_entropy(
            &CrossEntropySpec::new(shape),
            &h,
            &b.upload_labels(&[0, 1]).unwrap(),
            out,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("loss") && err.contains("f16"), "{err}");
    let _ = (Reduction::Sum, TeacherInput::Logits);
}

/// Uploads and downloads keep every bit of each dtype.
fn round_trips_are_exact<B: Backend>(b: &B) {
    let v: Vec<bf16> = (0..7)
        .map(|i| bf16::from_f32(i as f32 * 0.37 - 1.0))
        .collect();
    assert_eq!(b.download_as::<bf16>(&b.upload_as(&v).unwrap()).unwrap(), v);
    let w: Vec<f16> = (0..5).map(|i| f16::from_f32(i as f32 * 1e-5)).collect();
    let wb = b.upload_as(&w).unwrap();
    assert_eq!(b.dtype(&wb), Dtype::F16);
    assert_eq!(b.len(&wb), 5);
    assert_eq!(b.download_as::<f16>(&wb).unwrap(), w);
    assert_close_abs(
        "as f32",
        &b.download(&wb).unwrap(),
        &w.iter().map(|x| x.to_f64()).collect::<Vec<_>>(),
        0.0,
        0.0,
    )
    .unwrap();
}

backend_tests!(
    bf16_budget,
    f16_budget,
    budget_at_16_by_131072,
    mixed_dtypes_meet_the_f32_contract,
    in_place_over_a_half_student,
    softmax_in_half,
    half_buffers_where_f32_is_needed_are_errors,
    round_trips_are_exact,
);
