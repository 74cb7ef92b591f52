//! The GPU bench runner: one table of kernel, shape, backend, median time over >= 20 runs after a
//! warm-up, achieved GB/s of the minimal traffic, and that as a share of the device-to-device copy
//! bandwidth measured in the same run. Inputs rotate over several buffer sets so that caches do
//! not flatter small shapes.
//!
//!   cargo run --release --example gpu_bench -- [--large] [--runs 20] [--json out/gpu_bench.json]
//!
//! wgpu times each run with timestamp queries when the device has them (else the wall clock
//! around submit and wait), CUDA with events recorded on the backend's stream; on both the
//! reference is a device-to-device copy of one `[N, C]` tensor (8 bytes per element), and CUDA adds
//! a row for our streaming kernel `y += x` (the 12 bytes per element of the fused losses).
//! `--large` adds 8192x32000 and 16384x131072 (about 26 GB of traffic per call).

use std::io::Write;

use distillation::backend::wgpu::WgpuBuffer;
use distillation::rng::Rng;
use distillation::{
    Backend, CrossEntropySpec, Divergence, DivergenceSpec, GradOut, HintonSpec, LossOut, RowShape,
    WgpuBackend,
};

struct Row {
    kernel: String,
    shape: String,
    backend: String,
    median_ms: f64,
    gbps: f64,
    copy_gbps: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.range(-4.0, 4.0) as f32).collect()
}

/// Input sets to rotate: enough that their total passes 256 MiB, at most 8, at least 2.
fn sets_for(bytes: u64) -> usize {
    ((256u64 << 20) / bytes.max(1)).clamp(2, 8) as usize
}

/// The kernels timed, each with its minimal traffic in bytes per element and per row.
const KERNELS: [(&str, u64); 5] = [
    ("hinton", 12),
    ("forward_kl", 12),
    ("reverse_kl", 12),
    ("jsd", 12),
    ("cross_entropy", 8),
];

