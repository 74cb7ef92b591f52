//! Mathematical properties and determinism, on every backend.

mod common;

use common::{to_f64, Lcg};
use distillation::ops::{self, feature};
use distillation::{
    AttentionSpec, Backend, CrossEntropySpec, DivergenceSpec, GradOut, HintonSpec, LossOut,
    MseSpec, RowShape, SoftmaxSpec,
};

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
        let m = MseSpec::new(n * c);
        let mloss = b.filled(1, f32::NAN).unwrap();
        b.mse(&m, &s, &t, &mloss, None, None).unwrap();
        let at = AttentionSpec::new(10, 7, 7, 4099);
        let aloss = b.filled(1, f32::NAN).unwrap();
        b.attention_transfer(&at, &s, &t, &aloss, None, None)
            .unwrap();
        [loss, rows, gs, gt, mloss, aloss].map(|x| {
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
    same_input_gives_same_bits,
    non_finite_input_gives_nan_loss,
    invalid_label_is_never_silent,
    feature_losses_on_a_cnn_shape,
);
