//! Every loss kernel on every available backend over a ladder of shapes, with the minimal memory
//! traffic as criterion's throughput (so it reports GB/s), and the same losses composed from
//! unfused kernels on the same backend beside them; plus one training step of the default MLP.
//! Timings include waiting for the device.
//!
//! `cargo bench --bench losses`; `DISTILLATION_BENCH_LARGE=1` adds 8192x32000 and 16384x131072
//! (GPU shapes). The CPU backends (the f64 reference, and the fast one whose losses are the
//! reference's) run the two small shapes only.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use distillation::nn::{Mlp, Optimizer};
use distillation::rng::Rng;
use distillation::tape::{Tape, Tensor};
use distillation::{
    AttentionSpec, Backend, CpuBackend, CrossEntropySpec, Divergence, DivergenceSpec,
    FastCpuBackend, GradOut, HintonSpec, LossOut, MseSpec, RowShape, SoftmaxSpec, TeacherInput,
    WgpuBackend,
};

fn shapes(gpu: bool) -> Vec<(usize, usize)> {
    let mut v = vec![(64, 10), (1024, 1000)];
    if gpu {
        v.push((4096, 32000));
        if std::env::var("DISTILLATION_BENCH_LARGE").is_ok() {
            v.extend([(8192, 32000), (16384, 131072)]);
        }
    }
    v
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.range(-4.0, 4.0) as f32).collect()
}

