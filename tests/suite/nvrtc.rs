//! The CUDA kernels compile with NVRTC, and the CUDA backend degrades to an error without a GPU.
//!
//! - Every kernel file (`cuda::SOURCES`) compiles to PTX for sm_80 and sm_90 with an empty NVRTC log (no
//!   warning), and the PTX's entry points take exactly the parameters the backend passes
//!   (`cuda::KERNELS`). Without NVRTC the test prints "skipped: NVRTC not found", unless
//!   `DISTILLATION_REQUIRE` names `nvrtc` (then it fails). `.ci/install-nvrtc.sh` installs NVRTC and
//!   prints the directory to put on `LD_LIBRARY_PATH`. `DISTILLATION_PTX_DIR=dir` keeps the PTX.
//! - `CudaBackend::new()` returns `Error::Unavailable` (not a panic) where there is no CUDA driver or
//!   device, unless `DISTILLATION_REQUIRE` names `cuda` (then it must succeed).
#![cfg(feature = "cuda")]

use distillation::backend::cuda::{self, CudaBackend, KERNELS, SOURCES};
use distillation::backend::required;
use distillation::{Backend, Error};

const ARCHES: [&str; 2] = ["sm_80", "sm_90"];

fn nvrtc_or_skip() -> bool {
    if cuda::nvrtc_available() {
        return true;
    }
    if required("nvrtc") {
        panic!(
            "DISTILLATION_REQUIRE names nvrtc but NVRTC (libnvrtc.so.13) cannot be loaded: run \
             `bash .ci/install-nvrtc.sh` and add the directory it prints last to LD_LIBRARY_PATH"
        );
    }
    println!("skipped: NVRTC not found");
    false
}

/// The PTX parameter types of entry `name`, as signature letters (`p`/`l` both read `.u64`).
fn ptx_params(ptx: &str, name: &str) -> Option<Vec<String>> {
    let start = ptx.find(&format!(".entry {name}("))?;
    let rest = &ptx[start..];
    let end = rest.find(')')?;
    Some(
        rest[..end]
            .lines()
            .filter_map(|line| {
                let line = line.trim();
                let ty = line.strip_prefix(".param ")?;
                Some(ty.split_whitespace().next()?.to_string())
            })
            .collect(),
    )
}

fn ptx_type(letter: char) -> &'static str {
    match letter {
        'p' | 'l' => ".u64",
        'u' | 'i' => ".u32",
        'f' => ".f32",
        'd' => ".f64",
        other => panic!("unknown signature letter {other}"),
    }
}

