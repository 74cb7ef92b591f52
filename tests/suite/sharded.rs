//! The vocab-sharded losses (`docs/LOSSES.md` section 9): the columns of `[N, C]` logits split
//! into 1, 2, 3 and 7 shards (uneven widths, shards of width 1), each shard's stats combined in
//! this process (the in-process combine, or the distributed recipe: MAX of the maxima, rescale,
//! SUM of the sums), then each shard's loss part and gradient columns, compared with the
//! unsharded f64 reference of the same loss, on the reference backend, the fast CPU backend and
//! wgpu (`sharded.wgsl`; required with `DISTILLATION_REQUIRE=wgpu`). The teacher as logits,
//! probabilities or log-probabilities (exact zeros included); `sharded.cu` compiles with NVRTC
//! (required with `DISTILLATION_REQUIRE=nvrtc`; `tools/cuda-emu` `EMU_SHARDED` runs it).

use crate::common;

use common::{assert_close, assert_close_abs, to_f64, Lcg};
use distillation::ops::sharded::{JSD_TERMS, MAXIMA, STATS};
use distillation::ops::{cross_entropy, divergence, dkd, hinton, RowLossResult};
use distillation::{
    CpuBackend, CrossEntropySpec, Divergence, DivergenceSpec, DkdSpec, Error, FastCpuBackend,
    HintonSpec, Reduction, RowShape, Shard, ShardedBackend, ShardedKdLoss, ShardedLoss,
    TeacherInput, IGNORE_INDEX,
};
use proptest::prelude::*;

/// The sharded run's outputs, shards concatenated back into `[N, C]`.
struct Whole {
    loss: f64,
    row_loss: Vec<f32>,
    grad_student: Vec<f32>,
    grad_teacher: Option<Vec<f32>>,
}

/// Column `offset..offset + width` of every row.
fn columns(x: &[f32], c: usize, offset: usize, width: usize) -> Vec<f32> {
    x.chunks_exact(c)
        .flat_map(|r| r[offset..offset + width].iter().copied())
        .collect()
}

/// The shards' `(offset, width)` for `widths`.
fn layout(widths: &[usize]) -> Vec<(usize, usize)> {
    let mut o = 0;
    widths
        .iter()
        .map(|&w| {
            o += w;
            (o - w, w)
        })
        .collect()
}

/// Runs `kd` over the shards `widths` of `[n, c]` logits on `b`; `distributed` combines with the
/// MAX / rescale / SUM recipe instead of `combine_shard_stats`.
#[allow(clippy::too_many_arguments)]
fn run<B: ShardedBackend>(
    b: &B,
    kd: &ShardedKdLoss,
    n: usize,
    c: usize,
    widths: &[usize],
    s: &[f32],
    t: Option<&[f32]>,
    labels: Option<&[i32]>,
    distributed: bool,
) -> distillation::Result<Whole> {
    let shards: Vec<(Shard, Vec<f32>, Option<Vec<f32>>)> = layout(widths)
        .into_iter()
        .map(|(o, w)| {
            (
                Shard::new(n, c, o, w),
                columns(s, c, o, w),
                t.map(|t| columns(t, c, o, w)),
            )
        })
        .collect();
    let mut stats = Vec::new();
    for (sh, ss, ts) in &shards {
        stats.push(kd.stats(b, *sh, ss, ts.as_deref(), labels)?);
    }
    let global = if distributed {
        // all-reduce MAX of the maxima planes
        let mut maxima = stats[0][..n * MAXIMA].to_vec();
        for st in &stats[1..] {
            for (m, &v) in maxima.iter_mut().zip(&st[..n * MAXIMA]) {
                *m = m.max(v);
            }
        }
        // each shard rescales, then all-reduce SUM of the sums planes
        let mut global = vec![0.0f32; n * STATS];
        global[..n * MAXIMA].copy_from_slice(&maxima);
        for st in &mut stats {
            kd.rescale_stats(st, &maxima)?;
            for (g, &v) in global[n * MAXIMA..].iter_mut().zip(&st[n * MAXIMA..]) {
                *g += v;
            }
        }
        global
    } else {
        let refs: Vec<&[f32]> = stats.iter().map(|v| v.as_slice()).collect();
        kd.combine_shard_stats(&refs)?
    };
    let jsd = if kd.loss.needs_jsd_terms() {
        let mut sum = vec![0.0f32; n * JSD_TERMS];
        for (sh, ss, ts) in &shards {
            let part = kd.jsd_terms(b, *sh, ss, ts.as_deref().unwrap(), labels, &global)?;
            sum.iter_mut().zip(part).for_each(|(a, v)| *a += v);
        }
        Some(sum)
    } else {
        None
    };
    let mut out = Whole {
        loss: 0.0,
        row_loss: vec![0.0; n],
        grad_student: vec![f32::NAN; n * c],
        grad_teacher: (kd.teacher_grad && t.is_some()).then(|| vec![f32::NAN; n * c]),
    };
    for (sh, ss, ts) in &shards {
        let r = kd.loss_and_grad(b, *sh, ss, ts.as_deref(), labels, &global, jsd.as_deref())?;
        out.loss += r.loss as f64;
        for (a, v) in out.row_loss.iter_mut().zip(&r.row_loss) {
            *a += v;
        }
        for row in 0..n {
            let (dst, src) = (row * c + sh.offset, row * sh.width);
            out.grad_student[dst..dst + sh.width]
                .copy_from_slice(&r.grad_student[src..src + sh.width]);
            if let (Some(g), Some(rg)) = (out.grad_teacher.as_mut(), r.grad_teacher.as_ref()) {
                g[dst..dst + sh.width].copy_from_slice(&rg[src..src + sh.width]);
            }
        }
    }
    Ok(out)
}

