//! Sparse top-k teachers (`docs/LOSSES.md` section 10) on every backend: random cases drawn by
//! proptest against the f64 reference (odd sizes, k = 1 and k = C, extreme logits, masked rows,
//! every dtype, tail and divergence), the reference's gradient by finite differences, the
//! reference against the dense loss of the densified teacher (renormalize: `-inf` outside the
//! support; uniform: the uniform fill), the same bits for any thread count, and the errors of bad
//! input. Outputs are poisoned with NaN.

use crate::common;

use common::{assert_close, assert_close_abs, to_f64, Lcg};
use distillation::half::{bf16, f16};
use distillation::ops::sparse::{check_sparse_teacher, reference::sparse_kd as reference};
use distillation::{
    Backend, CpuBackend, Divergence, DivergenceSpec, Dtype, Error, FastCpuBackend, GradOut,
    HostSlice, LossOut, Reduction, RowShape, SparseKdLoss, SparseSpec, SparseTail, SparseValues,
    TeacherInput, IGNORE_INDEX,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// One drawn case.
#[derive(Clone, Debug)]
struct Case {
    spec: SparseSpec,
    s: Vec<f32>,
    idx: Vec<i32>,
    vals: Vec<f32>,
    labels: Option<Vec<i32>>,
    s_dtype: Dtype,
    v_dtype: Dtype,
}

struct Got {
    loss: f32,
    rows: Vec<f32>,
    grad: Vec<f32>,
}

fn rounded(v: &[f32], d: Dtype) -> Vec<f32> {
    match d {
        Dtype::F32 => v.to_vec(),
        Dtype::Bf16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        Dtype::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
    }
}

fn upload<B: Backend>(b: &B, v: &[f32], d: Dtype) -> B::Buffer {
    match d {
        Dtype::F32 => b.upload(v),
        Dtype::Bf16 => b.upload_host(HostSlice::Bf16(
            &v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(),
        )),
        Dtype::F16 => b.upload_host(HostSlice::F16(
            &v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(),
        )),
    }
    .unwrap()
}

/// Runs the case on `b` (gradient into an f32 buffer, or in place over an f32 student).
fn run<B: Backend>(b: &B, c: &Case, in_place: bool) -> distillation::Result<Got> {
    let spec = &c.spec;
    let (n, len) = (spec.shape.rows, spec.shape.len());
    let s = upload(b, &c.s, c.s_dtype);
    let v = upload(b, &c.vals, c.v_dtype);
    let idx = b.upload_labels(&c.idx)?;
    let labels = c.labels.as_ref().map(|l| b.upload_labels(l)).transpose()?;
    let (loss, rows, g) = (
        b.filled(1, f32::NAN)?,
        b.filled(n, f32::NAN)?,
        b.filled(len, f32::NAN)?,
    );
    let out = LossOut {
        loss: &loss,
        row_loss: Some(&rows),
        grad_student: if in_place {
            GradOut::InPlace
        } else {
            GradOut::Into(&g)
        },
        grad_teacher: None,
    };
    b.sparse_kd(spec, &s, &idx, &v, labels.as_ref(), out)?;
    Ok(Got {
        loss: b.download(&loss)?[0],
        rows: b.download(&rows)?,
        grad: b.download(if in_place { &s } else { &g })?,
    })
}

fn want(c: &Case) -> distillation::ops::RowLossResult {
    reference(
        &c.spec,
        &to_f64(&rounded(&c.s, c.s_dtype)),
        &c.idx,
        &to_f64(&rounded(&c.vals, c.v_dtype)),
        c.labels.as_deref(),
    )
}

/// The teacher's top-k (or, `random_support`, k random classes) of `t`'s log-softmax, as
/// log-probabilities or as the logits themselves.
fn teacher_of(
    t: &[f32],
    c: usize,
    k: usize,
    logits: bool,
    random_support: bool,
    g: &mut Lcg,
) -> (Vec<i32>, Vec<f32>) {
    let (mut idx, mut vals) = (Vec::new(), Vec::new());
    for row in t.chunks(c) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        let mut order: Vec<usize> = (0..c).collect();
        if random_support {
            for i in (1..c).rev() {
                let j = ((g.next_f32() * 0.5 + 0.5) * (i + 1) as f32) as usize % (i + 1);
                order.swap(i, j);
            }
        } else {
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        }
        for &j in &order[..k] {
            idx.push(j as i32);
            vals.push(if logits {
                row[j]
            } else {
                (row[j] as f64 - lse) as f32
            });
        }
    }
    (idx, vals)
}