#[test]
fn kernels_compile_without_warnings() {
    if !nvrtc_or_skip() {
        return;
    }
    for arch in ARCHES {
        let compiled =
            cuda::compile_all_kernels_with_logs(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(compiled.len(), SOURCES.len());
        for k in &compiled {
            assert!(
                k.log.is_empty(),
                "NVRTC said something compiling {} for {arch}:\n{}",
                k.file,
                k.log
            );
            assert!(
                k.ptx.contains(".entry"),
                "{} for {arch}: no entry point in the PTX",
                k.file
            );
            println!("{arch} {}: {} bytes of PTX", k.file, k.ptx.len());
            // DISTILLATION_PTX_DIR=dir keeps the PTX (dir/sm_90/divergence.ptx, ...) for
            // `ptxas -arch=sm_90 -v` (registers, spills).
            if let Ok(dir) = std::env::var("DISTILLATION_PTX_DIR") {
                let dir = std::path::Path::new(&dir).join(arch);
                std::fs::create_dir_all(&dir).unwrap();
                let name = k.file.replace(".cu", ".ptx");
                std::fs::write(dir.join(name), &k.ptx).unwrap();
            }
        }
        for kernel in KERNELS {
            let (file, name, sig) = (kernel.file, kernel.name, kernel.signature);
            let k = compiled
                .iter()
                .find(|k| k.file == file)
                .expect("file compiled");
            let params = ptx_params(&k.ptx, name)
                .unwrap_or_else(|| panic!("{file} ({arch}) has no entry point {name}"));
            let expected: Vec<&str> = sig.chars().map(ptx_type).collect();
            assert_eq!(
                params, expected,
                "{name} in {file} ({arch}): PTX parameters vs the backend's signature {sig}"
            );
        }
        // Every entry point of the PTX is one the backend knows (no forgotten kernel).
        for k in &compiled {
            for line in k.ptx.lines().filter(|l| l.contains(".entry ")) {
                let name = line
                    .split(".entry ")
                    .nth(1)
                    .unwrap()
                    .trim_end_matches('(')
                    .trim();
                assert!(
                    KERNELS.iter().any(|t| t.file == k.file && t.name == name),
                    "{} exports {name}, which cuda::KERNELS does not list",
                    k.file
                );
            }
        }
    }
}

#[test]
fn compile_all_kernels_gives_ptx_per_file() {
    if !nvrtc_or_skip() {
        return;
    }
    let ptx = cuda::compile_all_kernels("sm_90").unwrap_or_else(|e| panic!("{e}"));
    let files: Vec<&str> = ptx.iter().map(|(f, _)| f.as_str()).collect();
    let expected: Vec<&str> = SOURCES.iter().map(|s| s.file).collect();
    assert_eq!(files, expected);
    for (file, text) in &ptx {
        assert!(text.contains(".target sm_90"), "{file}: not PTX for sm_90");
    }
}

#[test]
fn compile_errors_carry_the_log() {
    if !nvrtc_or_skip() {
        return;
    }
    match cuda::compile_kernel("softmax.cu", "sm_1") {
        Err(Error::Compile { file, log }) => {
            assert_eq!(file, "softmax.cu");
            assert!(!log.is_empty());
        }
        other => panic!("an invalid architecture should be a compile error, got {other:?}"),
    }
}

#[test]
fn cuda_backend_without_a_device_is_an_error_not_a_panic() {
    let result = std::panic::catch_unwind(CudaBackend::new).expect("CudaBackend::new() panicked");
    if required("cuda") {
        let backend = result.unwrap_or_else(|e| panic!("DISTILLATION_REQUIRE names cuda: {e}"));
        println!("CUDA backend: {}", backend.name());
        return;
    }
    match result {
        Ok(backend) => println!("CUDA backend available: {}", backend.name()),
        Err(e) => {
            let message = e.to_string();
            assert!(
                matches!(
                    e,
                    Error::Unavailable {
                        backend: "cuda",
                        ..
                    }
                ),
                "expected Error::Unavailable, got {e:?}"
            );
            assert!(
                message.contains("CUDA"),
                "the message should mention CUDA: {message}"
            );
            println!("as expected without a GPU: {message}");
        }
    }
}

// ---- on a GPU: every op against the CPU reference ------------------------------------------------

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut d2, mut w2) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if w.is_nan() {
            assert!(g.is_nan(), "expected NaN, got {g}");
            continue;
        }
        let d = g as f64 - w as f64;
        d2 += d * d;
        w2 += (w as f64) * (w as f64);
    }
    if d2 == 0.0 {
        0.0
    } else {
        d2.sqrt() / w2.sqrt().max(1e-30)
    }
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// A row-loss call on backend `B`.
type RowOp<'f, B> = dyn for<'x> Fn(
        &B,
        &<B as Backend>::Buffer,
        &<B as Backend>::Buffer,
        &<B as Backend>::Labels,
        distillation::LossOut<'x, B>,
    ) -> distillation::Result<()>
    + 'f;

/// Runs `op` on a backend: [loss, row_loss, grad_student, grad_teacher] (outputs poisoned with NaN).
fn run_on<B: Backend>(
    b: &B,
    s: &[f32],
    t: &[f32],
    labels: &[i32],
    rows: usize,
    op: &RowOp<B>,
) -> Vec<Vec<f32>> {
    use distillation::{GradOut, LossOut};
    let sb = b.upload(s).unwrap();
    let tb = b.upload(t).unwrap();
    let lb = b.upload_labels(labels).unwrap();
    let loss = b.filled(1, f32::NAN).unwrap();
    let rl = b.filled(rows, f32::NAN).unwrap();
    let gs = b.filled(s.len(), f32::NAN).unwrap();
    let gt = b.filled(s.len(), f32::NAN).unwrap();
    let out = LossOut {
        loss: &loss,
        row_loss: Some(&rl),
        grad_student: GradOut::Into(&gs),
        grad_teacher: Some(&gt),
    };
    op(b, &sb, &tb, &lb, out).unwrap();
    vec![
        b.download(&loss).unwrap(),
        b.download(&rl).unwrap(),
        b.download(&gs).unwrap(),
        b.download(&gt).unwrap(),
    ]
}

