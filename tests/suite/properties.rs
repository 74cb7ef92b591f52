//! Mathematical properties and determinism, on every backend.

use crate::common;

use common::{to_f64, Lcg};
use distillation::ops::{self, feature};
use distillation::{
    AttentionSpec, Backend, CrossEntropySpec, DivergenceSpec, DkdSpec, GradOut, HintonSpec,
    LossOut, MseSpec, Reduction, RowShape, SoftmaxSpec, IGNORE_INDEX,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

fn softmax_rows_sum_to_one_and_ignore_shifts<B: Backend>(b: &B) {
    let mut g = Lcg(7);
    for &(n, c, t) in &[
        (5usize, 1usize, 1.0f32),
        (9, 10, 0.05),
        (3, 1031, 4.0),
        (2, 5000, 100.0),
    ] {
        let spec = SoftmaxSpec {
            shape: RowShape::new(n, c),
            temperature: t,
            log: false,
        };
        let x = g.vec(n * c, 20.0);
        let shifted: Vec<f32> = x.iter().map(|v| v + 1000.0).collect();
        let y = b.filled(n * c, f32::NAN).unwrap();
        b.softmax(&spec, &b.upload(&x).unwrap(), &y).unwrap();
        let y1 = b.download(&y).unwrap();
        for row in y1.chunks(c) {
            let s: f64 = row.iter().map(|&v| v as f64).sum();
            assert!(
                (s - 1.0).abs() < 1e-5,
                "row sums to {s} (n={n}, c={c}, T={t})"
            );
            assert!(row.iter().all(|&v| (0.0..=1.0).contains(&v)));
        }
        b.softmax(&spec, &b.upload(&shifted).unwrap(), &y).unwrap();
        let y2 = b.download(&y).unwrap();
        // x + 1000 rounds x to f32's grid at 1000 (ulp 6e-5), so allow that much change in x / T.
        let tol = 1e-4 / t.min(1.0);
        for (a, bb) in y1.iter().zip(&y2) {
            assert!(
                (a - bb).abs() <= tol * a.max(*bb).max(1e-3),
                "shift changed {a} to {bb}"
            );
        }
    }
}

fn kl_is_nonnegative_and_zero_on_equal_inputs<B: Backend>(b: &B) {
    let mut g = Lcg(11);
    for &(n, c, t) in &[(4usize, 10usize, 1.0f32), (7, 257, 4.0), (2, 3000, 0.05)] {
        let shape = RowShape::new(n, c);
        let (s, t_logits) = (g.vec(n * c, 8.0), g.vec(n * c, 8.0));
        let run = |s: &[f32], tl: &[f32]| {
            let spec = DivergenceSpec::new(shape, t);
            let (loss, rows, grad) = (
                b.filled(1, f32::NAN).unwrap(),
                b.filled(n, f32::NAN).unwrap(),
                b.filled(n * c, f32::NAN).unwrap(),
            );
            let out = LossOut {
                loss: &loss,
                row_loss: Some(&rows),
                grad_student: GradOut::Into(&grad),
                grad_teacher: None,
            };
            b.divergence(
                &spec,
                &b.upload(s).unwrap(),
                &b.upload(tl).unwrap(),
                None,
                out,
            )
            .unwrap();
            (
                b.download(&loss).unwrap()[0],
                b.download(&rows).unwrap(),
                b.download(&grad).unwrap(),
            )
        };
        let (loss, rows, _) = run(&s, &t_logits);
        assert!(
            loss > 0.0 && rows.iter().all(|&r| r >= 0.0),
            "KL must be >= 0: {loss} {rows:?}"
        );
        let (loss, rows, grad) = run(&s, &s);
        assert!(
            loss.abs() < 1e-5 && rows.iter().all(|r| r.abs() < 1e-5),
            "KL(s||s) = {loss}"
        );
        assert!(
            grad.iter().all(|g| g.abs() < 1e-6),
            "gradient of KL(s||s) must vanish"
        );
    }
}

fn cross_entropy_is_nonnegative<B: Backend>(b: &B) {
    let mut g = Lcg(3);
    let (n, c) = (33, 100);
    let s = g.vec(n * c, 30.0);
    let labels: Vec<i32> = (0..n as i32).map(|i| (i * 7) % c as i32).collect();
    let (loss, rows) = (
        b.filled(1, f32::NAN).unwrap(),
        b.filled(n, f32::NAN).unwrap(),
    );
    let out = LossOut {
        loss: &loss,
        row_loss: Some(&rows),
        grad_student: GradOut::None,
        grad_teacher: None,
    };
    let spec = CrossEntropySpec {
        label_smoothing: 0.1,
        ..CrossEntropySpec::new(RowShape::new(n, c))
    };
    b.cross_entropy(
        &spec,
        &b.upload(&s).unwrap(),
        &b.upload_labels(&labels).unwrap(),
        out,
    )
    .unwrap();
    assert!(b.download(&loss).unwrap()[0] >= 0.0);
    assert!(b.download(&rows).unwrap().iter().all(|&r| r >= 0.0));
}

/// A DKD case drawn over everything `DkdSpec::validate` accepts: C from 2, T log-uniform over
/// [1e-3, 1e4], each weight 0 or up to 10, label smoothing in [0, 1), every reduction, any finite
/// upstream gradient, logits up to |1e4|, masked rows, any `ignore_index`.
#[derive(Clone, Debug)]
struct DkdCase {
    spec: DkdSpec,
    s: Vec<f32>,
    t: Vec<f32>,
    labels: Vec<i32>,
}

fn dkd_case() -> impl Strategy<Value = DkdCase> {
    let weight = prop_oneof![Just(0f32), 0f32..10.0];
    let shape = (
        1usize..24,
        prop_oneof![2usize..=12, 13usize..700, Just(1025usize)],
    );
    (
        shape,
        (1e-3f64.ln()..1e4f64.ln()),
        (weight.clone(), weight.clone(), weight),
        (
            0f32..0.99,
            0u8..3,
            -5f32..5.0,
            prop_oneof![Just(IGNORE_INDEX), -3i32..0],
        ),
        (prop_oneof![Just(1f32), Just(10.0), Just(1e4)], any::<u64>()),
    )
        .prop_map(|((n, c), lt, w, (eps, red, gs, ignore), (scale, seed))| {
            let mut g = Lcg(seed);
            let labels = (0..n)
                .map(|_| {
                    if g.next_f32() > 0.6 {
                        ignore
                    } else {
                        (((g.next_f32() + 1.0) * 0.5 * c as f32) as usize).min(c - 1) as i32
                    }
                })
                .collect();
            let spec = DkdSpec {
                ce_weight: w.0,
                label_smoothing: eps,
                reduction: [Reduction::BatchMean, Reduction::Sum, Reduction::None][red as usize],
                grad_scale: gs,
                ignore_index: ignore,
                ..DkdSpec::new(RowShape::new(n, c), lt.exp() as f32, w.1, w.2)
            };
            DkdCase {
                spec,
                s: g.vec(n * c, scale),
                t: g.vec(n * c, scale),
                labels,
            }
        })
}

/// DKD on `b`: (loss, row losses, student gradient).
fn run_dkd<B: Backend>(b: &B, spec: &DkdSpec, s: &[f32], t: &[f32], labels: &[i32]) -> Outputs {
    let (n, len) = (spec.shape.rows, spec.shape.len());
    let (loss, rows, gs) = (
        b.filled(1, f32::NAN).unwrap(),
        b.filled(n, f32::NAN).unwrap(),
        b.filled(len, f32::NAN).unwrap(),
    );
    let out = LossOut {
        loss: &loss,
        row_loss: Some(&rows),
        grad_student: GradOut::Into(&gs),
        grad_teacher: None,
    };
    let (sb, tb) = (b.upload(s).unwrap(), b.upload(t).unwrap());
    b.dkd(spec, &sb, &tb, &b.upload_labels(labels).unwrap(), out)
        .unwrap();
    let get = |x| b.download(x).unwrap();
    (get(&loss)[0], get(&rows), get(&gs))
}

type Outputs = (f32, Vec<f32>, Vec<f32>);

/// Over every accepted input: finite, non-negative row losses; masked rows exactly 0 with a 0
/// gradient; each row's gradient sums to 0 (every term's does: `p1 - target`, `T (p^ - q^)`, and
/// TCKD's `T (p_g - q_g) (1 - sum p^)`); and with the teacher equal to the student both KD terms
/// vanish, loss and gradient: DKD is then `ce_weight` times cross-entropy.
fn dkd_properties<B: Backend>(b: &B) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let check = |k: DkdCase| -> Result<(), String> {
        let (spec, c) = (k.spec, k.spec.shape.cols);
        let (loss, rows, gs) = run_dkd(b, &spec, &k.s, &k.t, &k.labels);
        let weight = spec.ce_weight.max(spec.tckd_weight).max(spec.nckd_weight) as f64;
        let kscale = (spec.grad_scale.abs() as f64) * weight * (spec.temperature as f64).max(1.0);
        if !loss.is_finite() {
            return Err(format!("loss {loss}"));
        }
        for (r, (&l, g)) in rows.iter().zip(gs.chunks(c)).enumerate() {
            if k.labels[r] == spec.ignore_index {
                if l != 0.0 || g.iter().any(|&v| v != 0.0) {
                    return Err(format!("masked row {r}: loss {l}, gradient {g:?}"));
                }
                continue;
            }
            // f32 rounding of the CE and KD sums: a few ulps of the row's log terms, T^2 times.
            let t2 = (spec.temperature as f64).powi(2).max(1.0);
            let floor = 1e-6 * t2 * (1.0 + (c as f64).ln()) * 10.0;
            if !(l.is_finite() && l as f64 >= -floor) {
                return Err(format!("row {r}: loss {l}"));
            }
            let sum: f64 = g.iter().map(|&v| v as f64).sum();
            let abs: f64 = g.iter().map(|&v| (v as f64).abs()).sum();
            // Where the row's gradient is tiny (confident rows: p^ - q^ of two probabilities near
            // 1), its elements are the rounding of their O(k T w) terms.
            if sum.abs() > 1e-4 * abs + 1e-7 * kscale {
                return Err(format!("row {r}: gradient sums to {sum} (|g| = {abs})"));
            }
        }
        // Teacher = student: DKD = ce_weight CE.
        let (_, rows, gs) = run_dkd(b, &spec, &k.s, &k.s, &k.labels);
        let ce = CrossEntropySpec {
            label_smoothing: spec.label_smoothing,
            reduction: spec.reduction,
            ignore_index: spec.ignore_index,
            grad_scale: spec.grad_scale * spec.ce_weight,
            ..CrossEntropySpec::new(spec.shape)
        };
        let want = ops::cross_entropy::reference::cross_entropy(&ce, &to_f64(&k.s), &k.labels);
        let w = spec.ce_weight as f64;
        let want_rows: Vec<f64> = want.row_loss.iter().map(|v| w * v).collect();
        let t = spec.temperature as f64;
        // The KD terms of equal inputs are 0 up to f32 rounding of second-order sums, T^2 times.
        let atol = 1e-7 * t * t.max(1.0) * (1.0 + (c as f64).ln());
        common::assert_close_abs("rows (teacher = student)", &rows, &want_rows, 1e-4, atol)?;
        let gunit = (spec.grad_scale.abs()
            * spec.ce_weight.max(spec.tckd_weight).max(spec.nckd_weight))
            as f64;
        common::assert_close_abs(
            "gradient (teacher = student)",
            &gs,
            &want.grad_student,
            1e-4,
            1e-6 * gunit * t.max(1.0),
        )
    };
    runner
        .run(&dkd_case(), |k| check(k).map_err(TestCaseError::fail))
        .unwrap();
}