/// The unsharded f64 reference of `kd`.
fn unsharded(
    kd: &ShardedKdLoss,
    n: usize,
    c: usize,
    s: &[f32],
    t: Option<&[f32]>,
    labels: Option<&[i32]>,
) -> RowLossResult {
    let shape = RowShape::new(n, c);
    let (s64, t64) = (to_f64(s), t.map(to_f64));
    match kd.loss {
        ShardedLoss::Divergence(d) => divergence::reference::divergence(
            &DivergenceSpec {
                divergence: d,
                teacher: kd.teacher,
                reduction: kd.reduction,
                ignore_index: kd.ignore_index,
                ..DivergenceSpec::new(shape, kd.temperature)
            },
            &s64,
            t64.as_deref().unwrap(),
            labels,
        ),
        ShardedLoss::CrossEntropy => cross_entropy::reference::cross_entropy(
            &CrossEntropySpec {
                label_smoothing: kd.label_smoothing,
                reduction: kd.reduction,
                ignore_index: kd.ignore_index,
                ..CrossEntropySpec::new(shape)
            },
            &s64,
            labels.unwrap(),
        ),
        ShardedLoss::Hinton { alpha } if kd.teacher != TeacherInput::Logits => {
            // alpha CE + (1 - alpha) T^2 KL(q || p) with the given q: the unsharded pieces
            let kl = unsharded(
                &ShardedKdLoss {
                    loss: ShardedLoss::Divergence(Divergence::ForwardKl),
                    ..*kd
                },
                n,
                c,
                s,
                t,
                labels,
            );
            let ce = unsharded(
                &ShardedKdLoss {
                    loss: ShardedLoss::CrossEntropy,
                    ..*kd
                },
                n,
                c,
                s,
                None,
                labels,
            );
            let (a, b) = (alpha as f64, 1.0 - alpha as f64);
            let mix = |x: &[f64], y: &[f64]| -> Vec<f64> {
                x.iter().zip(y).map(|(x, y)| a * x + b * y).collect()
            };
            RowLossResult {
                loss: a * ce.loss + b * kl.loss,
                row_loss: mix(&ce.row_loss, &kl.row_loss),
                grad_student: mix(&ce.grad_student, &kl.grad_student),
                ..Default::default()
            }
        }
        ShardedLoss::Dkd {
            ce_weight,
            tckd_weight,
            nckd_weight,
        } => dkd::reference::dkd(
            &DkdSpec {
                ce_weight,
                label_smoothing: kd.label_smoothing,
                reduction: kd.reduction,
                ignore_index: kd.ignore_index,
                ..DkdSpec::new(shape, kd.temperature, tckd_weight, nckd_weight)
            },
            &s64,
            t64.as_deref().unwrap(),
            labels.unwrap(),
        ),
        ShardedLoss::Hinton { alpha } => hinton::reference::hinton(
            &HintonSpec {
                label_smoothing: kd.label_smoothing,
                reduction: kd.reduction,
                ignore_index: kd.ignore_index,
                ..HintonSpec::new(shape, kd.temperature, alpha)
            },
            &s64,
            t64.as_deref().unwrap(),
            labels.unwrap(),
        ),
    }
}

/// Compares a sharded run with the unsharded reference: relative error `tol`, and absolute
/// floors `atol_row` for the (row) losses and `atol_grad` per gradient element.
fn compare(
    what: &str,
    got: &Whole,
    want: &RowLossResult,
    tol: f64,
    atol_row: f64,
    atol_grad: f64,
) -> Result<(), String> {
    let loss_tol = tol * want.loss.abs() + atol_row * got.row_loss.len() as f64;
    if (got.loss - want.loss).abs() > loss_tol || got.loss.is_nan() != want.loss.is_nan() {
        return Err(format!("{what}: loss {} != {}", got.loss, want.loss));
    }
    assert_close_abs(
        &format!("{what} row_loss"),
        &got.row_loss,
        &want.row_loss,
        tol,
        atol_row,
    )?;
    assert_close_abs(
        &format!("{what} grad_student"),
        &got.grad_student,
        &want.grad_student,
        tol,
        atol_grad,
    )?;
    if let Some(g) = &got.grad_teacher {
        assert_close_abs(
            &format!("{what} grad_teacher"),
            g,
            &want.grad_teacher,
            tol,
            atol_grad,
        )?;
    }
    Ok(())
}