#[test]
fn cuda_matches_the_cpu_reference() {
    use distillation::{
        CpuBackend, CrossEntropySpec, Divergence, DivergenceSpec, HintonSpec, Reduction, RowShape,
        TeacherInput,
    };
    let cuda = match CudaBackend::new() {
        Ok(b) => b,
        Err(e) => {
            assert!(!required("cuda"), "DISTILLATION_REQUIRE names cuda: {e}");
            println!("skipped: {e}");
            return;
        }
    };
    let cpu = CpuBackend::new();
    let mut rng = Lcg(7);
    let tol = 1e-4;
    let shapes = [
        (1usize, 1usize),
        (3, 7),
        (17, 100),
        (5, 1025),
        (4, 5000),
        (70, 33),
    ];
    for &(n, c) in &shapes {
        for &temp in &[0.05f32, 1.0, 4.0, 100.0] {
            for &scale in &[1.0f32, 10.0] {
                if temp * 20.0 < scale {
                    // Rows so confident (x/T ~ 200) that the f64 reference's own rounding of the
                    // near-zero gradients is of the size of the values compared.
                    continue;
                }
                let s = rng.vec(n * c, scale);
                let t = rng.vec(n * c, scale);
                let labels: Vec<i32> = (0..n)
                    .map(|r| {
                        if r % 4 == 3 {
                            -100
                        } else {
                            ((r * 7) % c) as i32
                        }
                    })
                    .collect();
                for div in [
                    Divergence::ForwardKl,
                    Divergence::ReverseKl,
                    Divergence::Jsd { beta: 0.3 },
                ] {
                    let spec = DivergenceSpec {
                        divergence: div,
                        teacher: TeacherInput::Logits,
                        reduction: Reduction::BatchMean,
                        ..DivergenceSpec::new(RowShape::new(n, c), temp)
                    };
                    let got = run_on(&cuda, &s, &t, &labels, n, &|b, s, t, l, o| {
                        b.divergence(&spec, s, t, Some(l), o)
                    });
                    let want = run_on(&cpu, &s, &t, &labels, n, &|b, s, t, l, o| {
                        b.divergence(&spec, s, t, Some(l), o)
                    });
                    for (k, name) in ["loss", "row_loss", "grad_student", "grad_teacher"]
                        .iter()
                        .enumerate()
                    {
                        let e = rel_err(&got[k], &want[k]);
                        assert!(
                            e <= tol,
                            "{div:?} n={n} c={c} T={temp} scale={scale} {name}: relative error {e}"
                        );
                    }
                }
                let ce = CrossEntropySpec {
                    label_smoothing: 0.1,
                    ..CrossEntropySpec::new(RowShape::new(n, c))
                };
                let got = run_on(&cuda, &s, &t, &labels, n, &|b, s, _t, l, mut o| {
                    o.grad_teacher = None;
                    b.cross_entropy(&ce, s, l, o)
                });
                let want = run_on(&cpu, &s, &t, &labels, n, &|b, s, _t, l, mut o| {
                    o.grad_teacher = None;
                    b.cross_entropy(&ce, s, l, o)
                });
                for k in 0..3 {
                    let e = rel_err(&got[k], &want[k]);
                    assert!(
                        e <= tol,
                        "CE n={n} c={c} scale={scale} output {k}: relative error {e}"
                    );
                }
                let hs = HintonSpec {
                    label_smoothing: 0.1,
                    ..HintonSpec::new(RowShape::new(n, c), temp, 0.3)
                };
                let got = run_on(&cuda, &s, &t, &labels, n, &|b, s, t, l, o| {
                    b.hinton(&hs, s, t, l, o)
                });
                let want = run_on(&cpu, &s, &t, &labels, n, &|b, s, t, l, o| {
                    b.hinton(&hs, s, t, l, o)
                });
                for k in 0..4 {
                    let e = rel_err(&got[k], &want[k]);
                    assert!(
                        e <= tol,
                        "Hinton n={n} c={c} T={temp} scale={scale} output {k}: relative error {e}"
                    );
                }
            }
        }
    }
    println!("CUDA matches the CPU reference on {}", cuda.name());
}
