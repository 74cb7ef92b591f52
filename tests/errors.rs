//! Bad input through the public API comes back as an `Err` that says what is wrong, on every
//! backend; never a panic, never a silently wrong number.

mod common;

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
        kd.forward_backward(b, &[], &[], &[], 3),
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
