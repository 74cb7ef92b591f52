//! The burn adapter (feature `burn`, `src/burn.rs`) against burn's own composition of the same
//! losses (`log_softmax`, KL, cross-entropy written with burn ops), the loss and the gradients
//! through burn's autodiff, on burn's Flex CPU device, on its default wgpu device (the host-copy
//! route) and on the wgpu device shared with our kernels (`distillation::burn::wgpu_device`, the
//! zero-copy route); lavapipe here, the wgpu devices skipped when there is no adapter unless
//! `DISTILLATION_REQUIRE` names wgpu.

use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Device, DeviceKind, Int, Tensor, TensorData};
use distillation::half::bf16;
use distillation::{Divergence, FastCpuBackend, KdLoss};

fn devices() -> Vec<(&'static str, Device)> {
    let mut v = vec![("flex", Device::flex().autodiff())];
    // burn's wgpu device panics on first use when there is no adapter: probe with our own
    // wgpu backend first (the same driver).
    match distillation::WgpuBackend::new() {
        Ok(_) => {
            v.push(("wgpu", Device::wgpu(DeviceKind::DefaultDevice).autodiff()));
            let shared = distillation::burn::wgpu_device().expect("the shared burn wgpu device");
            v.push(("wgpu-shared", shared.autodiff()));
        }
        Err(e) => {
            let required = std::env::var("DISTILLATION_REQUIRE").unwrap_or_default();
            assert!(
                !required.split(',').any(|b| b.trim() == "wgpu"),
                "DISTILLATION_REQUIRE names wgpu but no adapter: {e}"
            );
            eprintln!("burn wgpu device skipped: {e}");
        }
    }
    v
}

/// Deterministic logits in about [-scale, scale].
fn logits(n: usize, c: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n * c)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) as f32 / (1u64 << 31) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn tensor(v: &[f32], n: usize, c: usize, dev: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v.to_vec(), [n, c]), (dev, DType::F32))
}

fn labels(v: &[i64], dev: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), dev)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().expect("read back")
}

fn close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: ours {x}, burn {y}"
        );
    }
}

/// burn's own composition: `alpha CE + (1 - alpha) T^2 KL(q || p)`, batchmean.
fn composed_kd(s: Tensor<2>, t: Tensor<2>, y: Tensor<1, Int>, temp: f32, alpha: f32) -> Tensor<1> {
    let n = s.dims()[0] as f32;
    let log_p = log_softmax(s.clone().div_scalar(temp), 1);
    let log_q = log_softmax(t.clone().div_scalar(temp), 1);
    let kl = (log_q.clone().exp() * (log_q - log_p)).sum().div_scalar(n);
    let ce = log_softmax(s, 1)
        .gather(1, y.unsqueeze_dim(1))
        .sum()
        .neg()
        .div_scalar(n);
    ce.mul_scalar(alpha) + kl.mul_scalar((1.0 - alpha) * temp * temp)
}

#[test]
fn kd_loss_matches_burns_composition() {
    let (n, c) = (7, 37);
    let (s, t) = (logits(n, c, 1, 4.0), logits(n, c, 2, 4.0));
    let y: Vec<i64> = (0..n as i64).map(|i| (i * 5) % c as i64).collect();
    for (name, dev) in devices() {
        for (temp, alpha) in [(1.0, 0.5), (4.0, 0.1), (0.5, 0.0)] {
            let a = tensor(&s, n, c, &dev).require_grad();
            let ours = distillation::burn::kd_loss(
                a.clone(),
                tensor(&t, n, c, &dev),
                labels(&y, &dev),
                temp,
                alpha,
            )
            .expect("kd_loss");
            let ga = a.grad(&ours.backward()).expect("student grad");
            let b = tensor(&s, n, c, &dev).require_grad();
            let theirs = composed_kd(
                b.clone(),
                tensor(&t, n, c, &dev),
                labels(&y, &dev),
                temp,
                alpha,
            );
            let gb = b.grad(&theirs.backward()).expect("composed grad");
            close(
                &format!("{name} loss T={temp}"),
                &host(ours),
                &host(theirs),
                1e-5,
            );
            close(&format!("{name} grad T={temp}"), &host(ga), &host(gb), 1e-5);
        }
    }
}