/// Every op twice on the same inputs: bit-identical outputs.
fn same_input_gives_same_bits<B: Backend>(b: &B) {
    let mut g = Lcg(5);
    let (n, c) = (70, 4099);
    let shape = RowShape::new(n, c);
    let (s, t) = (
        b.upload(&g.vec(n * c, 10.0)).unwrap(),
        b.upload(&g.vec(n * c, 10.0)).unwrap(),
    );
    let labels = b
        .upload_labels(
            &(0..n as i32)
                .map(|i| if i % 5 == 0 { -100 } else { i * 13 % c as i32 })
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let run = || {
        let (loss, rows, gs, gt) = (
            b.filled(1, f32::NAN).unwrap(),
            b.filled(n, f32::NAN).unwrap(),
            b.filled(n * c, f32::NAN).unwrap(),
            b.filled(n * c, f32::NAN).unwrap(),
        );
        let out = LossOut {
            loss: &loss,
            row_loss: Some(&rows),
            grad_student: GradOut::Into(&gs),
            grad_teacher: Some(&gt),
        };
        b.hinton(&HintonSpec::new(shape, 3.0, 0.3), &s, &t, &labels, out)
            .unwrap();
        let (dloss, drows, dgs) = (
            b.filled(1, f32::NAN).unwrap(),
            b.filled(n, f32::NAN).unwrap(),
            b.filled(n * c, f32::NAN).unwrap(),
        );
        let dout = LossOut {
            loss: &dloss,
            row_loss: Some(&drows),
            grad_student: GradOut::Into(&dgs),
            grad_teacher: None,
        };
        b.dkd(&DkdSpec::new(shape, 4.0, 1.0, 8.0), &s, &t, &labels, dout)
            .unwrap();
        let m = MseSpec::new(n * c);
        let mloss = b.filled(1, f32::NAN).unwrap();
        b.mse(&m, &s, &t, &mloss, None, None).unwrap();
        let at = AttentionSpec::new(10, 7, 7, 4099);
        let aloss = b.filled(1, f32::NAN).unwrap();
        b.attention_transfer(&at, &s, &t, &aloss, None, None)
            .unwrap();
        [loss, rows, gs, gt, mloss, aloss, dloss, drows, dgs].map(|x| {
            b.download(&x)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        })
    };
    assert!(run() == run(), "outputs differ between two identical calls");
}

/// A NaN or an infinity in an input gives a NaN loss, never a silent finite number.
fn non_finite_input_gives_nan_loss<B: Backend>(b: &B) {
    let (n, c) = (3, 37);
    let shape = RowShape::new(n, c);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut s = Lcg(1).vec(n * c, 2.0);
        s[c + 5] = bad; // row 1
        let t = Lcg(2).vec(n * c, 2.0);
        let labels = b.upload_labels(&[1, 2, 3]).unwrap();
        let (sb, tb) = (b.upload(&s).unwrap(), b.upload(&t).unwrap());
        let (loss, rows) = (b.filled(1, 0.0).unwrap(), b.filled(n, 0.0).unwrap());
        let out = || LossOut {
            loss: &loss,
            row_loss: Some(&rows),
            grad_student: GradOut::None,
            grad_teacher: None,
        };
        let check = |what: &str| {
            let r = b.download(&rows).unwrap();
            assert!(
                b.download(&loss).unwrap()[0].is_nan(),
                "{what}: loss not NaN for input {bad}"
            );
            assert!(
                r[1].is_nan() && r[0].is_finite() && r[2].is_finite(),
                "{what}: rows {r:?}"
            );
        };
        b.divergence(&DivergenceSpec::new(shape, 2.0), &sb, &tb, None, out())
            .unwrap();
        check("divergence");
        b.cross_entropy(&CrossEntropySpec::new(shape), &sb, &labels, out())
            .unwrap();
        check("cross_entropy");
        b.hinton(&HintonSpec::new(shape, 2.0, 0.5), &sb, &tb, &labels, out())
            .unwrap();
        check("hinton");
        b.dkd(
            &DkdSpec::new(shape, 2.0, 1.0, 8.0),
            &sb,
            &tb,
            &labels,
            out(),
        )
        .unwrap();
        check("dkd");
        // A non-finite teacher logit (here the label's own) also gives a NaN row.
        let mut tl = t.clone();
        tl[c + 2] = bad;
        let tb2 = b.upload(&tl).unwrap();
        b.dkd(
            &DkdSpec::new(shape, 2.0, 1.0, 8.0),
            &b.upload(&Lcg(1).vec(n * c, 2.0)).unwrap(),
            &tb2,
            &labels,
            out(),
        )
        .unwrap();
        check("dkd (teacher)");
        let y = b.filled(n * c, 0.0).unwrap();
        b.softmax(
            &SoftmaxSpec {
                shape,
                temperature: 1.0,
                log: false,
            },
            &sb,
            &y,
        )
        .unwrap();
        let y = b.download(&y).unwrap();
        assert!(y[c..2 * c].iter().all(|v| v.is_nan()) && y[..c].iter().all(|v| v.is_finite()));
        let m = b.filled(1, 0.0).unwrap();
        b.mse(&MseSpec::new(n * c), &sb, &tb, &m, None, None)
            .unwrap();
        assert!(!b.download(&m).unwrap()[0].is_finite(), "mse");
    }
}

