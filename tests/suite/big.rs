//! Big rows and the chunked path: C = 262144 on every backend, one call of 2^25 elements, and on
//! wgpu a storage binding limit forced below the batch so every row op runs in several chunks.

use crate::common;

use common::{assert_close, assert_close_abs, to_f64, Lcg};
use distillation::backend::wgpu::{WgpuBuffer, WgpuOptions};
use distillation::ops::{self, feature, softmax};
use distillation::{
    Backend, CrossEntropySpec, DivergenceSpec, GradOut, HintonSpec, LossOut, MseSpec, RowShape,
    SoftmaxSpec, WgpuBackend,
};

fn hinton_case<B: Backend>(b: &B, n: usize, c: usize, temperature: f32, seed: u64) {
    let mut g = Lcg(seed);
    let (s, t) = (g.vec(n * c, 8.0), g.vec(n * c, 8.0));
    let labels: Vec<i32> = (0..n)
        .map(|i| {
            if i % 7 == 3 {
                -100
            } else {
                ((i * 7919) % c) as i32
            }
        })
        .collect();
    let spec = HintonSpec::new(RowShape::new(n, c), temperature, 0.25);
    let (loss, gs, gt) = (
        b.filled(1, f32::NAN).unwrap(),
        b.filled(n * c, f32::NAN).unwrap(),
        b.filled(n * c, f32::NAN).unwrap(),
    );
    let out = LossOut {
        loss: &loss,
        row_loss: None,
        grad_student: GradOut::Into(&gs),
        grad_teacher: Some(&gt),
    };
    b.hinton(
        &spec,
        &b.upload(&s).unwrap(),
        &b.upload(&t).unwrap(),
        &b.upload_labels(&labels).unwrap(),
        out,
    )
    .unwrap();
    let want = ops::hinton::reference::hinton(&spec, &to_f64(&s), &to_f64(&t), &labels);
    let c_ = c as f64;
    assert_close_abs(
        "loss",
        &b.download(&loss).unwrap(),
        &[want.loss],
        1e-4,
        4e-7 * (1.0 + c_.ln()),
    )
    .unwrap();
    // Entries are ~1/C: compare on that scale.
    let atol = 1e-7 / n as f64;
    assert_close_abs(
        "grad_student",
        &b.download(&gs).unwrap(),
        &want.grad_student,
        1e-4,
        atol,
    )
    .unwrap();
    assert_close_abs(
        "grad_teacher",
        &b.download(&gt).unwrap(),
        &want.grad_teacher,
        1e-4,
        atol,
    )
    .unwrap();
}

fn rows_of_262144_classes<B: Backend>(b: &B) {
    hinton_case(b, 3, 262144, 2.0, 1);
}

/// One call over more than 2^25 elements (130 rows of 262144, 130 MiB per tensor): over the
/// 128 MiB storage binding limit of wgpu's defaults and of lavapipe, so the rows run in chunks.
fn one_call_of_2_pow_25_elements<B: Backend>(b: &B) {
    let (n, c) = (130, 262144);
    assert!(n * c > 1 << 25);
    let mut g = Lcg(2);
    let (s, t) = (g.vec(n * c, 6.0), g.vec(n * c, 6.0));
    let spec = DivergenceSpec::new(RowShape::new(n, c), 4.0);
    let (loss, gs) = (
        b.filled(1, f32::NAN).unwrap(),
        b.filled(n * c, f32::NAN).unwrap(),
    );
    b.divergence(
        &spec,
        &b.upload(&s).unwrap(),
        &b.upload(&t).unwrap(),
        None,
        LossOut::with_grad(&loss, &gs),
    )
    .unwrap();
    let want = ops::divergence::reference::divergence(&spec, &to_f64(&s), &to_f64(&t), None);
    assert_close("loss", &b.download(&loss).unwrap(), &[want.loss], 1e-4).unwrap();
    assert_close_abs(
        "grad",
        &b.download(&gs).unwrap(),
        &want.grad_student,
        1e-4,
        1e-7 / n as f64,
    )
    .unwrap();
}

