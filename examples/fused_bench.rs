//! Fused linear + loss against the unfused composition on the fast CPU backend: peak extra
//! memory (a counting global allocator's high-water mark above the inputs and gradient buffers)
//! and time (`docs/PERF.md`, "Fused linear + loss"):
//!
//!     cargo run --release --example fused_bench [-- --n 2048 --h 1024 --v 32000 --budget-mib 48 --runs 3]
//!
//! Both sides compute the Hinton loss (T = 2, alpha = 0.5) of a student layer `[V, H]` against a
//! teacher layer of the same shape, from states `[N, H]` (f32, then bf16 states and weights) and
//! write `grad_h` `[N, H]` and `grad_W` `[V, H]` (f32, preallocated, not counted). Unfused:
//! student and teacher logits `[N, V]` by two matmuls, the Hinton kernel with its gradient in
//! place, `grad_h = g W` and `grad_W += g^T h`. Fused: `FusedLinearKd::run` (chunks of rows from
//! the budget). `--runs` runs of each, alternating, after a warm-up matmul (the gemm's packing
//! workspace is allocated before either is measured); the fastest wall time and the least CPU
//! time (all threads, `/proc/self/stat`) of each are reported (the machine is shared), the peak
//! memory is the same in every run; the losses and gradients of the
//! last runs are compared.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use distillation::half::bf16;
use distillation::ops::dense::{CopySpec, MatmulSpec};
use distillation::{
    Backend, Dtype, FastCpuBackend, FusedGrads, FusedLinearKd, GradOut, HintonSpec, Linear,
    LossOut, RowShape, Teacher,
};

/// The system allocator, counting the bytes held and their high-water mark.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded to the system allocator with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded to the system allocator with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) };
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// This process's CPU time (user + system, all threads) in seconds, from `/proc/self/stat`
/// (Linux; 0 elsewhere), in clock ticks of 10 ms.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// A run's wall and CPU seconds.
#[derive(Clone, Copy)]
struct Time {
    wall: f64,
    cpu: f64,
}

/// Runs `f`, returning its result, its times and the bytes allocated above what was held when it
/// started (the peak).
fn measure<T>(f: impl FnOnce() -> T) -> (T, Time, usize) {
    let base = HELD.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let out = f();
    let time = Time {
        wall: t0.elapsed().as_secs_f64(),
        cpu: cpu_seconds() - c0,
    };
    (out, time, PEAK.load(Ordering::Relaxed) - base)
}

/// The faster of two runs' times, field by field.
fn best(a: Time, b: Time) -> Time {
    Time {
        wall: a.wall.min(b.wall),
        cpu: a.cpu.min(b.cpu),
    }
}

struct Args {
    n: usize,
    h: usize,
    v: usize,
    budget_mib: usize,
    runs: usize,
}

fn args() -> Args {
    let mut a = Args {
        n: 2048,
        h: 1024,
        v: 32000,
        budget_mib: 48,
        runs: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value: usize = it
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--n" => a.n = value,
            "--h" => a.h = value,
            "--v" => a.v = value,
            "--budget-mib" => a.budget_mib = value,
            "--runs" => a.runs = value.max(1),
            _ => panic!("unknown flag {flag} (--n, --h, --v, --budget-mib, --runs)"),
        }
    }
    a
}

