//! The autograd tape: parameter gradients against finite differences on the CPU backend, and one
//! training step giving the same parameters on every backend as on the CPU.

use crate::common;

use common::{assert_close, to_f64, Lcg};
use distillation::nn::{Mlp, Optimizer};
use distillation::rng::Rng;
use distillation::tape::{Tape, Tensor};
use distillation::{
    Backend, CpuBackend, CrossEntropySpec, DivergenceSpec, DkdSpec, HintonSpec, RowShape,
};

const SIZES: [usize; 4] = [6, 9, 8, 5];

/// The loss every test here uses: Hinton on the logits, plus cross-entropy with label smoothing,
/// plus reverse KL, an MSE hint on the first hidden layer and DKD (last).
fn total_loss<'a, B: Backend>(
    tape: &Tape<'a, B>,
    mlp: &Mlp<B>,
    x: &[f32],
    teacher: &[f32],
    hint: &[f32],
    labels: &B::Labels,
) -> (Vec<distillation::tape::Var>, Vec<distillation::tape::Var>) {
    let b = tape.backend();
    let n = x.len() / SIZES[0];
    let xin = tape.constant(Tensor::from_host(b, x, &[n, SIZES[0]]).unwrap());
    let f = mlp.forward(tape, xin).unwrap();
    let t = tape.constant(Tensor::from_host(b, teacher, &[n, SIZES[3]]).unwrap());
    let h = tape.constant(Tensor::from_host(b, hint, &[n, SIZES[1]]).unwrap());
    let shape = RowShape::new(n, SIZES[3]);
    let l1 = tape
        .hinton(f.logits, t, labels, HintonSpec::new(shape, 2.0, 0.3))
        .unwrap();
    let l2 = tape
        .cross_entropy(
            f.logits,
            labels,
            CrossEntropySpec {
                label_smoothing: 0.1,
                grad_scale: 0.5,
                ..CrossEntropySpec::new(shape)
            },
        )
        .unwrap();
    let rkl = DivergenceSpec {
        divergence: distillation::Divergence::ReverseKl,
        grad_scale: 0.25,
        ..DivergenceSpec::new(shape, 3.0)
    };
    let l3 = tape.divergence(f.logits, t, None, rkl).unwrap();
    let l4 = tape.mse(f.hidden[0], h, 0.7).unwrap();
    let dkd = DkdSpec {
        grad_scale: 0.4,
        ..DkdSpec::new(shape, 4.0, 1.0, 8.0)
    };
    let l5 = tape.dkd(f.logits, t, labels, dkd).unwrap();
    (vec![l1, l2, l3, l4, l5], f.params)
}

/// `sum_j w_j l_j` over the loss roots, each weighted as recorded.
fn weighted_value<B: Backend>(tape: &Tape<'_, B>, losses: &[distillation::tape::Var]) -> f64 {
    losses
        .iter()
        .map(|l| {
            let w = tape.loss_weight(*l).unwrap().unwrap() as f64;
            w * tape.value(*l).unwrap().to_host(tape.backend()).unwrap()[0] as f64
        })
        .sum()
}

/// Each loss root carries the weight its op was given; `add_weighted_loss` adds `w l`.
#[test]
fn loss_roots_carry_their_weight() {
    let b = CpuBackend::new();
    let d = data(7);
    let labels = b.upload_labels(&d.labels).unwrap();
    let mlp = Mlp::new(&b, &SIZES, &mut Rng::new(3)).unwrap();
    let tape = Tape::new(&b);
    let (losses, params) = total_loss(&tape, &mlp, &d.x, &d.teacher, &d.hint, &labels);
    let weights: Vec<_> = losses
        .iter()
        .map(|l| tape.loss_weight(*l).unwrap())
        .collect();
    assert_eq!(
        weights,
        [Some(1.0), Some(0.5), Some(0.25), Some(0.7), Some(0.4)]
    );
    assert_eq!(tape.loss_weight(params[0]).unwrap(), None);
    assert!(tape.backward(&[params[0]]).is_err());
    let total = Tensor::zeros(&b, &[1]).unwrap();
    for l in &losses {
        tape.add_weighted_loss(*l, &total).unwrap();
    }
    let got = total.to_host(&b).unwrap()[0] as f64;
    let want = weighted_value(&tape, &losses);
    assert!((got - want).abs() < 1e-5 * want.abs(), "{got} vs {want}");
    assert!(tape.add_weighted_loss(params[0], &total).is_err());
}