/// The absolute floors of a case (`compare`): the stats are f32, so the global quantities in
/// each element (`log Z`, the divergence `D`) carry an f32 rounding of their magnitude,
/// `δ ~ 1e-7 (|logit| / T + D)`; an element's gradient error is `δ p_j k T` (summing to
/// `k T δ` over a row), a row loss's `T^2 δ`. The floors are 10 times that.
fn floors(want: &RowLossResult, temp: f32, logits: f32, reduction: Reduction) -> (f64, f64) {
    let (t, m) = (temp as f64, logits as f64);
    let valid = want.row_loss.iter().filter(|v| **v != 0.0).count().max(1);
    let k = if reduction == Reduction::BatchMean {
        1.0 / valid as f64
    } else {
        1.0
    };
    // the largest row loss: T^2 D for a divergence, about CE + T^2 D for Hinton
    let big = want.row_loss.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    (
        1e-6 * (1.0 + m * (1.0 + t) + big),
        1e-6 * k * (1.0 + m * (1.0 + t) + big / t + big),
    )
}

/// The losses a case runs.
fn losses(beta: f32, alpha: f32, eps: f32, t: f32) -> Vec<ShardedKdLoss> {
    let mut v = vec![
        ShardedKdLoss::divergence(Divergence::ForwardKl, t),
        ShardedKdLoss::divergence(Divergence::ReverseKl, t),
        ShardedKdLoss::divergence(Divergence::Jsd { beta }, t),
        ShardedKdLoss {
            label_smoothing: eps,
            ..ShardedKdLoss::cross_entropy()
        },
        ShardedKdLoss {
            label_smoothing: eps,
            ..ShardedKdLoss::hinton(t, alpha)
        },
    ];
    for kd in &mut v {
        kd.teacher_grad = true;
    }
    // DKD: the teacher detached, at least 2 classes (check_case skips it below that)
    v.push(ShardedKdLoss {
        label_smoothing: eps,
        ..ShardedKdLoss::new(
            ShardedLoss::Dkd {
                ce_weight: 0.7,
                tckd_weight: 1.0,
                nckd_weight: 2.0,
            },
            t,
        )
    });
    v
}

/// Splits `c` columns into `k` uneven shards (the first of width 1 when `k > 1`).
fn split(c: usize, k: usize, g: &mut Lcg) -> Vec<usize> {
    let k = k.min(c);
    if k == 1 {
        return vec![c];
    }
    let mut cuts: Vec<usize> = vec![1];
    while cuts.len() < k - 1 {
        let x = 2 + ((g.next_f32() + 1.0) * 0.5 * (c - 2) as f32) as usize;
        if x < c && !cuts.contains(&x) {
            cuts.push(x);
        }
    }
    cuts.sort();
    let mut w = Vec::new();
    let mut prev = 0;
    for x in cuts.into_iter().chain([c]) {
        w.push(x - prev);
        prev = x;
    }
    w
}

/// One case over every loss, both backends, both combines.
#[allow(clippy::too_many_arguments)]
fn check_case(
    n: usize,
    c: usize,
    widths: &[usize],
    temp: f32,
    scale: f32,
    masked: bool,
    reduction: Reduction,
    seed: u64,
    near: f32,
) -> Result<(), String> {
    let mut g = Lcg(seed);
    let s = g.vec(n * c, scale);
    let t: Vec<f32> = if near > 0.0 {
        // a teacher close to the student: p ~ q, the divergences second order
        s.iter().map(|&v| v + near * scale * g.next_f32()).collect()
    } else {
        g.vec(n * c, scale)
    };
    let labels: Vec<i32> = (0..n)
        .map(|r| {
            if masked && r % 3 == 1 {
                IGNORE_INDEX
            } else {
                ((r * 7 + seed as usize) % c) as i32
            }
        })
        .collect();
    for kd in losses(0.3, 0.4, 0.1, temp) {
        let kd = ShardedKdLoss { reduction, ..kd };
        if kd.loss.is_dkd() && c < 2 {
            continue;
        }
        let t = kd.loss.needs_teacher().then_some(t.as_slice());
        let want = unsharded(&kd, n, c, &s, t, Some(&labels));
        let what = format!("{:?} T={temp} widths={widths:?}", kd.loss);
        let (atol_row, atol_grad) = floors(&want, temp, scale, reduction);
        let r = run(
            &CpuBackend::new(),
            &kd,
            n,
            c,
            widths,
            &s,
            t,
            Some(&labels),
            false,
        )
        .map_err(|e| format!("{what}: {e}"))?;
        compare(
            &format!("reference {what}"),
            &r,
            &want,
            1e-5,
            atol_row,
            atol_grad,
        )?;
        for threads in [1, 3] {
            let fast = FastCpuBackend::new().with_threads(threads);
            let r = run(&fast, &kd, n, c, widths, &s, t, Some(&labels), threads == 3)
                .map_err(|e| format!("{what}: {e}"))?;
            compare(
                &format!("fast {what}"),
                &r,
                &want,
                1e-4,
                10.0 * atol_row,
                10.0 * atol_grad,
            )?;
        }
        if let Some(w) = common::wgpu() {
            let r = run(w, &kd, n, c, widths, &s, t, Some(&labels), true)
                .map_err(|e| format!("{what}: {e}"))?;
            let (row, grad) = (30.0 * atol_row, 30.0 * atol_grad);
            compare(&format!("wgpu {what}"), &r, &want, 1e-4, row, grad)?;
        }
    }
    Ok(())
}