fn random(len: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

fn upload(b: &FastCpuBackend, v: &[f32], dtype: Dtype) -> <FastCpuBackend as Backend>::Buffer {
    match dtype {
        Dtype::Bf16 => b.upload_as(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
        _ => b.upload(v),
    }
    .expect("upload")
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

fn main() {
    let a = args();
    let (n, h, v) = (a.n, a.h, a.v);
    let b = FastCpuBackend::new();
    println!(
        "{} | N = {n}, H = {h}, V = {v}, budget {} MiB",
        b.name(),
        a.budget_mib
    );
    println!("| dtype | path | wall (s) | CPU (s) | peak extra memory (MiB) | loss |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let labels: Vec<i32> = (0..n).map(|i| ((i * 7919) % v) as i32).collect();
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let scale = 1.0 / (h as f32).sqrt();
        let hs = upload(&b, &random(n * h, 1.0, 1), dtype);
        let w = upload(&b, &random(v * h, 2.0 * scale, 2), dtype);
        let ht = upload(&b, &random(n * h, 1.0, 3), dtype);
        let wt = upload(&b, &random(v * h, 4.0 * scale, 4), dtype);
        let grad_h = b.filled(n * h, 0.0).expect("grad_h");
        let grad_w = b.filled(v * h, 0.0).expect("grad_w");
        // Warm-up: the gemm's packing workspace at full depth and width.
        let warm = b.filled(6 * v, 0.0).expect("warm-up");
        let six = b.filled(6 * h, 0.0).expect("warm-up");
        let fwd = |m: usize| MatmulSpec {
            trans_b: true,
            ..MatmulSpec::new(m, h, v)
        };
        b.matmul(&fwd(6), &six, &w, &warm).expect("warm-up");
        drop((warm, six));

        let spec = HintonSpec::new(RowShape::new(n, v), 2.0, 0.5);
        let fused = FusedLinearKd {
            memory_budget: a.budget_mib << 20,
            ..FusedLinearKd::new(h, v, 2.0, 0.5)
        };
        let zero = b.filled(v * h, 0.0).expect("zero");
        let clear = || {
            b.copy_rows(&CopySpec::contiguous(v * h, 0, 0), &zero, &grad_w)
                .expect("zero grad_W")
        };
        let inf = Time {
            wall: f64::INFINITY,
            cpu: f64::INFINITY,
        };
        let (mut t_unfused, mut t_fused) = (inf, inf);
        let (mut m_unfused, mut m_fused) = (0, 0);
        let (mut unfused_loss, mut fused_loss) = (0.0, 0.0);
        let (mut gh_unfused, mut gw_unfused) = (Vec::new(), Vec::new());
        let (mut gh_fused, mut gw_fused) = (Vec::new(), Vec::new());
        for _ in 0..a.runs {
            clear();
            let (loss, secs, mem) = measure(|| {
                let s = b.filled(n * v, 0.0).expect("student logits");
                let t = b.filled(n * v, 0.0).expect("teacher logits");
                b.matmul(&fwd(n), &hs, &w, &s).expect("student logits");
                b.matmul(&fwd(n), &ht, &wt, &t).expect("teacher logits");
                let labels_b = b.upload_labels(&labels).expect("labels");
                let loss = b.filled(1, 0.0).expect("loss");
                let out = LossOut {
                    loss: &loss,
                    row_loss: None,
                    grad_student: GradOut::InPlace,
                    grad_teacher: None,
                };
                b.hinton(&spec, &s, &t, &labels_b, out).expect("hinton");
                drop(t);
                b.matmul(&MatmulSpec::new(n, v, h), &s, &w, &grad_h)
                    .expect("grad_h");
                let gw = MatmulSpec {
                    trans_a: true,
                    accumulate: true,
                    ..MatmulSpec::new(v, n, h)
                };
                b.matmul(&gw, &s, &hs, &grad_w).expect("grad_W");
                b.download(&loss).expect("loss")[0]
            });
            (unfused_loss, t_unfused, m_unfused) = (loss, best(t_unfused, secs), mem);
            gh_unfused = b.download(&grad_h).expect("grad_h");
            gw_unfused = b.download(&grad_w).expect("grad_W");
            clear();
            let (loss, secs, mem) = measure(|| {
                let student = Linear {
                    hidden: &hs,
                    weight: &w,
                    bias: None,
                };
                let teacher = Teacher::Linear {
                    layer: Linear {
                        hidden: &ht,
                        weight: &wt,
                        bias: None,
                    },
                    hidden: h,
                    vocab: v,
                };
                let grads = FusedGrads {
                    hidden: Some(&grad_h),
                    weight: Some(&grad_w),
                    bias: None,
                };
                fused
                    .run(&b, &student, &teacher, Some(&labels), &grads)
                    .expect("fused")
            });
            (fused_loss, t_fused, m_fused) = (loss, best(t_fused, secs), mem);
            gh_fused = b.download(&grad_h).expect("grad_h");
            gw_fused = b.download(&grad_w).expect("grad_W");
        }
        let mib = |x: usize| x as f64 / (1u64 << 20) as f64;
        for (path, t, m, l) in [
            ("unfused", t_unfused, m_unfused, unfused_loss),
            ("fused", t_fused, m_fused, fused_loss),
        ] {
            println!(
                "| {dtype} | {path} | {:.2} | {:.2} | {:.1} | {l:.6} |",
                t.wall,
                t.cpu,
                mib(m)
            );
        }
        println!(
            "| {dtype} | fused / unfused | {:.3}x | {:.3}x | {:.3}x (1/{:.1}) | grad_h rel {:.1e}, \
             grad_W rel {:.1e} |",
            t_fused.wall / t_unfused.wall,
            t_fused.cpu / t_unfused.cpu,
            m_fused as f64 / m_unfused as f64,
            m_unfused as f64 / m_fused as f64,
            rel(&gh_fused, &gh_unfused),
            rel(&gw_fused, &gw_unfused),
        );
    }
}
