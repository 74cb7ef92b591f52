//! Bad input through the public API comes back as an `Err` that says what is wrong, on every
//! backend; never a panic, never a silently wrong number.

use crate::common;

use distillation::loss::SoftTargetLoss;
use distillation::{
    AttentionSpec, Backend, CrossEntropyLoss, Divergence, DivergenceSpec, Error, GradOut, KdLoss,
    LossOut, MseSpec, RowShape, SoftmaxSpec, TeacherInput,
};

fn expect_err<T: std::fmt::Debug>(r: distillation::Result<T>, needle: &str) {
    match r {
        Ok(v) => panic!("expected an error mentioning {needle:?}, got Ok({v:?})"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(needle),
                "error {msg:?} does not mention {needle:?}"
            );
        }
    }
}

fn kd_loss_rejects_bad_input<B: Backend>(b: &B) {
    let s = vec![0.5f32; 6];
    let t = vec![0.1f32; 6];
    let kd = KdLoss::new(2.0, 0.5);
    expect_err(
        KdLoss {
            temperature: 0.0,
            ..kd
        }
        .forward_backward(b, &s, &t, &[0, 1], 3),
        "temperature",
    );
    expect_err(
        KdLoss {
            temperature: -1.0,
            ..kd
        }
        .forward_backward(b, &s, &t, &[0, 1], 3),
        "temperature",
    );
    expect_err(
        KdLoss {
            temperature: f32::NAN,
            ..kd
        }
        .forward_backward(b, &s, &t, &[0, 1], 3),
        "temperature",
    );
    expect_err(
        KdLoss { alpha: 1.5, ..kd }.forward_backward(b, &s, &t, &[0, 1], 3),
        "alpha",
    );
    expect_err(
        KdLoss {
            label_smoothing: 1.0,
            ..kd
        }
        .forward_backward(b, &s, &t, &[0, 1], 3),
        "label_smoothing",
    );
    expect_err(
        kd.forward_backward(b, &s, &t, &[0, 3], 3),
        "label out of range: row 1 has label 3",
    );
    expect_err(
        kd.forward_backward(b, &s, &t, &[0, -5], 3),
        "label out of range",
    );
    expect_err(
        kd.forward_backward(b, &s, &t, &[0], 3),
        "labels has 1 elements, expected 2",
    );
    expect_err(
        kd.forward_backward(b, &s[..5], &t, &[0, 1], 3),
        "whole number of rows",
    );
    expect_err(
        kd.forward_backward(b, &s, &t[..3], &[0, 1], 3),
        "teacher has 3 elements, expected 6",
    );
    expect_err(kd.forward_backward(b, &s, &t, &[0, 1], 0), "classes");
    expect_err(
        kd.forward_backward(b, &[] as &[f32], &[] as &[f32], &[], 3),
        "whole number of rows",
    );
    let mut bad = s.clone();
    bad[4] = f32::NAN;
    expect_err(
        KdLoss {
            check_inputs: true,
            ..kd
        }
        .forward_backward(b, &bad, &t, &[0, 1], 3),
        "student[4] = NaN",
    );
    // Without the check, the NaN shows in the loss instead.
    assert!(kd
        .forward_backward(b, &bad, &t, &[0, 1], 3)
        .unwrap()
        .loss
        .is_nan());
    // ignore_index is a valid label.
    assert!(kd.forward_backward(b, &s, &t, &[-100, 1], 3).is_ok());
}

fn soft_target_and_ce_reject_bad_input<B: Backend>(b: &B) {
    let s = vec![0.5f32; 6];
    let t = vec![0.1f32; 6];
    for beta in [0.0, 1.0, -0.5, f32::NAN] {
        let l = SoftTargetLoss::new(Divergence::Jsd { beta }, 1.0);
        expect_err(l.forward_backward(b, &s, &t, None, 3), "beta");
    }
    let probs = SoftTargetLoss {
        teacher: TeacherInput::Probs,
        teacher_grad: true,
        ..SoftTargetLoss::new(Divergence::ForwardKl, 1.0)
    };
    expect_err(
        probs.forward_backward(b, &s, &t, None, 3),
        "teacher's gradient needs the teacher as logits",
    );
    let ce = CrossEntropyLoss::default();
    expect_err(ce.forward_backward(b, &s, &[0, 7], 3), "label out of range");
    expect_err(
        CrossEntropyLoss {
            label_smoothing: -0.1,
            ..ce
        }
        .forward_backward(b, &s, &[0, 1], 3),
        "label_smoothing",
    );
}