#[test]
fn two_three_and_seven_shards_equal_the_unsharded_losses() {
    let mut g = Lcg(7);
    for (n, c) in [(5, 40), (3, 9), (1, 7), (4, 1000)] {
        for k in [1, 2, 3, 7] {
            let widths = split(c, k, &mut g);
            for temp in [1.0, 4.0] {
                check_case(
                    n,
                    c,
                    &widths,
                    temp,
                    4.0,
                    true,
                    Reduction::BatchMean,
                    11 + k as u64,
                    0.0,
                )
                .unwrap();
            }
        }
    }
}

#[test]
fn teacher_close_to_the_student_at_high_temperature() {
    let mut g = Lcg(17);
    for (n, c) in [(3, 50), (2, 700)] {
        for k in [2, 7] {
            let widths = split(c, k, &mut g);
            for temp in [5.0, 20.0] {
                for near in [1e-2, 1e-3] {
                    check_case(n, c, &widths, temp, 3.0, true, Reduction::Sum, 5, near).unwrap();
                }
            }
        }
    }
}

#[test]
fn the_distributed_combine_equals_the_in_process_one() {
    let kd = ShardedKdLoss::hinton(3.0, 0.3);
    let (n, c) = (4, 30);
    let mut g = Lcg(3);
    let (s, t) = (g.vec(n * c, 6.0), g.vec(n * c, 6.0));
    let labels = [0, 29, 5, IGNORE_INDEX];
    let widths = [1, 13, 16];
    let b = CpuBackend::new();
    let a = run(&b, &kd, n, c, &widths, &s, Some(&t), Some(&labels), false).unwrap();
    let d = run(&b, &kd, n, c, &widths, &s, Some(&t), Some(&labels), true).unwrap();
    assert!((a.loss - d.loss).abs() <= 1e-6 * a.loss.abs());
    assert_close("grad", &d.grad_student, &to_f64(&a.grad_student), 1e-6).unwrap();
}

#[test]
fn rows_without_labels_and_every_row_masked() {
    let (n, c) = (3, 11);
    let mut g = Lcg(5);
    let (s, t) = (g.vec(n * c, 3.0), g.vec(n * c, 3.0));
    let kd = ShardedKdLoss::divergence(Divergence::ForwardKl, 2.0);
    let want = unsharded(&kd, n, c, &s, Some(&t), None);
    for b in [
        &CpuBackend::new() as &dyn ShardedDyn,
        &FastCpuBackend::new(),
    ] {
        let r = b.run(&kd, n, c, &[4, 1, 6], &s, Some(&t), None).unwrap();
        compare("no labels", &r, &want, 1e-4, 1e-6, 1e-6).unwrap();
    }
    let kd = ShardedKdLoss::hinton(2.0, 0.5);
    let labels = [IGNORE_INDEX; 3];
    for b in [
        &CpuBackend::new() as &dyn ShardedDyn,
        &FastCpuBackend::new(),
    ] {
        let r = b
            .run(&kd, n, c, &[4, 1, 6], &s, Some(&t), Some(&labels))
            .unwrap();
        assert_eq!(r.loss, 0.0);
        assert!(r.grad_student.iter().all(|&v| v == 0.0));
    }
}

/// Runs over either backend behind one reference.
trait ShardedDyn {
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        kd: &ShardedKdLoss,
        n: usize,
        c: usize,
        widths: &[usize],
        s: &[f32],
        t: Option<&[f32]>,
        labels: Option<&[i32]>,
    ) -> distillation::Result<Whole>;
}

impl<B: ShardedBackend> ShardedDyn for B {
    fn run(
        &self,
        kd: &ShardedKdLoss,
        n: usize,
        c: usize,
        widths: &[usize],
        s: &[f32],
        t: Option<&[f32]>,
        labels: Option<&[i32]>,
    ) -> distillation::Result<Whole> {
        run(self, kd, n, c, widths, s, t, labels, false)
    }
}

