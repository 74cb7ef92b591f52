//! The CPU reference's gradients against central finite differences in f64, on random small inputs.
//! This is what makes the reference an arbiter: every GPU backward pass is compared with it.

use crate::common;

use common::Lcg;
use distillation::ops::{cross_entropy, divergence, dkd, feature, hinton, softmax};
use distillation::{
    AttentionSpec, CrossEntropySpec, Divergence, DivergenceSpec, DkdSpec, HintonSpec, MseSpec,
    Reduction, RowShape, TeacherInput, IGNORE_INDEX,
};
use proptest::prelude::*;

/// Central differences of `f` at `x`, step scaled to each coordinate.
fn numeric_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let h = 1e-5 * x[i].abs().max(1.0);
            let x0 = x[i];
            x[i] = x0 + h;
            let up = f(&x);
            x[i] = x0 - h;
            let down = f(&x);
            x[i] = x0;
            (up - down) / (2.0 * h)
        })
        .collect()
}

fn assert_grad(what: &str, analytic: &[f64], numeric: &[f64]) -> Result<(), TestCaseError> {
    let num: f64 = analytic
        .iter()
        .zip(numeric)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = numeric.iter().map(|b| b * b).sum::<f64>().sqrt();
    prop_assert!(
        num <= 1e-6 * den.max(1e-3),
        "{what}: |analytic - numeric| = {num:.3e}, |numeric| = {den:.3e}\nanalytic {analytic:?}\nnumeric {numeric:?}"
    );
    Ok(())
}

fn inputs() -> impl Strategy<Value = (usize, usize, f64, u64)> {
    (
        1usize..5,
        1usize..8,
        (0.3f64.ln()..10f64.ln()),
        any::<u64>(),
    )
        .prop_map(|(n, c, lt, seed)| (n, c, lt.exp(), seed))
}

fn vec64(g: &mut Lcg, n: usize, scale: f32) -> Vec<f64> {
    g.vec(n, scale).into_iter().map(f64::from).collect()
}

