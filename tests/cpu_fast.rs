//! The fast CPU backend beyond the shared suite (which runs every test body on it too): both of
//! its matmul micro-kernels against the f64 reference over the packing blocks' edges, repeat
//! runs giving the same bits (also with a thread lent through `help_until`, which splits large
//! matmuls and Adam steps across two threads), and an output that aliases an input being an
//! `Err`.

mod common;

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
