//! The tape's dense ops against the f64 CPU reference on random shapes, on every backend.

use crate::common;

use common::{assert_close, check_matmul, to_f64, Lcg};
use distillation::ops::dense::{self, MatmulSpec};
use distillation::ops::optim::{self, AdamSpec, SgdSpec};
use distillation::Backend;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const TOL: f64 = 1e-5;

fn run<S: Strategy>(s: S, f: impl Fn(S::Value) -> Result<(), String>)
where
    S::Value: std::fmt::Debug,
{
    let mut r = TestRunner::new(Config {
        cases: 32,
        failure_persistence: None,
        ..Config::default()
    });
    r.run(&s, |v| f(v).map_err(TestCaseError::fail)).unwrap();
}

fn matmul_matches_reference<B: Backend>(b: &B) {
    let dims = (1usize..70, 1usize..300, 1usize..70);
    run(
        (
            dims,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
        ),
        |((m, k, n), ta, tb, acc, seed)| {
            let spec = MatmulSpec {
                m,
                k,
                n,
                trans_a: ta,
                trans_b: tb,
                accumulate: acc,
            };
            check_matmul(b, spec, seed, TOL).map(|_| ())
        },
    );
}

fn elementwise_ops_match_reference<B: Backend>(b: &B) {
    run(
        (1usize..40, 1usize..600, any::<bool>(), any::<u64>()),
        |(rows, cols, acc, seed)| {
            let mut g = Lcg(seed);
            let (x, bias, dy) = (
                g.vec(rows * cols, 2.0),
                g.vec(cols, 2.0),
                g.vec(rows * cols, 2.0),
            );
            let (xb, biasb) = (b.upload(&x).unwrap(), b.upload(&bias).unwrap());
            let y = b.filled(rows * cols, f32::NAN).unwrap();
            b.bias_add(&xb, &biasb, &y).map_err(|e| e.to_string())?;
            assert_close(
                "bias_add",
                &b.download(&y).unwrap(),
                &dense::reference::bias_add(&to_f64(&x), &to_f64(&bias)),
                TOL,
            )?;
            let out0 = g.vec(cols, 1.0);
            let out = if acc {
                b.upload(&out0).unwrap()
            } else {
                b.filled(cols, f32::NAN).unwrap()
            };
            b.sum_rows(&xb, &out, acc).map_err(|e| e.to_string())?;
            let mut want = to_f64(&out0);
            dense::reference::sum_rows(&to_f64(&x), cols, &mut want, acc);
            assert_close("sum_rows", &b.download(&out).unwrap(), &want, TOL)?;
            b.relu(&xb, &y).map_err(|e| e.to_string())?;
            let relu = b.download(&y).unwrap();
            assert_close("relu", &relu, &dense::reference::relu(&to_f64(&x)), 0.0)?;
            let dx = b.filled(rows * cols, f32::NAN).unwrap();
            b.relu_backward(&y, &b.upload(&dy).unwrap(), &dx)
                .map_err(|e| e.to_string())?;
            assert_close(
                "relu_backward",
                &b.download(&dx).unwrap(),
                &dense::reference::relu_backward(&to_f64(&relu), &to_f64(&dy)),
                0.0,
            )?;
            let yb = b.upload(&dy).unwrap();
            b.axpy(-0.5, &xb, &yb).map_err(|e| e.to_string())?;
            let want: Vec<f64> = dy
                .iter()
                .zip(&x)
                .map(|(&y, &x)| y as f64 - 0.5 * x as f64)
                .collect();
            assert_close("axpy", &b.download(&yb).unwrap(), &want, TOL)
        },
    );
}

fn optimizer_steps_match_reference<B: Backend>(b: &B) {
    run(
        (1usize..3000, 1u32..2000, any::<u64>()),
        |(n, step, seed)| {
            let mut g = Lcg(seed);
            let (w, grad, m, v) = (
                g.vec(n, 1.0),
                g.vec(n, 1.0),
                g.vec(n, 0.1),
                g.vec(n, 0.01).iter().map(|x| x.abs()).collect::<Vec<_>>(),
            );
            let spec = AdamSpec {
                weight_decay: 0.01,
                step,
                ..AdamSpec::new(1e-3)
            };
            let (wb, mb, vb) = (
                b.upload(&w).unwrap(),
                b.upload(&m).unwrap(),
                b.upload(&v).unwrap(),
            );
            b.adam_step(&spec, &wb, &b.upload(&grad).unwrap(), &mb, &vb)
                .map_err(|e| e.to_string())?;
            let (mut ww, mut wm, mut wv) = (to_f64(&w), to_f64(&m), to_f64(&v));
            optim::reference::adam_step(&spec, &mut ww, &to_f64(&grad), &mut wm, &mut wv);
            assert_close("adam w", &b.download(&wb).unwrap(), &ww, TOL)?;
            assert_close("adam m", &b.download(&mb).unwrap(), &wm, TOL)?;
            assert_close("adam v", &b.download(&vb).unwrap(), &wv, TOL)?;
            let spec = SgdSpec {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 1e-4,
            };
            let (wb, velb) = (b.upload(&w).unwrap(), b.upload(&m).unwrap());
            b.sgd_step(&spec, &wb, &b.upload(&grad).unwrap(), &velb)
                .map_err(|e| e.to_string())?;
            let (mut ww, mut vel) = (to_f64(&w), to_f64(&m));
            optim::reference::sgd_step(&spec, &mut ww, &to_f64(&grad), &mut vel);
            assert_close("sgd w", &b.download(&wb).unwrap(), &ww, TOL)?;
            assert_close("sgd velocity", &b.download(&velb).unwrap(), &vel, TOL)
        },
    );
}

fn dense_ops_reject_bad_shapes<B: Backend>(b: &B) {
    let six = b.upload(&[1.0; 6]).unwrap();
    let four = b.upload(&[1.0; 4]).unwrap();
    let e = b
        .matmul(&MatmulSpec::new(2, 3, 2), &six, &six, &six)
        .unwrap_err()
        .to_string();
    assert!(e.contains("c has 6 elements, expected 4"), "{e}");
    assert!(b
        .bias_add(&six, &four, &six)
        .unwrap_err()
        .to_string()
        .contains("[rows, bias.len()]"));
    assert!(b.relu(&six, &four).is_err());
    assert!(b
        .adam_step(&AdamSpec::new(-1.0), &six, &six, &six, &six)
        .unwrap_err()
        .to_string()
        .contains("learning rate"));
    assert!(b
        .adam_step(
            &AdamSpec {
                step: 0,
                ..AdamSpec::new(1e-3)
            },
            &six,
            &six,
            &six,
            &six
        )
        .is_err());
    assert!(b
        .matmul(&MatmulSpec::new(0, 3, 2), &six, &six, &four)
        .is_err());
}

backend_tests!(
    matmul_matches_reference,
    elementwise_ops_match_reference,
    optimizer_steps_match_reference,
    dense_ops_reject_bad_shapes
);