fn dtype_of(i: u8) -> Dtype {
    [Dtype::F32, Dtype::Bf16, Dtype::F16][i as usize % 3]
}

/// A case from drawn parameters (the combinations validation refuses are mapped to accepted ones).
#[allow(clippy::too_many_arguments)]
fn make_case(
    n: usize,
    c: usize,
    k_pick: usize,
    div_pick: u8,
    tail_pick: u8,
    logits: bool,
    temp: f32,
    scale: f32,
    alpha: f32,
    eps: f32,
    mask: bool,
    dtypes: (u8, u8),
    seed: u64,
) -> Case {
    let mut g = Lcg(seed);
    let k = match k_pick % 4 {
        0 => 1,
        1 => c.min(1024),
        _ => 1 + k_pick % c.min(64),
    };
    let divergence = match div_pick % 3 {
        0 => Divergence::ForwardKl,
        1 => Divergence::ReverseKl,
        _ => Divergence::Jsd {
            beta: [0.5, 0.1, 0.9, 1e-3][(div_pick / 3) as usize % 4],
        },
    };
    let mut tail = [
        SparseTail::Renormalize,
        SparseTail::Bucket,
        SparseTail::Uniform,
    ][tail_pick as usize % 3];
    let values = if logits {
        tail = SparseTail::Renormalize;
        SparseValues::Logits
    } else {
        SparseValues::LogProbs
    };
    let divergence =
        if divergence == Divergence::ReverseKl && tail == SparseTail::Renormalize && k < c {
            if logits {
                Divergence::ForwardKl
            } else {
                tail = SparseTail::Bucket;
                divergence
            }
        } else {
            divergence
        };
    let s = g.vec(n * c, scale);
    // A teacher related to the student (as a trained one is) plus its own noise.
    let t: Vec<f32> = s
        .iter()
        .zip(g.vec(n * c, scale))
        .map(|(&a, b)| 0.5 * a + b)
        .collect();
    let (idx, vals) = teacher_of(&t, c, k, logits, seed.is_multiple_of(3), &mut g);
    let labels = if alpha > 0.0 || mask {
        Some(
            (0..n)
                .map(|r| {
                    if mask && r % 2 == 1 {
                        IGNORE_INDEX
                    } else {
                        (g.next_f32().abs() * c as f32) as i32 % c as i32
                    }
                })
                .collect(),
        )
    } else {
        None
    };
    let spec = SparseSpec {
        divergence,
        values,
        tail,
        alpha: if labels.is_some() { alpha } else { 0.0 },
        label_smoothing: eps,
        reduction: [Reduction::BatchMean, Reduction::Sum, Reduction::None][seed as usize % 3],
        grad_scale: 1.5,
        ..SparseSpec::new(RowShape::new(n, c), k, temp)
    };
    Case {
        spec,
        s,
        idx,
        vals,
        labels,
        s_dtype: dtype_of(dtypes.0),
        v_dtype: dtype_of(dtypes.1),
    }
}