/// DKD through the tape on leaf logits: its root's gradient against finite differences of its
/// weighted value, and its teacher (a variable here) detached: no gradient.
#[test]
fn dkd_root_gradient_and_detached_teacher() {
    let b = CpuBackend::new();
    let (n, c) = (7, 5);
    let mut g = Lcg(21);
    let (s, t) = (g.vec(n * c, 1.0), g.vec(n * c, 3.0));
    let labels = b.upload_labels(&[0, 1, -100, 3, 4, 0, 1]).unwrap();
    let spec = DkdSpec {
        grad_scale: 0.4,
        ..DkdSpec::new(RowShape::new(n, c), 4.0, 1.0, 8.0)
    };
    let eval = |s: &[f32]| {
        let tape = Tape::new(&b);
        let sv = tape.leaf(Tensor::from_host(&b, s, &[n, c]).unwrap());
        let tv = tape.leaf(Tensor::from_host(&b, &t, &[n, c]).unwrap());
        let l = tape.dkd(sv, tv, &labels, spec).unwrap();
        tape.backward(&[l]).unwrap();
        let gt = tape.grad(tv).unwrap().map(|g| g.to_host(&b).unwrap());
        assert!(
            gt.as_ref().is_none_or(|g| g.iter().all(|&v| v == 0.0)),
            "{gt:?}"
        );
        let grad = tape.grad(sv).unwrap().unwrap().to_host(&b).unwrap();
        (weighted_value(&tape, &[l]), grad)
    };
    let (_, grad) = eval(&s);
    let h = 1e-2f32;
    let numeric: Vec<f64> = (0..n * c)
        .map(|i| {
            let mut x = s.clone();
            x[i] += h;
            let up = eval(&x).0;
            x[i] -= 2.0 * h;
            (up - eval(&x).0) / (2.0 * h as f64)
        })
        .collect();
    assert_close("dkd root", &grad, &numeric, 1e-3).unwrap();
}

struct Data {
    x: Vec<f32>,
    teacher: Vec<f32>,
    hint: Vec<f32>,
    labels: Vec<i32>,
}

fn data(n: usize) -> Data {
    let mut g = Lcg(21);
    Data {
        x: g.vec(n * SIZES[0], 1.5),
        teacher: g.vec(n * SIZES[3], 3.0),
        hint: g.vec(n * SIZES[1], 1.0),
        labels: (0..n as i32)
            .map(|i| if i == 2 { -100 } else { i % SIZES[3] as i32 })
            .collect(),
    }
}

#[test]
fn parameter_gradients_match_finite_differences() {
    let b = CpuBackend::new();
    let d = data(7);
    let labels = b.upload_labels(&d.labels).unwrap();
    let mut mlp = Mlp::new(&b, &SIZES, &mut Rng::new(3)).unwrap();
    let tape = Tape::new(&b);
    let (losses, params) = total_loss(&tape, &mlp, &d.x, &d.teacher, &d.hint, &labels);
    // Without DKD, whose larger gradients make a ReLU kink of this MLP (a first-layer unit near 0,
    // within the step of parameter 0's element 16) exceed the tolerance below: DKD's root chains
    // like the others (one fused kernel, its weighted gradient), and its own gradient is checked
    // by finite differences in tests/suite/reference.rs and, through the tape, in
    // `dkd_root_gradient_and_detached_teacher`.
    let losses = &losses[..4];
    tape.backward(losses).unwrap();
    let grads: Vec<Vec<f32>> = params
        .iter()
        .map(|p| tape.grad(*p).unwrap().unwrap().to_host(&b).unwrap())
        .collect();
    drop(tape);
    let h: f32 = std::env::var("FD_H")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3e-3);
    let mut checked = 0;
    for (pi, grad) in grads.iter().enumerate() {
        let base = mlp.params()[pi].value.to_host(&b).unwrap();
        let mut numeric = Vec::new();
        for i in 0..base.len() {
            let mut eval = |v: f32| {
                let mut p = base.clone();
                p[i] = v;
                let shape = mlp.params()[pi].value.shape.clone();
                mlp.params_mut()[pi].value = Tensor::from_host(&b, &p, &shape).unwrap();
                let tape = Tape::new(&b);
                let (losses, _) = total_loss(&tape, &mlp, &d.x, &d.teacher, &d.hint, &labels);
                weighted_value(&tape, &losses[..4])
            };
            let up = eval(base[i] + h);
            let down = eval(base[i] - h);
            numeric.push((up - down) / (2.0 * h as f64));
            checked += 1;
        }
        let shape = mlp.params()[pi].value.shape.clone();
        mlp.params_mut()[pi].value = Tensor::from_host(&b, &base, &shape).unwrap();
        // The CPU backend stores f32 between ops: a loss of ~5 is known to ~3e-7, so differences
        // over 2h = 6e-3 carry ~1e-4 of noise on gradients of ~0.05. Each kernel's backward is
        // checked in f64 in tests/suite/reference.rs; this checks how the tape chains them, where a
        // wrong transpose or a lost accumulation is an O(1) error.
        assert_close(&format!("param {pi}"), grad, &numeric, 1e-2).unwrap();
    }
    assert_eq!(checked, mlp.parameter_count());
}