#[test]
fn online_teacher_gets_its_gradient_and_upstream_scales() {
    let (n, c) = (5, 11);
    let (s, t) = (logits(n, c, 3, 3.0), logits(n, c, 4, 3.0));
    for (name, dev) in devices() {
        let a = tensor(&s, n, c, &dev).require_grad();
        let b = tensor(&t, n, c, &dev).require_grad();
        let ours =
            distillation::burn::soft_target_loss(a.clone(), b.clone(), Divergence::ForwardKl, 2.0)
                .expect("soft_target_loss")
                .mul_scalar(3.0);
        let g = ours.backward();
        let (ga, gb) = (a.grad(&g).expect("student"), b.grad(&g).expect("teacher"));

        let a2 = tensor(&s, n, c, &dev).require_grad();
        let b2 = tensor(&t, n, c, &dev).require_grad();
        let log_p = log_softmax(a2.clone().div_scalar(2.0), 1);
        let log_q = log_softmax(b2.clone().div_scalar(2.0), 1);
        let theirs = (log_q.clone().exp() * (log_q - log_p))
            .sum()
            .mul_scalar(4.0 / n as f32)
            .mul_scalar(3.0);
        let g2 = theirs.backward();
        close(
            &format!("{name} student"),
            &host(ga),
            &host(a2.grad(&g2).unwrap()),
            1e-5,
        );
        close(
            &format!("{name} teacher"),
            &host(gb),
            &host(b2.grad(&g2).unwrap()),
            1e-5,
        );
    }
}

#[test]
fn cross_entropy_with_label_smoothing() {
    let (n, c) = (6, 9);
    let s = logits(n, c, 5, 5.0);
    let y: Vec<i64> = (0..n as i64).map(|i| (i * 2) % c as i64).collect();
    let eps = 0.1f32;
    for (name, dev) in devices() {
        let a = tensor(&s, n, c, &dev).require_grad();
        let ours = distillation::burn::cross_entropy(a.clone(), labels(&y, &dev), eps).expect("ce");
        let ga = a.grad(&ours.backward()).unwrap();
        let b = tensor(&s, n, c, &dev).require_grad();
        let lp = log_softmax(b.clone(), 1);
        let nll = lp
            .clone()
            .gather(1, labels(&y, &dev).unsqueeze_dim(1))
            .sum()
            .neg();
        let smooth = lp.sum().neg().div_scalar(c as f32);
        let theirs = (nll.mul_scalar(1.0 - eps) + smooth.mul_scalar(eps)).div_scalar(n as f32);
        let gb = b.grad(&theirs.backward()).unwrap();
        close(&format!("{name} ce loss"), &host(ours), &host(theirs), 1e-5);
        close(&format!("{name} ce grad"), &host(ga), &host(gb), 1e-5);
    }
}