#[test]
fn bad_input_is_an_error_saying_what_is_wrong() {
    let b = CpuBackend::new();
    let kd = ShardedKdLoss::hinton(2.0, 0.5);
    let s = vec![0.0f32; 6];
    // offset + width > C
    let e = kd
        .stats(&b, Shard::new(2, 4, 2, 3), &s, Some(&s), Some(&[0, 1]))
        .unwrap_err();
    assert!(e.to_string().contains("offset + width <= classes"), "{e}");
    // a label outside the global vocabulary
    let e = kd
        .stats(&b, Shard::new(2, 8, 0, 3), &s, Some(&s), Some(&[0, 8]))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Label {
                row: 1,
                label: 8,
                classes: 8,
                ..
            }
        ),
        "{e}"
    );
    // missing labels, missing teacher, student of the wrong length
    assert!(kd
        .stats(&b, Shard::new(2, 8, 0, 3), &s, Some(&s), None)
        .is_err());
    assert!(kd
        .stats(&b, Shard::new(2, 8, 0, 3), &s, None, Some(&[0, 1]))
        .is_err());
    let e = kd
        .stats(&b, Shard::new(2, 8, 0, 4), &s, Some(&s), Some(&[0, 1]))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                what: "student",
                got: 6,
                expected: 8,
                ..
            }
        ),
        "{e}"
    );
    // combined stats of the wrong size
    let e = kd
        .loss_and_grad(
            &b,
            Shard::new(2, 8, 0, 3),
            &s,
            Some(&s),
            Some(&[0, 1]),
            &[0.0; 5],
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                what: "combined stats",
                ..
            }
        ),
        "{e}"
    );
    // JSD without its terms
    let jsd = ShardedKdLoss::divergence(Divergence::Jsd { beta: 0.5 }, 1.0);
    let st = jsd
        .stats(&b, Shard::new(2, 8, 0, 3), &s, Some(&s), None)
        .unwrap();
    let e = jsd
        .loss_and_grad(&b, Shard::new(2, 8, 0, 3), &s, Some(&s), None, &st, None)
        .unwrap_err();
    assert!(e.to_string().contains("JSD terms"), "{e}");
    // shards that do not cover the same rows
    let e = kd
        .combine_shard_stats(&[&[0.0; 2 * STATS], &[0.0; STATS]])
        .unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    // bad parameters
    let bad = ShardedKdLoss::hinton(0.0, 0.5);
    assert!(matches!(
        bad.stats(&b, Shard::new(2, 8, 0, 3), &s, Some(&s), Some(&[0, 1])),
        Err(Error::Param {
            name: "temperature",
            ..
        })
    ));
    let bad = ShardedKdLoss::hinton(1.0, 1.5);
    assert!(bad
        .stats(
            &FastCpuBackend::new(),
            Shard::new(2, 8, 0, 3),
            &s,
            Some(&s),
            Some(&[0, 1])
        )
        .is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn sharded_equals_unsharded(
        n in 1usize..6,
        c in 1usize..90,
        k in prop::sample::select(vec![1usize, 2, 3, 7]),
        temp in prop::sample::select(vec![0.05f32, 0.5, 1.0, 2.0, 8.0, 30.0]),
        scale in prop::sample::select(vec![0.1f32, 3.0, 20.0, 300.0]),
        masked in any::<bool>(),
        red in 0u8..3,
        seed in 0u64..1000,
    ) {
        let mut g = Lcg(seed);
        let widths = split(c, k, &mut g);
        let reduction = [Reduction::BatchMean, Reduction::Sum, Reduction::None][red as usize];
        let near = if seed % 4 == 0 { 1e-3 } else { 0.0 };
        check_case(n, c, &widths, temp, scale, masked, reduction, seed, near)
            .map_err(TestCaseError::fail)?;
    }
}

// ---- the teacher given as probabilities or log-probabilities ----

/// A teacher given as `form` from logits `t` (`[n, c]`): `log_softmax(t)` per row in f64, rounded
/// to f32 (probabilities `exp` of it, which underflow to 0 at extreme logits); `zeros` gives every
/// element `j % 5 == 2` probability 0 exactly (`-inf` as a log-probability), the rest renormalised.
fn given_teacher(t: &[f32], c: usize, form: TeacherInput, zeros: bool) -> Vec<f32> {
    t.chunks_exact(c)
        .flat_map(|row| {
            let x: Vec<f64> = row
                .iter()
                .enumerate()
                .map(|(j, &v)| {
                    if zeros && j % 5 == 2 {
                        f64::NEG_INFINITY
                    } else {
                        v as f64
                    }
                })
                .collect();
            let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            x.into_iter()
                .map(move |v| match form {
                    TeacherInput::Probs => (v - lse).exp() as f32,
                    _ => (v - lse) as f32,
                })
                .collect::<Vec<f32>>()
        })
        .collect()
}

/// Whether an unmasked row of a given teacher holds a probability of exactly 0.
fn has_zero(t: &[f32], c: usize, labels: &[i32], form: TeacherInput) -> bool {
    t.chunks_exact(c).zip(labels).any(|(row, &l)| {
        l != IGNORE_INDEX
            && row.iter().any(|&v| match form {
                TeacherInput::Probs => v == 0.0,
                _ => v == f32::NEG_INFINITY,
            })
    })
}

