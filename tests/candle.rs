//! The candle adapter (feature `candle`) against candle's own composition of the same losses
//! (`candle_nn::ops::log_softmax`, KL as a sum, `candle_nn::loss::cross_entropy`), values and
//! gradients through `backward()`, on the CPU.

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::ops::{log_softmax, softmax};
use distillation::candle as dc;
use distillation::Divergence;

fn logits(n: usize, c: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n * c)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        })
        .collect()
}

fn close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let g = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let w = want
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(g.len(), w.len(), "{what}: lengths");
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() <= tol * b.abs().max(1.0),
            "{what}[{i}]: ours {a}, candle's composition {b}"
        );
    }
}

/// `T^2 KL(softmax(t/T) || softmax(s/T))` per row, candle ops only.
fn kl_rows(s: &Tensor, t: &Tensor, temp: f64) -> Tensor {
    let lp = log_softmax(&(s / temp).unwrap(), D::Minus1).unwrap();
    let lq = log_softmax(&(t / temp).unwrap(), D::Minus1).unwrap();
    let q = lq.exp().unwrap();
    ((q * (lq - lp).unwrap()).unwrap().sum(D::Minus1).unwrap() * (temp * temp)).unwrap()
}

#[test]
fn kd_loss_and_gradients_match_candles_composition() {
    let dev = Device::Cpu;
    let (n, c) = (7, 33);
    let s = Var::from_vec(logits(n, c, 1), (n, c), &dev).unwrap();
    let t = Var::from_vec(logits(n, c, 2), (n, c), &dev).unwrap();
    let y: Vec<u32> = (0..n as u32).map(|r| (r * 5) % c as u32).collect();
    let labels = Tensor::new(y.as_slice(), &dev).unwrap();
    let (temp, alpha) = (3.0f32, 0.3f32);

    let ours = dc::kd_loss(s.as_tensor(), t.as_tensor(), &labels, temp, alpha).unwrap();
    let g_ours = ours.backward().unwrap();

    let ce = candle_nn::loss::cross_entropy(s.as_tensor(), &labels).unwrap();
    let kl = kl_rows(s.as_tensor(), t.as_tensor(), temp as f64)
        .mean_all()
        .unwrap();
    let theirs = ((ce * alpha as f64).unwrap() + (kl * (1.0 - alpha) as f64).unwrap()).unwrap();
    let g_theirs = theirs.backward().unwrap();

    close("loss", &ours, &theirs, 1e-5);
    close(
        "grad_student",
        g_ours.get(s.as_tensor()).unwrap(),
        g_theirs.get(s.as_tensor()).unwrap(),
        1e-5,
    );
    // The teacher is a Var: online distillation, its gradient too.
    close(
        "grad_teacher",
        g_ours.get(t.as_tensor()).unwrap(),
        g_theirs.get(t.as_tensor()).unwrap(),
        1e-5,
    );
}

