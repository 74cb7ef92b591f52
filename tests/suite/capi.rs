//! The C ABI (`src/capi/`, `include/distillation.h`): builds `tests/c/capi_test.c` with the system
//! `cc` against the header and the cdylib cargo built next to this test, runs it, and checks its
//! results equal the Rust API's on the same inputs, and that bad arguments give status codes with
//! messages. Also checks the header declares every `dst_*` entry point (and, when `cbindgen` is on
//! the PATH, that the checked-in header is what cbindgen generates).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use distillation::backend::{Backend, GradOut, LossOut};
use distillation::capi::{
    DST_ERR_ALIAS, DST_ERR_CONFIG, DST_ERR_DEVICE, DST_ERR_INPUT, DST_ERR_INVALID_ARGUMENT,
    DST_ERR_IO, DST_ERR_LABEL, DST_ERR_LIMIT, DST_ERR_NULL_POINTER, DST_ERR_PANIC, DST_ERR_SHAPE,
    DST_ERR_UNAVAILABLE, DST_ERR_UNSUPPORTED, DST_OK,
};
use distillation::{
    CpuBackend, CrossEntropySpec, Divergence, DivergenceSpec, DkdSpec, KdLoss, MseSpec, Reduction,
    RowShape, TeacherInput,
};

const N: usize = 4;
const C: usize = 5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The inputs of `capi_test.c`, exact in f32.
fn fill(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 37 + 11 + seed) % 101) as f32 / 10.0 - 5.0)
        .collect()
}

/// `target/<profile>/`: this test runs from `target/<profile>/deps/`.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

fn cdylib(dir: &Path) -> PathBuf {
    let name = if cfg!(target_os = "macos") {
        "libdistillation.dylib"
    } else {
        "libdistillation.so"
    };
    dir.join(name)
}