/// The floors of a given teacher: `floors` plus the student's normaliser met absolutely
/// (`docs/LOSSES.md` section 9: `~1e-7 T^2 (1 + log C)` a row, `~1e-7 k T (1 + log C)` a
/// gradient row), 10 times that.
fn given_floors(
    want: &RowLossResult,
    temp: f32,
    logits: f32,
    reduction: Reduction,
    c: usize,
) -> (f64, f64) {
    let (row, grad) = floors(want, temp, logits, reduction);
    let (t, lc) = (temp as f64, 1.0 + (c as f64).ln());
    let valid = want.row_loss.iter().filter(|v| **v != 0.0).count().max(1);
    let k = if reduction == Reduction::BatchMean {
        1.0 / valid as f64
    } else {
        1.0
    };
    (row + 1e-6 * t * t * lc, grad + 1e-6 * k * t * lc)
}

/// Inputs the review found reaching a panic, an abort or a backend-dependent number: each is now
/// an error before anything is allocated or launched.
#[test]
fn sizes_and_values_past_the_contract_are_errors() {
    let b = CpuBackend::new();
    let kd = ShardedKdLoss::hinton(2.0, 0.5);
    // a vocabulary past int32 (the labels' type; the kernels index columns in 32 bits)
    let big = i32::MAX as usize + 1;
    let e = kd
        .stats(
            &b,
            Shard::new(1, big, big - 1, 1),
            &[0.0],
            Some(&[0.0]),
            Some(&[0]),
        )
        .unwrap_err();
    assert!(matches!(e, Error::Limit(_)), "{e}");
    // a huge shard with empty slices: refused before its outputs are allocated
    let e = kd
        .stats(&b, Shard::new(1 << 40, 4, 0, 4), &[], Some(&[]), Some(&[]))
        .unwrap_err();
    assert!(matches!(e, Error::Limit(_)), "{e}");
    let e = kd
        .loss_and_grad(
            &b,
            Shard::new(1 << 30, 4, 0, 4),
            &[],
            Some(&[]),
            Some(&[]),
            &[],
            None,
        )
        .unwrap_err();
    assert!(matches!(e, Error::Limit(_) | Error::Shape { .. }), "{e}");
    // width 0 and short labels with the opt-in checks and a given teacher
    let rkl = ShardedKdLoss {
        teacher: TeacherInput::Probs,
        check_inputs: true,
        ..ShardedKdLoss::divergence(Divergence::ReverseKl, 1.0)
    };
    let e = rkl
        .stats(&b, Shard::new(2, 4, 0, 0), &[], Some(&[]), None)
        .unwrap_err();
    assert!(matches!(e, Error::Empty(_)), "{e}");
    let t = [0.25f32; 8];
    let e = rkl
        .loss_and_grad(
            &b,
            Shard::new(2, 4, 0, 4),
            &t,
            Some(&t),
            Some(&[0]),
            &[0.0; 2 * STATS],
            None,
        )
        .unwrap_err();
    assert!(matches!(e, Error::Shape { what: "labels", .. }), "{e}");
    // DKD weights whose w T^2 would overflow f32
    let e = ShardedKdLoss::dkd(1e4, 1.0, 1e7)
        .stats(
            &b,
            Shard::new(1, 4, 0, 4),
            &[0.0; 4],
            Some(&[0.0; 4]),
            Some(&[0]),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Param {
                name: "nckd_weight",
                ..
            }
        ),
        "{e}"
    );
    // global maxima below a shard's own (an all-reduce SUM of negative maxima, say)
    let st = kd
        .stats(
            &b,
            Shard::new(1, 4, 0, 4),
            &[1.0, 2.0, 3.0, 4.0],
            Some(&[0.0; 4]),
            Some(&[0]),
        )
        .unwrap();
    let mut local = st.clone();
    let e = kd.rescale_stats(&mut local, &[3.0, 0.0]).unwrap_err();
    assert!(e.to_string().contains("all-reduce MAX"), "{e}");
    let e = kd.rescale_stats(&mut local, &[f32::NAN, 0.0]).unwrap_err();
    assert!(matches!(e, Error::Input { .. }), "{e}");
    // reverse KL against a given zero probability: an error on every host backend, called
    // directly (not only through ShardedKdLoss)
    let spec = ShardedKdLoss {
        teacher: TeacherInput::Probs,
        ..ShardedKdLoss::divergence(Divergence::ReverseKl, 1.0)
    }
    .spec(Shard::new(1, 4, 0, 4));
    let t = [0.5f32, 0.5, 0.0, 0.0];
    let mut out = vec![0.0; STATS];
    let fast = FastCpuBackend::new();
    let mut backends: Vec<(&str, &dyn ShardedBackend)> = vec![("reference", &b), ("fast", &fast)];
    if let Some(w) = common::wgpu() {
        backends.push(("wgpu", w));
    }
    for (name, be) in backends {
        let e = be
            .sharded_stats(&spec, &[0.0; 4], Some(&t), None, &mut out)
            .unwrap_err();
        assert!(e.to_string().contains("probability 0"), "{name}: {e}");
    }
}