/// A label that is neither a class nor ignore_index never gives a silent number: an `Err` (host
/// backends check) or a NaN row loss (device backends, which do not read labels back).
fn invalid_label_is_never_silent<B: Backend>(b: &B) {
    let shape = RowShape::new(2, 3);
    let s = b.upload(&[1.0, 2.0, 3.0, 1.0, 2.0, 3.0]).unwrap();
    let t = b.upload(&[3.0, 2.0, 1.0, 1.0, 2.0, 3.0]).unwrap();
    for bad in [3, -1, 1000] {
        let labels = b.upload_labels(&[0, bad]).unwrap();
        assert!(b.check_labels(&labels, 3, -100).is_err());
        let (loss, rows) = (b.filled(1, 0.0).unwrap(), b.filled(2, 0.0).unwrap());
        let out = || LossOut {
            loss: &loss,
            row_loss: Some(&rows),
            grad_student: GradOut::None,
            grad_teacher: None,
        };
        let silent =
            |r: distillation::Result<()>| r.is_ok() && !b.download(&rows).unwrap()[1].is_nan();
        assert!(
            !silent(b.cross_entropy(&CrossEntropySpec::new(shape), &s, &labels, out())),
            "cross_entropy, label {bad}"
        );
        assert!(
            !silent(b.hinton(&HintonSpec::new(shape, 2.0, 0.5), &s, &t, &labels, out())),
            "hinton, label {bad}"
        );
        assert!(
            !silent(b.dkd(&DkdSpec::new(shape, 2.0, 1.0, 8.0), &s, &t, &labels, out())),
            "dkd, label {bad}"
        );
        assert!(
            !silent(b.divergence(
                &DivergenceSpec::new(shape, 2.0),
                &s,
                &t,
                Some(&labels),
                out()
            )),
            "divergence, label {bad}"
        );
    }
}

