//! `FusedLinearKd` refuses bad input on every backend with an error that names the problem:
//! shapes, missing or unused inputs, labels, the spec's values, aliased outputs.

use crate::common;

use distillation::{
    Backend, Divergence, Error, FusedGrads, FusedLinearKd, Linear, Reduction, Teacher,
};

/// Bad input is an error that names the problem, never a panic.
fn bad_input_is_an_error<B: Backend>(b: &B) {
    let (n, h, v) = (4, 3, 7);
    let spec = FusedLinearKd::new(h, v, 2.0, 0.5);
    let hid = b.upload(&vec![0.1; n * h]).unwrap();
    let w = b.upload(&vec![0.1; v * h]).unwrap();
    let short = b.upload(&vec![0.1; v * h - 1]).unwrap();
    let t = b.upload(&vec![0.0; n * v]).unwrap();
    let gh = b.filled(n * h, 0.0).unwrap();
    let gw = b.filled(v * h, 0.0).unwrap();
    let labels = vec![0, 1, 2, 3];
    let student = Linear {
        hidden: &hid,
        weight: &w,
        bias: None,
    };
    let grads = FusedGrads {
        hidden: Some(&gh),
        weight: Some(&gw),
        bias: None,
    };
    let ok = spec.run(b, &student, &Teacher::Logits(&t), Some(&labels), &grads);
    assert!(ok.is_ok(), "{ok:?}");
    let err = |r: distillation::Result<f32>, what: &str| {
        let e = r.expect_err(what);
        assert!(!e.to_string().is_empty(), "{what}");
        e
    };
    let bad_w = Linear {
        hidden: &hid,
        weight: &short,
        bias: None,
    };
    assert!(matches!(
        err(
            spec.run(b, &bad_w, &Teacher::Logits(&t), Some(&labels), &grads),
            "weight length"
        ),
        Error::Shape { .. }
    ));
    err(
        spec.run(b, &student, &Teacher::Logits(&t), None, &grads),
        "labels missing",
    );
    err(
        spec.run(b, &student, &Teacher::None, Some(&labels), &grads),
        "teacher missing",
    );
    err(
        spec.run(b, &student, &Teacher::Logits(&t), Some(&[0, 1, 2]), &grads),
        "labels short",
    );
    err(
        spec.run(
            b,
            &student,
            &Teacher::Logits(&t),
            Some(&[0, 1, 2, 7]),
            &grads,
        ),
        "label out of range",
    );
    let small_teacher = Teacher::Linear {
        layer: Linear {
            hidden: &hid,
            weight: &short,
            bias: None,
        },
        hidden: h,
        vocab: v - 1,
    };
    err(
        spec.run(b, &student, &small_teacher, Some(&labels), &grads),
        "V_t < V",
    );
    let ce = FusedLinearKd::cross_entropy_only(h, v);
    err(
        ce.run(b, &student, &Teacher::Logits(&t), Some(&labels), &grads),
        "unused teacher",
    );
    for bad in [
        FusedLinearKd::new(h, v, 0.0, 0.5),
        FusedLinearKd::new(h, v, 2.0, 1.5),
        FusedLinearKd::new(h, v, 2.0, 0.5).liger(0.0, 0.0),
        FusedLinearKd::new(h, v, 2.0, 0.5).liger(-1.0, 1.0),
        FusedLinearKd {
            reduction: Reduction::None,
            ..spec
        },
        FusedLinearKd {
            memory_budget: 0,
            ..spec
        },
        FusedLinearKd {
            divergence: Divergence::Jsd { beta: 1.0 },
            ..spec
        },
        FusedLinearKd::new(0, v, 2.0, 0.5),
    ] {
        err(
            bad.run(b, &student, &Teacher::Logits(&t), Some(&labels), &grads),
            "bad spec",
        );
    }
    // An output that is an input, or two outputs in one buffer.
    let alias = FusedGrads {
        hidden: Some(&hid),
        weight: Some(&gw),
        bias: None,
    };
    assert!(matches!(
        err(
            spec.run(b, &student, &Teacher::Logits(&t), Some(&labels), &alias),
            "alias"
        ),
        Error::Alias(_)
    ));
    let twice = FusedGrads {
        hidden: Some(&gh),
        weight: Some(&gh),
        bias: None,
    };
    err(
        spec.run(b, &student, &Teacher::Logits(&t), Some(&labels), &twice),
        "two outputs",
    );
}

backend_tests!(bad_input_is_an_error);