#[test]
fn masked_rows_and_bf16_logits_match_the_host_api() {
    let (n, c) = (6, 21);
    let (s, t) = (logits(n, c, 6, 6.0), logits(n, c, 7, 6.0));
    let y = [3i64, -100, 0, 20, -100, 7];
    let y32: Vec<i32> = y.iter().map(|&v| v as i32).collect();
    let kd = KdLoss::new(3.0, 0.3);
    // f32 on every device; bf16 on the Flex device (WGSL has no bf16: burn's wgpu backend
    // stores bf16 as f32 or refuses it, so the bits would not be ours).
    let want = kd
        .forward_backward(&FastCpuBackend::new(), &s, &t, &y32, c)
        .expect("host API");
    for (name, dev) in devices() {
        let a = tensor(&s, n, c, &dev).require_grad();
        let loss = distillation::burn::kd_loss_with(
            &kd,
            a.clone(),
            tensor(&t, n, c, &dev),
            labels(&y, &dev),
        )
        .expect("kd");
        let g = host(a.grad(&loss.backward()).unwrap());
        close(
            &format!("{name} masked loss"),
            &host(loss),
            &[want.loss],
            1e-6,
        );
        close(&format!("{name} masked grad"), &g, &want.grad_student, 1e-6);
        for r in [1, 4] {
            assert!(
                g[r * c..(r + 1) * c].iter().all(|&x| x == 0.0),
                "{name}: masked row {r}"
            );
        }
    }
    let (sb, tb): (Vec<bf16>, Vec<bf16>) = (
        s.iter().map(|&x| bf16::from_f32(x)).collect(),
        t.iter().map(|&x| bf16::from_f32(x)).collect(),
    );
    let want = kd
        .forward_backward(&FastCpuBackend::new(), &sb, &tb, &y32, c)
        .expect("host API bf16");
    let dev = Device::flex().autodiff();
    let bt = |v: &[bf16]| -> Tensor<2> {
        Tensor::from_data(TensorData::new(v.to_vec(), [n, c]), (&dev, DType::BF16))
    };
    let a = bt(&sb).require_grad();
    assert_eq!(a.dtype(), DType::BF16);
    let loss =
        distillation::burn::kd_loss_with(&kd, a.clone(), bt(&tb), labels(&y, &dev)).expect("bf16");
    let g = a.grad(&loss.backward()).unwrap();
    assert_eq!(
        g.dtype(),
        DType::BF16,
        "the gradient comes back in the logits' dtype"
    );
    let want_g: Vec<f32> = want.grad_student.iter().map(|x| x.to_f32()).collect();
    close("bf16 loss", &host(loss), &[want.loss], 1e-6);
    close("bf16 grad", &host(g), &want_g, 0.0);
}