fn kernel_methods_reject_bad_buffers<B: Backend>(b: &B) {
    let shape = RowShape::new(2, 3);
    let six = b.upload(&[0.0; 6]).unwrap();
    let five = b.upload(&[0.0; 5]).unwrap();
    let one = b.upload(&[0.0]).unwrap();
    let two = b.upload(&[0.0; 2]).unwrap();
    let spec = DivergenceSpec::new(shape, 1.0);
    let r = b.divergence(&spec, &five, &six, None, LossOut::with_grad(&one, &six));
    expect_err(r, "student has 5 elements, expected 6");
    let r = b.divergence(&spec, &six, &six, None, LossOut::with_grad(&two, &six));
    expect_err(r, "loss has 2 elements, expected 1");
    let r = b.divergence(&spec, &six, &six, None, LossOut::with_grad(&one, &five));
    expect_err(r, "grad_student has 5 elements");
    let labels = b.upload_labels(&[0, 1, 2]).unwrap();
    let out = LossOut {
        loss: &one,
        row_loss: None,
        grad_student: GradOut::None,
        grad_teacher: None,
    };
    expect_err(
        b.divergence(&spec, &six, &six, Some(&labels), out),
        "labels has 3 elements, expected 2",
    );
    let empty = DivergenceSpec::new(RowShape::new(0, 3), 1.0);
    let out = LossOut {
        loss: &one,
        row_loss: None,
        grad_student: GradOut::None,
        grad_teacher: None,
    };
    expect_err(b.divergence(&empty, &six, &six, None, out), "empty shape");
    let soft = SoftmaxSpec {
        shape,
        temperature: 1e-9,
        log: false,
    };
    expect_err(b.softmax(&soft, &six, &six), "temperature");
    expect_err(
        b.mse(&MseSpec::new(0), &six, &six, &one, None, None),
        "0 elements",
    );
    expect_err(
        b.mse(&MseSpec::new(6), &six, &five, &one, None, None),
        "b has 5 elements",
    );
    expect_err(
        b.attention_transfer(
            &AttentionSpec::new(1, 2, 2, 4),
            &six,
            &six,
            &one,
            None,
            None,
        ),
        "student has 6 elements, expected 8",
    );
    expect_err(
        b.attention_transfer(
            &AttentionSpec::new(0, 2, 2, 4),
            &six,
            &six,
            &one,
            None,
            None,
        ),
        "attention transfer needs",
    );
}

backend_tests!(
    kd_loss_rejects_bad_input,
    soft_target_and_ce_reject_bad_input,
    kernel_methods_reject_bad_buffers
);