/// One given-teacher case: forward KL, reverse KL, JSD and Hinton on the reference, the fast CPU
/// backend (1 and 3 threads) and wgpu (refused above T = 30), both combines. Reverse KL with a
/// zero probability in an unmasked row must be an error naming it, on every backend.
#[allow(clippy::too_many_arguments)]
fn check_given_case(
    n: usize,
    c: usize,
    widths: &[usize],
    temp: f32,
    scale: f32,
    masked: bool,
    reduction: Reduction,
    seed: u64,
    form: TeacherInput,
    zeros: bool,
) -> Result<(), String> {
    let mut g = Lcg(seed);
    let s = g.vec(n * c, scale);
    let t = given_teacher(&g.vec(n * c, scale), c, form, zeros);
    let labels: Vec<i32> = (0..n)
        .map(|r| {
            if masked && r % 3 == 1 {
                IGNORE_INDEX
            } else {
                ((r * 7 + seed as usize) % c) as i32
            }
        })
        .collect();
    let zero = has_zero(&t, c, &labels, form);
    let mut kds = losses(0.3, 0.4, 0.1, temp);
    kds.retain(|kd| kd.loss.needs_teacher() && !kd.loss.is_dkd());
    for kd in kds {
        let kd = ShardedKdLoss {
            reduction,
            teacher: form,
            teacher_grad: false,
            ..kd
        };
        let what = format!("{:?} {form:?} T={temp} widths={widths:?}", kd.loss);
        let t = Some(t.as_slice());
        let cpu = CpuBackend::new();
        let backends: Vec<(&str, &dyn ShardedDyn)> = {
            let mut v: Vec<(&str, &dyn ShardedDyn)> = vec![
                ("reference", &cpu as &dyn ShardedDyn),
                ("fast", common::cpu_fast().unwrap()),
            ];
            if let Some(w) = common::wgpu() {
                v.push(("wgpu", w));
            }
            v
        };
        if zero && kd.loss == ShardedLoss::Divergence(Divergence::ReverseKl) {
            for (name, b) in backends {
                let e = match b.run(&kd, n, c, widths, &s, t, Some(&labels)) {
                    Ok(_) => return Err(format!("{name} {what}: a zero probability was accepted")),
                    Err(e) => e,
                };
                if !e.to_string().contains("probability 0") {
                    return Err(format!("{name} {what}: {e}"));
                }
            }
            continue;
        }
        let want = unsharded(&kd, n, c, &s, t, Some(&labels));
        let (atol_row, atol_grad) = given_floors(&want, temp, scale, reduction, c);
        let r = run(
            &CpuBackend::new(),
            &kd,
            n,
            c,
            widths,
            &s,
            t,
            Some(&labels),
            false,
        )
        .map_err(|e| format!("{what}: {e}"))?;
        compare(
            &format!("reference {what}"),
            &r,
            &want,
            1e-5,
            atol_row,
            atol_grad,
        )?;
        for threads in [1, 3] {
            let fast = FastCpuBackend::new().with_threads(threads);
            let r = run(&fast, &kd, n, c, widths, &s, t, Some(&labels), threads == 3)
                .map_err(|e| format!("{what}: {e}"))?;
            compare(
                &format!("fast {what}"),
                &r,
                &want,
                1e-4,
                10.0 * atol_row,
                10.0 * atol_grad,
            )?;
        }
        if let Some(w) = common::wgpu() {
            let r = run(w, &kd, n, c, widths, &s, t, Some(&labels), true);
            if temp > 30.0 {
                match r {
                    Err(Error::Unsupported(m)) if m.contains("T = 30") => {}
                    other => return Err(format!("wgpu {what}: not refused: {:?}", other.err())),
                }
            } else {
                let r = r.map_err(|e| format!("wgpu {what}: {e}"))?;
                let (row, grad) = (30.0 * atol_row, 30.0 * atol_grad);
                compare(&format!("wgpu {what}"), &r, &want, 1e-4, row, grad)?;
            }
        }
    }
    Ok(())
}

#[test]
fn teacher_probabilities_and_log_probabilities_equal_the_unsharded_losses() {
    let mut g = Lcg(23);
    for form in [TeacherInput::Probs, TeacherInput::LogProbs] {
        for (n, c) in [(5, 40), (3, 9), (1, 7), (4, 1000)] {
            for k in [2, 3, 7] {
                let widths = split(c, k, &mut g);
                let temp = if k == 3 { 4.0 } else { 1.0 };
                let zeros = k != 2;
                check_given_case(
                    n,
                    c,
                    &widths,
                    temp,
                    4.0,
                    true,
                    Reduction::BatchMean,
                    31 + k as u64,
                    form,
                    zeros,
                )
                .unwrap();
            }
        }
    }
}

#[test]
fn given_teachers_at_tiny_and_huge_temperatures_and_extreme_logits() {
    let mut g = Lcg(29);
    for form in [TeacherInput::Probs, TeacherInput::LogProbs] {
        for (temp, scale) in [(0.05, 3.0), (100.0, 3.0), (1000.0, 0.5), (2.0, 300.0)] {
            let widths = split(60, 3, &mut g);
            check_given_case(
                3,
                60,
                &widths,
                temp,
                scale,
                true,
                Reduction::Sum,
                3,
                form,
                false,
            )
            .unwrap();
        }
    }
}

