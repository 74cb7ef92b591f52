//! The fast CPU backend's losses against this machine's memory bandwidth, measured in the same
//! run (`docs/PERF.md`, "The losses on the CPU"):
//!
//!     cargo run --release --example cpu_bench [-- --runs 10 --threads 0 --shapes 2048x32000]
//!
//! For each shape: a streaming `c = a + b` over `[N, C]` f32 arrays on the same threads (12 bytes
//! per element: the floor's bandwidth), then forward + backward of the fused Hinton loss (reads
//! student and teacher, writes the gradient: 12 bytes per element), forward KL (12) and
//! cross-entropy (8), each through `Backend` with the gradient written into a buffer allocated
//! once; then the same three with bf16 student, teacher and gradient (`*_bf16`: 6 and 4 bytes per
//! element). Medians of `--runs` runs after two warm-ups; GB/s of the minimal traffic and its
//! share of the `c = a + b` bandwidth.
//!
//! `--sparse` measures instead a sparse top-k teacher (`docs/LOSSES.md` section 10, forward KL,
//! log-probabilities, renormalize and bucket tails, T = 1) at k = 16, 64 and 128: the minimal
//! traffic is the student read and the gradient written (8 bytes per element) plus 8 bytes per
//! teacher entry (an i32 index and an f32 value); the call includes the host-side check of the
//! indices and values.

use std::time::Instant;

use distillation::half::bf16;
use distillation::{
    Backend, CrossEntropySpec, DivergenceSpec, Dtype, FastCpuBackend, HintonSpec, LossOut,
    RowShape, SparseSpec, SparseTail,
};

struct Args {
    runs: usize,
    threads: usize,
    shapes: Vec<(usize, usize)>,
    json: bool,
    sparse: bool,
}

fn args() -> Args {
    let mut a = Args {
        runs: 10,
        threads: 0,
        shapes: vec![(1024, 1000), (2048, 32000), (4096, 32000)],
        json: false,
        sparse: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--runs" => a.runs = value().parse().expect("--runs N"),
            "--threads" => a.threads = value().parse().expect("--threads N (0: all cores)"),
            "--shapes" => {
                a.shapes = value()
                    .split(',')
                    .map(|s| {
                        let (n, c) = s.split_once('x').expect("--shapes NxC,NxC");
                        (n.parse().expect("N"), c.parse().expect("C"))
                    })
                    .collect()
            }
            "--json" => a.json = true,
            "--sparse" => a.sparse = true,
            other => panic!(
                "unknown flag {other}: --runs N, --threads N, --shapes NxC,.., --json, --sparse"
            ),
        }
    }
    a
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `f` over `runs` runs after two warm-ups.
fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// `c = a + b` over `threads` contiguous parts.
fn add(a: &[f32], b: &[f32], c: &mut [f32], threads: usize) {
    let per = a.len().div_ceil(threads);
    std::thread::scope(|s| {
        for ((ca, cb), cc) in a.chunks(per).zip(b.chunks(per)).zip(c.chunks_mut(per)) {
            s.spawn(move || {
                for ((x, y), z) in ca.iter().zip(cb).zip(cc.iter_mut()) {
                    *z = x + y;
                }
            });
        }
    });
}

fn lcg(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Each row's `k` largest log-probabilities of `t` (`[rows, c]`) and their classes.
fn top_k(t: &[f32], c: usize, k: usize) -> (Vec<i32>, Vec<f32>) {
    let (mut idx, mut val) = (Vec::new(), Vec::new());
    for row in t.chunks(c) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        let mut order: Vec<usize> = (0..c).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
        for &j in &order[..k] {
            idx.push(j as i32);
            val.push((row[j] as f64 - lse) as f32);
        }
    }
    (idx, val)
}