fn labels(g: &mut Lcg, n: usize, c: usize) -> Vec<i32> {
    (0..n)
        .map(|r| {
            // Row 1 is masked when there are several rows, so masking is always exercised.
            if r == 1 {
                IGNORE_INDEX
            } else {
                (((g.next_f32() + 1.0) * 0.5 * c as f32) as usize).min(c - 1) as i32
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn softmax_backward_is_the_derivative((n, c, t, seed) in inputs(), log in any::<bool>()) {
        let mut g = Lcg(seed);
        let (x, w) = (vec64(&mut g, n * c, 3.0), vec64(&mut g, n * c, 1.0));
        let f = |x: &[f64]| softmax::reference::softmax(x, c, t, log).iter().zip(&w).map(|(y, w)| y * w).sum();
        let y = softmax::reference::softmax(&x, c, t, log);
        let analytic = softmax::reference::softmax_backward(&y, &w, c, t, log);
        assert_grad("softmax", &analytic, &numeric_grad(&x, f))?;
    }

    #[test]
    fn divergence_gradients_are_the_derivatives(
        (n, c, t, seed) in inputs(),
        div in 0u8..3,
        beta in 0.1f32..0.9,
        form in 0u8..3,
        red in 0u8..3,
    ) {
        let mut g = Lcg(seed);
        let shape = RowShape::new(n, c);
        let teacher = [TeacherInput::Logits, TeacherInput::Probs, TeacherInput::LogProbs][form as usize];
        let spec = DivergenceSpec {
            divergence: [Divergence::ForwardKl, Divergence::ReverseKl, Divergence::Jsd { beta }][div as usize],
            teacher,
            reduction: [Reduction::BatchMean, Reduction::Sum, Reduction::None][red as usize],
            grad_scale: 0.7,
            ..DivergenceSpec::new(shape, t as f32)
        };
        let s = vec64(&mut g, n * c, 3.0);
        let mut tv = vec64(&mut g, n * c, 3.0);
        if teacher != TeacherInput::Logits {
            tv = softmax::reference::softmax(&tv, c, 1.0, teacher == TeacherInput::LogProbs);
        }
        let y = labels(&mut g, n, c);
        let r = divergence::reference::divergence(&spec, &s, &tv, Some(&y));
        let loss = |s: &[f64], tv: &[f64]| 0.7 * divergence::reference::divergence(&spec, s, tv, Some(&y)).loss;
        assert_grad("student", &r.grad_student, &numeric_grad(&s, |s| loss(s, &tv)))?;
        if teacher == TeacherInput::Logits {
            assert_grad("teacher", &r.grad_teacher, &numeric_grad(&tv, |tv| loss(&s, tv)))?;
        }
    }

    #[test]
    fn cross_entropy_gradient_is_the_derivative((n, c, _t, seed) in inputs(), eps in 0.0f32..0.5) {
        let mut g = Lcg(seed);
        let spec = CrossEntropySpec { label_smoothing: eps, ..CrossEntropySpec::new(RowShape::new(n, c)) };
        let s = vec64(&mut g, n * c, 3.0);
        let y = labels(&mut g, n, c);
        let r = cross_entropy::reference::cross_entropy(&spec, &s, &y);
        let f = |s: &[f64]| cross_entropy::reference::cross_entropy(&spec, s, &y).loss;
        assert_grad("student", &r.grad_student, &numeric_grad(&s, f))?;
    }

    #[test]
    fn hinton_gradients_are_the_derivatives((n, c, t, seed) in inputs(), alpha in 0.0f32..=1.0, eps in 0.0f32..0.3) {
        let mut g = Lcg(seed);
        let spec = HintonSpec { label_smoothing: eps, ..HintonSpec::new(RowShape::new(n, c), t as f32, alpha) };
        let (s, tv) = (vec64(&mut g, n * c, 3.0), vec64(&mut g, n * c, 3.0));
        let y = labels(&mut g, n, c);
        let r = hinton::reference::hinton(&spec, &s, &tv, &y);
        assert_grad("student", &r.grad_student, &numeric_grad(&s, |s| hinton::reference::hinton(&spec, s, &tv, &y).loss))?;
        assert_grad("teacher", &r.grad_teacher, &numeric_grad(&tv, |tv| hinton::reference::hinton(&spec, &s, tv, &y).loss))?;
    }

    #[test]
    fn dkd_gradient_is_the_derivative(
        (n, c, t, seed) in inputs(),
        w in (0.0f32..2.0, 0.0f32..3.0, 0.0f32..10.0),
        eps in 0.0f32..0.3,
        red in 0u8..3,
        confident in any::<bool>(),
    ) {
        let mut g = Lcg(seed);
        let c = c.max(2); // DKD needs a non-target class
        let spec = DkdSpec {
            ce_weight: w.0,
            label_smoothing: eps,
            reduction: [Reduction::BatchMean, Reduction::Sum, Reduction::None][red as usize],
            grad_scale: 0.7,
            ..DkdSpec::new(RowShape::new(n, c), t as f32, w.1, w.2)
        };
        let (mut s, tv) = (vec64(&mut g, n * c, 3.0), vec64(&mut g, n * c, 3.0));
        let y = labels(&mut g, n, c);
        if confident {
            // A student sure of the label: p_g near 1, where 1 - p_g comes from the rest's terms.
            for (r, &l) in y.iter().enumerate() {
                if l >= 0 {
                    s[r * c + l as usize] += 6.0 * t;
                }
            }
        }
        let r = dkd::reference::dkd(&spec, &s, &tv, &y);
        let f = |s: &[f64]| 0.7 * dkd::reference::dkd(&spec, s, &tv, &y).loss;
        assert_grad("student", &r.grad_student, &numeric_grad(&s, f))?;
    }

    #[test]
    fn feature_gradients_are_the_derivatives(
        (n, cs, ct, hw) in (1usize..4, 1usize..5, 1usize..5, 1usize..10),
        seed in any::<u64>(),
    ) {
        let mut g = Lcg(seed);
        let spec = AttentionSpec::new(n, cs, ct, hw);
        let (s, t) = (vec64(&mut g, spec.student_len(), 2.0), vec64(&mut g, spec.teacher_len(), 2.0));
        let (_, gs, gt) = feature::reference::attention_transfer(&spec, &s, &t);
        assert_grad("at student", &gs, &numeric_grad(&s, |s| feature::reference::attention_transfer(&spec, s, &t).0))?;
        assert_grad("at teacher", &gt, &numeric_grad(&t, |t| feature::reference::attention_transfer(&spec, &s, t).0))?;
        let m = MseSpec::new(spec.student_len());
        let b = vec64(&mut g, m.len, 2.0);
        let (_, ga, gb) = feature::reference::mse(&m, &s, &b);
        assert_grad("mse a", &ga, &numeric_grad(&s, |a| feature::reference::mse(&m, a, &b).0))?;
        assert_grad("mse b", &gb, &numeric_grad(&b, |bb| feature::reference::mse(&m, &s, bb).0))?;
    }
}
