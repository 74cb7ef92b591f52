//! Every case of the PyTorch fixtures (`tests/fixtures/torch_losses.json`, a copy of
//! `shared/fixtures/`), on every backend. The relation-based cases (similarity-preserving, RKD,
//! spec section 7) run as compositions on the autograd tape, the others as single kernels.

use crate::common;

use common::{assert_close, assert_close_abs};
use distillation::tape::{Tape, Tensor};
use distillation::{
    AttentionSpec, Backend, CrossEntropySpec, Divergence, DivergenceSpec, GradOut, HintonSpec,
    LossOut, MseSpec, RowShape, SoftmaxSpec, TeacherInput,
};
use serde_json::Value;

const TOL: f64 = 1e-4;

fn cases() -> Vec<Value> {
    let text = include_str!("../fixtures/torch_losses.json");
    let v: Value = serde_json::from_str(text).expect("fixture JSON");
    v["cases"].as_array().expect("cases").clone()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn i32s(v: &Value) -> Vec<i32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as i32)
        .collect()
}

fn param(c: &Value, name: &str) -> f32 {
    c["params"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("param {name}")) as f32
}

fn shape(c: &Value) -> Vec<usize> {
    c["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

struct Outs<B: Backend> {
    loss: B::Buffer,
    rows: B::Buffer,
    gs: B::Buffer,
    gt: B::Buffer,
}

fn outs<B: Backend>(b: &B, n: usize, len: usize) -> Outs<B> {
    Outs {
        loss: b.filled(1, f32::NAN).unwrap(),
        rows: b.filled(n, f32::NAN).unwrap(),
        gs: b.filled(len, f32::NAN).unwrap(),
        gt: b.filled(len, f32::NAN).unwrap(),
    }
}

fn check_row_loss<B: Backend>(b: &B, c: &Value, o: &Outs<B>, with_gt: bool) -> Result<(), String> {
    assert_close(
        "loss",
        &b.download(&o.loss).unwrap(),
        &[c["loss"].as_f64().unwrap()],
        TOL,
    )?;
    if let Some(rows) = c.get("per_row") {
        assert_close("per_row", &b.download(&o.rows).unwrap(), &f64s(rows), TOL)?;
    }
    assert_close_abs(
        "grad_student",
        &b.download(&o.gs).unwrap(),
        &f64s(&c["grad_student"]),
        TOL,
        1e-7,
    )?;
    if with_gt {
        assert_close_abs(
            "grad_teacher",
            &b.download(&o.gt).unwrap(),
            &f64s(&c["grad_teacher"]),
            TOL,
            1e-7,
        )?;
    }
    Ok(())
}

/// Runs one case; `Ok(false)` for a case this suite does not run as a kernel.
fn run_case<B: Backend>(b: &B, c: &Value) -> Result<bool, String> {
    let op = c["op"].as_str().unwrap();
    let sh = shape(c);
    let err = |e: distillation::Error| e.to_string();
    match op {
        "softmax" | "log_softmax" => {
            let spec = SoftmaxSpec {
                shape: RowShape::new(sh[0], sh[1]),
                temperature: param(c, "temperature"),
                log: op == "log_softmax",
            };
            let x = b.upload(&f32s(&c["input"])).unwrap();
            let y = b.filled(spec.shape.len(), f32::NAN).unwrap();
            b.softmax(&spec, &x, &y).map_err(err)?;
            assert_close("output", &b.download(&y).unwrap(), &f64s(&c["output"]), TOL)?;
            let dy = b.upload(&f32s(&c["grad_output"])).unwrap();
            let dx = b.filled(spec.shape.len(), f32::NAN).unwrap();
            b.softmax_backward(&spec, &y, &dy, &dx).map_err(err)?;
            assert_close(
                "grad_input",
                &b.download(&dx).unwrap(),
                &f64s(&c["grad_input"]),
                TOL,
            )?;
        }
        "kl_div" | "rkl_div" | "jsd_div" => {
            let rs = RowShape::new(sh[0], sh[1]);
            let spec = DivergenceSpec {
                divergence: match op {
                    "kl_div" => Divergence::ForwardKl,
                    "rkl_div" => Divergence::ReverseKl,
                    _ => Divergence::Jsd {
                        beta: param(c, "beta"),
                    },
                },
                teacher: match c["params"]["teacher"].as_str().unwrap() {
                    "logits" => TeacherInput::Logits,
                    "probs" => TeacherInput::Probs,
                    _ => TeacherInput::LogProbs,
                },
                ..DivergenceSpec::new(rs, param(c, "temperature"))
            };
            let s = b.upload(&f32s(&c["student"])).unwrap();
            let t = b.upload(&f32s(&c["teacher_input"])).unwrap();
            let labels = c.get("labels").map(|l| b.upload_labels(&i32s(l)).unwrap());
            let with_gt = c.get("grad_teacher").is_some();
            let o = outs(b, rs.rows, rs.len());
            let out = LossOut {
                loss: &o.loss,
                row_loss: Some(&o.rows),
                grad_student: GradOut::Into(&o.gs),
                grad_teacher: with_gt.then_some(&o.gt),
            };
            b.divergence(&spec, &s, &t, labels.as_ref(), out)
                .map_err(err)?;
            check_row_loss(b, c, &o, with_gt)?;
        }
        "cross_entropy" => {
            let rs = RowShape::new(sh[0], sh[1]);
            let spec = CrossEntropySpec {
                label_smoothing: param(c, "label_smoothing"),
                ..CrossEntropySpec::new(rs)
            };
            let s = b.upload(&f32s(&c["student"])).unwrap();
            let labels = b.upload_labels(&i32s(&c["labels"])).unwrap();
            let o = outs(b, rs.rows, rs.len());
            b.cross_entropy(&spec, &s, &labels, LossOut::with_grad(&o.loss, &o.gs))
                .map_err(err)?;
            check_row_loss(b, c, &o, false)?;
        }
        "hinton" => {
            let rs = RowShape::new(sh[0], sh[1]);
            let spec = HintonSpec {
                label_smoothing: param(c, "label_smoothing"),
                ..HintonSpec::new(rs, param(c, "temperature"), param(c, "alpha"))
            };
            let s = b.upload(&f32s(&c["student"])).unwrap();
            let t = b.upload(&f32s(&c["teacher_input"])).unwrap();
            let labels = b.upload_labels(&i32s(&c["labels"])).unwrap();
            let o = outs(b, rs.rows, rs.len());
            let out = LossOut {
                loss: &o.loss,
                row_loss: None,
                grad_student: GradOut::Into(&o.gs),
                grad_teacher: Some(&o.gt),
            };
            b.hinton(&spec, &s, &t, &labels, out).map_err(err)?;
            check_row_loss(b, c, &o, true)?;
        }
        "mse" => {
            let len: usize = sh.iter().product();
            let spec = MseSpec::new(len);
            let a = b.upload(&f32s(&c["student"])).unwrap();
            let bb = b.upload(&f32s(&c["teacher_input"])).unwrap();
            let o = outs(b, 1, len);
            b.mse(&spec, &a, &bb, &o.loss, Some(&o.gs), Some(&o.gt))
                .map_err(err)?;
            check_row_loss(b, c, &o, true)?;
        }
        "attention_transfer" => {
            let tsh: Vec<usize> = c["teacher_shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let spec = AttentionSpec::new(sh[0], sh[1], tsh[1], sh[2] * sh[3]);
            let s = b.upload(&f32s(&c["student"])).unwrap();
            let t = b.upload(&f32s(&c["teacher_input"])).unwrap();
            let loss = b.filled(1, f32::NAN).unwrap();
            let gs = b.filled(spec.student_len(), f32::NAN).unwrap();
            let gt = b.filled(spec.teacher_len(), f32::NAN).unwrap();
            b.attention_transfer(&spec, &s, &t, &loss, Some(&gs), Some(&gt))
                .map_err(err)?;
            assert_close(
                "loss",
                &b.download(&loss).unwrap(),
                &[c["loss"].as_f64().unwrap()],
                TOL,
            )?;
            assert_close(
                "grad_student",
                &b.download(&gs).unwrap(),
                &f64s(&c["grad_student"]),
                TOL,
            )?;
            assert_close(
                "grad_teacher",
                &b.download(&gt).unwrap(),
                &f64s(&c["grad_teacher"]),
                TOL,
            )?;
        }
        "similarity_preserving" | "rkd_distance" => {
            let tsh: Vec<usize> = c["teacher_shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let tape = Tape::new(b);
            let fs = tape.leaf(Tensor::from_host(b, &f32s(&c["student"]), &sh).unwrap());
            let ft = tape.leaf(Tensor::from_host(b, &f32s(&c["teacher_input"]), &tsh).unwrap());
            let loss = if op == "rkd_distance" {
                tape.rkd_distance(fs, ft, 1.0)
            } else {
                tape.similarity_preserving(fs, ft, 1.0)
            }
            .map_err(err)?;
            tape.backward(&[loss]).map_err(err)?;
            let host = |v| tape.grad(v).unwrap().unwrap().to_host(b).unwrap();
            assert_close(
                "loss",
                &tape.value(loss).unwrap().to_host(b).unwrap(),
                &[c["loss"].as_f64().unwrap()],
                TOL,
            )?;
            assert_close("grad_student", &host(fs), &f64s(&c["grad_student"]), TOL)?;
            assert_close("grad_teacher", &host(ft), &f64s(&c["grad_teacher"]), TOL)?;
        }
        other => return Err(format!("unknown fixture op {other}")),
    }
    Ok(true)
}

fn torch_fixtures<B: Backend>(b: &B) {
    let cases = cases();
    let (mut passed, mut later) = (0, 0);
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let op = c["op"].as_str().unwrap();
        match run_case(b, c) {
            Ok(true) => passed += 1,
            Ok(false) => later += 1,
            Err(e) => failures.push(format!("case {i} ({op} {}): {e}", c["params"])),
        }
    }
    println!("{}: {passed} fixture cases passed", b.name());
    assert!(
        failures.is_empty(),
        "fixture failures:\n{}",
        failures.join("\n")
    );
    assert_eq!(later, 0, "every fixture case runs");
    assert_eq!(passed, cases.len());
}

backend_tests!(torch_fixtures);