fn run_wgpu(
    b: &WgpuBackend,
    shapes: &[(usize, usize)],
    runs: usize,
    rows: &mut Vec<Row>,
) -> distillation::Result<()> {
    let name = b.name();
    for &(n, c) in shapes {
        let nc = n * c;
        let sets = sets_for(8 * nc as u64);
        let inputs: Vec<(WgpuBuffer, WgpuBuffer)> = (0..sets)
            .map(|k| {
                Ok((
                    b.upload(&data(nc, 2 * k as u64))?,
                    b.upload(&data(nc, 2 * k as u64 + 1))?,
                ))
            })
            .collect::<distillation::Result<_>>()?;
        let labels = b.upload_labels(&(0..n as i32).map(|i| i % c as i32).collect::<Vec<_>>())?;
        let (loss, grad) = (b.filled(1, 0.0)?, b.filled(nc, 0.0)?);
        // Copy bandwidth: the student tensor copied into the gradient buffer (read + write).
        let mut copy = Vec::new();
        for i in 0..runs + 3 {
            let t = b.time_recorded(|enc| b.record_copy(enc, &inputs[i % sets].0, &grad))?;
            if i >= 3 {
                copy.push(t);
            }
        }
        let copy_gbps = 8.0 * nc as f64 / median(copy) / 1e9;
        let shape = RowShape::new(n, c);
        for (kernel, per_elem) in KERNELS {
            let mut times = Vec::new();
            for i in 0..runs + 3 {
                let (s, t) = &inputs[i % sets];
                let secs = b.time_recorded(|enc| {
                    let out = LossOut {
                        loss: &loss,
                        row_loss: None,
                        grad_student: GradOut::Into(&grad),
                        grad_teacher: None,
                    };
                    match kernel {
                        "hinton" => b.recorder(enc).hinton(
                            &HintonSpec::new(shape, 4.0, 0.5),
                            s,
                            t,
                            &labels,
                            out,
                        ),
                        "cross_entropy" => b.recorder(enc).cross_entropy(
                            &CrossEntropySpec::new(shape),
                            s,
                            &labels,
                            out,
                        ),
                        k => {
                            let divergence = match k {
                                "forward_kl" => Divergence::ForwardKl,
                                "reverse_kl" => Divergence::ReverseKl,
                                _ => Divergence::Jsd { beta: 0.5 },
                            };
                            b.recorder(enc).divergence(
                                &DivergenceSpec {
                                    divergence,
                                    ..DivergenceSpec::new(shape, 4.0)
                                },
                                s,
                                t,
                                None,
                                out,
                            )
                        }
                    }
                })?;
                if i >= 3 {
                    times.push(secs);
                }
            }
            let med = median(times);
            rows.push(Row {
                kernel: kernel.into(),
                shape: format!("{n}x{c}"),
                backend: name.clone(),
                median_ms: med * 1e3,
                gbps: (per_elem * nc as u64 + 4 * n as u64) as f64 / med / 1e9,
                copy_gbps,
            });
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn run_cuda(
    b: &distillation::CudaBackend,
    shapes: &[(usize, usize)],
    runs: usize,
    rows: &mut Vec<Row>,
) -> distillation::Result<()> {
    let name = b.name();
    for &(n, c) in shapes {
        let nc = n * c;
        let sets = sets_for(8 * nc as u64);
        let inputs: Vec<_> = (0..sets)
            .map(|k| {
                Ok((
                    b.upload(&data(nc, 2 * k as u64))?,
                    b.upload(&data(nc, 2 * k as u64 + 1))?,
                ))
            })
            .collect::<distillation::Result<Vec<_>>>()?;
        let labels = b.upload_labels(&(0..n as i32).map(|i| i % c as i32).collect::<Vec<_>>())?;
        let (loss, grad) = (b.filled(1, 0.0)?, b.filled(nc, 0.0)?);
        // Each run between two CUDA events recorded on the backend's stream (device time, not
        // launch overhead); median of `runs` after 3 warm-ups.
        let stream = b.stream();
        let dev = |what: &'static str| {
            move |e: cudarc::driver::DriverError| distillation::Error::Device {
                backend: "cuda",
                message: format!("{what}: {e:?}"),
            }
        };
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let time =
            |f: &mut dyn FnMut(usize) -> distillation::Result<()>| -> distillation::Result<f64> {
                let start = stream.context().new_event(timing).map_err(dev("event"))?;
                let end = stream.context().new_event(timing).map_err(dev("event"))?;
                let mut v = Vec::new();
                for i in 0..runs + 3 {
                    start.record(stream).map_err(dev("record"))?;
                    f(i)?;
                    end.record(stream).map_err(dev("record"))?;
                    let ms = start.elapsed_ms(&end).map_err(dev("elapsed"))?;
                    if i >= 3 {
                        v.push(ms as f64 / 1e3);
                    }
                }
                b.synchronize()?;
                Ok(median(v))
            };
        // The floor's reference: a device-to-device copy of one [N, C] tensor (cuMemcpyDtoDAsync),
        // counted as 8 bytes per element (read + write), rotating over the input sets.
        let mut dst = stream.alloc_zeros::<f32>(nc).map_err(dev("alloc"))?;
        let copy = time(&mut |i| {
            let src = inputs[i % sets]
                .0
                .as_slice()
                .expect("uploaded buffers own their memory");
            stream.memcpy_dtod(src, &mut dst).map_err(dev("copy"))
        })?;
        drop(dst);
        let copy_gbps = 8.0 * nc as f64 / copy / 1e9;
        // A streaming kernel of ours for comparison: `y += x` (12 bytes per element).
        let axpy = time(&mut |i| b.axpy(1.0, &inputs[i % sets].0, &grad))?;
        rows.push(Row {
            kernel: "axpy (y += x)".into(),
            shape: format!("{n}x{c}"),
            backend: name.clone(),
            median_ms: axpy * 1e3,
            gbps: 12.0 * nc as f64 / axpy / 1e9,
            copy_gbps,
        });
        let shape = RowShape::new(n, c);
        for (kernel, per_elem) in KERNELS {
            let med = time(&mut |i| {
                let (s, t) = &inputs[i % sets];
                let out = LossOut {
                    loss: &loss,
                    row_loss: None,
                    grad_student: GradOut::Into(&grad),
                    grad_teacher: None,
                };
                match kernel {
                    "hinton" => b.hinton(&HintonSpec::new(shape, 4.0, 0.5), s, t, &labels, out),
                    "cross_entropy" => {
                        b.cross_entropy(&CrossEntropySpec::new(shape), s, &labels, out)
                    }
                    k => {
                        let divergence = match k {
                            "forward_kl" => Divergence::ForwardKl,
                            "reverse_kl" => Divergence::ReverseKl,
                            _ => Divergence::Jsd { beta: 0.5 },
                        };
                        b.divergence(
                            &DivergenceSpec {
                                divergence,
                                ..DivergenceSpec::new(shape, 4.0)
                            },
                            s,
                            t,
                            None,
                            out,
                        )
                    }
                }
            })?;
            rows.push(Row {
                kernel: kernel.into(),
                shape: format!("{n}x{c}"),
                backend: name.clone(),
                median_ms: med * 1e3,
                gbps: (per_elem * nc as u64 + 4 * n as u64) as f64 / med / 1e9,
                copy_gbps,
            });
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().position(|a| a == f);
    let runs = flag("--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(20usize)
        .max(20);
    let mut shapes = vec![(64, 10), (1024, 1000), (4096, 32000)];
    if flag("--large").is_some() {
        shapes.extend([(8192, 32000), (16384, 131072)]);
    }
    let mut rows = Vec::new();
    match WgpuBackend::new() {
        Ok(b) => {
            eprintln!("wgpu: {} (timestamps: {})", b.name(), b.has_timestamps());
            if let Err(e) = run_wgpu(&b, &shapes, runs, &mut rows) {
                eprintln!("wgpu: {e}");
            }
        }
        Err(e) => eprintln!("wgpu: {e}"),
    }
    #[cfg(feature = "cuda")]
    match distillation::CudaBackend::new() {
        Ok(b) => {
            if let Err(e) = run_cuda(&b, &shapes, runs, &mut rows) {
                eprintln!("cuda: {e}");
            }
        }
        Err(e) => eprintln!("cuda: {e}"),
    }
    println!("| kernel | shape | backend | median ms | GB/s | copy GB/s | % of copy |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.4} | {:.1} | {:.1} | {:.0}% |",
            r.kernel,
            r.shape,
            r.backend,
            r.median_ms,
            r.gbps,
            r.copy_gbps,
            100.0 * r.gbps / r.copy_gbps
        );
    }
    if let Some(path) = flag("--json").and_then(|i| args.get(i + 1)) {
        let json: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({"kernel": r.kernel, "shape": r.shape, "backend": r.backend, "median_ms": r.median_ms, "gbps": r.gbps, "copy_gbps": r.copy_gbps}))
            .collect();
        let mut f = std::fs::File::create(path).expect("json output file");
        writeln!(f, "{}", serde_json::to_string_pretty(&json).unwrap()).unwrap();
    }
}