#[test]
fn wgpu_caller_buffer_without_storage_usage_is_an_error() {
    let Some(b) = common::wgpu() else { return };
    let buf = b
        .device()
        .create_buffer(&distillation::wgpu::BufferDescriptor {
            label: None,
            size: 64,
            usage: distillation::wgpu::BufferUsages::COPY_DST
                | distillation::wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
    let e = distillation::backend::wgpu::WgpuBuffer::from_buffer(buf.clone(), 16).unwrap_err();
    assert!(e.to_string().contains("STORAGE"), "{e}");
    let buf = b
        .device()
        .create_buffer(&distillation::wgpu::BufferDescriptor {
            label: None,
            size: 64,
            usage: distillation::wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
    assert!(matches!(
        distillation::backend::wgpu::WgpuBuffer::from_buffer(buf, 17),
        Err(Error::Shape { .. })
    ));
}

/// File errors are `Error::Io`: they name the file, what failed and how to fix it.
#[test]
fn missing_or_malformed_data_files_are_io_errors() {
    use distillation::data::Dataset;
    let dir = std::env::temp_dir().join(format!("distillation-errors-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("no-such-images.idx");
    let e = Dataset::from_idx(&missing, &missing).unwrap_err();
    assert!(
        matches!(&e, Error::Io { action: "read", file, .. } if *file == missing.display().to_string()),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("cannot read {}: ", missing.display()))
            && msg.contains("check the path"),
        "{msg}"
    );

    // A label file where the images should be: the wrong magic number, and what to pass instead.
    let labels = dir.join("labels.idx");
    std::fs::write(&labels, [0u8, 0, 8, 1, 0, 0, 0, 1, 7]).unwrap();
    let e = Dataset::from_idx(&labels, &labels).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("not an IDX image file (magic 0x00000801")
            && msg.contains("pass an MNIST-format images file"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The offline method's soft-target cache in a folder that cannot be created (under a file) is
/// an I/O error naming the folder, from the whole experiment.
#[test]
fn unwritable_cache_folder_is_an_io_error() {
    use distillation::data::Dataset;
    use distillation::experiment::{self, Config, Method};
    let dir =
        std::env::temp_dir().join(format!("distillation-errors-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("a-file");
    std::fs::write(&file, b"not a folder").unwrap();
    let cache = file.join("cache");
    let data = Dataset::digits().unwrap();
    let cfg = Config {
        method: Method::Cached,
        teacher_hidden: vec![8],
        student_hidden: vec![4],
        epochs: 1,
        teacher_epochs: 1,
        folds: 2,
        run_folds: Some(1),
        cache_dir: cache.clone(),
        ..Config::default()
    };
    let e = experiment::run(&distillation::CpuBackend::new(), &data, &cfg, &mut |_| {})
        .err()
        .expect("a cache folder under a file cannot be created");
    assert!(
        matches!(
            e,
            Error::Io {
                action: "create",
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("cannot create {}: ", cache.display()))
            && msg.contains("cache_dir"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Configurations that cannot run are `Error::Config`, saying what to change.
#[test]
fn bad_configurations_are_config_errors() {
    use distillation::data::Dataset;
    use distillation::experiment::{Config, Method, ModelKind};
    let digits = Dataset::digits().unwrap();
    let flat = Dataset::new(vec![0.0; 8], vec![0, 1], 4, 10, None).unwrap();
    let cases = [
        (
            Config {
                epochs: 0,
                ..Config::default()
            },
            &digits,
            "epochs 0",
        ),
        (
            Config {
                folds: 5000,
                ..Config::default()
            },
            &digits,
            "folds must be in 2..=1797",
        ),
        (
            Config {
                method: Method::Ensemble,
                teachers: 1,
                ..Config::default()
            },
            &digits,
            "an ensemble needs at least 2 teachers, the configuration has 1",
        ),
        (
            Config {
                method: Method::AttentionTransfer,
                ..Config::default()
            },
            &digits,
            "use the CNN model",
        ),
        (
            Config {
                model: ModelKind::Cnn,
                folds: 2,
                ..Config::default()
            },
            &flat,
            "the CNN needs image data",
        ),
        (
            Config {
                augment: true,
                folds: 2,
                ..Config::default()
            },
            &flat,
            "drop --augment",
        ),
        (
            Config {
                method: Method::Dkd,
                dkd_beta: -8.0,
                ..Config::default()
            },
            &digits,
            "--dkd-beta -8: DKD's weights",
        ),
        (
            Config {
                run_folds: Some(0),
                ..Config::default()
            },
            &digits,
            "run_folds = 0",
        ),
        (
            Config {
                method: Method::Ensemble,
                teachers: 11,
                ..Config::default()
            },
            &digits,
            "at most 10",
        ),
        (
            Config {
                top_k: Some(5),
                ..Config::default()
            },
            &digits,
            "top_k is the cached teacher's",
        ),
        (
            Config {
                teacher_epochs: 10_000_000_000_000,
                ..Config::default()
            },
            &digits,
            "teacher_epochs = 10000000000000: at most",
        ),
    ];
    // Loss weights and the noise out of their domains: parameter errors naming them.
    for (cfg, name) in [
        (
            Config {
                hint_weight: -1.0,
                ..Config::default()
            },
            "hint_weight",
        ),
        (
            Config {
                rkd_weight: f32::NAN,
                ..Config::default()
            },
            "rkd_weight",
        ),
        (
            Config {
                noise: -0.5,
                ..Config::default()
            },
            "noise",
        ),
    ] {
        let e = cfg.validate(&digits).unwrap_err();
        assert!(e.to_string().contains(name), "{name}: {e}");
    }
    for (cfg, data, needle) in cases {
        let e = cfg.validate(data).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{needle}: {e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("invalid configuration: ") && msg.contains(needle),
            "{msg:?} does not mention {needle:?}"
        );
    }
}

/// A transpose whose size product wraps, an upstream gradient whose kernel factors would
/// overflow f32, a NaN axpy factor: errors on every host backend, not a panic or a NaN.
#[test]
fn overflowing_sizes_and_factors_are_errors() {
    use distillation::{
        Backend, DivergenceSpec, Error, FastCpuBackend, GradOut, LossOut, RowShape,
    };
    fn check<B: Backend>(b: &B) {
        let x = b.upload(&[1.0; 8]).unwrap();
        let y = b.filled(8, 0.0).unwrap();
        let e = b.transpose(1, (1usize << 63) + 4, 2, &x, &y).unwrap_err();
        assert!(matches!(e, Error::Limit(_)), "{e}");
        assert!(b.axpy(f32::NAN, &x, &y).is_err());
        let (s, t) = (b.upload(&[0.5; 8]).unwrap(), b.upload(&[0.5; 8]).unwrap());
        let loss = b.filled(1, 0.0).unwrap();
        let g = b.filled(8, 0.0).unwrap();
        let spec = DivergenceSpec {
            grad_scale: f32::MAX,
            ..DivergenceSpec::new(RowShape::new(2, 4), 2.0)
        };
        let out = LossOut {
            loss: &loss,
            row_loss: None,
            grad_student: GradOut::Into(&g),
            grad_teacher: None,
        };
        let e = b.divergence(&spec, &s, &t, None, out).unwrap_err();
        assert!(e.to_string().contains("grad_scale"), "{e}");
    }
    check(&distillation::CpuBackend::new());
    check(&FastCpuBackend::new());
}