#[test]
fn upstream_gradient_scales_ours() {
    let dev = Device::Cpu;
    let (n, c) = (4, 10);
    let s = Var::from_vec(logits(n, c, 3), (n, c), &dev).unwrap();
    let t = Tensor::from_vec(logits(n, c, 4), (n, c), &dev).unwrap();
    let labels = Tensor::new(&[1i64, -100, 3, 9], &dev).unwrap();
    let once = dc::kd_loss(s.as_tensor(), &t, &labels, 2.0, 0.5).unwrap();
    let g1 = once.backward().unwrap();
    let thrice = (dc::kd_loss(s.as_tensor(), &t, &labels, 2.0, 0.5).unwrap() * 3.0).unwrap();
    let g3 = thrice.backward().unwrap();
    let want = (g1.get(s.as_tensor()).unwrap() * 3.0).unwrap();
    close("3 x grad", g3.get(s.as_tensor()).unwrap(), &want, 1e-6);
    // The masked row (-100) has no gradient.
    let row = g1.get(s.as_tensor()).unwrap().get(1).unwrap();
    assert_eq!(
        row.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    // A teacher that is not a Var gets no gradient.
    assert!(g1.get(&t).is_none());
}

#[test]
fn divergences_cross_entropy_and_dkd_match() {
    let dev = Device::Cpu;
    let (n, c) = (5, 17);
    let s = Var::from_vec(logits(n, c, 5), (n, c), &dev).unwrap();
    let t = Tensor::from_vec(logits(n, c, 6), (n, c), &dev).unwrap();
    let labels = Tensor::new(&[0u32, 4, 16, 7, 7], &dev).unwrap();

    // Forward KL alone.
    let ours = dc::soft_target_loss(s.as_tensor(), &t, Divergence::ForwardKl, 2.0).unwrap();
    let theirs = kl_rows(s.as_tensor(), &t, 2.0).mean_all().unwrap();
    close("forward kl", &ours, &theirs, 1e-5);
    let (go, gt) = (ours.backward().unwrap(), theirs.backward().unwrap());
    close(
        "forward kl grad",
        go.get(s.as_tensor()).unwrap(),
        gt.get(s.as_tensor()).unwrap(),
        1e-5,
    );

    // Reverse KL: KL(p || q).
    let ours = dc::soft_target_loss(s.as_tensor(), &t, Divergence::ReverseKl, 2.0).unwrap();
    let theirs = kl_rows(&t, s.as_tensor(), 2.0).mean_all().unwrap();
    close("reverse kl", &ours, &theirs, 1e-5);
    let (go, gt) = (ours.backward().unwrap(), theirs.backward().unwrap());
    close(
        "reverse kl grad",
        go.get(s.as_tensor()).unwrap(),
        gt.get(s.as_tensor()).unwrap(),
        1e-5,
    );

    // Cross-entropy.
    let ours = dc::cross_entropy(s.as_tensor(), &labels, 0.0).unwrap();
    let theirs = candle_nn::loss::cross_entropy(s.as_tensor(), &labels).unwrap();
    close("cross-entropy", &ours, &theirs, 1e-5);
    let (go, gt) = (ours.backward().unwrap(), theirs.backward().unwrap());
    close(
        "cross-entropy grad",
        go.get(s.as_tensor()).unwrap(),
        gt.get(s.as_tensor()).unwrap(),
        1e-5,
    );

    // DKD, mdistiller's composition: TCKD on [p_g, 1 - p_g], NCKD over the other classes.
    let temp = 4.0f64;
    let gt_mask = candle_nn::encoding::one_hot(labels.clone(), c, 1f32, 0f32).unwrap();
    let other = (1.0 - &gt_mask).unwrap();
    let binary = |z: &Tensor| {
        let p = softmax(&(z / temp).unwrap(), D::Minus1).unwrap();
        let pg = (&p * &gt_mask).unwrap().sum_keepdim(D::Minus1).unwrap();
        let po = (&p * &other).unwrap().sum_keepdim(D::Minus1).unwrap();
        Tensor::cat(&[pg, po], D::Minus1).unwrap()
    };
    let (bs, bt) = (binary(s.as_tensor()), binary(&t));
    let tckd = (&bt * (bt.log().unwrap() - bs.log().unwrap()).unwrap())
        .unwrap()
        .sum(D::Minus1)
        .unwrap();
    let masked = |z: &Tensor| (z / temp).unwrap() - (&gt_mask * 1000.0).unwrap();
    let ls = log_softmax(&masked(s.as_tensor()).unwrap(), D::Minus1).unwrap();
    let lt = log_softmax(&masked(&t).unwrap(), D::Minus1).unwrap();
    let nckd = (lt.exp().unwrap() * (&lt - &ls).unwrap())
        .unwrap()
        .sum(D::Minus1)
        .unwrap();
    let ce = candle_nn::loss::cross_entropy(s.as_tensor(), &labels).unwrap();
    let kd = ((tckd + (nckd * 8.0).unwrap()).unwrap() * (temp * temp))
        .unwrap()
        .mean_all()
        .unwrap();
    let theirs = (ce + kd).unwrap();
    let ours = dc::dkd_loss(s.as_tensor(), &t, &labels, 4.0, 1.0, 8.0).unwrap();
    close("dkd", &ours, &theirs, 1e-5);
    let (go, gt) = (ours.backward().unwrap(), theirs.backward().unwrap());
    close(
        "dkd grad",
        go.get(s.as_tensor()).unwrap(),
        gt.get(s.as_tensor()).unwrap(),
        1e-4,
    );
}

#[test]
fn bf16_logits_give_bf16_gradients() {
    let dev = Device::Cpu;
    let (n, c) = (3, 40);
    let s32 = Tensor::from_vec(logits(n, c, 7), (n, c), &dev).unwrap();
    let s = Var::from_tensor(&s32.to_dtype(DType::BF16).unwrap()).unwrap();
    let t = Tensor::from_vec(logits(n, c, 8), (n, c), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let labels = Tensor::new(&[1u32, 2, 3], &dev).unwrap();
    let loss = dc::kd_loss(s.as_tensor(), &t, &labels, 4.0, 0.2).unwrap();
    assert_eq!(loss.dtype(), DType::F32);
    let g = loss.backward().unwrap();
    let gs = g.get(s.as_tensor()).unwrap();
    assert_eq!(gs.dtype(), DType::BF16);
    // The same values in f32.
    let s2 = Var::from_tensor(&s.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
    let t2 = t.to_dtype(DType::F32).unwrap();
    let loss2 = dc::kd_loss(s2.as_tensor(), &t2, &labels, 4.0, 0.2).unwrap();
    close("bf16 loss", &loss, &loss2, 1e-6);
    let g2 = loss2.backward().unwrap();
    close(
        "bf16 grad",
        gs,
        g2.get(s2.as_tensor()).unwrap(),
        1.0 / 128.0,
    );
}

/// A half gradient is the upstream times the f32 gradient rounded once: with an upstream of 1/3,
/// every element equals the f32 route's gradient times 1/3 rounded to bf16 (it was rounded to
/// bf16 first, then scaled and rounded again).
#[test]
fn half_gradients_are_rounded_once() {
    let dev = Device::Cpu;
    let (n, c) = (4, 50);
    let s32 = Tensor::from_vec(logits(n, c, 17), (n, c), &dev).unwrap();
    let sb = s32.to_dtype(DType::BF16).unwrap();
    let t = Tensor::from_vec(logits(n, c, 18), (n, c), &dev).unwrap();
    let labels = Tensor::new(&[1u32, 2, 3, 4], &dev).unwrap();
    let s = Var::from_tensor(&sb).unwrap();
    let loss = (dc::kd_loss(s.as_tensor(), &t, &labels, 3.0, 0.4).unwrap() / 3.0).unwrap();
    let g = loss.backward().unwrap();
    let got = g.get(s.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
    // The f32 route on the same (bf16-valued) logits, scaled in f32, rounded once.
    let s2 = Var::from_tensor(&sb.to_dtype(DType::F32).unwrap()).unwrap();
    let loss2 = (dc::kd_loss(s2.as_tensor(), &t, &labels, 3.0, 0.4).unwrap() / 3.0).unwrap();
    let want = loss2
        .backward()
        .unwrap()
        .get(s2.as_tensor())
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let (a, b): (Vec<f32>, Vec<f32>) = (
        got.flatten_all().unwrap().to_vec1().unwrap(),
        want.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert_eq!(a, b, "bf16 gradient vs the f32 one rounded once");
    // Reduction::None is refused (the adapter returns a scalar).
    let none = distillation::KdLoss {
        reduction: distillation::Reduction::None,
        ..distillation::KdLoss::new(3.0, 0.4)
    };
    let e = dc::kd_loss_with(&none, s.as_tensor(), &t, &labels)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Reduction::None"), "{e}");
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dev = Device::Cpu;
    let s = Tensor::from_vec(logits(2, 5, 9), (2, 5), &dev).unwrap();
    let t = Tensor::from_vec(logits(2, 4, 9), (2, 4), &dev).unwrap();
    let y = Tensor::new(&[0u32, 1], &dev).unwrap();
    let e = dc::kd_loss(&s, &t, &y, 2.0, 0.5).unwrap_err().to_string();
    assert!(e.contains("must match"), "{e}");
    let e = dc::kd_loss(&s, &s, &Tensor::new(&[0u32], &dev).unwrap(), 2.0, 0.5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("one label per row"), "{e}");
    let e = dc::kd_loss(&s, &s, &Tensor::new(&[0u32, 9], &dev).unwrap(), 2.0, 0.5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("label"), "{e}");
    let e = dc::kd_loss(&s, &s, &y, -1.0, 0.5).unwrap_err().to_string();
    assert!(e.contains("temperature"), "{e}");
    let e = dc::kd_loss(
        &s.t().unwrap(),
        &s.t().unwrap(),
        &Tensor::new(&[0u32; 5], &dev).unwrap(),
        2.0,
        0.5,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("contiguous"), "{e}");
    let e = dc::kd_loss(&s.to_dtype(DType::F64).unwrap(), &s, &y, 2.0, 0.5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("F64"), "{e}");
}
