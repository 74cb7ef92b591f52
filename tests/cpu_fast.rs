//! The fast CPU backend beyond the shared suite (which runs every test body on it too): both of
//! its matmul micro-kernels against the f64 reference over the packing blocks' edges, repeat
//! runs giving the same bits, and an output that aliases an input being an `Err`.

mod common;

use common::check_matmul;
use distillation::backend::cpu_fast::gemm::Kernel;
use distillation::ops::dense::MatmulSpec;
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