#[test]
fn given_teacher_errors_say_what_is_wrong() {
    let b = CpuBackend::new();
    let (n, c) = (2, 6);
    let sh = Shard::new(n, c, 2, 3);
    let s = vec![0.5f32; n * 3];
    let labels = [1, 4];
    // the teacher's gradient needs logits
    let kd = ShardedKdLoss {
        teacher: TeacherInput::Probs,
        teacher_grad: true,
        ..ShardedKdLoss::hinton(2.0, 0.5)
    };
    let q = vec![1.0f32 / 6.0; n * 3];
    let st = kd.stats(&b, sh, &s, Some(&q), Some(&labels)).unwrap();
    let e = kd
        .loss_and_grad(&b, sh, &s, Some(&q), Some(&labels), &st, None)
        .unwrap_err();
    assert!(e.to_string().contains("needs the teacher as logits"), "{e}");
    // reverse KL with a zero probability: the row and the global class, on both CPU backends
    // through the trait too
    let rkl = ShardedKdLoss {
        teacher: TeacherInput::LogProbs,
        ..ShardedKdLoss::divergence(Divergence::ReverseKl, 1.0)
    };
    let mut lq = vec![-(6.0f32.ln()); n * 3];
    lq[4] = f32::NEG_INFINITY; // row 1, local column 1 = class 3
    let e = rkl.stats(&b, sh, &s, Some(&lq), None).unwrap_err();
    assert!(
        matches!(&e, Error::Input { row: 1, problem, .. } if problem.contains("class 3")),
        "{e}"
    );
    let spec = rkl.spec(sh);
    let mut out = vec![0.0f32; n * distillation::ops::sharded::STATS];
    for be in [&b as &dyn ShardedBackend, &FastCpuBackend::new()] {
        assert!(be
            .sharded_stats(&spec, &s, Some(&lq), None, &mut out)
            .is_err());
    }
    // masked, the row is not checked
    assert!(rkl
        .stats(&b, sh, &s, Some(&lq), Some(&[0, IGNORE_INDEX]))
        .is_ok());
    // forward KL and JSD are finite there
    for d in [Divergence::ForwardKl, Divergence::Jsd { beta: 0.5 }] {
        let kd = ShardedKdLoss {
            loss: ShardedLoss::Divergence(d),
            ..rkl
        };
        assert!(kd.stats(&b, sh, &s, Some(&lq), None).is_ok());
    }
    // check_inputs: values per shard
    let checked = ShardedKdLoss {
        teacher: TeacherInput::Probs,
        check_inputs: true,
        ..ShardedKdLoss::divergence(Divergence::ForwardKl, 1.0)
    };
    let mut bad = q.clone();
    bad[2] = -0.1;
    let e = checked.stats(&b, sh, &s, Some(&bad), None).unwrap_err();
    assert!(
        matches!(&e, Error::Input { row: 0, problem, .. } if problem.contains("class 4")),
        "{e}"
    );
    let lp_checked = ShardedKdLoss {
        teacher: TeacherInput::LogProbs,
        ..checked
    };
    let mut bad = lq.clone();
    bad[0] = 0.5;
    let e = lp_checked.stats(&b, sh, &s, Some(&bad), None).unwrap_err();
    assert!(e.to_string().contains("above 0"), "{e}");
    // check_inputs: each row's sum over every shard, from the combined stats
    let (left, right) = (Shard::new(n, c, 0, 3), sh);
    let uniform = vec![1.0f32 / 6.0; n * 3];
    let sl = checked.stats(&b, left, &s, Some(&uniform), None).unwrap();
    let sr = checked.stats(&b, right, &s, Some(&uniform), None).unwrap();
    let global = checked.combine_shard_stats(&[&sl, &sr]).unwrap();
    assert!(checked
        .loss_and_grad(&b, right, &s, Some(&uniform), None, &global, None)
        .is_ok());
    // the left half's stats only: sums of 1/2
    let e = checked
        .loss_and_grad(&b, right, &s, Some(&uniform), None, &sl, None)
        .unwrap_err();
    assert!(e.to_string().contains("sum to 0.5"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn sharded_equals_unsharded_with_given_teachers(
        n in 1usize..6,
        c in 1usize..90,
        k in prop::sample::select(vec![2usize, 3, 7]),
        temp in prop::sample::select(vec![0.05f32, 0.5, 1.0, 2.0, 8.0, 30.0]),
        scale in prop::sample::select(vec![0.1f32, 3.0, 20.0, 300.0]),
        masked in any::<bool>(),
        red in 0u8..3,
        logprobs in any::<bool>(),
        zeros in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let mut g = Lcg(seed);
        let widths = split(c, k, &mut g);
        let reduction = [Reduction::BatchMean, Reduction::Sum, Reduction::None][red as usize];
        let form = if logprobs { TeacherInput::LogProbs } else { TeacherInput::Probs };
        check_given_case(n, c, &widths, temp, scale, masked, reduction, seed, form, zeros)
            .map_err(TestCaseError::fail)?;
    }
}
