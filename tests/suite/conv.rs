//! Convolution and pooling ops against the f64 CPU reference on random shapes, on every backend;
//! col2im checked as the exact adjoint of im2col, pooling backward by finite differences.

use crate::common;

use common::{assert_close, to_f64, Lcg};
use distillation::ops::conv::{self, ConvSpec, PoolSpec};
use distillation::Backend;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

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

fn conv_spec() -> impl Strategy<Value = ConvSpec> {
    (
        1usize..4,
        1usize..10,
        1usize..10,
        1usize..6,
        1usize..4,
        1usize..3,
        0usize..2,
    )
        .prop_filter_map("kernel fits", |(n, h, w, c, k, stride, pad)| {
            let s = ConvSpec {
                n,
                h,
                w,
                c,
                k,
                stride,
                pad,
            };
            s.validate().ok().map(|_| s)
        })
}

fn im2col_and_col2im_match_reference<B: Backend>(b: &B) {
    run((conv_spec(), any::<u64>()), |(s, seed)| {
        let mut g = Lcg(seed);
        let x = g.vec(s.input_len(), 1.0);
        let (r, c) = s.cols_shape();
        let cols = b.filled(r * c, f32::NAN).unwrap();
        b.im2col(&s, &b.upload(&x).unwrap(), &cols)
            .map_err(|e| e.to_string())?;
        assert_close(
            "im2col",
            &b.download(&cols).unwrap(),
            &conv::reference::im2col(&s, &to_f64(&x)),
            0.0,
        )?;
        let dcols = g.vec(r * c, 1.0);
        let dx = b.filled(s.input_len(), f32::NAN).unwrap();
        b.col2im(&s, &b.upload(&dcols).unwrap(), &dx)
            .map_err(|e| e.to_string())?;
        assert_close(
            "col2im",
            &b.download(&dx).unwrap(),
            &conv::reference::col2im(&s, &to_f64(&dcols)),
            1e-6,
        )
    });
}

fn pooling_and_transpose_match_reference<B: Backend>(b: &B) {
    let shape = (
        1usize..4,
        1usize..12,
        1usize..12,
        1usize..6,
        1usize..4,
        any::<bool>(),
    );
    run((shape, any::<u64>()), |((n, h, w, c, k, max), seed)| {
        let s = PoolSpec {
            n,
            h: h.max(k),
            w: w.max(k),
            c,
            k,
            max,
        };
        let mut g = Lcg(seed);
        let x = g.vec(s.input_len(), 1.0);
        let y = b.filled(s.output_len(), f32::NAN).unwrap();
        let xb = b.upload(&x).unwrap();
        b.pool(&s, &xb, &y).map_err(|e| e.to_string())?;
        assert_close(
            "pool",
            &b.download(&y).unwrap(),
            &conv::reference::pool(&s, &to_f64(&x)),
            1e-6,
        )?;
        let dy = g.vec(s.output_len(), 1.0);
        let dx = b.filled(s.input_len(), f32::NAN).unwrap();
        b.pool_backward(&s, &xb, &b.upload(&dy).unwrap(), &dx)
            .map_err(|e| e.to_string())?;
        let want = conv::reference::pool_backward(&s, &to_f64(&x), &to_f64(&dy));
        assert_close("pool backward", &b.download(&dx).unwrap(), &want, 1e-6)?;
        let (rows, cols) = (s.h * s.w, s.c);
        let t = b.filled(x.len(), f32::NAN).unwrap();
        b.transpose(n, rows, cols, &xb, &t)
            .map_err(|e| e.to_string())?;
        assert_close(
            "transpose",
            &b.download(&t).unwrap(),
            &conv::reference::transpose(&to_f64(&x), n, rows, cols),
            0.0,
        )
    });
}

fn conv_ops_reject_bad_shapes<B: Backend>(b: &B) {
    let x = b.upload(&[0.0; 16]).unwrap();
    let s = ConvSpec {
        n: 1,
        h: 4,
        w: 4,
        c: 1,
        k: 3,
        stride: 1,
        pad: 1,
    };
    let wrong = b.upload(&[0.0; 10]).unwrap();
    assert!(b
        .im2col(&s, &x, &wrong)
        .unwrap_err()
        .to_string()
        .contains("cols has 10 elements, expected 144"));
    let big = ConvSpec { k: 9, pad: 0, ..s };
    assert!(b
        .im2col(&big, &x, &wrong)
        .unwrap_err()
        .to_string()
        .contains("does not fit"));
    let p = PoolSpec {
        n: 1,
        h: 4,
        w: 4,
        c: 1,
        k: 5,
        max: true,
    };
    assert!(b.pool(&p, &x, &wrong).is_err());
    assert!(b.transpose(2, 2, 2, &x, &x).is_err());
}

backend_tests!(
    im2col_and_col2im_match_reference,
    pooling_and_transpose_match_reference,
    conv_ops_reject_bad_shapes
);

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// <im2col(x), y> = <x, col2im(y)>: col2im is the exact adjoint (the backward of im2col).
    #[test]
    fn col2im_is_the_adjoint_of_im2col(s in conv_spec(), seed in any::<u64>()) {
        let mut g = Lcg(seed);
        let x = to_f64(&g.vec(s.input_len(), 1.0));
        let (r, c) = s.cols_shape();
        let y = to_f64(&g.vec(r * c, 1.0));
        let lhs: f64 = conv::reference::im2col(&s, &x).iter().zip(&y).map(|(a, b)| a * b).sum();
        let rhs: f64 = x.iter().zip(conv::reference::col2im(&s, &y)).map(|(a, b)| a * b).sum();
        prop_assert!((lhs - rhs).abs() <= 1e-9 * lhs.abs().max(1.0));
    }

    /// Pooling backward is the derivative of <pool(x), dy> (random inputs have no ties).
    #[test]
    fn pool_backward_is_the_derivative(n in 1usize..3, h in 2usize..7, c in 1usize..3, k in 1usize..3, max in any::<bool>(), seed in any::<u64>()) {
        let s = PoolSpec { n, h, w: h + 1, c, k, max };
        let mut g = Lcg(seed);
        let x = to_f64(&g.vec(s.input_len(), 1.0));
        let dy = to_f64(&g.vec(s.output_len(), 1.0));
        let f = |x: &[f64]| conv::reference::pool(&s, x).iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>();
        let analytic = conv::reference::pool_backward(&s, &x, &dy);
        for i in 0..x.len() {
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += 1e-7;
            down[i] -= 1e-7;
            let numeric = (f(&up) - f(&down)) / 2e-7;
            prop_assert!((numeric - analytic[i]).abs() < 1e-6, "element {}: {} vs {}", i, numeric, analytic[i]);
        }
    }
}
