//! `distill`: the teacher-student comparison on the best backend, and a T x alpha sweep.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand, ValueEnum};
use distillation::checkpoint::Checkpoint;
use distillation::data::Dataset;
use distillation::experiment::{self, Config, Method, ModelKind, Outcome, Progress, Report};
use distillation::{Backend, CpuBackend, Error, FastCpuBackend, Result, WgpuBackend};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(
    name = "distill",
    version,
    about = "Knowledge distillation: teacher vs distilled student vs the same student trained alone"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The teacher / distilled / simple comparison with k-fold cross-validation (the default).
    Run,
    /// Cross-validated student accuracy over a grid of temperatures and alphas.
    Sweep {
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        temperatures: Vec<f32>,
        #[arg(long, value_delimiter = ',', default_value = "0.1,0.2,0.5")]
        alphas: Vec<f32>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendChoice {
    /// CUDA, else a hardware wgpu adapter, else the fast CPU backend.
    Auto,
    /// The fast CPU backend (f32 matmul, AVX2+FMA when the CPU has them).
    Cpu,
    /// The f64 CPU reference (slow; every other backend is checked against it).
    Reference,
    Wgpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModelChoice {
    Mlp,
    Cnn,
}

/// `--method`: the names and help lines of the methods' registry
/// (`distillation::experiment::methods`).
fn method_parser() -> impl TypedValueParser<Value = Method> {
    PossibleValuesParser::new(
        Method::ALL
            .iter()
            .map(|m| PossibleValue::new(m.name()).help(m.about())),
    )
    .map(|name| Method::from_name(&name).expect("a registered method name"))
}

#[derive(clap::Args, Debug)]
struct Opts {
    #[arg(long, value_enum, default_value = "auto", global = true)]
    backend: BackendChoice,
    #[arg(long, value_enum, default_value = "mlp", global = true)]
    model: ModelChoice,
    #[arg(long, value_parser = method_parser(), default_value = "kd", global = true)]
    method: Method,
    /// Softmax temperature of the soft targets.
    #[arg(long, default_value_t = 4.0, global = true)]
    temperature: f32,
    /// Weight of the hard-label cross-entropy (1 - alpha weighs the soft targets).
    #[arg(long, default_value_t = 0.2, global = true)]
    alpha: f32,
    /// Fraction of each training fold the student sees with labels.
    #[arg(long, default_value_t = 0.05, global = true)]
    label_fraction: f64,
    /// Epochs over the labelled part (student and simple model).
    #[arg(long, default_value_t = 200, global = true)]
    epochs: usize,
    /// Epochs over the whole training fold for the teacher.
    #[arg(long, default_value_t = 200, global = true)]
    teacher_epochs: usize,
    /// Hard-label fine-tuning epochs for the distilled student after distillation.
    #[arg(long, default_value_t = 0, global = true)]
    finetune_epochs: usize,
    #[arg(long, default_value_t = 5, global = true)]
    folds: usize,
    /// Run only the first N folds.
    #[arg(long, global = true)]
    run_folds: Option<usize>,
    #[arg(long, default_value_t = 0, global = true)]
    seed: u64,
    #[arg(long, default_value_t = 32, global = true)]
    batch: usize,
    #[arg(long, default_value_t = 1e-3, global = true)]
    lr: f32,
    /// Random +-1 pixel shifts and Gaussian noise on the student's inputs.
    #[arg(long, global = true)]
    augment: bool,
    /// DKD (--method dkd): the weight of TCKD, the target-vs-rest part (the paper's alpha).
    #[arg(long, default_value_t = 1.0, global = true)]
    dkd_alpha: f32,
    /// DKD: the weight of NCKD, the part among the non-target classes (the paper's beta).
    #[arg(long, default_value_t = 8.0, global = true)]
    dkd_beta: f32,
    /// DKD: epochs of linear warm-up of its two KD terms (0: none).
    #[arg(long, default_value_t = 20, global = true)]
    dkd_warmup: usize,
    /// --method cached: store the teacher as its top K log-probabilities per example (a
    /// safetensors top-k cache, indices i32 + values bf16) instead of dense probabilities.
    #[arg(long, value_name = "K", global = true)]
    top_k: Option<usize>,
    /// --top-k: the teacher's mass outside its top K: renormalize (the top K is the whole
    /// distribution), uniform (spread over the other classes) or bucket (one extra class; not
    /// available in the experiment yet).
    #[arg(long, default_value = "renormalize", value_parser = ["renormalize", "bucket", "uniform"], global = true)]
    top_k_tail: String,
    /// Output folder for results.json, curves.svg and student.safetensors.
    #[arg(long, default_value = "out", global = true)]
    out: PathBuf,
    /// MNIST-format IDX images (with --idx-labels) instead of the shipped digits set.
    #[arg(long, requires = "idx_labels", global = true)]
    idx_images: Option<PathBuf>,
    #[arg(long, requires = "idx_images", global = true)]
    idx_labels: Option<PathBuf>,
    /// Your own data instead of the shipped digits set: a CSV file (plain or gzip'ed), each row
    /// the features then an integer label 0, 1, ...; a first row that is not all numbers is a
    /// header. The features are used as they are (not rescaled).
    #[arg(
        long,
        value_name = "FILE.csv",
        conflicts_with = "idx_images",
        global = true
    )]
    data: Option<PathBuf>,
    /// The image shape of the --data rows, HxW or CxHxW (features in C, H, W order), for
    /// --model cnn and --augment.
    #[arg(long, value_name = "HxW", requires = "data", value_parser = parse_image_shape, global = true)]
    image_shape: Option<(usize, usize, usize)>,
    /// A teacher trained elsewhere, used in every fold instead of training one: safetensors of a
    /// PyTorch nn.Sequential(Linear, ReLU, ..., Linear) (keys 0.weight [out, in], 0.bias,
    /// 2.weight, ...) or of the crate's CNN, as --save-teacher writes them.
    #[arg(long, value_name = "FILE.safetensors", global = true)]
    teacher: Option<PathBuf>,
    /// Also write the last fold's teacher (the student checkpoint's layout; with --teacher, the
    /// loaded one).
    #[arg(long, value_name = "FILE.safetensors", global = true)]
    save_teacher: Option<PathBuf>,
    /// Hidden layer sizes of the teacher MLP (with --teacher: the file's).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "256,256",
        conflicts_with = "teacher",
        global = true
    )]
    teacher_hidden: Vec<usize>,
    /// Hidden layer sizes of the student MLP (and of the simple model).
    #[arg(long, value_delimiter = ',', default_value = "32", global = true)]
    student_hidden: Vec<usize>,
    /// Channels of the teacher CNN's conv blocks (with --teacher: the file's).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "32,64",
        conflicts_with = "teacher",
        global = true
    )]
    teacher_channels: Vec<usize>,
    /// Channels of the student CNN's conv blocks.
    #[arg(long, value_delimiter = ',', default_value = "8,16", global = true)]
    student_channels: Vec<usize>,
    /// No progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    /// Folds trained at once, each on its own thread (CPU backends; the GPU ones run one at a
    /// time); a thread with no fold left helps the others' large matmuls. Default: one per
    /// core. Results are the same for any value.
    #[arg(long, global = true)]
    jobs: Option<usize>,
}