/// Builds the cdylib into the target directory this test runs from (`cargo test` builds the
/// library as an rlib for the tests, not necessarily the cdylib; this is a no-op when it is fresh).
fn build_cdylib(dir: &Path) {
    let target_dir = dir.parent().expect("target dir");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--lib", "--target-dir"])
        .arg(target_dir)
        .current_dir(root());
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    // The features this test was built with, so that the library is the one `cargo test` already
    // built (a no-op) and the rlib the doctests link is not replaced by another feature set's.
    if !cfg!(feature = "cuda") {
        cmd.arg("--no-default-features");
    }
    let features: Vec<&str> = [
        ("candle", cfg!(feature = "candle")),
        ("burn", cfg!(feature = "burn")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    let status = cmd.status().expect("run cargo build --lib");
    assert!(status.success(), "cargo build --lib failed");
}

/// Builds and runs the C program; returns its stdout.
fn run_c_program() -> String {
    let dir = lib_dir();
    build_cdylib(&dir);
    let lib = cdylib(&dir);
    assert!(
        lib.exists(),
        "the cdylib {} is missing after cargo build --lib",
        lib.display()
    );
    let exe = dir.join("capi_test_c");
    let out = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .arg("-std=c99")
        .arg("-Wall")
        .arg("-Wextra")
        .arg("-Werror")
        .arg(root().join("tests/c/capi_test.c"))
        .arg("-I")
        .arg(root().join("include"))
        .arg("-L")
        .arg(&dir)
        .arg("-ldistillation")
        // The test uses fmaxf / fabsf: libm must be named (only the cdylib depends on it).
        .arg("-lm")
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("running the C compiler `cc`");
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().expect("running capi_test_c");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "capi_test_c failed:\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

fn arrays(stdout: &str) -> HashMap<String, Vec<f32>> {
    stdout
        .lines()
        .filter(|l| !l.starts_with("error ") && !l.starts_with("version ") && l.contains('.'))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?.to_string();
            let v: Result<Vec<f32>, _> = it.map(str::parse::<f32>).collect();
            Some((name, v.ok()?))
        })
        .collect()
}

fn same(got: &HashMap<String, Vec<f32>>, name: &str, want: &[f32]) {
    let g = got
        .get(name)
        .unwrap_or_else(|| panic!("the C program printed no {name}"));
    assert_eq!(g.len(), want.len(), "{name}: length");
    for (i, (a, b)) in g.iter().zip(want).enumerate() {
        // Both sides run the same CPU backend and %.9g round-trips f32: the values are equal.
        assert!(
            a == b || (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            "{name}[{i}]: C ABI {a}, Rust {b}"
        );
    }
}

/// A row loss through the backend's own API: (loss, row_loss, grad_student, grad_teacher).
type Row = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn row_loss(
    b: &CpuBackend,
    run: impl FnOnce(LossOut<'_, CpuBackend>) -> distillation::Result<()>,
) -> Row {
    let loss = b.filled(1, 0.0).unwrap();
    let rows = b.filled(N, 0.0).unwrap();
    let gs = b.filled(N * C, 0.0).unwrap();
    let gt = b.filled(N * C, 0.0).unwrap();
    run(LossOut {
        loss: &loss,
        row_loss: Some(&rows),
        grad_student: GradOut::Into(&gs),
        grad_teacher: Some(&gt),
    })
    .unwrap();
    (
        b.download(&loss).unwrap(),
        b.download(&rows).unwrap(),
        b.download(&gs).unwrap(),
        b.download(&gt).unwrap(),
    )
}

#[test]
fn c_program_matches_the_rust_api() {
    let stdout = run_c_program();
    assert!(stdout.lines().any(|l| l == "ok"), "{stdout}");
    let got = arrays(&stdout);
    let b = CpuBackend::new();
    let s = fill(N * C, 0);
    let t = fill(N * C, 5);
    let labels = [1, -100, 4, 0];

    // Hinton through KdLoss.
    let mut kd = KdLoss::new(2.0, 0.3);
    kd.label_smoothing = 0.1;
    kd.teacher_grad = true;
    let r = kd.forward_backward(&b, &s, &t, &labels, C).unwrap();
    same(&got, "hinton.loss", &[r.loss]);
    same(&got, "hinton.row_loss", &r.row_loss);
    same(&got, "hinton.grad_student", &r.grad_student);
    same(
        &got,
        "hinton.grad_teacher",
        r.grad_teacher.as_ref().unwrap(),
    );
    same(&got, "hinton_inplace.loss", &[r.loss]);
    same(&got, "hinton_inplace.grad_student", &r.grad_student);

    // JSD through the backend.
    let shape = RowShape::new(N, C);
    let spec = DivergenceSpec {
        divergence: Divergence::Jsd { beta: 0.4 },
        reduction: Reduction::Sum,
        grad_scale: 0.5,
        ..DivergenceSpec::new(shape, 3.0)
    };
    let (sb, tb) = (b.upload(&s).unwrap(), b.upload(&t).unwrap());
    let lb = b.upload_labels(&labels).unwrap();
    let (l, rows, gs, gt) = row_loss(&b, |o| b.divergence(&spec, &sb, &tb, Some(&lb), o));
    same(&got, "jsd.loss", &l);
    same(&got, "jsd.row_loss", &rows);
    same(&got, "jsd.grad_student", &gs);
    same(&got, "jsd.grad_teacher", &gt);

    // Reverse KL against probabilities (no teacher gradient for probabilities).
    let row = [0.1f32, 0.2, 0.3, 0.25, 0.15];
    let p: Vec<f32> = (0..N * C).map(|i| row[i % C]).collect();
    let spec = DivergenceSpec {
        divergence: Divergence::ReverseKl,
        teacher: TeacherInput::Probs,
        ..DivergenceSpec::new(shape, 1.5)
    };
    let pb = b.upload(&p).unwrap();
    let (loss, gs) = (b.filled(1, 0.0).unwrap(), b.filled(N * C, 0.0).unwrap());
    b.divergence(&spec, &sb, &pb, None, LossOut::with_grad(&loss, &gs))
        .unwrap();
    same(&got, "rkl_probs.loss", &b.download(&loss).unwrap());
    same(&got, "rkl_probs.grad_student", &b.download(&gs).unwrap());

    // Reverse KL against probabilities with exact zeros: an error without a floor (the C program
    // checks DST_ERR_INPUT), finite with teacher_eps = 1e-8, and equal to the Rust API's.
    let p: Vec<f32> = (0..N * C)
        .map(|i| if i % C == 0 { 0.0 } else { 0.25 })
        .collect();
    let pb = b.upload(&p).unwrap();
    let spec = DivergenceSpec {
        divergence: Divergence::ReverseKl,
        teacher: TeacherInput::Probs,
        ..DivergenceSpec::new(shape, 1.0)
    };
    let (loss, gs) = (b.filled(1, 0.0).unwrap(), b.filled(N * C, 0.0).unwrap());
    assert!(b
        .divergence(&spec, &sb, &pb, None, LossOut::with_grad(&loss, &gs))
        .is_err());
    let spec = DivergenceSpec {
        teacher_eps: 1e-8,
        ..spec
    };
    let (l, rows, gs, _) = row_loss(&b, |o| {
        b.divergence(
            &spec,
            &sb,
            &pb,
            None,
            LossOut {
                grad_teacher: None,
                ..o
            },
        )
    });
    assert!(l[0].is_finite(), "rkl_eps loss {l:?}");
    same(&got, "rkl_eps.loss", &l);
    same(&got, "rkl_eps.row_loss", &rows);
    same(&got, "rkl_eps.grad_student", &gs);

    // Cross-entropy.
    let spec = CrossEntropySpec {
        label_smoothing: 0.1,
        ignore_index: -1,
        reduction: Reduction::None,
        ..CrossEntropySpec::new(shape)
    };
    let ce_labels = b.upload_labels(&[2, -1, 0, 3]).unwrap();
    let (loss, rows, gs) = (
        b.filled(1, 0.0).unwrap(),
        b.filled(N, 0.0).unwrap(),
        b.filled(N * C, 0.0).unwrap(),
    );
    b.cross_entropy(
        &spec,
        &sb,
        &ce_labels,
        LossOut {
            loss: &loss,
            row_loss: Some(&rows),
            grad_student: GradOut::Into(&gs),
            grad_teacher: None,
        },
    )
    .unwrap();
    same(&got, "ce.loss", &b.download(&loss).unwrap());
    same(&got, "ce.row_loss", &b.download(&rows).unwrap());
    same(&got, "ce.grad_student", &b.download(&gs).unwrap());

    // DKD through the backend.
    let spec = DkdSpec {
        label_smoothing: 0.1,
        grad_scale: 0.5,
        ..DkdSpec::new(shape, 4.0, 1.0, 8.0)
    };
    let (l, rows, gs, _) = row_loss(&b, |o| {
        b.dkd(
            &spec,
            &sb,
            &tb,
            &lb,
            LossOut {
                grad_teacher: None,
                ..o
            },
        )
    });
    same(&got, "dkd.loss", &l);
    same(&got, "dkd.row_loss", &rows);
    same(&got, "dkd.grad_student", &gs);
    same(&got, "dkd_inplace.grad_student", &gs);

    // The sparse teacher through SparseKdLoss, on the indices and values the C program made.
    let idx: Vec<i32> = got["sparse.indices"].iter().map(|&v| v as i32).collect();
    let sparse = distillation::SparseKdLoss {
        tail: distillation::SparseTail::Bucket,
        alpha: 0.3,
        ..distillation::SparseKdLoss::new(2.0)
    };
    let r = sparse
        .forward_backward(&b, &s, &idx, &got["sparse.values"], Some(&labels), C, 2)
        .unwrap();
    same(&got, "sparse.loss", &[r.loss]);
    same(&got, "sparse.row_loss", &r.row_loss);
    // (grad_scale 0.5 in C)
    let half: Vec<f32> = r.grad_student.iter().map(|g| g * 0.5).collect();
    same(&got, "sparse.grad_student", &half);

    // MSE.
    let spec = MseSpec {
        len: N * C,
        grad_scale: 2.0,
    };
    let (loss, ga, gb) = (
        b.filled(1, 0.0).unwrap(),
        b.filled(N * C, 0.0).unwrap(),
        b.filled(N * C, 0.0).unwrap(),
    );
    b.mse(&spec, &sb, &tb, &loss, Some(&ga), Some(&gb)).unwrap();
    same(&got, "mse.loss", &b.download(&loss).unwrap());
    same(&got, "mse.grad_a", &b.download(&ga).unwrap());
    same(&got, "mse.grad_b", &b.download(&gb).unwrap());

    fused_linear_matches(&got, &b, &labels, &t);

    // Version.
    let version = format!(
        "version {} {}",
        distillation::capi::DST_ABI_VERSION,
        env!("CARGO_PKG_VERSION")
    );
    assert!(stdout.lines().any(|l| l == version), "{stdout}");

    // The status codes as the C program sees them: the header's numbers are the library's.
    let codes = [
        (DST_OK, "ok"),
        (DST_ERR_NULL_POINTER, "null_pointer"),
        (DST_ERR_INVALID_ARGUMENT, "invalid_argument"),
        (DST_ERR_SHAPE, "shape"),
        (DST_ERR_LABEL, "label"),
        (DST_ERR_ALIAS, "alias"),
        (DST_ERR_UNAVAILABLE, "unavailable"),
        (DST_ERR_DEVICE, "device"),
        (DST_ERR_PANIC, "panic"),
        (DST_ERR_UNSUPPORTED, "unsupported"),
        (DST_ERR_LIMIT, "limit"),
        (DST_ERR_INPUT, "input"),
        (DST_ERR_IO, "io"),
        (DST_ERR_CONFIG, "config"),
    ];
    let want: String = codes.iter().map(|(c, n)| format!(" {c}={n}")).collect();
    assert!(
        stdout.lines().any(|l| l == format!("codes{want}")),
        "no line `codes{want}`:\n{stdout}"
    );

    // Every expected error came back with its code and a message (the C program checks the codes
    // and fails otherwise; here, that each case ran).
    for case in [
        "null_student",
        "null_loss",
        "n_zero",
        "t_zero",
        "t_negative",
        "alpha",
        "reduction",
        "label_hinton",
        "label_ce",
        "label_divergence",
        "label_dkd",
        "dkd_one_class",
        "dkd_weight",
        "dkd_alias",
        "cuda_dkd_null_ctx",
        "alias",
        "rkl_zero",
        "eps_forward_kl",
        "eps_range",
        "mse_empty",
        "cuda_create_null_out",
        "cuda_create_negative",
        "cuda_null_ctx",
        "cuda_divergence_null_ctx",
        "cuda_sync_null",
        "dtype_code",
        "dtype_inplace",
        "fused_null_spec",
        "fused_weighting",
        "fused_teacher_vocab",
        "fused_reduction_none",
        "fused_both_teachers",
        "fused_no_labels",
        "fused_label",
        "fused_alias",
        "fused_dtype",
        "cuda_fused_null_ctx",
    ] {
        let prefix = format!("error {case} ");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no error line for {case}:\n{stdout}"));
        assert!(line.len() > prefix.len() + 3, "{line}");
    }
    println!("{stdout}");
}

/// The fused linear layer + loss of the C program (`dst_cpu_fused_linear_kd`) against
/// `FusedLinearKd` on the same backend and inputs (equal), and against the f64 reference (1e-4).
fn fused_linear_matches(
    got: &HashMap<String, Vec<f32>>,
    b: &CpuBackend,
    labels: &[i32],
    t: &[f32],
) {
    use distillation::ops::fused_linear::reference::{fused_linear_kd, LayerF64, TeacherF64};
    use distillation::{FusedGrads, FusedLinearKd, Linear, Teacher};
    const FH: usize = 3;
    const FTH: usize = 2;
    const FTV: usize = C + 2;
    let quarter = |len: usize, seed: usize| -> Vec<f32> {
        fill(len, seed).iter().map(|x| x * 0.25).collect()
    };
    let (h, w, bias) = (quarter(N * FH, 1), quarter(C * FH, 2), quarter(C, 3));
    let (th, tw, tb) = (quarter(N * FTH, 4), quarter(FTV * FTH, 5), quarter(FTV, 6));
    let (gw0, gb0) = (quarter(C * FH, 7), quarter(C, 8));
    let spec = FusedLinearKd {
        divergence: Divergence::Jsd { beta: 0.4 },
        chunk_rows: 2,
        ..FusedLinearKd::new(FH, C, 2.0, 0.0).liger(0.3, 0.7)
    };
    let up = |x: &[f32]| b.upload(x).unwrap();
    let (hb, wb, bb, thb, twb, tbb) = (up(&h), up(&w), up(&bias), up(&th), up(&tw), up(&tb));
    let (gh, gw, gb) = (b.filled(N * FH, 0.0).unwrap(), up(&gw0), up(&gb0));
    let student = Linear {
        hidden: &hb,
        weight: &wb,
        bias: Some(&bb),
    };
    let teacher = Teacher::Linear {
        layer: Linear {
            hidden: &thb,
            weight: &twb,
            bias: Some(&tbb),
        },
        hidden: FTH,
        vocab: FTV,
    };
    let grads = FusedGrads {
        hidden: Some(&gh),
        weight: Some(&gw),
        bias: Some(&gb),
    };
    let loss = spec
        .run(b, &student, &teacher, Some(labels), &grads)
        .unwrap();
    let (gh, gw, gb) = (
        b.download(&gh).unwrap(),
        b.download(&gw).unwrap(),
        b.download(&gb).unwrap(),
    );
    same(got, "fused.loss", &[loss]);
    same(got, "fused.grad_hidden", &gh);
    same(got, "fused.grad_weight", &gw);
    same(got, "fused.grad_bias", &gb);

    // The f64 reference: this call's own gradient plus the initial grad_weight / grad_bias.
    let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let (h64, w64, b64, th64, tw64, tb64) = (f(&h), f(&w), f(&bias), f(&th), f(&tw), f(&tb));
    let r = fused_linear_kd(
        &spec,
        &LayerF64 {
            hidden: &h64,
            weight: &w64,
            bias: Some(&b64),
        },
        &TeacherF64::Linear {
            layer: LayerF64 {
                hidden: &th64,
                weight: &tw64,
                bias: Some(&tb64),
            },
            hidden: FTH,
            vocab: FTV,
        },
        Some(labels),
    )
    .unwrap();
    let close = |name: &str, got: &[f32], want: &[f64]| {
        for (i, (a, e)) in got.iter().zip(want).enumerate() {
            assert!(
                (*a as f64 - e).abs() <= 1e-4 * e.abs().max(1.0),
                "{name}[{i}]: {a}, the f64 reference {e}"
            );
        }
    };
    close("fused.loss", &[loss], &[r.loss]);
    close("fused.grad_hidden", &gh, &r.grad_hidden);
    let acc = |g: &[f64], g0: &[f32]| -> Vec<f64> {
        g.iter().zip(g0).map(|(a, &b)| a + b as f64).collect()
    };
    close("fused.grad_weight", &gw, &acc(&r.grad_weight, &gw0));
    close("fused.grad_bias", &gb, &acc(&r.grad_bias, &gb0));

    // Hinton with the teacher as logits, label smoothing 0.1.
    let spec = FusedLinearKd {
        label_smoothing: 0.1,
        ..FusedLinearKd::new(FH, C, 2.0, 0.3)
    };
    let tl = up(t);
    let gh = b.filled(N * FH, 0.0).unwrap();
    let student = Linear {
        hidden: &hb,
        weight: &wb,
        bias: None,
    };
    let grads = FusedGrads {
        hidden: Some(&gh),
        weight: None,
        bias: None,
    };
    let loss = spec
        .run(b, &student, &Teacher::Logits(&tl), Some(labels), &grads)
        .unwrap();
    same(got, "fused_logits.loss", &[loss]);
    same(got, "fused_logits.grad_hidden", &b.download(&gh).unwrap());
}

/// The `dst_*` functions `extern "C"` in `src/capi/`.
fn capi_functions() -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("src/capi"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    let src: String = files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    src.lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix("pub ")?;
            let rest = rest.strip_prefix("unsafe ").unwrap_or(rest);
            let rest = rest.strip_prefix("extern \"C\" fn ")?;
            let name = rest.split('(').next()?.trim();
            name.starts_with("dst_").then(|| name.to_string())
        })
        .collect()
}

#[test]
fn header_declares_every_entry_point() {
    let header = std::fs::read_to_string(root().join("include/distillation.h")).unwrap();
    let fns = capi_functions();
    assert!(fns.len() >= 15, "found only {fns:?} in src/capi/");
    let mut missing = Vec::new();
    for f in &fns {
        // A declaration: the name followed by its parameter list, preceded by its documentation.
        let decl = format!("{f}(");
        let at = header
            .match_indices(&decl)
            .map(|(i, _)| i)
            .find(|&i| i > 0 && matches!(header.as_bytes()[i - 1], b' ' | b'*'));
        let Some(at) = at else {
            missing.push(f.clone());
            continue;
        };
        let line_start = header[..at].rfind('\n').map_or(0, |i| i + 1);
        let previous = header[..line_start.saturating_sub(1)]
            .rsplit('\n')
            .next()
            .unwrap_or("");
        assert!(
            previous.trim_end().ends_with("*/"),
            "{f} has no documentation comment in the header"
        );
    }
    assert!(
        missing.is_empty(),
        "include/distillation.h lacks {missing:?}: regenerate it with \
         `cbindgen --config cbindgen.toml --crate distillation --output include/distillation.h`"
    );
    // Nothing declared that the library does not export.
    for line in header.lines() {
        if let Some(rest) = line.replace('*', " ").split(" dst_").nth(1) {
            if let Some(name) = rest.split('(').next().filter(|_| rest.contains('(')) {
                let name = format!("dst_{name}");
                if !name.contains(' ') && !name.contains('`') {
                    assert!(
                        fns.contains(&name),
                        "the header declares {name}, src/capi/ does not"
                    );
                }
            }
        }
    }
}

#[test]
fn header_is_what_cbindgen_generates() {
    let Ok(out) = Command::new("cbindgen")
        .current_dir(root())
        .args([
            "--config",
            "cbindgen.toml",
            "--crate",
            "distillation",
            "--quiet",
        ])
        .output()
    else {
        println!("cbindgen not on the PATH: skipped (header_declares_every_entry_point still ran)");
        return;
    };
    assert!(
        out.status.success(),
        "cbindgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = std::fs::read_to_string(root().join("include/distillation.h")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        header,
        "include/distillation.h is stale: regenerate it with \
         `cbindgen --config cbindgen.toml --crate distillation --output include/distillation.h`"
    );
}
