//! The fast CPU backend beyond the shared suite (which runs every test body on it too): both of
//! its matmul micro-kernels against the f64 reference over the packing blocks' edges, repeat
//! runs giving the same bits (also with a thread lent through `help_until`, which splits large
//! matmuls and Adam steps across two threads), and an output that aliases an input being an
//! `Err`.

use crate::common;

use common::check_matmul;
use distillation::backend::cpu_fast::gemm::Kernel;
use distillation::ops::dense::MatmulSpec;
use distillation::ops::optim::AdamSpec;
use distillation::{Backend, Error, FastCpuBackend};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

fn check(b: &FastCpuBackend, spec: MatmulSpec, seed: u64) -> Result<Vec<f32>, String> {
    check_matmul(b, spec, seed, 1e-5)
}

#[test]
fn both_kernels_match_the_reference_on_random_shapes() {
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    // k past one 256-deep block, m past one 96-row block.
    let shapes = (1usize..130, 1usize..600, 1usize..90);
    let s = (
        shapes,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    );
    runner
        .run(&s, |((m, k, n), ta, tb, acc, seed)| {
            let spec = MatmulSpec {
                m,
                k,
                n,
                trans_a: ta,
                trans_b: tb,
                accumulate: acc,
            };
            for b in [FastCpuBackend::new(), FastCpuBackend::portable()] {
                check(&b, spec, seed).map_err(TestCaseError::fail)?;
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn wide_matrices_cross_the_column_block() {
    // n past one 2048-column block of packed B, every layout.
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let spec = MatmulSpec {
            m: 7,
            k: 33,
            n: 2100,
            trans_a: ta,
            trans_b: tb,
            accumulate: ta,
        };
        for b in [FastCpuBackend::new(), FastCpuBackend::portable()] {
            check(&b, spec, 11).unwrap();
        }
    }
}

#[test]
fn same_input_same_bits() {
    let b = FastCpuBackend::new();
    let spec = MatmulSpec {
        trans_b: true,
        ..MatmulSpec::new(45, 300, 70)
    };
    let first = check(&b, spec, 5).unwrap();
    for _ in 0..3 {
        let again = check(&b, spec, 5).unwrap();
        assert!(first
            .iter()
            .zip(&again)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

/// A training step's matmuls (forward, both backward forms) and an Adam step, three times over
/// (Adam state carried), with their outputs.
fn matmuls_and_adam(b: &FastCpuBackend) -> Vec<Vec<f32>> {
    let mut g = common::Lcg(3);
    let (x, w) = (g.vec(64 * 300, 1.0), g.vec(260 * 300, 0.1));
    let (x, w) = (b.upload(&x).unwrap(), b.upload(&w).unwrap());
    let (m, v) = (
        b.filled(260 * 300, 0.0).unwrap(),
        b.filled(260 * 300, 0.0).unwrap(),
    );
    let mut outs = Vec::new();
    for step in 1..=3 {
        let y = b.filled(64 * 260, f32::NAN).unwrap();
        let fwd = MatmulSpec {
            trans_b: true,
            ..MatmulSpec::new(64, 300, 260)
        };
        b.matmul(&fwd, &x, &w, &y).unwrap();
        let dw = b.filled(260 * 300, f32::NAN).unwrap();
        let grad = MatmulSpec {
            trans_a: true,
            ..MatmulSpec::new(260, 64, 300)
        };
        b.matmul(&grad, &y, &x, &dw).unwrap();
        let dx = b.filled(64 * 300, f32::NAN).unwrap();
        b.matmul(&MatmulSpec::new(64, 260, 300), &y, &w, &dx)
            .unwrap();
        let spec = AdamSpec {
            step,
            ..AdamSpec::new(1e-3)
        };
        b.adam_step(&spec, &w, &dw, &m, &v).unwrap();
        for buf in [&y, &dw, &dx, &w, &m, &v] {
            outs.push(b.download(buf).unwrap());
        }
    }
    outs
}

/// The wide Adam forms (AVX2, or AVX-512 where the CPU has it) give the portable loop's bits.
#[test]
fn adam_gives_the_same_bits_on_every_kernel() {
    let mut g = common::Lcg(17);
    // Odd length: a tail past every vector width; weight decay on, large and tiny gradients.
    let n = 4099;
    let (w0, grads) = (g.vec(n, 1.0), g.vec(n, 3.0));
    let grads: Vec<f32> = grads
        .iter()
        .enumerate()
        .map(|(i, &x)| if i % 7 == 0 { x * 1e-6 } else { x })
        .collect();
    let run = |b: &FastCpuBackend| {
        let (w, dw) = (b.upload(&w0).unwrap(), b.upload(&grads).unwrap());
        let (m, v) = (b.filled(n, 0.0).unwrap(), b.filled(n, 0.0).unwrap());
        for step in 1..=4 {
            let spec = AdamSpec {
                step,
                weight_decay: 0.01,
                ..AdamSpec::new(1e-2)
            };
            b.adam_step(&spec, &w, &dw, &m, &v).unwrap();
        }
        [&w, &m, &v].map(|buf| b.download(buf).unwrap())
    };
    let (wide, portable) = (
        run(&FastCpuBackend::new()),
        run(&FastCpuBackend::portable()),
    );
    for (x, y) in wide.iter().zip(&portable) {
        assert!(x.iter().any(|v| *v != 0.0) && x.iter().all(|v| v.is_finite()));
        assert!(
            x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()),
            "the wide Adam step differs from the portable one"
        );
    }
}

#[test]
fn a_lent_thread_gives_the_same_bits() {
    let b = FastCpuBackend::new();
    let alone = matmuls_and_adam(&b);
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Stops the helper however the runs end: a panic unwinds through the scope, which joins
    /// the helper, so without this a failure would hang instead.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let stop = AtomicBool::new(false);
    let helped = std::thread::scope(|s| {
        let _stop = Stop(&stop);
        s.spawn(|| b.help_until(&|| stop.load(Ordering::Acquire)));
        (0..5).map(|_| matmuls_and_adam(&b)).collect::<Vec<_>>()
    });
    for run in helped {
        for (got, want) in run.iter().zip(&alone) {
            assert!(got.iter().all(|v| v.is_finite()));
            assert!(got
                .iter()
                .zip(want)
                .all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }
}

#[test]
fn detected_kernel_is_named() {
    let b = FastCpuBackend::new();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        assert_eq!(b.kernel(), Kernel::Avx2Fma);
    }
    assert!(b.name().starts_with("cpu (f32"), "{}", b.name());
}

#[test]
fn an_output_that_is_an_input_is_an_error() {
    let b = FastCpuBackend::new();
    let x = b.upload(&[1.0; 16]).unwrap();
    let w = b.upload(&[1.0; 16]).unwrap();
    let e = b.matmul(&MatmulSpec::new(4, 4, 4), &x, &w, &w).unwrap_err();
    assert!(matches!(e, Error::Alias(_)), "{e}");
    assert!(e.to_string().contains("separate output"), "{e}");
    let e = b.relu(&x, &x).unwrap_err();
    assert!(matches!(e, Error::Alias(_)), "{e}");
    // The buffers are untouched and usable afterwards.
    assert_eq!(b.download(&x).unwrap(), vec![1.0; 16]);
}

// ---- the row and feature losses ----

use distillation::backend::cpu_fast::rows::Simd;
use distillation::ops as dops;
use distillation::{
    AttentionSpec, CrossEntropySpec, Divergence, DivergenceSpec, DkdSpec, GradOut, HintonSpec,
    LossOut, MseSpec, Reduction, RowShape, SoftmaxSpec, TeacherInput, IGNORE_INDEX,
};

/// Every loss of the fast backend on one input (a masked row, a teacher given three ways, every
/// gradient), its outputs in one list.
fn all_losses(b: &FastCpuBackend, n: usize, c: usize) -> Vec<Vec<f32>> {
    let mut g = common::Lcg(23);
    let (s, t) = (g.vec(n * c, 6.0), g.vec(n * c, 6.0));
    let mut labels: Vec<i32> = (0..n).map(|r| ((r * 7919) % c) as i32).collect();
    labels[n / 2] = IGNORE_INDEX;
    let shape = RowShape::new(n, c);
    let (sb, tb, lb) = (
        b.upload(&s).unwrap(),
        b.upload(&t).unwrap(),
        b.upload_labels(&labels).unwrap(),
    );
    let mut outs = Vec::new();
    let mut take = |bufs: &[&distillation::backend::cpu::CpuBuffer]| {
        for x in bufs {
            outs.push(b.download(x).unwrap());
        }
    };
    let probs = dops::softmax::reference::softmax(&common::to_f64(&t), c, 2.0, false);
    let probs: Vec<f32> = probs.iter().map(|&v| v as f32).collect();
    let pb = b.upload(&probs).unwrap();
    for (div, form) in [
        (Divergence::ForwardKl, TeacherInput::Logits),
        (Divergence::ReverseKl, TeacherInput::Logits),
        (Divergence::Jsd { beta: 0.3 }, TeacherInput::Logits),
        (Divergence::ForwardKl, TeacherInput::Probs),
        (Divergence::Jsd { beta: 0.3 }, TeacherInput::Probs),
    ] {
        let spec = DivergenceSpec {
            divergence: div,
            teacher: form,
            ..DivergenceSpec::new(shape, 3.0)
        };
        let (loss, rows, gs) = (
            b.filled(1, f32::NAN).unwrap(),
            b.filled(n, f32::NAN).unwrap(),
            b.filled(n * c, f32::NAN).unwrap(),
        );
        let gt = b.filled(n * c, f32::NAN).unwrap();
        let logits = form == TeacherInput::Logits;
        let teacher = if logits { &tb } else { &pb };
        let out = LossOut {
            loss: &loss,
            row_loss: Some(&rows),
            grad_student: GradOut::Into(&gs),
            grad_teacher: logits.then_some(&gt),
        };
        b.divergence(&spec, &sb, teacher, Some(&lb), out).unwrap();
        take(&[&loss, &rows, &gs]);
        if logits {
            take(&[&gt]);
        }
    }
    let spec = HintonSpec {
        label_smoothing: 0.1,
        ..HintonSpec::new(shape, 4.0, 0.3)
    };
    let (loss, rows, gt) = (
        b.filled(1, f32::NAN).unwrap(),
        b.filled(n, f32::NAN).unwrap(),
        b.filled(n * c, f32::NAN).unwrap(),
    );
    let s_in_place = b.upload(&s).unwrap();
    let out = LossOut {
        loss: &loss,
        row_loss: Some(&rows),
        grad_student: GradOut::InPlace,
        grad_teacher: Some(&gt),
    };
    b.hinton(&spec, &s_in_place, &tb, &lb, out).unwrap();
    take(&[&loss, &rows, &s_in_place, &gt]);
    let spec = DkdSpec {
        label_smoothing: 0.1,
        ..DkdSpec::new(shape, 4.0, 1.0, 8.0)
    };
    let (loss, rows, gs) = (
        b.filled(1, f32::NAN).unwrap(),
        b.filled(n, f32::NAN).unwrap(),
        b.filled(n * c, f32::NAN).unwrap(),
    );
    let s_in_place = b.upload(&s).unwrap();
    let out = LossOut {
        loss: &loss,
        row_loss: Some(&rows),
        grad_student: GradOut::InPlace,
        grad_teacher: None,
    };
    b.dkd(&spec, &s_in_place, &tb, &lb, out).unwrap();
    b.dkd(&spec, &sb, &tb, &lb, LossOut::with_grad(&loss, &gs))
        .unwrap();
    take(&[&loss, &rows, &s_in_place, &gs]);
    let spec = CrossEntropySpec {
        label_smoothing: 0.05,
        reduction: Reduction::Sum,
        ..CrossEntropySpec::new(shape)
    };
    let (loss, gs) = (
        b.filled(1, f32::NAN).unwrap(),
        b.filled(n * c, f32::NAN).unwrap(),
    );
    b.cross_entropy(&spec, &sb, &lb, LossOut::with_grad(&loss, &gs))
        .unwrap();
    take(&[&loss, &gs]);
    for log in [false, true] {
        let spec = SoftmaxSpec {
            shape,
            temperature: 2.5,
            log,
        };
        let (y, dx) = (
            b.filled(n * c, f32::NAN).unwrap(),
            b.filled(n * c, f32::NAN).unwrap(),
        );
        b.softmax(&spec, &sb, &y).unwrap();
        b.softmax_backward(&spec, &y, &tb, &dx).unwrap();
        take(&[&y, &dx]);
    }
    let spec = MseSpec::new(n * c);
    let (loss, ga, gb) = (
        b.filled(1, f32::NAN).unwrap(),
        b.filled(n * c, f32::NAN).unwrap(),
        b.filled(n * c, f32::NAN).unwrap(),
    );
    b.mse(&spec, &sb, &tb, &loss, Some(&ga), Some(&gb)).unwrap();
    take(&[&loss, &ga, &gb]);
    if c.is_multiple_of(4) {
        let spec = AttentionSpec::new(n, 4, 2, c / 4);
        let tt = b.upload(&t[..n * 2 * (c / 4)]).unwrap();
        let (loss, ga, gb) = (
            b.filled(1, f32::NAN).unwrap(),
            b.filled(n * c, f32::NAN).unwrap(),
            b.filled(n * 2 * (c / 4), f32::NAN).unwrap(),
        );
        b.attention_transfer(&spec, &sb, &tt, &loss, Some(&ga), Some(&gb))
            .unwrap();
        take(&[&loss, &ga, &gb]);
    }
    outs
}

fn same_bits(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            x.iter().all(|v| !v.is_nan()),
            "{what}: output {i} has a NaN"
        );
        let diff = x
            .iter()
            .zip(y)
            .position(|(p, q)| p.to_bits() != q.to_bits());
        assert!(diff.is_none(), "{what}: output {i} differs at {diff:?}");
    }
}

/// Rows shared among threads (many rows) and rows split among threads (two rows of 300k
/// classes, 147 blocks) give the bits of one thread, and every instruction set the same bits.
#[test]
fn losses_give_the_same_bits_for_any_thread_count_and_instruction_set() {
    for (n, c) in [(64, 5000), (2, 300_000), (3, 12)] {
        let one = all_losses(&FastCpuBackend::new().with_threads(1), n, c);
        for threads in [2, 3, 5] {
            let b = FastCpuBackend::new().with_threads(threads);
            same_bits(
                &all_losses(&b, n, c),
                &one,
                &format!("{n}x{c}, {threads} threads"),
            );
        }
        for simd in [Simd::Portable, Simd::Avx2, Simd::Avx512] {
            if let Ok(b) = FastCpuBackend::new().with_threads(2).with_simd(simd) {
                same_bits(&all_losses(&b, n, c), &one, &format!("{n}x{c}, {simd:?}"));
            }
        }
    }
}

/// Few long rows (the rows split among threads): Hinton, DKD and the divergences against the f64
/// reference, with a block-sized spread of maxima (a large logit far into the row).
#[test]
fn long_rows_match_the_reference() {
    let b = FastCpuBackend::new().with_threads(4);
    let (n, c) = (2, 262_144);
    let mut g = common::Lcg(41);
    let (mut s, mut t) = (g.vec(n * c, 4.0), g.vec(n * c, 4.0));
    s[200_000] = 40.0;
    t[c + 5] = 35.0;
    let labels = vec![7, 250_000];
    let (sd, td) = (common::to_f64(&s), common::to_f64(&t));
    let (sb, tb, lb) = (
        b.upload(&s).unwrap(),
        b.upload(&t).unwrap(),
        b.upload_labels(&labels).unwrap(),
    );
    for temperature in [1.0f32, 4.0, 1000.0] {
        // The suite's per-element floor for gradients (tests/suite/kernels.rs, `grad_unit`): f32
        // resolves `q (log q - log p - KL)` to about 1e-7 of the largest |logit| / T (times
        // max(T, 1) / N_valid), here where the teacher's top class nearly cancels.
        let atol =
            1e-6 * (temperature.max(1.0) as f64) / n as f64 * (40.0 / temperature as f64).max(1.0);
        let close = |what: &str, got: &[f32], want: &[f64]| {
            common::assert_close_abs(what, got, want, 1e-4, atol).unwrap()
        };
        let spec = HintonSpec::new(RowShape::new(n, c), temperature, 0.5);
        let (loss, gs, gt) = (
            b.filled(1, f32::NAN).unwrap(),
            b.filled(n * c, f32::NAN).unwrap(),
            b.filled(n * c, f32::NAN).unwrap(),
        );
        let out = LossOut {
            grad_teacher: Some(&gt),
            ..LossOut::with_grad(&loss, &gs)
        };
        b.hinton(&spec, &sb, &tb, &lb, out).unwrap();
        let want = dops::hinton::reference::hinton(&spec, &sd, &td, &labels);
        common::assert_close("loss", &b.download(&loss).unwrap(), &[want.loss], 1e-4).unwrap();
        close("grad", &b.download(&gs).unwrap(), &want.grad_student);
        close("grad t", &b.download(&gt).unwrap(), &want.grad_teacher);
        let spec = DkdSpec::new(RowShape::new(n, c), temperature, 1.0, 8.0);
        b.dkd(&spec, &sb, &tb, &lb, LossOut::with_grad(&loss, &gs))
            .unwrap();
        let want = dops::dkd::reference::dkd(&spec, &sd, &td, &labels);
        common::assert_close("dkd loss", &b.download(&loss).unwrap(), &[want.loss], 1e-4).unwrap();
        close("dkd grad", &b.download(&gs).unwrap(), &want.grad_student);
        for div in [Divergence::ReverseKl, Divergence::Jsd { beta: 0.5 }] {
            let spec = DivergenceSpec {
                divergence: div,
                ..DivergenceSpec::new(RowShape::new(n, c), temperature)
            };
            b.divergence(&spec, &sb, &tb, None, LossOut::with_grad(&loss, &gs))
                .unwrap();
            let want = dops::divergence::reference::divergence(&spec, &sd, &td, None);
            let what = format!("{div:?} at T = {temperature}");
            common::assert_close(&what, &b.download(&loss).unwrap(), &[want.loss], 1e-4).unwrap();
            close(&what, &b.download(&gs).unwrap(), &want.grad_student);
        }
    }
}

/// bf16 and f16 operands, converted exactly while packing: the f32 result of the converted
/// values (the AVX2 transposed panels of bf16 included).
#[test]
fn gemm_half_operands_match_the_reference() {
    use distillation::backend::cpu_fast::gemm::{sgemm, Kernel};
    use distillation::half::{bf16, f16};
    use distillation::ops::dense::reference::matmul as matmul_reference;
    use distillation::ops::dense::MatmulSpec;
    for kernel in [Kernel::Portable, Kernel::detect()] {
        for (m, k, n) in [(7, 3, 17), (13, 300, 40), (33, 257, 100)] {
            for (ta, tb) in [(false, true), (true, false), (false, false)] {
                let spec = MatmulSpec {
                    m,
                    k,
                    n,
                    trans_a: ta,
                    trans_b: tb,
                    accumulate: false,
                };
                let a: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7919 % 23) as f32 - 11.0) / 8.0)
                    .collect();
                let b: Vec<f32> = (0..k * n)
                    .map(|i| ((i * 104729 % 31) as f32 - 15.0) / 16.0)
                    .collect();
                let ab: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
                let bb: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
                let bh: Vec<f16> = b.iter().map(|&x| f16::from_f32(x)).collect();
                let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                let a_r: Vec<f32> = ab.iter().map(|x| x.to_f32()).collect();
                for (b_r, got) in [
                    (bb.iter().map(|x| x.to_f32()).collect::<Vec<f32>>(), {
                        let mut c = vec![f32::NAN; m * n];
                        sgemm(kernel, &spec, &ab, &bb, &mut c);
                        c
                    }),
                    (bh.iter().map(|x| x.to_f32()).collect(), {
                        let mut c = vec![f32::NAN; m * n];
                        sgemm(kernel, &spec, &ab, &bh, &mut c);
                        c
                    }),
                ] {
                    let mut want = vec![0.0; m * n];
                    matmul_reference(&spec, &f64s(&a_r), &f64s(&b_r), &mut want);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{spec:?} {kernel:?} element {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