/// `--image-shape`: `HxW` (one channel) or `CxHxW`.
fn parse_image_shape(s: &str) -> std::result::Result<(usize, usize, usize), String> {
    let dims: Vec<usize> = s
        .split(['x', 'X'])
        .map(|d| d.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| {
            format!("{s:?} is not HxW or CxHxW (positive integers, e.g. 8x8 or 3x32x32)")
        })?;
    let shape = match dims[..] {
        [h, w] => (1, h, w),
        [c, h, w] => (c, h, w),
        _ => return Err(format!("{s:?} is not HxW or CxHxW (e.g. 8x8 or 3x32x32)")),
    };
    let (c, h, w) = shape;
    let limit = 1 << 16;
    if [c, h, w].iter().any(|&d| d == 0 || d > limit) {
        return Err(format!("{s:?}: each dimension must be in 1..={limit}"));
    }
    Ok(shape)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn config(o: &Opts) -> Config {
    Config {
        method: o.method,
        model: match o.model {
            ModelChoice::Mlp => ModelKind::Mlp,
            ModelChoice::Cnn => ModelKind::Cnn,
        },
        temperature: o.temperature,
        alpha: o.alpha,
        label_fraction: o.label_fraction,
        epochs: o.epochs,
        teacher_epochs: o.teacher_epochs,
        finetune_epochs: o.finetune_epochs,
        folds: o.folds,
        run_folds: o.run_folds,
        seed: o.seed,
        batch: o.batch,
        lr: o.lr,
        augment: o.augment,
        dkd_alpha: o.dkd_alpha,
        dkd_beta: o.dkd_beta,
        dkd_warmup: o.dkd_warmup,
        cache_dir: o.out.join("soft-targets"),
        top_k: o.top_k,
        top_k_tail: distillation::ops::SparseTail::parse(&o.top_k_tail)
            .expect("clap checked the value"),
        teacher_hidden: o.teacher_hidden.clone(),
        student_hidden: o.student_hidden.clone(),
        teacher_channels: o.teacher_channels.clone(),
        student_channels: o.student_channels.clone(),
        ..Config::default()
    }
}

fn run(cli: Cli) -> Result<()> {
    let o = &cli.opts;
    let command = cli.command.unwrap_or(Command::Run);
    if let (Command::Sweep { .. }, Some(_)) = (&command, &o.save_teacher) {
        return Err(Error::Config(
            "--save-teacher writes the teacher of a run; the sweep trains many: drop it, or run \
             without `sweep`"
                .into(),
        ));
    }
    let data = match (&o.data, &o.idx_images, &o.idx_labels) {
        (Some(file), _, _) => {
            let csv = Dataset::from_csv_file(file, o.image_shape)?;
            let d = &csv.data;
            eprintln!(
                "data: {}: {} rows of {} features{}, {} classes{}",
                file.display(),
                d.len(),
                d.dim,
                d.image
                    .map_or(String::new(), |(c, h, w)| format!(" ({c}x{h}x{w} images)")),
                d.classes,
                if csv.header {
                    " (first row: a header)"
                } else {
                    ""
                }
            );
            csv.data
        }
        (None, Some(i), Some(l)) => Dataset::from_idx(i, l)?,
        _ => Dataset::digits()?,
    };
    let mut cfg = config(o);
    if let Some(file) = &o.teacher {
        cfg = cfg.with_teacher(Checkpoint::load(file)?)?;
    }
    cfg.validate(&data)?;
    if let Some(t) = &cfg.teacher {
        eprintln!(
            "teacher: {} ({}, {} parameters, {}), loaded, not trained",
            t.file().display(),
            t.describe(),
            t.parameter_count(),
            t.dtype()
        );
    }
    match o.backend {
        BackendChoice::Cpu => dispatch(&FastCpuBackend::new(), &data, &cfg, &command, o, cores(o)),
        BackendChoice::Reference => {
            dispatch(&CpuBackend::new(), &data, &cfg, &command, o, cores(o))
        }
        BackendChoice::Wgpu => dispatch(&WgpuBackend::new()?, &data, &cfg, &command, o, 1),
        BackendChoice::Cuda => cuda(&data, &cfg, &command, o),
        BackendChoice::Auto => {
            #[cfg(feature = "cuda")]
            match distillation::CudaBackend::new() {
                Ok(b) => return dispatch(&b, &data, &cfg, &command, o, 1),
                Err(e) => eprintln!("auto: {e}"),
            }
            let hw = distillation::backend::wgpu::WgpuOptions {
                hardware_only: true,
                ..Default::default()
            };
            match WgpuBackend::with_options(hw) {
                Ok(b) => dispatch(&b, &data, &cfg, &command, o, 1),
                Err(e) => {
                    eprintln!("auto: {e}; using the CPU backend");
                    dispatch(&FastCpuBackend::new(), &data, &cfg, &command, o, cores(o))
                }
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda(data: &Dataset, cfg: &Config, command: &Command, o: &Opts) -> Result<()> {
    dispatch(&distillation::CudaBackend::new()?, data, cfg, command, o, 1)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &Dataset, _: &Config, _: &Command, _: &Opts) -> Result<()> {
    Err(Error::Unavailable {
        backend: "cuda",
        reason: "built without the `cuda` feature".into(),
    })
}

/// `--jobs`, or one fold per core.
fn cores(o: &Opts) -> usize {
    o.jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn dispatch<B: Backend + Sync>(
    backend: &B,
    data: &Dataset,
    cfg: &Config,
    command: &Command,
    o: &Opts,
    jobs: usize,
) -> Result<()> {
    eprintln!("backend: {}", backend.name());
    match command {
        Command::Run => {
            let mut progress = progress_printer(o.quiet);
            let outcome = experiment::run_parallel(backend, data, cfg, jobs, &mut progress)?;
            print_table(&outcome.report);
            write_outputs(&o.out, &outcome, backend, o.save_teacher.as_deref())
        }
        Command::Sweep {
            temperatures,
            alphas,
        } => sweep(backend, data, cfg, temperatures, alphas, o, jobs),
    }
}

fn progress_printer(quiet: bool) -> impl FnMut(Progress<'_>) + Send {
    // One bar per fold in flight (folds may train side by side with --jobs).
    let bars = MultiProgress::new();
    let mut active: HashMap<usize, ProgressBar> = HashMap::new();
    move |p| match p {
        Progress::Start(name, fold, steps) => {
            if let Some(b) = active.remove(&fold) {
                b.finish_and_clear();
            }
            if !quiet {
                let b = bars.add(ProgressBar::new(steps as u64));
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg:>18} [{bar:30}] {pos}/{len} steps {elapsed}",
                    )
                    .unwrap()
                    .progress_chars("=> "),
                );
                b.set_message(format!("fold {} {name}", fold + 1));
                active.insert(fold, b);
            }
        }
        Progress::Step(fold) => {
            if let Some(b) = active.get(&fold) {
                b.inc(1);
            }
        }
        Progress::Fold(r) => {
            if let Some(b) = active.remove(&r.fold) {
                b.finish_and_clear();
            }
            let line = format!(
                "fold {}: teacher {:.2}%  distilled {:.2}%  simple {:.2}%",
                r.fold + 1,
                100.0 * r.teacher,
                100.0 * r.student,
                100.0 * r.simple
            );
            if quiet || bars.is_hidden() || bars.println(&line).is_err() {
                eprintln!("{line}");
            }
        }
    }
}

fn print_table(r: &Report) {
    let c = &r.config;
    println!();
    let teacher = match &c.teacher {
        Some(t) => format!(
            "the teacher loaded from {}, not trained",
            t.file().display()
        ),
        None => format!("{} for the teacher", c.teacher_epochs),
    };
    println!(
        "{} folds, method {:?}, T = {}, alpha = {}, {}% labelled, {} epochs ({teacher}), backend {}",
        r.folds.len(),
        c.method,
        c.temperature,
        c.alpha,
        100.0 * c.label_fraction,
        c.epochs,
        r.backend
    );
    println!(
        "{:<10} {:>18} {:>12} {:>20}",
        "model", "accuracy", "parameters", "latency / example"
    );
    let row = |name: &str, s: &experiment::Summary, params: usize, lat: Option<f64>| {
        let lat = lat.map_or("-".to_string(), |l| format!("{:.2} us", l * 1e6));
        println!(
            "{name:<10} {:>10.2}% +- {:<4.2} {params:>12} {lat:>20}",
            100.0 * s.mean,
            100.0 * s.std
        );
    };
    row(
        "teacher",
        &r.teacher,
        r.teacher_params,
        Some(r.teacher_latency),
    );
    row(
        "distilled",
        &r.student,
        r.student_params,
        Some(r.student_latency),
    );
    row("simple", &r.simple, r.student_params, None);
    let gain = 100.0 * (r.student.mean - r.simple.mean);
    println!(
        "distillation {} the student by {:.2} points; the student has {:.1}x fewer parameters and runs {:.1}x faster per example; {:.1} s in all",
        if gain >= 0.0 { "helped" } else { "did NOT help" },
        gain.abs(),
        r.teacher_params as f64 / r.student_params as f64,
        r.teacher_latency / r.student_latency,
        r.seconds
    );
    if c.teacher.is_some() {
        println!(
            "the loaded teacher's accuracy is measured on each fold's test split, which may hold \
             examples it was trained on"
        );
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::io(
        "write",
        path,
        format!("{e} (check that the folder is writable, or choose another with --out)"),
    )
}

fn write_outputs<B: Backend>(
    out: &Path,
    outcome: &Outcome<B>,
    backend: &B,
    save_teacher: Option<&Path>,
) -> Result<()> {
    let r = &outcome.report;
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    let json = out.join("results.json");
    std::fs::write(
        &json,
        serde_json::to_string_pretty(r).map_err(|e| io_err(&json, e))?,
    )
    .map_err(|e| io_err(&json, e))?;
    let svg = out.join("curves.svg");
    std::fs::write(&svg, distillation::report::curves_svg(r)).map_err(|e| io_err(&svg, e))?;
    let st = out.join("student.safetensors");
    distillation::report::save_net(&outcome.student, backend, &st)?;
    println!(
        "wrote {}, {}, {}",
        json.display(),
        svg.display(),
        st.display()
    );
    if let Some(path) = save_teacher {
        distillation::report::save_net(&outcome.teacher, backend, path)?;
        println!("wrote {} (the last fold's teacher)", path.display());
    }
    Ok(())
}

fn sweep<B: Backend + Sync>(
    backend: &B,
    data: &Dataset,
    cfg: &Config,
    temperatures: &[f32],
    alphas: &[f32],
    o: &Opts,
    jobs: usize,
) -> Result<()> {
    let cell = |t: f32, a: f32| Config {
        temperature: t,
        alpha: a,
        ..cfg.clone()
    };
    // Every cell of the grid checked before the first run (a bad value at the end of the list
    // would otherwise fail after the runs before it, their results lost).
    for &t in temperatures {
        for &a in alphas {
            cell(t, a).validate(data)?;
        }
    }
    let mut rows = Vec::new();
    for &t in temperatures {
        for &a in alphas {
            let c = cell(t, a);
            eprintln!("sweep: T = {t}, alpha = {a}");
            let mut progress = progress_printer(o.quiet);
            let r = experiment::run_parallel(backend, data, &c, jobs, &mut progress)?.report;
            rows.push((t, a, r));
        }
    }
    println!(
        "\n{:>6} {:>6} {:>20} {:>20}",
        "T", "alpha", "distilled", "simple"
    );
    for (t, a, r) in &rows {
        println!(
            "{t:>6} {a:>6} {:>12.2}% +- {:<4.2} {:>12.2}% +- {:<4.2}",
            100.0 * r.student.mean,
            100.0 * r.student.std,
            100.0 * r.simple.mean,
            100.0 * r.simple.std
        );
    }
    std::fs::create_dir_all(&o.out).map_err(|e| io_err(&o.out, e))?;
    let path = o.out.join("sweep.json");
    let json: Vec<_> = rows
        .iter()
        .map(|(t, a, r)| serde_json::json!({"temperature": t, "alpha": a, "report": r}))
        .collect();
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json).map_err(|e| io_err(&path, e))?,
    )
    .map_err(|e| io_err(&path, e))?;
    println!("wrote {}", path.display());
    Ok(())
}