fn check_case<B: Backend>(b: &B, c: &Case) -> Result<(), String> {
    c.spec.validate().map_err(|e| e.to_string())?;
    let vals = rounded(&c.vals, c.v_dtype);
    if check_sparse_teacher(&c.spec, &c.idx, &vals, c.labels.as_deref()).is_err() {
        // (reverse KL with no tail mass left after rounding: an error everywhere, tested below)
        return Ok(());
    }
    let got = run(b, c, false).map_err(|e| e.to_string())?;
    // On the device (f32, subnormals flushed) reverse KL against a tail mass below 1e-30 sees a
    // tail of 0: that row is +inf (docs/LOSSES.md section 10), not compared.
    if on_device(b)
        && c.spec.divergence == Divergence::ReverseKl
        && c.spec.tail != SparseTail::Renormalize
        && c.spec.k < c.spec.shape.cols
        && c.spec.values == SparseValues::LogProbs
    {
        let k = c.spec.k;
        for r in 0..c.spec.shape.rows {
            if c.labels
                .as_ref()
                .is_some_and(|l| l[r] == c.spec.ignore_index)
            {
                continue;
            }
            let v = to_f64(&vals[r * k..(r + 1) * k]);
            let (_, m) = distillation::ops::sparse::teacher_row(&c.spec, &v).unwrap();
            if m < 1e-30 {
                if got.rows[r].is_nan() {
                    return Err(format!("row {r}: tail mass {m}: got NaN, want +inf"));
                }
                return Ok(());
            }
        }
    }
    let w = want(c);
    // Absolute floors at the f32 resolution of the terms: the loss is T^2 times sums of terms
    // of order 1, the gradient `grad_scale T` times differences of probabilities (a row whose
    // exact gradient is 1e-15, a teacher and a student both one-hot, gets f32's 1e-8 there).
    let tol = 2e-4;
    let t = (c.spec.temperature as f64).max(1.0);
    let (mut atol_loss, mut atol_grad) = (1e-6 * t * t, 1e-7 * c.spec.grad_scale as f64 * t);
    if on_device(b) {
        // f32 log-probabilities (no f64 on the device): the terms' logs resolve to f32's ulp of
        // the largest |log q| on the support (1000 for logits 1e4 at T = 20, where reverse KL's
        // p (log(p / q) - RKL) cancels to ~1e-4 of its parts).
        let k = c.spec.k;
        let lmax = vals
            .chunks(k)
            .map(|r| {
                let mx = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                r.iter()
                    .filter(|v| v.is_finite())
                    .map(|&v| ((mx - v) / c.spec.temperature) as f64)
                    .fold(0.0, f64::max)
            })
            .fold(1.0, f64::max);
        atol_loss = atol_loss.max(2e-7 * t * t * lmax);
        atol_grad = atol_grad.max(2e-7 * c.spec.grad_scale as f64 * t * lmax);
    }
    assert_close_abs("loss", &[got.loss], &[w.loss], tol, atol_loss)?;
    assert_close_abs("row_loss", &got.rows, &w.row_loss, tol, atol_loss)?;
    assert_close_abs("grad", &got.grad, &w.grad_student, tol, atol_grad)?;
    Ok(())
}

fn proptest_against_the_reference<B: Backend>(b: &B) {
    let mut runner = TestRunner::new(Config {
        cases: 160,
        ..Config::default()
    });
    let sizes = prop_oneof![
        4 => (1usize..5, 1usize..70),
        2 => (1usize..4, 70usize..400),
        1 => (1usize..3, 1000usize..2600),
    ];
    let strategy = (
        sizes,
        (0usize..1000, any::<u8>(), any::<u8>(), any::<bool>()),
        (
            prop_oneof![
                Just(1.0f32),
                Just(4.0),
                Just(0.05),
                Just(20.0),
                Just(30.0),
                0.3f32..8.0
            ],
            prop_oneof![Just(1.0f32), Just(8.0), Just(300.0), Just(1e4)],
        ),
        (
            prop_oneof![Just(0.0f32), Just(0.3), 0.0f32..=1.0],
            prop_oneof![Just(0.0f32), Just(0.1)],
            any::<bool>(),
            (any::<u8>(), any::<u8>()),
            any::<u64>(),
        ),
    );
    runner
        .run(
            &strategy,
            |((n, c), (kp, dp, tp, lg), (temp, scale), (alpha, eps, mask, dt, seed))| {
                let case = make_case(
                    n, c, kp, dp, tp, lg, temp, scale, alpha, eps, mask, dt, seed,
                );
                check_case(b, &case).map_err(|m| {
                    TestCaseError::fail(format!(
                        "{m}\n{:?} {:?} {:?}",
                        case.spec, case.s_dtype, case.v_dtype
                    ))
                })
            },
        )
        .unwrap();
}

/// Every divergence and tail, by name, on a few fixed shapes (k = 1, k = C, several blocks).
fn every_combination<B: Backend>(b: &B) {
    let mut seed = 7;
    for &(n, c) in &[(3usize, 5usize), (2, 37), (2, 1031), (1, 3000)] {
        for kp in [0usize, 1, 2, 3] {
            for dp in [0u8, 1, 2, 5] {
                for tp in 0..3u8 {
                    for lg in [false, true] {
                        seed += 1;
                        let case = make_case(
                            n,
                            c,
                            kp,
                            dp,
                            tp,
                            lg,
                            2.0,
                            4.0,
                            0.25,
                            0.1,
                            true,
                            (0, 0),
                            seed,
                        );
                        check_case(b, &case).unwrap_or_else(|m| panic!("{m}\n{:?}", case.spec));
                    }
                }
            }
        }
    }
}