backend_tests!(rows_of_262144_classes, one_call_of_2_pow_25_elements);

/// wgpu with a binding limit of a few rows: every op runs in several chunks, the last one short.
#[test]
fn wgpu_chunked_path_matches_reference() {
    let Some(default) = common::wgpu() else {
        return;
    };
    eprintln!(
        "adapter storage binding limit: {} bytes",
        default.max_binding_bytes()
    );
    let (n, c) = (200, 1000); // 64-row chunks of 256 000 bytes: 4 chunks, the last of 8 rows
    let b = WgpuBackend::with_options(WgpuOptions {
        max_binding_bytes: Some(300_000),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(b.max_binding_bytes(), 300_000);
    hinton_case(&b, n, c, 3.0, 3);

    let mut g = Lcg(4);
    let (s, t) = (g.vec(n * c, 5.0), g.vec(n * c, 5.0));
    let labels: Vec<i32> = (0..n as i32)
        .map(|i| if i % 3 == 0 { -100 } else { i % c as i32 })
        .collect();
    let shape = RowShape::new(n, c);
    // Cross-entropy, gradient in place.
    let sb = b.upload(&s).unwrap();
    let loss = b.filled(1, f32::NAN).unwrap();
    let out = LossOut {
        loss: &loss,
        row_loss: None,
        grad_student: GradOut::InPlace,
        grad_teacher: None,
    };
    b.cross_entropy(
        &CrossEntropySpec::new(shape),
        &sb,
        &b.upload_labels(&labels).unwrap(),
        out,
    )
    .unwrap();
    let want = ops::cross_entropy::reference::cross_entropy(
        &CrossEntropySpec::new(shape),
        &to_f64(&s),
        &labels,
    );
    assert_close("ce loss", &b.download(&loss).unwrap(), &[want.loss], 1e-4).unwrap();
    assert_close(
        "ce grad in place",
        &b.download(&sb).unwrap(),
        &want.grad_student,
        1e-4,
    )
    .unwrap();
    // Softmax.
    let spec = SoftmaxSpec {
        shape,
        temperature: 2.0,
        log: true,
    };
    let y = b.filled(n * c, f32::NAN).unwrap();
    b.softmax(&spec, &b.upload(&s).unwrap(), &y).unwrap();
    let want = softmax::reference::softmax(&to_f64(&s), c, 2.0, true);
    assert_close("log_softmax", &b.download(&y).unwrap(), &want, 1e-4).unwrap();
    // MSE over more elements than one binding holds.
    let m = MseSpec::new(n * c);
    let (ga, mloss) = (
        b.filled(n * c, f32::NAN).unwrap(),
        b.filled(1, f32::NAN).unwrap(),
    );
    b.mse(
        &m,
        &b.upload(&s).unwrap(),
        &b.upload(&t).unwrap(),
        &mloss,
        Some(&ga),
        None,
    )
    .unwrap();
    let (l, wa, _) = feature::reference::mse(&m, &to_f64(&s), &to_f64(&t));
    assert_close("mse", &b.download(&mloss).unwrap(), &[l], 1e-4).unwrap();
    assert_close("mse grad", &b.download(&ga).unwrap(), &wa, 1e-4).unwrap();
}

/// A single row larger than the binding limit cannot be chunked: a clear `Err`, not a panic.
#[test]
fn wgpu_row_over_the_binding_limit_is_an_error() {
    let Some(_) = common::wgpu() else { return };
    let b = WgpuBackend::with_options(WgpuOptions {
        max_binding_bytes: Some(4096),
        ..Default::default()
    })
    .unwrap();
    let (n, c) = (100, 2000);
    let s = b.upload(&vec![0.0; n * c]).unwrap();
    let loss: WgpuBuffer = b.filled(1, 0.0).unwrap();
    let e = b
        .divergence(
            &DivergenceSpec::new(RowShape::new(n, c), 1.0),
            &s,
            &s,
            None,
            LossOut::with_grad(&loss, &b.filled(n * c, 0.0).unwrap()),
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("binding limit") && msg.contains("2000 classes"),
        "{msg}"
    );
}