fn main() -> distillation::Result<()> {
    let a = args();
    let b = FastCpuBackend::new().with_threads(a.threads);
    let threads = if a.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.threads
    };
    let (temperature, alpha) = (4.0, 0.5);
    let exp_ns = distillation::backend::cpu_fast::rows::exp_ns_per_element(b.simd())?;
    if !a.json {
        println!("backend: {}, {threads} threads, {} runs", b.name(), a.runs);
        println!("one vectorised exp: {exp_ns:.2} ns per element on one core (cache-resident)");
        println!("| loss | shape | median ms | GB/s | c = a + b GB/s | % of c = a + b |");
        println!("| --- | --- | --- | --- | --- | --- |");
    }
    let mut rows = Vec::new();
    for &(n, c) in &a.shapes {
        let len = n * c;
        let (s, t) = (lcg(1, len, 5.0), lcg(2, len, 5.0));
        let labels: Vec<i32> = lcg(3, n, 1.0)
            .iter()
            .map(|v| (((v + 1.0) * 0.5 * c as f32) as usize).min(c - 1) as i32)
            .collect();
        let mut out = vec![0.0f32; len];
        let floor_s = time(a.runs, || add(&s, &t, &mut out, threads));
        let floor = 12.0 * len as f64 / floor_s / 1e9;
        drop(out);
        if a.sparse {
            let sb = b.upload(&s)?;
            let (loss, grad) = (b.filled(1, 0.0)?, b.filled(len, 0.0)?);
            for k in [16usize, 64, 128] {
                let (idx, lq) = top_k(&t, c, k);
                let (ib, vb) = (b.upload_labels(&idx)?, b.upload(&lq)?);
                for tail in [SparseTail::Renormalize, SparseTail::Bucket] {
                    let spec = SparseSpec {
                        tail,
                        ..SparseSpec::new(RowShape::new(n, c), k, 1.0)
                    };
                    let sec = time(a.runs, || {
                        b.sparse_kd(&spec, &sb, &ib, &vb, None, LossOut::with_grad(&loss, &grad))
                            .expect("sparse")
                    });
                    let bytes = 8.0 * len as f64 + 8.0 * (n * k) as f64;
                    let gbps = bytes / sec / 1e9;
                    let name = format!("sparse_k{k}_{}", tail.name());
                    if a.json {
                        rows.push(format!(
                            "{{\"loss\":\"{name}\",\"n\":{n},\"c\":{c},\"ms\":{:.4},\"gbps\":{gbps:.2},\"floor_gbps\":{floor:.2}}}",
                            sec * 1e3
                        ));
                    } else {
                        println!(
                            "| {name} | {n}x{c} | {:.3} | {gbps:.1} | {floor:.1} | {:.0}% |",
                            sec * 1e3,
                            100.0 * gbps / floor
                        );
                    }
                }
            }
            continue;
        }
        let (sb, tb, lb) = (b.upload(&s)?, b.upload(&t)?, b.upload_labels(&labels)?);
        let (loss, grad) = (b.filled(1, 0.0)?, b.filled(len, 0.0)?);
        let shape = RowShape::new(n, c);
        let hinton = HintonSpec::new(shape, temperature, alpha);
        let kl = DivergenceSpec::new(shape, temperature);
        let ce = CrossEntropySpec::new(shape);
        let mut run = |name: &str, bytes: f64, f: &mut dyn FnMut()| {
            let sec = time(a.runs, f);
            let gbps = bytes * len as f64 / sec / 1e9;
            if a.json {
                rows.push(format!(
                    "{{\"loss\":\"{name}\",\"n\":{n},\"c\":{c},\"ms\":{:.4},\"gbps\":{gbps:.2},\"floor_gbps\":{floor:.2}}}",
                    sec * 1e3
                ));
            } else {
                println!(
                    "| {name} | {n}x{c} | {:.3} | {gbps:.1} | {floor:.1} | {:.0}% |",
                    sec * 1e3,
                    100.0 * gbps / floor
                );
            }
        };
        run("hinton", 12.0, &mut || {
            b.hinton(&hinton, &sb, &tb, &lb, LossOut::with_grad(&loss, &grad))
                .expect("hinton")
        });
        run("forward_kl", 12.0, &mut || {
            b.divergence(&kl, &sb, &tb, None, LossOut::with_grad(&loss, &grad))
                .expect("forward KL")
        });
        run("cross_entropy", 8.0, &mut || {
            b.cross_entropy(&ce, &sb, &lb, LossOut::with_grad(&loss, &grad))
                .expect("cross-entropy")
        });
        // bf16 inputs and gradient: half the traffic.
        let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
        let (sh, th) = (b.upload_as(&to_bf16(&s))?, b.upload_as(&to_bf16(&t))?);
        let gh = b.filled_as(Dtype::Bf16, len, 0.0)?;
        run("hinton_bf16", 6.0, &mut || {
            b.hinton(&hinton, &sh, &th, &lb, LossOut::with_grad(&loss, &gh))
                .expect("hinton bf16")
        });
        run("forward_kl_bf16", 6.0, &mut || {
            b.divergence(&kl, &sh, &th, None, LossOut::with_grad(&loss, &gh))
                .expect("forward KL bf16")
        });
        run("cross_entropy_bf16", 4.0, &mut || {
            b.cross_entropy(&ce, &sh, &lb, LossOut::with_grad(&loss, &gh))
                .expect("cross-entropy bf16")
        });
    }
    if a.json {
        println!("[{}]", rows.join(",\n"));
    }
    Ok(())
}