#[test]
fn dkd_matches_the_host_api() {
    let (n, c) = (4, 10);
    let (s, t) = (logits(n, c, 8, 4.0), logits(n, c, 9, 4.0));
    let y = [1i64, 9, 0, 4];
    let y32: Vec<i32> = y.iter().map(|&v| v as i32).collect();
    let want = distillation::DkdLoss::new(4.0, 1.0, 8.0)
        .forward_backward(&FastCpuBackend::new(), &s, &t, &y32, c)
        .expect("host");
    for (name, dev) in devices() {
        let a = tensor(&s, n, c, &dev).require_grad();
        let loss = distillation::burn::dkd_loss(
            a.clone(),
            tensor(&t, n, c, &dev),
            labels(&y, &dev),
            4.0,
            1.0,
            8.0,
        )
        .expect("dkd");
        let g = host(a.grad(&loss.backward()).unwrap());
        close(&format!("{name} dkd loss"), &host(loss), &[want.loss], 1e-6);
        close(&format!("{name} dkd grad"), &g, &want.grad_student, 1e-6);
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dev = Device::flex().autodiff();
    let s = tensor(&logits(3, 4, 1, 1.0), 3, 4, &dev);
    let t = tensor(&logits(3, 5, 2, 1.0), 3, 5, &dev);
    let e = distillation::burn::kd_loss(s.clone(), t, labels(&[0, 1, 2], &dev), 2.0, 0.5)
        .expect_err("shape mismatch");
    assert!(e.to_string().contains("teacher"), "{e}");
    let t = tensor(&logits(3, 4, 2, 1.0), 3, 4, &dev);
    let e = distillation::burn::kd_loss(s.clone(), t.clone(), labels(&[0, 1], &dev), 2.0, 0.5)
        .expect_err("label count");
    assert!(e.to_string().contains("labels"), "{e}");
    let e = distillation::burn::kd_loss(s.clone(), t.clone(), labels(&[0, 1, 9], &dev), 2.0, 0.5)
        .expect_err("label range");
    assert!(e.to_string().contains("label"), "{e}");
    let e = distillation::burn::kd_loss(s, t, labels(&[0, 1, 2], &dev), -1.0, 0.5)
        .expect_err("temperature");
    assert!(e.to_string().contains("temperature"), "{e}");
    let half = Tensor::<2>::from_data(TensorData::new(vec![1.0f64; 4], [2, 2]), (&dev, DType::F64));
    let e = distillation::burn::cross_entropy(half, labels(&[0, 1], &dev), 0.0)
        .expect_err("f64 logits");
    assert!(e.to_string().contains("F64"), "{e}");
}

/// A teacher or labels on another device than the student: an error naming `to_device` (burn's
/// own add would panic); `Reduction::None`: an error (the adapter returns a scalar).
#[test]
fn other_devices_and_reduction_none_are_errors() {
    let devs = devices();
    let (n, c) = (3, 4);
    let s_host = logits(n, c, 1, 1.0);
    for (name, other) in devs.iter().skip(1) {
        let dev = Device::flex().autodiff();
        let s = tensor(&s_host, n, c, &dev).require_grad();
        let t = tensor(&logits(n, c, 2, 1.0), n, c, other).require_grad();
        let e = distillation::burn::kd_loss(s.clone(), t, labels(&[0, 1, 2], &dev), 2.0, 0.5)
            .expect_err("teacher on another device");
        assert!(e.to_string().contains("to_device"), "{name}: {e}");
        let t = tensor(&logits(n, c, 2, 1.0), n, c, &dev);
        let e = distillation::burn::kd_loss(s, t, labels(&[0, 1, 2], other), 2.0, 0.5)
            .expect_err("labels on another device");
        assert!(e.to_string().contains("to_device"), "{name}: {e}");
    }
    for (name, dev) in &devs {
        let s = tensor(&s_host, n, c, dev).require_grad();
        let t = tensor(&logits(n, c, 2, 1.0), n, c, dev);
        let none = KdLoss {
            reduction: distillation::Reduction::None,
            ..KdLoss::new(2.0, 0.5)
        };
        let e = distillation::burn::kd_loss_with(&none, s, t, labels(&[0, 1, 2], dev))
            .expect_err("Reduction::None");
        assert!(e.to_string().contains("Reduction::None"), "{name}: {e}");
    }
}

/// The shared device when there is an adapter (and `DISTILLATION_REQUIRE` does not name wgpu).
fn shared_device() -> Option<Device> {
    devices()
        .into_iter()
        .find(|(name, _)| *name == "wgpu-shared")
        .map(|(_, d)| d)
}

#[test]
fn shared_wgpu_device_reads_nothing_to_the_host() {
    let Some(dev) = shared_device() else {
        return;
    };
    let (n, c) = (9, 130);
    let (s, t) = (logits(n, c, 11, 5.0), logits(n, c, 12, 5.0));
    let y: Vec<i64> = (0..n as i64).map(|i| (i * 7) % c as i64).collect();
    let a = tensor(&s, n, c, &dev).require_grad();
    let before = distillation::burn::host_reads();
    let loss = distillation::burn::kd_loss(
        a.clone(),
        tensor(&t, n, c, &dev),
        labels(&y, &dev),
        2.0,
        0.3,
    )
    .expect("kd_loss");
    let g = a.grad(&loss.backward()).expect("student grad");
    assert_eq!(
        distillation::burn::host_reads(),
        before,
        "the zero-copy route read a tensor to the host"
    );
    // The same call on burn's default wgpu device takes the copy route: same numbers.
    let dflt = Device::wgpu(DeviceKind::DefaultDevice).autodiff();
    let b = tensor(&s, n, c, &dflt).require_grad();
    let copied = distillation::burn::kd_loss(
        b.clone(),
        tensor(&t, n, c, &dflt),
        labels(&y, &dflt),
        2.0,
        0.3,
    )
    .expect("kd_loss, copy route");
    let gb = b.grad(&copied.backward()).expect("copy route grad");
    assert_eq!(
        distillation::burn::host_reads(),
        before + 3,
        "the copy route reads the student, the teacher and the labels"
    );
    close("shared vs copy loss", &host(loss), &host(copied), 1e-6);
    close("shared vs copy grad", &host(g), &host(gb), 1e-6);
}

#[test]
fn shared_device_strided_input_takes_the_copy_route() {
    let Some(dev) = shared_device() else {
        return;
    };
    let (n, c) = (5, 12);
    let s = logits(n, c, 13, 3.0);
    // [c, n] transposed to a non-contiguous [n, c] view: not bindable in place.
    let st: Vec<f32> = (0..c * n).map(|i| s[(i % n) * c + i / n]).collect();
    let y: Vec<i64> = (0..n as i64).map(|i| i % c as i64).collect();
    let a = tensor(&st, c, n, &dev).require_grad();
    let view = a.clone().transpose();
    let before = distillation::burn::host_reads();
    let loss = distillation::burn::cross_entropy(view, labels(&y, &dev), 0.0).expect("ce");
    assert!(
        distillation::burn::host_reads() > before,
        "a strided view is read on the host"
    );
    let g = host(a.grad(&loss.backward()).unwrap().transpose());
    let want = distillation::CrossEntropyLoss::default()
        .forward_backward(
            &FastCpuBackend::new(),
            &s,
            &y.iter().map(|&v| v as i32).collect::<Vec<_>>(),
            c,
        )
        .expect("host");
    close("strided loss", &host(loss), &[want.loss], 1e-6);
    close("strided grad", &g, &want.grad_student, 1e-6);
}

#[test]
fn shared_device_bad_label_is_nan_not_a_panic() {
    let Some(dev) = shared_device() else {
        return;
    };
    let s = tensor(&logits(3, 4, 1, 1.0), 3, 4, &dev);
    let t = tensor(&logits(3, 4, 2, 1.0), 3, 4, &dev);
    // Labels are not read back on the device (as on our own wgpu backend): a label that is
    // neither a class nor -100 makes the loss NaN.
    let loss = distillation::burn::kd_loss(s, t, labels(&[0, 1, 9], &dev), 2.0, 0.5)
        .expect("accepted on the device");
    assert!(host(loss)[0].is_nan());
}

/// The windows the zero-copy route binds: our wgpu backend on tensors at offsets inside one
/// buffer (as cubecl pages hold many tensors), NaN around them. The kernels read and write only
/// their windows, and give the numbers of the host API.
#[test]
fn wgpu_backend_binds_windows_at_offsets() {
    use distillation::{Backend, Dtype, KdLoss, LossOut, RowShape};
    let Ok(b) = distillation::WgpuBackend::new() else {
        return;
    };
    let align = (b.limits().min_storage_buffer_offset_alignment as usize / 4).max(1);
    let (n, c) = (3, 70);
    let len = n * c;
    let (s, t) = (logits(n, c, 21, 4.0), logits(n, c, 22, 4.0));
    let y = [4i32, -100, 69];
    // Regions of `slot` floats: [poison | student | teacher | gradient | loss], each region's
    // data at its start, NaN after it.
    let slot = (len + 1).div_ceil(align) * align;
    let mut all = vec![f32::NAN; 5 * slot];
    all[slot..slot + len].copy_from_slice(&s);
    all[2 * slot..2 * slot + len].copy_from_slice(&t);
    let whole = b.upload(&all).expect("upload");
    let at = |k: usize, len: usize| {
        b.wrap_buffer(
            whole.buffer().clone(),
            (k * slot * 4) as u64,
            len,
            Dtype::F32,
        )
        .expect("an aligned window")
    };
    let (sw, tw, gw, lw) = (at(1, len), at(2, len), at(3, len), at(4, 1));
    let labels = b.upload_labels(&y).expect("labels");
    let kd = KdLoss::new(2.0, 0.3);
    b.hinton(
        &kd.spec(RowShape::new(n, c)),
        &sw,
        &tw,
        &labels,
        LossOut::with_grad(&lw, &gw),
    )
    .expect("hinton on windows");
    // A misaligned window is refused, not bound.
    if align > 1 {
        assert!(b
            .wrap_buffer(whole.buffer().clone(), 4, 1, Dtype::F32)
            .is_err());
    }
    // Labels in a window of the gradient's region (or of the loss's): an alias error, not
    // labels overwritten while the kernel reads them.
    for k in [3, 4] {
        let inside = b
            .wrap_labels(whole.buffer().clone(), (k * slot * 4) as u64, 1)
            .expect("an aligned label window");
        let e = b
            .hinton(
                &kd.spec(RowShape::new(1, c)),
                &at(1, c),
                &at(2, c),
                &inside,
                LossOut::with_grad(&lw, &at(3, c)),
            )
            .expect_err("labels overlapping an output");
        assert!(e.to_string().contains("overlap"), "{e}");
    }
    let got = b.download(&whole).expect("download");
    let want = kd
        .forward_backward(&FastCpuBackend::new(), &s, &t, &y, c)
        .expect("host API");
    close(
        "window grad",
        &got[3 * slot..3 * slot + len],
        &want.grad_student,
        1e-6,
    );
    close(
        "window loss",
        &got[4 * slot..4 * slot + 1],
        &[want.loss],
        1e-6,
    );
    assert_eq!(
        &got[slot..slot + len],
        &s[..],
        "the student window is read only"
    );
    for (k, used) in [(0, 0), (1, len), (2, len), (3, len), (4, 1)] {
        assert!(
            got[k * slot + used..(k + 1) * slot]
                .iter()
                .all(|x| x.is_nan()),
            "region {k}: a write outside its window"
        );
    }
}

/// f16 logits on the shared device (where the adapter has f16): bound as they are, the gradient
/// written in f16 by our kernels, the numbers of the host API on the same f16 values.
#[test]
fn shared_device_f16_logits_without_copies() {
    use distillation::half::f16;
    let Some(dev) = shared_device() else {
        return;
    };
    let has_f16 = distillation::WgpuBackend::new().is_ok_and(|b| {
        b.device()
            .features()
            .contains(distillation::wgpu::Features::SHADER_F16)
    });
    if !has_f16 {
        eprintln!("no f16 on this adapter: skipped");
        return;
    }
    let (n, c) = (4, 33);
    let h = |v: Vec<f32>| -> Vec<f16> { v.into_iter().map(f16::from_f32).collect() };
    let (s, t) = (h(logits(n, c, 31, 4.0)), h(logits(n, c, 32, 4.0)));
    let y = [0i64, 32, -100, 7];
    let y32: Vec<i32> = y.iter().map(|&v| v as i32).collect();
    let ht = |v: &[f16]| -> Tensor<2> {
        Tensor::from_data(TensorData::new(v.to_vec(), [n, c]), (&dev, DType::F16))
    };
    let a = ht(&s).require_grad();
    let before = distillation::burn::host_reads();
    let loss = distillation::burn::kd_loss(a.clone(), ht(&t), labels(&y, &dev), 3.0, 0.4)
        .expect("f16 kd_loss");
    let g = a.grad(&loss.backward()).unwrap();
    assert_eq!(
        distillation::burn::host_reads(),
        before,
        "f16 read to the host"
    );
    assert_eq!(g.dtype(), DType::F16, "the gradient in the logits' dtype");
    let want = KdLoss::new(3.0, 0.4)
        .forward_backward(&FastCpuBackend::new(), &s, &t, &y32, c)
        .expect("host API f16");
    let want_g: Vec<f32> = want.grad_student.iter().map(|x| x.to_f32()).collect();
    close("f16 loss", &host(loss), &[want.loss], 1e-5);
    // Both round an f32 gradient to f16 once; the f32 values differ in their last bits.
    close("f16 grad", &host(g), &want_g, 2e-3);
}