fn in_place_and_half_gradients<B: Backend>(b: &B) {
    for tp in 0..3u8 {
        let case = make_case(
            3,
            301,
            2,
            2,
            tp,
            false,
            2.0,
            4.0,
            0.3,
            0.0,
            true,
            (1, 1),
            11,
        );
        let w = want(&case);
        // In place over an f32 student.
        let mut c32 = case.clone();
        c32.s_dtype = Dtype::F32;
        let got = run(b, &c32, true).unwrap();
        assert_close("in-place grad", &got.grad, &want(&c32).grad_student, 2e-4).unwrap();
        // A bf16 gradient into a bf16 buffer: within bf16 rounding of the exact one.
        let s = upload(b, &case.s, Dtype::Bf16);
        let v = upload(b, &case.vals, Dtype::Bf16);
        let g = b
            .filled_as(Dtype::Bf16, case.spec.shape.len(), f32::NAN)
            .unwrap();
        let loss = b.filled(1, f32::NAN).unwrap();
        let l = b.upload_labels(case.labels.as_ref().unwrap()).unwrap();
        b.sparse_kd(
            &case.spec,
            &s,
            &b.upload_labels(&case.idx).unwrap(),
            &v,
            Some(&l),
            LossOut {
                loss: &loss,
                row_loss: None,
                grad_student: GradOut::Into(&g),
                grad_teacher: None,
            },
        )
        .unwrap();
        assert_close("bf16 grad", &b.download(&g).unwrap(), &w.grad_student, 6e-3).unwrap();
        assert_close("loss", &b.download(&loss).unwrap(), &[w.loss], 2e-4).unwrap();
    }
}

fn bad_rows_are_nan<B: Backend>(b: &B) {
    let mut case = make_case(3, 40, 2, 0, 1, false, 2.0, 4.0, 0.0, 0.0, false, (0, 0), 5);
    case.s[40 + 3] = f32::NAN;
    let got = run(b, &case, false).unwrap();
    assert!(got.rows[1].is_nan() && got.loss.is_nan());
    assert!(got.grad[40..80].iter().all(|v| v.is_nan()));
    assert!(got.rows[0].is_finite() && got.grad[..40].iter().all(|v| v.is_finite()));
}

/// Every tail and divergence from T = 0.01 to 30 (the wgpu kernel's maximum), at mild and
/// extreme logits.
fn temperatures_from_tiny_to_the_maximum<B: Backend>(b: &B) {
    let mut seed = 900;
    for temp in [0.01f32, 0.05, 0.3, 1.0, 5.0, 20.0, 30.0] {
        for (c, scale) in [(37usize, 4.0f32), (300, 8.0), (11, 300.0)] {
            for tp in 0..3u8 {
                for dp in [0u8, 1, 2] {
                    seed += 1;
                    let case = make_case(
                        2,
                        c,
                        2,
                        dp,
                        tp,
                        false,
                        temp,
                        scale,
                        0.2,
                        0.1,
                        true,
                        (0, 0),
                        seed,
                    );
                    check_case(b, &case)
                        .unwrap_or_else(|m| panic!("T = {temp}: {m}\n{:?}", case.spec));
                }
            }
        }
    }
}

