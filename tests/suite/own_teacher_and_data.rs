//! Bring your own teacher and data: the CSV loader (`--data`), the layer-size flags, teacher
//! checkpoints read back (`--teacher`, `--save-teacher`, a PyTorch-layout file) and the errors of
//! each, through the library and the `distill` CLI.

use std::path::{Path, PathBuf};
use std::process::Command;

use distillation::checkpoint::Checkpoint;
use distillation::data::Dataset;
use distillation::experiment::{Config, Method, ModelKind};
use distillation::nn::Net;
use distillation::rng::Rng;
use distillation::tape::{Tape, Tensor};
use distillation::{Backend, CpuBackend, Error, FastCpuBackend};
use safetensors::Dtype;

/// A fresh folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("distillation-byo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn distill(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .output()
        .unwrap()
}

/// The CLI failed with `needle` in its message, and did not panic.
fn fails_with(args: &[&str], needle: &str) {
    let out = distill(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
}

/// The CLI succeeded; its results.json.
fn succeeds(args: &[&str], out_dir: &Path) -> serde_json::Value {
    let out = distill(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap()).unwrap()
}

const QUICK: [&str; 10] = [
    "--backend",
    "cpu",
    "--jobs",
    "1",
    "--run-folds",
    "1",
    "--epochs",
    "4",
    "--teacher-epochs",
    "3",
];

// ---------------------------------------------------------------- CSV

/// `(channels, height, width)`.
type Image = (usize, usize, usize);

const ROWS: &str = "0.5,1,-2,0\n1.5,2e-1,3,2\n\n-0.25,0,1,1\n4,4,4,2.0\n";

#[test]
fn csv_loads_with_or_without_header_plain_or_gzipped() {
    let dir = scratch("csv");
    let header = "f0, f1, f2, label\r\n";
    let variants = [
        ("plain.csv", ROWS.as_bytes().to_vec(), false),
        (
            "header.csv",
            format!("\u{feff}{header}{}", ROWS.replace('\n', "\r\n")).into_bytes(),
            true,
        ),
        ("plain.csv.gz", gzip(ROWS.as_bytes()), false),
        (
            "header.csv.gz",
            gzip(format!("{header}{ROWS}").as_bytes()),
            true,
        ),
    ];
    for (name, bytes, has_header) in variants {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let csv = Dataset::from_csv_file(&path, None).unwrap();
        assert_eq!(csv.header, has_header, "{name}");
        let d = csv.data;
        assert_eq!(
            (d.len(), d.dim, d.classes, d.image),
            (4, 3, 3, None),
            "{name}"
        );
        // Features as given (not rescaled), labels from the last column ("2.0" is 2).
        assert_eq!(
            d.x,
            vec![0.5, 1.0, -2.0, 1.5, 0.2, 3.0, -0.25, 0.0, 1.0, 4.0, 4.0, 4.0],
            "{name}"
        );
        assert_eq!(d.y, vec![0, 2, 1, 2], "{name}");
    }
    // An image shape, HxW or CxHxW.
    let path = dir.join("img.csv");
    std::fs::write(&path, "1,2,3,4,0\n5,6,7,8,1\n").unwrap();
    let d = Dataset::from_csv_file(&path, Some((1, 2, 2))).unwrap().data;
    assert_eq!(d.image, Some((1, 2, 2)));
    // The shipped digits, written as a CSV with a header, load as the same data set.
    let digits = Dataset::digits().unwrap();
    let mut text = (0..64).map(|i| format!("p{i},")).collect::<String>() + "label\n";
    for (row, y) in digits.x.chunks(64).zip(&digits.y) {
        for v in row {
            text += &format!("{v},");
        }
        text += &format!("{y}\n");
    }
    let path = dir.join("digits.csv.gz");
    std::fs::write(&path, gzip(text.as_bytes())).unwrap();
    let mine = Dataset::from_csv_file(&path, Some((1, 8, 8))).unwrap();
    assert!(mine.header);
    assert_eq!(mine.data, digits);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_csv_files_are_errors_naming_the_file_line_and_fix() {
    let dir = scratch("csv-errors");
    let cases: [(&str, &str, &str); 14] = [
        ("empty", "", "no rows"),
        ("header-only", "a,b,label\n", "only a header (line 1)"),
        (
            "ragged",
            "1,2,0\n3,4,1\n5,1\n",
            "line 3: 2 cells, but line 1 has 3",
        ),
        (
            "ragged-header",
            "a,b,label\n1,2,3,0\n",
            "line 2: 4 cells, but line 1 has 3",
        ),
        (
            "word",
            "1,2,0\n3,x,1\n",
            "line 2: column 2: \"x\" is not a number",
        ),
        ("blank-cell", "1,2,0\n3,,1\n", "line 2: column 2: is empty"),
        ("nan", "1,2,0\n3,NaN,1\n", "is not a finite f32"),
        ("huge", "1,2,0\n3,1e39,1\n", "is not a finite f32"),
        (
            "fraction",
            "1,2,0\n3,4,1.5\n",
            "line 2: label \"1.5\" (column 3, the last) is not a class",
        ),
        ("negative", "1,2,-1\n3,4,1\n", "line 1: label \"-1\""),
        (
            "label-word",
            "1,2,0\n3,4,cat\n",
            "line 2: label \"cat\" (column 3, the last) is not a number",
        ),
        ("big-label", "1,2,0\n3,4,100000\n", "is too large"),
        (
            "semicolons",
            "1;2;0\n3;4;1\n",
            "line 1: one cell (it holds ';': cells must be separated by commas)",
        ),
        ("binary", "\u{0}\u{1}", "line 1: one cell"),
    ];
    for (name, text, needle) in cases {
        let path = dir.join(format!("{name}.csv"));
        std::fs::write(&path, text).unwrap();
        let e = Dataset::from_csv_file(&path, None).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{name}: {e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(needle),
            "{name}: {msg}"
        );
    }
    let path = dir.join("latin1.csv");
    std::fs::write(&path, b"1,2,0\n\xe9,4,1\n").unwrap();
    let msg = Dataset::from_csv_file(&path, None).unwrap_err().to_string();
    assert!(msg.contains("not UTF-8"), "{msg}");
    let msg = Dataset::from_csv_file(&dir.join("missing.csv"), None)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("cannot read")
            && msg.contains("missing.csv")
            && msg.contains("check the path"),
        "{msg}"
    );
    // Data the pipeline cannot use: configuration errors.
    let config_cases: [(&str, &str, Option<Image>, &str); 2] = [
        (
            "one-class",
            "1,2,3\n3,4,3\n",
            None,
            "every one of the 2 rows has label 3: distillation needs at least 2 classes",
        ),
        (
            "shape",
            "1,2,3,0\n3,4,5,1\n",
            Some((1, 2, 2)),
            "image shape 1x2x2 does not hold the 3 features",
        ),
    ];
    for (name, text, image, needle) in config_cases {
        let path = dir.join(format!("{name}.csv"));
        std::fs::write(&path, text).unwrap();
        let e = Dataset::from_csv_file(&path, image).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{name}: {e:?}");
        assert!(e.to_string().contains(needle), "{name}: {e}");
    }
    // Too few rows for the folds.
    let path = dir.join("few.csv");
    std::fs::write(&path, "1,2,0\n3,4,1\n5,6,1\n").unwrap();
    let d = Dataset::from_csv_file(&path, None).unwrap().data;
    let e = Config::default().validate(&d).unwrap_err();
    assert!(
        matches!(e, Error::Config(_)) && e.to_string().contains("5 folds of 3 examples"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_cli_runs_on_a_csv_and_needs_an_image_shape_for_the_cnn() {
    let dir = scratch("csv-cli");
    let digits = Dataset::digits().unwrap();
    let mut text = String::new();
    for (row, y) in digits.x.chunks(64).zip(&digits.y).take(400) {
        for v in row {
            text += &format!("{v},");
        }
        text += &format!("{y}\n");
    }
    let csv = dir.join("digits.csv");
    std::fs::write(&csv, text).unwrap();
    let (csv_s, out_s) = (csv.to_str().unwrap(), dir.to_str().unwrap());
    let mut args = QUICK.to_vec();
    args.extend(["--quiet", "--out", out_s, "--data", csv_s]);
    let json = succeeds(&args, &dir);
    assert_eq!(json["folds"].as_array().unwrap().len(), 1);
    let mut cnn = args.clone();
    cnn.extend(["--model", "cnn"]);
    fails_with(&cnn, "--image-shape");
    let mut aug = args.clone();
    aug.push("--augment");
    fails_with(&aug, "--image-shape");
    cnn.extend([
        "--image-shape",
        "1x8x8",
        "--teacher-channels",
        "4",
        "--student-channels",
        "2",
    ]);
    succeeds(&cnn, &dir);
    let mut bad = args.clone();
    bad.extend(["--image-shape", "8x7"]);
    fails_with(&bad, "does not hold the 64 features");
    let mut bad = args.clone();
    bad.extend(["--image-shape", "0x8"]);
    fails_with(&bad, "each dimension must be in 1..=");
    fails_with(&["--image-shape", "8x8"], "--data");
    fails_with(
        &["--data", "/nonexistent/my.csv"],
        "cannot read /nonexistent/my.csv",
    );
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------- sizes

#[test]
fn layer_sizes_are_flags_and_bad_ones_are_config_errors() {
    let dir = scratch("sizes");
    let out_s = dir.to_str().unwrap();
    let mut args = QUICK.to_vec();
    args.extend([
        "--quiet",
        "--out",
        out_s,
        "--teacher-hidden",
        "16",
        "--student-hidden",
        "8,4",
    ]);
    let json = succeeds(&args, &dir);
    assert_eq!(json["teacher_params"], 64 * 16 + 16 + 16 * 10 + 10);
    assert_eq!(json["student_params"], 64 * 8 + 8 + 8 * 4 + 4 + 4 * 10 + 10);
    assert_eq!(json["config"]["student_hidden"], serde_json::json!([8, 4]));
    // The defaults are the configuration's.
    let d = Config::default();
    assert_eq!(
        (
            d.teacher_hidden,
            d.student_hidden,
            d.teacher_channels,
            d.student_channels
        ),
        (vec![256, 256], vec![32], vec![32, 64], vec![8, 16])
    );
    let help = String::from_utf8_lossy(&distill(&["--help"]).stdout).to_string();
    for default in [
        "[default: 256,256]",
        "[default: 32]",
        "[default: 32,64]",
        "[default: 8,16]",
    ] {
        assert!(help.contains(default), "{default}: {help}");
    }
    fails_with(
        &["--student-hidden", "0"],
        "student_hidden (--student-hidden) [0] has a size 0",
    );
    fails_with(
        &["--teacher-channels", "8,100000", "--model", "cnn"],
        "has a layer of 100000, more than 65536",
    );
    fails_with(&["--student-hidden", "x"], "invalid digit");

    let digits = Dataset::digits().unwrap();
    let cases = [
        (
            Config {
                student_hidden: vec![],
                ..Config::default()
            },
            "student_hidden (--student-hidden) is empty",
        ),
        (
            Config {
                teacher_hidden: vec![64, 0],
                ..Config::default()
            },
            "teacher_hidden (--teacher-hidden) [64, 0] has a size 0",
        ),
        (
            Config {
                student_channels: vec![4; 65],
                ..Config::default()
            },
            "has 65 layers, more than 64",
        ),
        (
            Config {
                teacher_hidden: vec![60_000, 60_000],
                ..Config::default()
            },
            "the teacher would have 3604560010 parameters, more than 100000000",
        ),
        (
            Config {
                model: ModelKind::Cnn,
                teacher_channels: vec![8, 4096, 4096],
                ..Config::default()
            },
            "give smaller sizes with --teacher-channels",
        ),
    ];
    for (cfg, needle) in cases {
        let e = cfg.validate(&digits).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{needle}: {e:?}");
        assert!(e.to_string().contains(needle), "{needle}: {e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------- checkpoints

/// Named tensors: `(name, shape, f32 values)`.
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// A safetensors file of `(name, shape, f32 values)`, each stored as `dtype`.
fn safetensors_file(tensors: &Tensors, dtype: Dtype) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| match dtype {
            Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::F64 => v.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
            // Exact for the values of `pytorch_mlp` (multiples of 1/64 below 1 in magnitude).
            Dtype::BF16 => v
                .iter()
                .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
                .collect(),
            Dtype::F16 => v
                .iter()
                .flat_map(|&x| f32_to_f16(x).to_le_bytes())
                .collect(),
            Dtype::I64 => v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect(),
            _ => unreachable!(),
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// f32 to half precision, for normal values that are exact in it.
fn f32_to_f16(x: f32) -> u16 {
    if x == 0.0 {
        return if x.is_sign_negative() { 0x8000 } else { 0 };
    }
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    assert!((1..31).contains(&exp), "{x} is not a normal f16");
    sign | ((exp as u16) << 10) | ((b >> 13) & 0x3ff) as u16
}

/// A PyTorch-layout MLP `sizes[0] -> ... -> sizes[last]`: `(2i).weight` `[out, in]`,
/// `(2i).bias`, with weights that are multiples of 1/64 (exact in every float dtype).
fn pytorch_mlp(sizes: &[usize], seed: u64) -> Tensors {
    let mut rng = Rng::new(seed);
    let mut v = Vec::new();
    for (i, w) in sizes.windows(2).enumerate() {
        let (inp, out) = (w[0], w[1]);
        let mut draw = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.range(-24.0, 24.0).round() / 64.0) as f32)
                .collect()
        };
        v.push((format!("{}.weight", 2 * i), vec![out, inp], draw(out * inp)));
        v.push((format!("{}.bias", 2 * i), vec![out], draw(out)));
    }
    v
}

/// `nn.Sequential(Linear, ReLU, ..., Linear)` on rows `x` of `dim`, in f64, from the PyTorch
/// layout: `y = x W^T + b`.
fn forward_directly(tensors: &Tensors, x: &[f32], dim: usize) -> Vec<f64> {
    let layers = tensors.len() / 2;
    let mut h: Vec<Vec<f64>> = x
        .chunks(dim)
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect();
    for l in 0..layers {
        let (_, shape, w) = &tensors[2 * l];
        let b = &tensors[2 * l + 1].2;
        let (out, inp) = (shape[0], shape[1]);
        h = h
            .iter()
            .map(|row| {
                (0..out)
                    .map(|o| {
                        let z = b[o] as f64
                            + (0..inp)
                                .map(|i| w[o * inp + i] as f64 * row[i])
                                .sum::<f64>();
                        if l + 1 < layers {
                            z.max(0.0)
                        } else {
                            z
                        }
                    })
                    .collect()
            })
            .collect();
    }
    h.concat()
}

fn logits<B: Backend>(b: &B, net: &Net<B>, x: &[f32], dim: usize) -> Vec<f32> {
    let tape = Tape::new(b);
    let v = tape.constant(Tensor::from_host(b, x, &[x.len() / dim, dim]).unwrap());
    let out = net.forward(&tape, v).unwrap().logits;
    tape.value(out).unwrap().to_host(b).unwrap()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: logit {i}: {g} vs {w}"
        );
    }
}

#[test]
fn a_pytorch_layout_teacher_predicts_like_the_network_evaluated_directly() {
    let dir = scratch("pytorch-layout");
    let digits = Dataset::digits().unwrap();
    let x = &digits.x[..40 * 64];
    let tensors = pytorch_mlp(&[64, 24, 12, 10], 5);
    let want = forward_directly(&tensors, x, 64);
    for dtype in [Dtype::F32, Dtype::F64, Dtype::F16, Dtype::BF16] {
        let path = dir.join(format!("teacher-{dtype}.safetensors"));
        std::fs::write(&path, safetensors_file(&tensors, dtype)).unwrap();
        let t = Checkpoint::load(&path).unwrap();
        assert_eq!(t.describe(), "mlp [64, 24, 12, 10]");
        assert_eq!((t.kind(), t.hidden()), (ModelKind::Mlp, vec![24, 12]));
        assert_eq!(
            t.parameter_count(),
            64 * 24 + 24 + 24 * 12 + 12 + 12 * 10 + 10
        );
        assert_eq!(t.dtype() == "F32", dtype == Dtype::F32, "{}", t.dtype());
        let fast = FastCpuBackend::new();
        let net = t.build(&fast, &digits).unwrap();
        assert_close(
            &logits(&fast, &net, x, 64),
            &want,
            1e-5,
            &format!("{dtype}, fast CPU"),
        );
        let reference = CpuBackend::new();
        let net = t.build(&reference, &digits).unwrap();
        assert_close(
            &logits(&reference, &net, x, 64),
            &want,
            1e-5,
            &format!("{dtype}, reference"),
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The Python with torch the test may use: `DISTILLATION_PYTHON`, the project's venv, or
/// `python3`; `None` (the test skips) when none imports torch.
fn python_with_torch() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("DISTILLATION_PYTHON").map(PathBuf::from),
        Some(PathBuf::from("/root/.cache/distillation/venv/bin/python")),
        Some(PathBuf::from("python3")),
    ];
    candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .args(["-c", "import torch, numpy"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// A PyTorch `nn.Sequential`, its state dict written as safetensors (by hand: the `safetensors`
/// package is not needed), and its logits on the digits.
const TORCH_TEACHER: &str = r#"
import gzip, json, struct, sys, torch
out, digits = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(64, 32), torch.nn.ReLU(),
    torch.nn.Linear(32, 16), torch.nn.ReLU(),
    torch.nn.Linear(16, 10))
rows = [l.split(",") for l in gzip.open(digits, "rt").read().split()]
x = torch.tensor([[float(v) / 16 for v in r[:-1]] for r in rows])
header, blobs, offset = {}, [], 0
for name, t in model.state_dict().items():
    b = t.detach().contiguous().numpy().astype("<f4").tobytes()
    header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
    blobs.append(b)
    offset += len(b)
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
open(out + "/teacher.safetensors", "wb").write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
with torch.no_grad():
    open(out + "/logits.f32", "wb").write(model(x).numpy().astype("<f4").tobytes())
"#;

#[test]
fn a_teacher_saved_by_pytorch_loads_with_pytorchs_predictions() {
    let Some(python) = python_with_torch() else {
        eprintln!(
            "skipped: no Python with torch (set DISTILLATION_PYTHON to one) for the PyTorch \
             round trip; the PyTorch-layout test written from Rust still ran"
        );
        return;
    };
    let dir = scratch("torch");
    let digits_gz = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits.csv.gz");
    let out = Command::new(&python)
        .args(["-c", TORCH_TEACHER])
        .arg(&dir)
        .arg(&digits_gz)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let torch: Vec<f64> = std::fs::read(dir.join("logits.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
        .collect();
    let digits = Dataset::digits().unwrap();
    assert_eq!(torch.len(), digits.len() * 10);
    let path = dir.join("teacher.safetensors");
    let t = Checkpoint::load(&path).unwrap();
    assert_eq!(t.describe(), "mlp [64, 32, 16, 10]");
    let b = FastCpuBackend::new();
    let net = t.build(&b, &digits).unwrap();
    assert_close(
        &logits(&b, &net, &digits.x, 64),
        &torch,
        1e-5,
        "torch logits",
    );
    // The same accuracy as PyTorch's logits give, over every example.
    let argmax = |row: &[f64]| (0..10).fold(0, |m, j| if row[j] > row[m] { j } else { m });
    let torch_correct = torch
        .chunks(10)
        .zip(&digits.y)
        .filter(|(r, &y)| argmax(r) as i32 == y)
        .count();
    let all: Vec<usize> = (0..digits.len()).collect();
    let acc = distillation::experiment::accuracy(&b, &net, &digits, &all).unwrap();
    assert_eq!(acc, torch_correct as f64 / digits.len() as f64);

    // Through the CLI: --teacher loads it (not trained: no teacher curve), --save-teacher writes
    // back the same tensors, bit for bit.
    let back = dir.join("back.safetensors");
    let mut args = QUICK.to_vec();
    args.extend(["--quiet", "--out", dir.to_str().unwrap()]);
    args.extend([
        "--teacher",
        path.to_str().unwrap(),
        "--save-teacher",
        back.to_str().unwrap(),
    ]);
    let json = succeeds(&args, &dir);
    assert_eq!(
        json["config"]["teacher"]["architecture"],
        "mlp [64, 32, 16, 10]"
    );
    assert_eq!(
        json["config"]["teacher_hidden"],
        serde_json::json!([32, 16])
    );
    assert_eq!(json["folds"][0]["teacher_curve"], serde_json::json!([]));
    let (a, c) = (std::fs::read(&path).unwrap(), std::fs::read(&back).unwrap());
    let (a, c) = (
        safetensors::SafeTensors::deserialize(&a).unwrap(),
        safetensors::SafeTensors::deserialize(&c).unwrap(),
    );
    let mut names = a.names();
    names.sort();
    let mut back_names = c.names();
    back_names.sort();
    assert_eq!(names, back_names);
    for n in names {
        let (x, y) = (a.tensor(n).unwrap(), c.tensor(n).unwrap());
        assert_eq!((x.shape(), x.data()), (y.shape(), y.data()), "{n}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `--save-teacher` then `--teacher` of the same file gives the same fold: the teacher's accuracy,
/// and (distilled from the same logits) the student's, for the MLP and the CNN.
#[test]
fn save_teacher_then_teacher_reproduces_the_run() {
    let dir = scratch("save-load");
    for (model, sizes) in [
        ("mlp", ["--teacher-hidden", "24", "--student-hidden", "8"]),
        (
            "cnn",
            ["--teacher-channels", "4,6", "--student-channels", "2,3"],
        ),
    ] {
        let (first, second) = (
            dir.join(format!("{model}-1")),
            dir.join(format!("{model}-2")),
        );
        let saved = dir.join(format!("{model}-teacher.safetensors"));
        let mut base = QUICK.to_vec();
        base.extend(["--quiet", "--model", model]);
        let mut a = base.clone();
        a.extend(sizes);
        a.extend([
            "--out",
            first.to_str().unwrap(),
            "--save-teacher",
            saved.to_str().unwrap(),
        ]);
        let trained = succeeds(&a, &first);
        let mut b = base.clone();
        b.extend([sizes[2], sizes[3]]);
        b.extend([
            "--out",
            second.to_str().unwrap(),
            "--teacher",
            saved.to_str().unwrap(),
        ]);
        let loaded = succeeds(&b, &second);
        let (t, l) = (&trained["folds"][0], &loaded["folds"][0]);
        assert!(t["teacher"].as_f64().unwrap() > 0.3, "{model}: {t}");
        for k in ["teacher", "student", "simple", "student_curve"] {
            assert_eq!(t[k], l[k], "{model}: {k}");
        }
        assert_eq!(
            trained["teacher_params"], loaded["teacher_params"],
            "{model}"
        );
        assert!(loaded["config"]["teacher"]["file"]
            .as_str()
            .unwrap()
            .ends_with(&format!("{model}-teacher.safetensors")));
        assert!(trained["config"]["teacher"].is_null());
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_checkpoints_are_errors_naming_the_tensor_and_the_shape() {
    let dir = scratch("bad-checkpoints");
    let good = pytorch_mlp(&[64, 12, 10], 1);
    let edit = |f: &dyn Fn(&mut Tensors)| {
        let mut t = good.clone();
        f(&mut t);
        t
    };
    let file_cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "missing-bias",
            safetensors_file(
                &edit(&|t| {
                    t.remove(3);
                }),
                Dtype::F32,
            ),
            "missing tensor 2.bias (expected shape [10])",
        ),
        (
            "wrong-inputs",
            safetensors_file(
                &edit(&|t| {
                    t[2] = ("2.weight".into(), vec![10, 13], vec![0.0; 130]);
                }),
                Dtype::F32,
            ),
            "tensor 2.weight has shape [10, 13], expected [_, 12]: a Linear weight [out, in] \
             whose inputs are the 12 outputs of 0.weight",
        ),
        (
            "bias-shape",
            safetensors_file(
                &edit(&|t| {
                    t[1] = ("0.bias".into(), vec![1, 12], vec![0.0; 12]);
                }),
                Dtype::F32,
            ),
            "tensor 0.bias has shape [1, 12], expected [12]",
        ),
        (
            "three-d",
            safetensors_file(
                &edit(&|t| {
                    t[0] = ("0.weight".into(), vec![12, 8, 8], vec![0.0; 768]);
                }),
                Dtype::F32,
            ),
            "tensor 0.weight has shape [12, 8, 8], expected [_, _]",
        ),
        (
            "int",
            safetensors_file(&good, Dtype::I64),
            "has dtype I64: only F32, F64, F16 and BF16",
        ),
        (
            "nan",
            safetensors_file(&edit(&|t| t[2].2[5] = f32::NAN), Dtype::F32),
            "tensor 2.weight (shape [10, 12]) has a non-finite value at flat index 5",
        ),
        (
            "batchnorm",
            safetensors_file(
                &edit(&|t| {
                    t.push(("1.running_mean".into(), vec![12], vec![0.0; 12]));
                }),
                Dtype::F32,
            ),
            "unexpected tensor 1.running_mean (shape [12])",
        ),
        (
            "dropout-shift",
            safetensors_file(
                &edit(&|t| {
                    t[2].0 = "3.weight".into();
                    t[3].0 = "3.bias".into();
                }),
                Dtype::F32,
            ),
            "unexpected tensor 3.bias",
        ),
        (
            "one-layer",
            safetensors_file(&pytorch_mlp(&[64, 10], 2), Dtype::F32),
            "no hidden layer",
        ),
        (
            "prefixed",
            safetensors_file(
                &edit(&|t| {
                    for x in t.iter_mut() {
                        x.0 = format!("net.{}", x.0);
                    }
                }),
                Dtype::F32,
            ),
            "its keys start with \"net.\"",
        ),
        (
            "not-safetensors",
            b"PK\x03\x04 a zip from torch.save".to_vec(),
            "not a safetensors file",
        ),
    ];
    for (name, bytes, needle) in file_cases {
        let path = dir.join(format!("{name}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        let e = Checkpoint::load(&path).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{name}: {e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("cannot load {}", path.display())) && msg.contains(needle),
            "{name}: {msg}"
        );
    }
    let e = Checkpoint::load(&dir.join("missing.safetensors")).unwrap_err();
    assert!(
        e.to_string().starts_with("cannot read") && e.to_string().contains("missing.safetensors"),
        "{e}"
    );

    // Files that are fine but do not fit the data or the configuration.
    let digits = Dataset::digits().unwrap();
    let load = |name: &str, tensors: &Tensors| {
        let path = dir.join(format!("{name}.safetensors"));
        std::fs::write(&path, safetensors_file(tensors, Dtype::F32)).unwrap();
        Checkpoint::load(&path).unwrap()
    };
    let config_cases = [
        (
            Config::default().with_teacher(load("inputs", &pytorch_mlp(&[63, 12, 10], 3))),
            "tensor 0.weight has shape [12, 63], expected [12, 64]: the first layer must take \
             the data's 64 features",
        ),
        (
            Config::default().with_teacher(load("classes", &pytorch_mlp(&[64, 12, 7], 3))),
            "tensor 2.weight has shape [7, 12], expected [10, 12]: the last layer must give one \
             logit for each of the data's 10 classes",
        ),
        (
            Config {
                method: Method::Ensemble,
                ..Config::default()
            }
            .with_teacher(load("ensemble", &good)),
            "method ensemble trains 3 teachers, but a loaded teacher",
        ),
        (
            Config {
                model: ModelKind::Cnn,
                ..Config::default()
            }
            .with_teacher(load("family", &good)),
            "is an MLP (mlp [64, 12, 10]), but the model is Cnn: pass --model mlp",
        ),
        (
            Config::default()
                .with_teacher(load("resized", &good))
                .map(|c| Config {
                    teacher_hidden: vec![13],
                    ..c
                }),
            "does not describe the loaded teacher",
        ),
    ];
    for (cfg, needle) in config_cases {
        let e = cfg.and_then(|c| c.validate(&digits)).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{needle}: {e:?}");
        assert!(e.to_string().contains(needle), "{needle}: {e}");
    }

    // Through the CLI: a non-zero exit with the message, no panic; --teacher fixes the teacher's
    // sizes.
    let wrong = dir.join("wrong-inputs.safetensors");
    fails_with(
        &["--teacher", wrong.to_str().unwrap()],
        "tensor 2.weight has shape [10, 13], expected [_, 12]",
    );
    let inputs = dir.join("inputs.safetensors");
    fails_with(
        &["--teacher", inputs.to_str().unwrap()],
        "expected [12, 64]",
    );
    fails_with(&["--teacher", "/nonexistent/t.safetensors"], "cannot read");
    fails_with(
        &[
            "--teacher",
            inputs.to_str().unwrap(),
            "--teacher-hidden",
            "8",
        ],
        "cannot be used with",
    );
    fails_with(
        &["sweep", "--save-teacher", "/tmp/never.safetensors"],
        "--save-teacher writes the teacher of a run",
    );
    std::fs::remove_dir_all(&dir).ok();
}