/// MSE and attention transfer agree with the reference on a feature map from a CNN-like shape.
fn feature_losses_on_a_cnn_shape<B: Backend>(b: &B) {
    let mut g = Lcg(9);
    let spec = AttentionSpec::new(32, 16, 64, 14 * 14);
    let (s, t) = (
        g.vec(spec.student_len(), 1.0),
        g.vec(spec.teacher_len(), 1.0),
    );
    let loss = b.filled(1, f32::NAN).unwrap();
    b.attention_transfer(
        &spec,
        &b.upload(&s).unwrap(),
        &b.upload(&t).unwrap(),
        &loss,
        None,
        None,
    )
    .unwrap();
    let (want, _, _) = feature::reference::attention_transfer(&spec, &to_f64(&s), &to_f64(&t));
    let got = b.download(&loss).unwrap()[0] as f64;
    assert!((got - want).abs() <= 1e-4 * want.abs(), "{got} vs {want}");
    let _ = ops::IGNORE_INDEX;
}

backend_tests!(
    softmax_rows_sum_to_one_and_ignore_shifts,
    kl_is_nonnegative_and_zero_on_equal_inputs,
    cross_entropy_is_nonnegative,
    dkd_properties,
    same_input_gives_same_bits,
    non_finite_input_gives_nan_loss,
    invalid_label_is_never_silent,
    feature_losses_on_a_cnn_shape,
);