/// One Adam step of the MLP from seed 5; the parameters after it.
fn one_step<B: Backend>(backend: &B, d: &Data) -> Vec<Vec<f32>> {
    let labels = backend.upload_labels(&d.labels).unwrap();
    let mut mlp = Mlp::new(backend, &SIZES, &mut Rng::new(5)).unwrap();
    let tape = Tape::new(backend);
    let (losses, params) = total_loss(&tape, &mlp, &d.x, &d.teacher, &d.hint, &labels);
    tape.backward(&losses).unwrap();
    Optimizer::adam(1e-2)
        .step(&tape, mlp.params_mut().into_iter().zip(params), 1)
        .unwrap();
    mlp.params()
        .iter()
        .map(|p| p.value.to_host(backend).unwrap())
        .collect()
}

/// One training step gives the same parameters on every backend as on the CPU.
fn one_training_step_matches_cpu<B: Backend>(b: &B) {
    let d = data(33);
    let want = one_step(&CpuBackend::new(), &d);
    for (i, (g, w)) in one_step(b, &d).iter().zip(&want).enumerate() {
        assert_close(&format!("param {i} after one step"), g, &to_f64(w), 1e-4).unwrap();
    }
}

backend_tests!(one_training_step_matches_cpu);

/// The gradients of `x` and of `y = reshape(x)` under `mse(x, c)` (pushed first) and the
/// cross-entropy of `y` (pushed last), after `backward` has run `runs` times.
fn shared_first_gradient<B: Backend>(b: &B, runs: usize, with_mse: bool) -> [Vec<f32>; 2] {
    let mut g = Lcg(4);
    let tape = Tape::new(b);
    let x = tape.leaf(Tensor::from_host(b, &g.vec(12, 2.0), &[3, 4]).unwrap());
    let c = tape.constant(Tensor::from_host(b, &g.vec(12, 1.0), &[3, 4]).unwrap());
    let mse = tape.mse(x, c, 0.5).unwrap();
    let y = tape.reshape(x, &[3, 4]).unwrap();
    let labels = b.upload_labels(&[1, 3, 0]).unwrap();
    let ce = tape
        .cross_entropy(y, &labels, CrossEntropySpec::new(RowShape::new(3, 4)))
        .unwrap();
    let roots = if with_mse { vec![mse, ce] } else { vec![ce] };
    for _ in 0..runs {
        tape.backward(&roots).unwrap();
    }
    [x, y].map(|v| tape.grad(v).unwrap().unwrap().to_host(b).unwrap())
}

/// Accumulation never writes into a buffer another node holds. Going backward, the
/// cross-entropy's saved gradient becomes `y`'s, then (through the reshape) `x`'s first
/// gradient; the MSE's gradient is then added into `x`'s, and must leave `y`'s (and the
/// cross-entropy's) alone.
fn accumulation_leaves_shared_gradients_alone<B: Backend>(b: &B) {
    let [_, ce] = shared_first_gradient(b, 1, false);
    let [gx, gy] = shared_first_gradient(b, 1, true);
    assert_eq!(gy, ce, "dL/dy is the cross-entropy's gradient alone");
    assert_ne!(gx, ce, "dL/dx has the MSE's gradient too");
}