/// Teachers whose top-k holds all but 1e-3 .. 1e-6 of the mass, spread over several entries (the
/// tail mass 1 - sum e^l cancels), against students that agree, are confident on the support
/// (their own mass outside it ~1e-7 or less) or put it elsewhere.
fn confident_rows_and_small_tails<B: Backend>(b: &B) {
    let (n, c, k) = (3usize, 50usize, 3usize);
    for tail_mass in [1e-3f64, 1e-5, 1e-6] {
        let probs = [0.5, 0.3, 0.2 - tail_mass];
        let mut idx = Vec::new();
        let mut vals = Vec::new();
        for r in 0..n {
            for (i, &q) in probs.iter().enumerate() {
                idx.push((7 * r + 13 * i) as i32 % c as i32);
                vals.push(q.ln() as f32);
            }
        }
        for student in 0..3 {
            let mut s = vec![0.0f32; n * c];
            for r in 0..n {
                for i in 0..k {
                    let j = idx[r * k + i] as usize;
                    s[r * c + j] = match student {
                        0 => probs[i].ln() as f32 + 3.0,
                        1 => 20.0 + i as f32,
                        _ => -5.0,
                    };
                }
            }
            for tail in [SparseTail::Bucket, SparseTail::Uniform] {
                for div in [
                    Divergence::ForwardKl,
                    Divergence::ReverseKl,
                    Divergence::Jsd { beta: 0.5 },
                    Divergence::Jsd { beta: 1e-3 },
                ] {
                    for temp in [1.0f32, 2.0] {
                        let case = Case {
                            spec: SparseSpec {
                                divergence: div,
                                tail,
                                ..SparseSpec::new(RowShape::new(n, c), k, temp)
                            },
                            s: s.clone(),
                            idx: idx.clone(),
                            vals: vals.clone(),
                            labels: None,
                            s_dtype: Dtype::F32,
                            v_dtype: Dtype::F32,
                        };
                        check_case(b, &case).unwrap_or_else(|m| {
                            panic!("tail {tail_mass}, student {student}: {m}\n{:?}", case.spec)
                        });
                    }
                }
            }
        }
    }
}