fn bench_backend<B: Backend>(c: &mut Criterion, b: &B, tag: &str, gpu: bool) {
    let mut group = c.benchmark_group(format!("losses/{tag}"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (n, cls) in shapes(gpu) {
        let shape = RowShape::new(n, cls);
        let nc = (n * cls) as u64;
        let s = b.upload(&data(n * cls, 1)).unwrap();
        let t = b.upload(&data(n * cls, 2)).unwrap();
        let labels = b
            .upload_labels(&(0..n as i32).map(|i| i % cls as i32).collect::<Vec<_>>())
            .unwrap();
        let (loss, grad, probs) = (
            b.filled(1, 0.0).unwrap(),
            b.filled(n * cls, 0.0).unwrap(),
            b.filled(n * cls, 0.0).unwrap(),
        );
        let id = |k: &str| BenchmarkId::new(k, format!("{n}x{cls}"));
        let out = || LossOut {
            loss: &loss,
            row_loss: None,
            grad_student: GradOut::Into(&grad),
            grad_teacher: None,
        };
        let run = |f: &dyn Fn()| {
            f();
            b.synchronize().unwrap();
        };

        // Read s and t, write the gradient: 12 bytes per element (+ labels).
        group.throughput(Throughput::Bytes(12 * nc + 4 * n as u64));
        group.bench_function(id("hinton_fused"), |bn| {
            bn.iter(|| {
                run(&|| {
                    b.hinton(&HintonSpec::new(shape, 4.0, 0.5), &s, &t, &labels, out())
                        .unwrap()
                })
            })
        });
        group.bench_function(id("hinton_unfused_ce_plus_kl"), |bn| {
            bn.iter(|| {
                run(&|| {
                    let ce = CrossEntropySpec {
                        grad_scale: 0.5,
                        ..CrossEntropySpec::new(shape)
                    };
                    b.cross_entropy(&ce, &s, &labels, out()).unwrap();
                    let kl = DivergenceSpec {
                        grad_scale: 0.5,
                        ..DivergenceSpec::new(shape, 4.0)
                    };
                    let o = LossOut {
                        loss: &loss,
                        row_loss: None,
                        grad_student: GradOut::Into(&probs),
                        grad_teacher: None,
                    };
                    b.divergence(&kl, &s, &t, None, o).unwrap();
                    b.axpy(1.0, &probs, &grad).unwrap();
                })
            })
        });
        group.throughput(Throughput::Bytes(12 * nc));
        for (label, div) in [
            ("forward_kl", Divergence::ForwardKl),
            ("reverse_kl", Divergence::ReverseKl),
            ("jsd", Divergence::Jsd { beta: 0.5 }),
        ] {
            let spec = DivergenceSpec {
                divergence: div,
                ..DivergenceSpec::new(shape, 4.0)
            };
            group.bench_function(id(label), |bn| {
                bn.iter(|| run(&|| b.divergence(&spec, &s, &t, None, out()).unwrap()))
            });
        }
        group.bench_function(id("forward_kl_unfused_softmax_then_kl"), |bn| {
            bn.iter(|| {
                run(&|| {
                    b.softmax(
                        &SoftmaxSpec {
                            shape,
                            temperature: 4.0,
                            log: false,
                        },
                        &t,
                        &probs,
                    )
                    .unwrap();
                    let spec = DivergenceSpec {
                        teacher: TeacherInput::Probs,
                        ..DivergenceSpec::new(shape, 4.0)
                    };
                    b.divergence(&spec, &s, &probs, None, out()).unwrap();
                })
            })
        });
        group.throughput(Throughput::Bytes(8 * nc + 4 * n as u64));
        group.bench_function(id("cross_entropy"), |bn| {
            bn.iter(|| {
                run(&|| {
                    b.cross_entropy(&CrossEntropySpec::new(shape), &s, &labels, out())
                        .unwrap()
                })
            })
        });
        group.throughput(Throughput::Bytes(8 * nc));
        group.bench_function(id("softmax"), |bn| {
            bn.iter(|| {
                run(&|| {
                    b.softmax(
                        &SoftmaxSpec {
                            shape,
                            temperature: 4.0,
                            log: true,
                        },
                        &s,
                        &grad,
                    )
                    .unwrap()
                })
            })
        });
        group.throughput(Throughput::Bytes(12 * nc));
        group.bench_function(id("mse"), |bn| {
            bn.iter(|| {
                run(&|| {
                    b.mse(&MseSpec::new(n * cls), &s, &t, &loss, Some(&grad), None)
                        .unwrap()
                })
            })
        });
        // Attention maps of the same elements seen as [n, 4, cls / 4] when cls allows.
        if cls % 4 == 0 {
            let at = AttentionSpec::new(n, 4, 4, cls / 4);
            group.bench_function(id("attention_transfer"), |bn| {
                bn.iter(|| {
                    run(&|| {
                        b.attention_transfer(&at, &s, &t, &loss, Some(&grad), None)
                            .unwrap()
                    })
                })
            });
        }
    }
    group.finish();

    // One distillation step of the default student (64-32-10) with its teacher's logits, batch 64.
    let mut g = c.benchmark_group(format!("train_step/{tag}"));
    g.sample_size(20).measurement_time(Duration::from_secs(2));
    let mut mlp = Mlp::new(b, &[64, 32, 10], &mut Rng::new(0)).unwrap();
    let x = Tensor::from_host(b, &data(64 * 64, 3), &[64, 64]).unwrap();
    let teacher = Tensor::from_host(b, &data(64 * 10, 4), &[64, 10]).unwrap();
    let labels = b
        .upload_labels(
            &(0..64)
                .map(|i| if i < 32 { i % 10 } else { -100 })
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let mut step = 0;
    g.bench_function("mlp_64_32_10_kd_adam_batch64", |bn| {
        bn.iter(|| {
            step += 1;
            let tape = Tape::new(b);
            let xv = tape.constant(x.clone());
            let f = mlp.forward(&tape, xv).unwrap();
            let tv = tape.constant(teacher.clone());
            let shape = RowShape::new(64, 10);
            let ce = tape
                .cross_entropy(
                    f.logits,
                    &labels,
                    CrossEntropySpec {
                        grad_scale: 0.2,
                        ..CrossEntropySpec::new(shape)
                    },
                )
                .unwrap();
            let kd = tape
                .divergence(
                    f.logits,
                    tv,
                    None,
                    DivergenceSpec {
                        grad_scale: 0.8,
                        ..DivergenceSpec::new(shape, 4.0)
                    },
                )
                .unwrap();
            tape.backward(&[ce, kd]).unwrap();
            Optimizer::adam(1e-3)
                .step(&tape, mlp.params_mut().into_iter().zip(f.params), step)
                .unwrap();
            b.synchronize().unwrap();
        })
    });
    // One step of the default teacher (64-256-256-10, cross-entropy, Adam, batch 32): the bulk of
    // the default experiment's time.
    let mut teacher_mlp = Mlp::new(b, &[64, 256, 256, 10], &mut Rng::new(1)).unwrap();
    let xt = Tensor::from_host(b, &data(32 * 64, 5), &[32, 64]).unwrap();
    let yt = b
        .upload_labels(&(0..32).map(|i| i % 10).collect::<Vec<_>>())
        .unwrap();
    let mut tstep = 0;
    g.bench_function("mlp_64_256_256_10_ce_adam_batch32", |bn| {
        bn.iter(|| {
            tstep += 1;
            let tape = Tape::new(b);
            let xv = tape.constant(xt.clone());
            let f = teacher_mlp.forward(&tape, xv).unwrap();
            let ce = tape
                .cross_entropy(f.logits, &yt, CrossEntropySpec::new(RowShape::new(32, 10)))
                .unwrap();
            tape.backward(&[ce]).unwrap();
            Optimizer::adam(1e-3)
                .step(
                    &tape,
                    teacher_mlp.params_mut().into_iter().zip(f.params),
                    tstep,
                )
                .unwrap();
            b.synchronize().unwrap();
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_backend(c, &CpuBackend::new(), "cpu_reference", false);
    bench_backend(c, &FastCpuBackend::new(), "cpu_fast", false);
    match WgpuBackend::new() {
        Ok(b) => bench_backend(c, &b, "wgpu", true),
        Err(e) => eprintln!("wgpu benches skipped: {e}"),
    }
    #[cfg(feature = "cuda")]
    match distillation::CudaBackend::new() {
        Ok(b) => bench_backend(c, &b, "cuda", true),
        Err(e) => eprintln!("cuda benches skipped: {e}"),
    }
}

criterion_group!(losses, benches);
criterion_main!(losses);