/// `backward` run twice gives the same gradients as once: the second pass starts afresh from the
/// roots' saved gradients, which the first left as they were.
fn backward_twice_gives_the_same_gradients<B: Backend>(b: &B) {
    assert_eq!(
        shared_first_gradient(b, 2, true),
        shared_first_gradient(b, 1, true)
    );
    let d = data(9);
    let labels = b.upload_labels(&d.labels).unwrap();
    let mlp = Mlp::new(b, &SIZES, &mut Rng::new(3)).unwrap();
    let grads = |runs: usize| {
        let tape = Tape::new(b);
        let (losses, params) = total_loss(&tape, &mlp, &d.x, &d.teacher, &d.hint, &labels);
        for _ in 0..runs {
            tape.backward(&losses).unwrap();
        }
        params
            .iter()
            .map(|p| tape.grad(*p).unwrap().unwrap().to_host(b).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(grads(2), grads(1));
}

mod accumulation {
    use super::*;
    backend_tests!(
        accumulation_leaves_shared_gradients_alone,
        backward_twice_gives_the_same_gradients
    );
}

/// A CNN on 6x5 images with 2 channels: conv, ReLU, max-pool, conv, ReLU, head; Hinton loss plus
/// attention transfer between its first block and a fixed map.
fn cnn_loss<'a, B: Backend>(
    tape: &Tape<'a, B>,
    cnn: &distillation::nn::Cnn<B>,
    x: &[f32],
    t: &[f32],
    labels: &B::Labels,
) -> (Vec<distillation::tape::Var>, Vec<distillation::tape::Var>) {
    let b = tape.backend();
    let n = 3;
    let xin = tape.constant(Tensor::from_host(b, x, &[n, 2 * 6 * 5]).unwrap());
    let f = cnn.forward(tape, xin).unwrap();
    let tv = tape.constant(Tensor::from_host(b, t, &[n, 4]).unwrap());
    let l1 = tape
        .hinton(
            f.logits,
            tv,
            labels,
            HintonSpec::new(RowShape::new(n, 4), 2.0, 0.5),
        )
        .unwrap();
    let map_shape = tape.value(f.maps[0]).unwrap().shape.clone();
    let fixed: Vec<f32> = (0..map_shape.iter().product::<usize>())
        .map(|i| ((i * 7) % 5) as f32 * 0.3)
        .collect();
    let fm = tape.constant(Tensor::from_host(b, &fixed, &map_shape).unwrap());
    let l2 = tape.attention_transfer(f.maps[0], fm, 50.0).unwrap();
    (vec![l1, l2], f.params)
}

fn cnn_setup<B: Backend>(b: &B) -> (distillation::nn::Cnn<B>, Vec<f32>, Vec<f32>, B::Labels) {
    let mut g = Lcg(8);
    let cnn = distillation::nn::Cnn::new(b, (2, 6, 5), &[3, 4], 4, &mut Rng::new(2)).unwrap();
    (
        cnn,
        g.vec(3 * 60, 1.0),
        g.vec(12, 2.0),
        b.upload_labels(&[0, 3, 1]).unwrap(),
    )
}

#[test]
fn cnn_gradients_match_finite_differences() {
    let b = CpuBackend::new();
    let (mut cnn, x, t, labels) = cnn_setup(&b);
    let tape = Tape::new(&b);
    let (losses, params) = cnn_loss(&tape, &cnn, &x, &t, &labels);
    tape.backward(&losses).unwrap();
    let grads: Vec<Vec<f32>> = params
        .iter()
        .map(|p| tape.grad(*p).unwrap().unwrap().to_host(&b).unwrap())
        .collect();
    drop(tape);
    let h = 3e-3f32;
    for (pi, grad) in grads.iter().enumerate() {
        let base = cnn.params_mut()[pi].value.to_host(&b).unwrap();
        let shape = cnn.params_mut()[pi].value.shape.clone();
        let mut numeric = Vec::new();
        for i in 0..base.len() {
            let mut eval = |v: f32| {
                let mut p = base.clone();
                p[i] = v;
                cnn.params_mut()[pi].value = Tensor::from_host(&b, &p, &shape).unwrap();
                let tape = Tape::new(&b);
                let (losses, _) = cnn_loss(&tape, &cnn, &x, &t, &labels);
                // Loss values are unweighted; the attention term carries its weight 50.
                weighted_value(&tape, &losses)
            };
            numeric.push((eval(base[i] + h) - eval(base[i] - h)) / (2.0 * h as f64));
        }
        cnn.params_mut()[pi].value = Tensor::from_host(&b, &base, &shape).unwrap();
        // As for the MLP: f32 storage between ops bounds the differences' precision.
        assert_close(&format!("cnn param {pi}"), grad, &numeric, 1e-2).unwrap();
    }
}

fn cnn_step<B: Backend>(b: &B) -> Vec<Vec<f32>> {
    let (mut cnn, x, t, labels) = cnn_setup(b);
    let tape = Tape::new(b);
    let (losses, params) = cnn_loss(&tape, &cnn, &x, &t, &labels);
    tape.backward(&losses).unwrap();
    Optimizer::Sgd {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 1e-4,
    }
    .step(&tape, cnn.params_mut().into_iter().zip(params), 1)
    .unwrap();
    cnn.params_mut()
        .iter()
        .map(|p| p.value.to_host(b).unwrap())
        .collect()
}

/// One SGD step of the CNN gives the same parameters on every backend as on the CPU.
fn one_cnn_step_matches_cpu<B: Backend>(b: &B) {
    let want = cnn_step(&CpuBackend::new());
    for (i, (g, w)) in cnn_step(b).iter().zip(&want).enumerate() {
        assert_close(
            &format!("cnn param {i} after one step"),
            g,
            &to_f64(w),
            1e-4,
        )
        .unwrap();
    }
}

mod cnn {
    use super::*;
    backend_tests!(one_cnn_step_matches_cpu);
}

/// Misuse of the tape is an error, not a panic or another value: a `Var` of another tape (or an
/// index past this one's nodes), a bias of the wrong length, a teacher or MSE target of another
/// shape with as many elements, a convolution spec im2col cannot run.
#[test]
fn misuse_is_an_error() {
    use distillation::ops::conv::ConvSpec;
    let b = CpuBackend;
    let t1 = Tape::new(&b);
    let t2 = Tape::new(&b);
    let x = t1.leaf(Tensor::from_host(&b, &[1.0; 6], &[2, 3]).unwrap());
    let w = t1.leaf(Tensor::from_host(&b, &[0.5; 12], &[3, 4]).unwrap());
    // A Var of t1 on t2 (t2 has no nodes) and on a t2 with as many nodes.
    assert!(t2.value(x).is_err());
    assert!(t2.matmul(x, w).is_err());
    let _ = t2.constant(Tensor::from_host(&b, &[0.0; 6], &[2, 3]).unwrap());
    let _ = t2.constant(Tensor::from_host(&b, &[0.0; 12], &[3, 4]).unwrap());
    assert!(
        t2.matmul(x, w).is_err(),
        "another tape's Var read a node of this one"
    );
    assert!(t2.grad(x).is_err() && t2.backward(&[x]).is_err());
    let y = t1.matmul(x, w).unwrap();
    // A bias of 2 or 8 for 4 columns: refused (it was tiled over a flattened view).
    for len in [2, 8] {
        let bias = t1.leaf(Tensor::from_host(&b, &vec![0.1; len], &[len]).unwrap());
        assert!(t1.bias_add(y, bias).is_err(), "bias of {len}");
    }
    // A teacher [4, 2] beside a [2, 4] student; an MSE target of another shape.
    let tt = t1.constant(Tensor::from_host(&b, &[0.0; 8], &[4, 2]).unwrap());
    let labels = b.upload_labels(&[0, 1]).unwrap();
    let spec = HintonSpec::new(RowShape::new(2, 4), 2.0, 0.5);
    assert!(t1.hinton(y, tt, &labels, spec).is_err());
    assert!(t1.mse(y, tt, 1.0).is_err());
    // im2col with stride 0 or a kernel past the padded image: an error, not a division by zero.
    let img = t1.constant(Tensor::from_host(&b, &[0.0; 16], &[1, 4, 4, 1]).unwrap());
    let conv = ConvSpec {
        n: 1,
        h: 4,
        w: 4,
        c: 1,
        k: 3,
        stride: 0,
        pad: 0,
    };
    assert!(t1.im2col(img, conv).is_err());
    assert!(t1
        .im2col(
            img,
            ConvSpec {
                k: 9,
                stride: 1,
                ..conv
            }
        )
        .is_err());
}