/// The same input gives the same bits twice.
fn same_bits_twice<B: Backend>(b: &B) {
    let case = make_case(5, 1031, 2, 2, 2, false, 2.0, 4.0, 0.3, 0.1, true, (0, 1), 9);
    let (x, y) = (run(b, &case, false).unwrap(), run(b, &case, false).unwrap());
    assert_eq!(x.loss.to_bits(), y.loss.to_bits());
    assert!(x
        .grad
        .iter()
        .zip(&y.grad)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(x
        .rows
        .iter()
        .zip(&y.rows)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

/// Whether `b` is a device backend (it does not read the indices and values back: a bad entry
/// makes its row NaN instead of an `Err`).
fn on_device<B: Backend>(b: &B) -> bool {
    b.name().starts_with("wgpu") || b.name().starts_with("cuda")
}

fn errors_of_bad_input<B: Backend>(b: &B) {
    let base = make_case(2, 10, 2, 0, 1, false, 2.0, 4.0, 0.5, 0.0, false, (0, 0), 3);
    let k = base.spec.k;
    let c = base.spec.shape.cols;
    let expect = |case: &Case, what: &str| {
        let e = match run(b, case, false) {
            Err(e) => e,
            Ok(_) => panic!("{what}: no error"),
        };
        let msg = e.to_string();
        eprintln!("{what}: {msg}");
        e
    };
    // A bad entry of the teacher (or label): an `Err` naming the row on the CPU backends; on the
    // device the row's loss and gradient NaN, the other row untouched (never an access out of
    // bounds).
    let bad_row = |case: &Case, what: &str, row: usize| {
        if on_device(b) {
            let got = run(b, case, false).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(got.rows[row].is_nan(), "{what}: row {row} {:?}", got.rows);
            assert!(
                got.grad[row * c..(row + 1) * c].iter().all(|v| v.is_nan()),
                "{what}"
            );
            let other = 1 - row;
            assert!(got.rows[other].is_finite(), "{what}: {:?}", got.rows);
            assert!(got.grad[other * c..(other + 1) * c]
                .iter()
                .all(|v| v.is_finite()));
        } else {
            let e = expect(case, what);
            match e {
                Error::Input { row: r, .. } => assert_eq!(r, row, "{what}"),
                Error::Label { .. } => {}
                e => panic!("{what}: {e}"),
            }
        }
    };
    // Duplicate and out-of-range indices.
    let mut c2 = base.clone();
    c2.idx[k + 1] = c2.idx[k];
    bad_row(&c2, "duplicate", 1);
    let mut c2 = base.clone();
    c2.idx[0] = 10;
    bad_row(&c2, "out of range", 0);
    let mut c2 = base.clone();
    c2.idx[1] = -1;
    bad_row(&c2, "negative", 0);
    let mut c2 = base.clone();
    c2.idx[k] = i32::MAX;
    bad_row(&c2, "i32::MAX", 1);
    // Values.
    let mut c2 = base.clone();
    c2.vals[1] = f32::NAN;
    bad_row(&c2, "NaN value", 0);
    let mut c2 = base.clone();
    c2.vals[1] = f32::INFINITY;
    bad_row(&c2, "+inf log-prob", 0);
    let mut c2 = base.clone();
    c2.vals[..k].fill(f32::NEG_INFINITY);
    bad_row(&c2, "all -inf", 0);
    if !on_device(b) {
        // (unchecked on the device: a sum above 1 is a tail mass of 0 there)
        let mut c2 = base.clone();
        c2.vals[0] = -0.01;
        c2.vals[1] = -0.01;
        assert!(matches!(expect(&c2, "sum above 1"), Error::Input { .. }));
        let mut c2 = base.clone();
        c2.vals[0] = 0.5;
        assert!(matches!(
            expect(&c2, "log-prob above 0"),
            Error::Input { .. }
        ));
    }
    // A -inf entry among finite ones is a probability of 0: fine.
    let mut c2 = base.clone();
    c2.vals[1] = f32::NEG_INFINITY;
    check_case(b, &c2).unwrap();
    // ... except under reverse KL, which is +inf there (the student has mass on every class).
    c2.spec.divergence = Divergence::ReverseKl;
    bad_row(&c2, "reverse KL, -inf on the support", 0);
    // Logits must be finite.
    let mut c2 = base.clone();
    c2.spec.values = SparseValues::Logits;
    c2.spec.tail = SparseTail::Renormalize;
    c2.vals[k + 1] = f32::NEG_INFINITY;
    bad_row(&c2, "logit -inf", 1);
    // The spec: k > C, k = 0, k > 1024, logits with a tail, reverse KL renormalised.
    for kk in [0, 11] {
        let mut c = base.clone();
        c.spec.k = kk;
        assert!(matches!(expect(&c, "k"), Error::Param { name: "k", .. }));
    }
    let big = SparseSpec::new(RowShape::new(1, 2000), 1025, 1.0);
    assert!(matches!(
        big.validate(),
        Err(Error::Param { name: "k", .. })
    ));
    let mut c = base.clone();
    c.spec.values = SparseValues::Logits;
    assert!(matches!(
        expect(&c, "logits + bucket"),
        Error::Unsupported(_)
    ));
    let mut c = base.clone();
    c.spec.divergence = Divergence::ReverseKl;
    c.spec.tail = SparseTail::Renormalize;
    assert!(matches!(
        expect(&c, "reverse KL renormalised"),
        Error::Unsupported(_)
    ));
    // Reverse KL against a tail with no mass.
    let mut c = base.clone();
    c.spec.divergence = Divergence::ReverseKl;
    c.vals[0] = -1e-9;
    c.vals[1] = 0.0;
    if on_device(b) {
        // (+inf there, as the reference's value)
        let got = run(b, &c, false).unwrap();
        assert_eq!(got.rows[0], f32::INFINITY, "{:?}", got.rows);
    } else {
        assert!(matches!(
            expect(&c, "reverse KL, no tail"),
            Error::Input { row: 0, .. }
        ));
    }
    // alpha > 0 without labels; lengths.
    let mut c = base.clone();
    c.labels = None;
    assert!(matches!(expect(&c, "no labels"), Error::Unsupported(_)));
    let mut c = base.clone();
    c.idx.pop();
    assert!(matches!(expect(&c, "indices length"), Error::Shape { .. }));
    let mut c = base.clone();
    c.labels = Some(vec![0, 12]);
    bad_row(&c, "label", 1);
}

/// Every body runs on the CPU backends (the reference and the fast one) and on wgpu (its
/// kernel `sparse.wgsl`; skipped without an adapter unless `DISTILLATION_REQUIRE` lists wgpu).
macro_rules! sparse_backend_tests {
    ($($body:ident),* $(,)?) => {
        mod cpu {
            $( #[test] fn $body() { super::$body(&distillation::CpuBackend) } )*
        }
        mod cpu_fast {
            $( #[test] fn $body() { super::$body(&distillation::FastCpuBackend::new()) } )*
        }
        mod wgpu {
            $( #[test] fn $body() { if let Some(b) = super::common::wgpu() { super::$body(b) } } )*
        }
    };
}

sparse_backend_tests!(
    proptest_against_the_reference,
    every_combination,
    in_place_and_half_gradients,
    bad_rows_are_nan,
    errors_of_bad_input,
    temperatures_from_tiny_to_the_maximum,
    confident_rows_and_small_tails,
    same_bits_twice,
);

/// The wgpu kernel takes T up to `GIVEN_TEACHER_MAX_TEMPERATURE` (30) and says so above.
#[test]
fn wgpu_rejects_temperatures_above_its_maximum() {
    if let Some(b) = common::wgpu() {
        let max = distillation::backend::wgpu::GIVEN_TEACHER_MAX_TEMPERATURE;
        let case = make_case(
            2,
            10,
            2,
            0,
            1,
            false,
            max * 1.5,
            4.0,
            0.0,
            0.0,
            false,
            (0, 0),
            3,
        );
        let e = run(b, &case, false)
            .err()
            .expect("an error above the maximum");
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("temperature"), "{e}");
    }
}

/// More rows than one storage binding holds: the rows run in chunks, the `[N, k]` indices and
/// values bound as windows of the same rows.
#[test]
fn wgpu_rows_in_chunks() {
    if common::wgpu().is_none() {
        return;
    }
    let b = distillation::WgpuBackend::with_options(distillation::backend::wgpu::WgpuOptions {
        max_binding_bytes: Some(64 * 40 * 4 * 2),
        ..Default::default()
    })
    .unwrap();
    for (tp, dt) in [(0u8, (0u8, 0u8)), (1, (1, 2)), (2, (2, 1))] {
        let case = make_case(300, 40, 2, 2, tp, false, 2.0, 4.0, 0.3, 0.1, true, dt, 77);
        check_case(&b, &case).unwrap_or_else(|m| panic!("{m}\n{:?}", case.spec));
    }
}

/// The reference's gradient against central differences of its loss.
#[test]
fn reference_gradient_by_finite_differences() {
    let mut seed = 100;
    for tp in 0..3u8 {
        for dp in [0u8, 1, 2] {
            for (alpha, eps) in [(0.0, 0.0), (0.4, 0.1)] {
                for kp in [0usize, 2, 1] {
                    seed += 1;
                    let mut case = make_case(
                        2,
                        9,
                        kp,
                        dp,
                        tp,
                        false,
                        1.7,
                        3.0,
                        alpha,
                        eps,
                        false,
                        (0, 0),
                        seed,
                    );
                    if check_sparse_teacher(
                        &case.spec,
                        &case.idx,
                        &case.vals,
                        case.labels.as_deref(),
                    )
                    .is_err()
                    {
                        continue;
                    }
                    case.spec.reduction = Reduction::Sum;
                    case.spec.grad_scale = 1.0;
                    let s = to_f64(&case.s);
                    let vals = to_f64(&case.vals);
                    let f = |s: &[f64]| {
                        reference(&case.spec, s, &case.idx, &vals, case.labels.as_deref()).loss
                    };
                    let g = reference(&case.spec, &s, &case.idx, &vals, case.labels.as_deref())
                        .grad_student;
                    for j in 0..s.len() {
                        let h = 1e-5;
                        let (mut a, mut b) = (s.clone(), s.clone());
                        a[j] += h;
                        b[j] -= h;
                        let fd = (f(&a) - f(&b)) / (2.0 * h);
                        assert!(
                            (fd - g[j]).abs() < 1e-6 * (1.0 + g[j].abs()),
                            "{:?}: element {j}: finite differences {fd}, gradient {}",
                            case.spec,
                            g[j]
                        );
                    }
                }
            }
        }
    }
}

/// The renormalize tail is the dense loss with a teacher of `-inf` outside the support, and the
/// uniform tail the dense loss with `m / (C - k)` there (forward KL, reverse KL, JSD; the dense
/// divergence takes the re-tempered log-probabilities with T on the student only).
#[test]
fn the_same_as_the_dense_loss_of_the_densified_teacher() {
    let mut seed = 500;
    for tail in [SparseTail::Renormalize, SparseTail::Uniform] {
        for div in [
            Divergence::ForwardKl,
            Divergence::ReverseKl,
            Divergence::Jsd { beta: 0.3 },
        ] {
            for (n, c, kp) in [(3usize, 7usize, 2usize), (2, 50, 3), (2, 6, 1)] {
                seed += 1;
                let tp = if tail == SparseTail::Uniform { 2 } else { 0 };
                let mut case = make_case(
                    n,
                    c,
                    kp,
                    0,
                    tp,
                    false,
                    1.5,
                    3.0,
                    0.0,
                    0.0,
                    true,
                    (0, 0),
                    seed,
                );
                case.spec.divergence = div;
                if case.spec.validate().is_err() {
                    continue;
                }
                let (k, temp) = (case.spec.k, case.spec.temperature as f64);
                // The densified teacher's log-probabilities.
                let mut dense = vec![0.0f64; n * c];
                for r in 0..n {
                    let vals = to_f64(&case.vals[r * k..(r + 1) * k]);
                    let (lq, m) =
                        distillation::ops::sparse::teacher_row(&case.spec, &vals).unwrap();
                    let fill = if tail == SparseTail::Uniform && c > k {
                        (m / (c - k) as f64).ln()
                    } else {
                        f64::NEG_INFINITY
                    };
                    dense[r * c..(r + 1) * c].fill(fill);
                    for (i, &j) in case.idx[r * k..(r + 1) * k].iter().enumerate() {
                        dense[r * c + j as usize] = lq[i];
                    }
                }
                let dspec = DivergenceSpec {
                    divergence: div,
                    teacher: TeacherInput::LogProbs,
                    reduction: case.spec.reduction,
                    grad_scale: case.spec.grad_scale,
                    ..DivergenceSpec::new(case.spec.shape, temp as f32)
                };
                let d = distillation::ops::divergence::reference::divergence(
                    &dspec,
                    &to_f64(&case.s),
                    &dense,
                    case.labels.as_deref(),
                );
                let w = want(&case);
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + b.abs());
                assert!(
                    close(w.loss, d.loss),
                    "{:?}: loss {} vs dense {}",
                    case.spec,
                    w.loss,
                    d.loss
                );
                for (x, y) in w.grad_student.iter().zip(&d.grad_student) {
                    assert!(close(*x, *y), "{:?}: gradient {x} vs dense {y}", case.spec);
                }
            }
        }
    }
}

/// The fast backend's bits do not depend on its thread count.
#[test]
fn fast_cpu_same_bits_for_any_thread_count() {
    let case = make_case(
        37,
        4099,
        2,
        2,
        2,
        false,
        2.0,
        4.0,
        0.3,
        0.1,
        true,
        (0, 0),
        9,
    );
    let one = run(&FastCpuBackend::new().with_threads(1), &case, false).unwrap();
    for t in [2, 3, 8] {
        let many = run(&FastCpuBackend::new().with_threads(t), &case, false).unwrap();
        assert_eq!(one.loss.to_bits(), many.loss.to_bits());
        assert!(one
            .grad
            .iter()
            .zip(&many.grad)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    let portable = run(&FastCpuBackend::portable().with_threads(2), &case, false).unwrap();
    assert_eq!(one.loss.to_bits(), portable.loss.to_bits());
}

/// The host API: the same numbers as the reference, and its checks.
#[test]
fn host_api() {
    let case = make_case(4, 33, 2, 0, 1, false, 2.0, 4.0, 0.5, 0.1, true, (0, 0), 21);
    let loss = SparseKdLoss {
        tail: case.spec.tail,
        divergence: case.spec.divergence,
        alpha: case.spec.alpha,
        label_smoothing: case.spec.label_smoothing,
        reduction: case.spec.reduction,
        ..SparseKdLoss::new(case.spec.temperature)
    };
    let mut spec = case.spec;
    spec.grad_scale = 1.0;
    let w = reference(
        &spec,
        &to_f64(&case.s),
        &case.idx,
        &to_f64(&case.vals),
        case.labels.as_deref(),
    );
    for out in [
        loss.forward_backward(
            &CpuBackend,
            &case.s,
            &case.idx,
            &case.vals,
            case.labels.as_deref(),
            33,
            case.spec.k,
        )
        .unwrap(),
        loss.forward_backward(
            &FastCpuBackend::new(),
            &case.s,
            &case.idx,
            &case.vals,
            case.labels.as_deref(),
            33,
            case.spec.k,
        )
        .unwrap(),
    ] {
        assert_close("loss", &[out.loss], &[w.loss], 1e-5).unwrap();
        assert_close("grad", &out.grad_student, &w.grad_student, 1e-4).unwrap();
    }
    let mut idx = case.idx.clone();
    idx[3] = 40;
    let e = loss
        .forward_backward(
            &CpuBackend,
            &case.s,
            &idx,
            &case.vals,
            case.labels.as_deref(),
            33,
            case.spec.k,
        )
        .unwrap_err();
    assert!(e.to_string().contains("not in 0..33"), "{e}");
}
