//! `FusedLinearKd` refuses bad input on every backend with an error that names the problem:
//! shapes, missing or unused inputs, labels, the spec's values, aliased outputs; a sparse
//! teacher's k, tail, indices (out of range, repeated: the batch's row named) and values.

use distillation::{
    Backend, Divergence, Error, FusedGrads, FusedLinearKd, Linear, Reduction, SparseTail,
    SparseValues, Teacher,
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
    // A teacher vocabulary whose weight's size would overflow: a Limit error, not a panic.
    let huge_teacher = Teacher::Linear {
        layer: Linear {
            hidden: &hid,
            weight: &w,
            bias: None,
        },
        hidden: h,
        vocab: usize::MAX / 2,
    };
    assert!(matches!(
        err(
            spec.run(b, &student, &huge_teacher, Some(&labels), &grads),
            "V_t x H_t overflows"
        ),
        Error::Limit(_)
    ));
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
        // Weights past 1e6; an upstream gradient whose product with the weights overflows.
        FusedLinearKd::new(h, v, 2.0, 0.5).liger(3e38, 3e38),
        FusedLinearKd {
            grad_scale: 1e31,
            ..spec
        },
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

/// A sparse teacher's bad input: an error before anything is written, naming the batch's row
/// (not the chunk's), on every backend.
fn bad_sparse_teacher_is_an_error<B: Backend>(b: &B) {
    let (n, h, v, k) = (5, 3, 7, 2);
    let spec = FusedLinearKd {
        chunk_rows: 2,
        ..FusedLinearKd::new(h, v, 2.0, 0.5)
    };
    let hid = b.upload(&vec![0.1; n * h]).unwrap();
    let w = b.upload(&vec![0.1; v * h]).unwrap();
    let gh = b.filled(n * h, 0.0).unwrap();
    let gw = b.filled(v * h, 0.0).unwrap();
    let labels = vec![0, 1, 2, 3, 4];
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
    let idx: Vec<i32> = vec![0, 1, 2, 3, 4, 5, 6, 0, 1, 2];
    let lp = vec![
        -1.0f32, -2.0, -0.5, -3.0, -1.0, -1.0, -0.2, -4.0, -1.5, -1.5,
    ];
    let vals = b.upload(&lp).unwrap();
    let run = |spec: &FusedLinearKd,
               idx: &[i32],
               vals: &B::Buffer,
               k: usize,
               values_kind: SparseValues,
               tail: SparseTail| {
        let teacher = Teacher::Sparse {
            indices: idx,
            values: vals,
            k,
            values_kind,
            tail,
        };
        spec.run(b, &student, &teacher, Some(&labels), &grads)
    };
    let lps = SparseValues::LogProbs;
    let ok = run(&spec, &idx, &vals, k, lps, SparseTail::Bucket);
    assert!(ok.is_ok(), "{ok:?}");
    let err = |r: distillation::Result<f32>, what: &str| {
        let e = r.expect_err(what);
        assert!(!e.to_string().is_empty(), "{what}");
        e
    };
    // Out of range and repeated indices, in row 3 (the second chunk's second row).
    for (bad, what) in [(7, "index out of range"), (6, "repeated index")] {
        let mut i = idx.clone();
        i[7] = bad;
        let before = b.download(&gw).unwrap();
        match err(run(&spec, &i, &vals, k, lps, SparseTail::Bucket), what) {
            Error::Input { row, .. } => assert_eq!(row, 3, "{what}"),
            e => panic!("{what}: {e}"),
        }
        assert_eq!(b.download(&gw).unwrap(), before, "{what}: grad_W written");
    }
    let mut i = idx.clone();
    i[9] = -1;
    err(
        run(&spec, &i, &vals, k, lps, SparseTail::Bucket),
        "negative index",
    );
    // Log-probabilities above 0 or summing past 1 (row 4), NaN.
    for (j, x) in [(8, 0.5f32), (9, -0.1), (2, f32::NAN)] {
        let mut l = lp.clone();
        l[j] = x;
        let bad = b.upload(&l).unwrap();
        match err(run(&spec, &idx, &bad, k, lps, SparseTail::Bucket), "values") {
            Error::Input { row, .. } => assert_eq!(row, j / k, "value {x}"),
            e => panic!("value {x}: {e}"),
        }
    }
    // k: 0, above V, not matching the arrays.
    err(run(&spec, &idx, &vals, 0, lps, SparseTail::Bucket), "k = 0");
    err(run(&spec, &idx, &vals, 8, lps, SparseTail::Bucket), "k > V");
    assert!(matches!(
        err(run(&spec, &idx, &vals, 1, lps, SparseTail::Bucket), "k = 1"),
        Error::Shape { .. }
    ));
    assert!(matches!(
        err(
            run(&spec, &idx[..8], &vals, k, lps, SparseTail::Bucket),
            "short indices"
        ),
        Error::Shape { .. }
    ));
    let short = b.upload(&lp[..9]).unwrap();
    assert!(matches!(
        err(
            run(&spec, &idx, &short, k, lps, SparseTail::Bucket),
            "short values"
        ),
        Error::Shape { .. }
    ));
    // A tail with logits; reverse KL with the renormalize tail (k < V).
    err(
        run(
            &spec,
            &idx,
            &vals,
            k,
            SparseValues::Logits,
            SparseTail::Uniform,
        ),
        "tail with logits",
    );
    let rkl = FusedLinearKd {
        divergence: Divergence::ReverseKl,
        ..spec
    };
    err(
        run(&rkl, &idx, &vals, k, lps, SparseTail::Renormalize),
        "reverse KL, renormalize",
    );
    // A sparse teacher for a loss without a divergence term; none for one with it.
    let ce = FusedLinearKd::cross_entropy_only(h, v);
    err(
        run(&ce, &idx, &vals, k, lps, SparseTail::Bucket),
        "unused teacher",
    );
    // The values as an output: grad_h over the values ([N, 3] logits, k = 3).
    let big = b.upload(&vec![-1.0; n * h]).unwrap();
    let idx3: Vec<i32> = (0..n * 3).map(|i| (i % 7) as i32).collect();
    let teacher = Teacher::Sparse {
        indices: &idx3,
        values: &big,
        k: 3,
        values_kind: SparseValues::Logits,
        tail: SparseTail::Renormalize,
    };
    let alias = FusedGrads {
        hidden: Some(&big),
        weight: None,
        bias: None,
    };
    assert!(matches!(
        err(
            spec.run(b, &student, &teacher, Some(&labels), &alias),
            "values aliased"
        ),
        Error::Alias(_)
    ));
}

backend_tests!(bad_input_is_an_error, bad_sparse_teacher_is_an_error);

/// The f64 reference refuses what the fused op refuses (an error, not a panic): a missing label
/// or teacher, a hidden size of 0, a short weight.
#[test]
fn the_reference_checks_its_input() {
    use distillation::ops::fused_linear::reference::{fused_linear_kd, LayerF64, TeacherF64};
    let (h, v) = (2, 3);
    let (x, w, t) = (vec![0.5; 2 * h], vec![0.1; v * h], vec![0.0; 2 * v]);
    fn layer<'a>(x: &'a [f64], w: &'a [f64]) -> LayerF64<'a> {
        LayerF64 {
            hidden: x,
            weight: w,
            bias: None,
        }
    }
    let spec = FusedLinearKd::new(h, v, 2.0, 0.5);
    let labels = [0, 2];
    assert!(fused_linear_kd(
        &spec,
        &layer(&x, &w),
        &TeacherF64::Logits(&t),
        Some(&labels)
    )
    .is_ok());
    let bad = [
        fused_linear_kd(&spec, &layer(&x, &w), &TeacherF64::Logits(&t), None),
        fused_linear_kd(&spec, &layer(&x, &w), &TeacherF64::None, Some(&labels)),
        fused_linear_kd(
            &spec,
            &layer(&x, &w[1..]),
            &TeacherF64::Logits(&t),
            Some(&labels),
        ),
        fused_linear_kd(
            &FusedLinearKd::new(0, v, 2.0, 0.5),
            &layer(&x, &w),
            &TeacherF64::Logits(&t),
            Some(&labels),
        ),
    ];
    for (i, r) in bad.iter().enumerate() {
        assert!(r.is_err(), "bad input {i} was accepted");
    }
}
