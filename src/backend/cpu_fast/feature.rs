//! The fast CPU backend's feature losses (`docs/LOSSES.md` sections 5 and 6): FitNets MSE and
//! attention transfer. No exponentials here: the arithmetic is f64 element by element (as cheap
//! as f32 at memory speed, and as exact as the reference), vectorised over 8 lanes, sums in a
//! fixed order of fixed chunks, so any thread count gives the same bits.

use super::rows::{threads_for, Simd};
use super::vmath::LANES;
use crate::ops::feature::reference::AT_EPS;
use crate::ops::{AttentionSpec, MseSpec};

/// Elements per MSE chunk: the unit of both the threads' shares and the fixed-order sum.
const CHUNK: usize = 1 << 14;

/// `sum (a - b)^2` over one chunk, and `k (a - b)` into the gradients that are wanted.
#[inline(always)]
fn mse_chunk(a: &[f32], b: &[f32], k: f64, ga: Option<&mut [f32]>, gb: Option<&mut [f32]>) -> f64 {
    let mut acc = [0.0f64; LANES];
    for (ca, cb) in a.chunks(LANES).zip(b.chunks(LANES)) {
        for l in 0..ca.len() {
            let d = ca[l] as f64 - cb[l] as f64;
            acc[l] += d * d;
        }
    }
    if let Some(ga) = ga {
        for ((g, &x), &y) in ga.iter_mut().zip(a).zip(b) {
            *g = (k * (x as f64 - y as f64)) as f32;
        }
    }
    if let Some(gb) = gb {
        for ((g, &x), &y) in gb.iter_mut().zip(a).zip(b) {
            *g = (-(k * (x as f64 - y as f64))) as f32;
        }
    }
    acc.iter().sum()
}

/// `mse_chunk` compiled for `simd` (a supported set: the backend holds no other).
fn mse_chunk_for(
    simd: Simd,
    a: &[f32],
    b: &[f32],
    k: f64,
    ga: Option<&mut [f32]>,
    gb: Option<&mut [f32]>,
) -> f64 {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    fn avx512(a: &[f32], b: &[f32], k: f64, ga: Option<&mut [f32]>, gb: Option<&mut [f32]>) -> f64 {
        mse_chunk(a, b, k, ga, gb)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn avx2(a: &[f32], b: &[f32], k: f64, ga: Option<&mut [f32]>, gb: Option<&mut [f32]>) -> f64 {
        mse_chunk(a, b, k, ga, gb)
    }
    match simd {
        // SAFETY: the CPU supports `simd`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { avx512(a, b, k, ga, gb) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2(a, b, k, ga, gb) },
        _ => mse_chunk(a, b, k, ga, gb),
    }
}

/// MSE: returns the loss; writes `dL/da = 2 g (a - b) / M` and `dL/db = -dL/da` when given.
pub fn mse(
    simd: Simd,
    max_threads: usize,
    spec: &MseSpec,
    a: &[f32],
    b: &[f32],
    ga: Option<&mut [f32]>,
    gb: Option<&mut [f32]>,
) -> f64 {
    let m = a.len();
    let k = spec.grad_scale as f64 * 2.0 / m as f64;
    let chunks = m.div_ceil(CHUNK);
    let mut sums = vec![0.0f64; chunks];
    let threads = threads_for(m, max_threads).min(chunks);
    // Split everything into the same chunks; each thread takes a contiguous run of them.
    type Item<'a> = (
        &'a [f32],
        &'a [f32],
        Option<&'a mut [f32]>,
        Option<&'a mut [f32]>,
        &'a mut f64,
    );
    let mut work: Vec<Item> = Vec::with_capacity(chunks);
    let mut ga_chunks = ga.map(|g| g.chunks_mut(CHUNK));
    let mut gb_chunks = gb.map(|g| g.chunks_mut(CHUNK));
    for (i, sum) in sums.iter_mut().enumerate() {
        let (lo, hi) = (i * CHUNK, ((i + 1) * CHUNK).min(m));
        let x = ga_chunks.as_mut().and_then(|it| it.next());
        let y = gb_chunks.as_mut().and_then(|it| it.next());
        work.push((&a[lo..hi], &b[lo..hi], x, y, sum));
    }
    let run = |items: &mut [Item]| {
        for (x, y, gx, gy, sum) in items.iter_mut() {
            **sum = mse_chunk_for(simd, x, y, k, gx.as_deref_mut(), gy.as_deref_mut());
        }
    };
    if threads <= 1 {
        run(&mut work);
    } else {
        let per = chunks.div_ceil(threads);
        std::thread::scope(|scope| {
            for part in work.chunks_mut(per) {
                scope.spawn(|| run(part));
            }
        });
    }
    drop(work);
    sums.iter().sum::<f64>() / m as f64
}

/// One sample's attention map `u = Q / max(||Q||, 1e-12)`, `Q = mean_c A^2`, into `u`; returns
/// the norm.
#[inline(always)]
fn attention_map(a: &[f32], channels: usize, u: &mut [f64]) -> f64 {
    let hw = u.len();
    u.fill(0.0);
    for c in 0..channels {
        let row = &a[c * hw..(c + 1) * hw];
        for (q, &x) in u.iter_mut().zip(row) {
            let x = x as f64;
            *q += x * x;
        }
    }
    let inv_c = 1.0 / channels as f64;
    let mut acc = [0.0f64; LANES];
    for chunk in u.chunks_mut(LANES) {
        for (l, q) in chunk.iter_mut().enumerate() {
            *q *= inv_c;
            acc[l] += *q * *q;
        }
    }
    let norm = acc.iter().sum::<f64>().sqrt().max(AT_EPS);
    for q in u.iter_mut() {
        *q /= norm;
    }
    norm
}

/// `dL/dA` of one sample from `dL/du` (reference: `ops::feature::attention_backward`).
#[inline(always)]
fn attention_backward(
    a: &[f32],
    u: &[f64],
    norm: f64,
    du: &mut [f64],
    channels: usize,
    out: &mut [f32],
) {
    let hw = u.len();
    if norm > AT_EPS {
        let mut acc = [0.0f64; LANES];
        for (cu, cd) in u.chunks(LANES).zip(du.chunks(LANES)) {
            for l in 0..cu.len() {
                acc[l] += cu[l] * cd[l];
            }
        }
        let dot: f64 = acc.iter().sum();
        for (d, &x) in du.iter_mut().zip(u) {
            *d = (*d - x * dot) / norm;
        }
    } else {
        for d in du.iter_mut() {
            *d /= norm;
        }
    }
    let k = 2.0 / channels as f64;
    for c in 0..channels {
        let (ar, or) = (&a[c * hw..(c + 1) * hw], &mut out[c * hw..(c + 1) * hw]);
        for ((o, &x), &d) in or.iter_mut().zip(ar).zip(du.iter()) {
            *o = (d * k * x as f64) as f32;
        }
    }
}

/// One sample: its loss sum and, when wanted, its gradients.
#[inline(always)]
fn attention_sample(
    spec: &AttentionSpec,
    (s, t): (&[f32], &[f32]),
    gs: Option<&mut [f32]>,
    gt: Option<&mut [f32]>,
    (us, ut, du): (&mut [f64], &mut [f64], &mut [f64]),
) -> f64 {
    let ns = attention_map(s, spec.student_channels, us);
    let nt = attention_map(t, spec.teacher_channels, ut);
    let mut acc = [0.0f64; LANES];
    for (cs, ct) in us.chunks(LANES).zip(ut.chunks(LANES)) {
        for l in 0..cs.len() {
            let d = cs[l] - ct[l];
            acc[l] += d * d;
        }
    }
    let k = spec.grad_scale as f64 * 2.0 / (spec.n * spec.hw) as f64;
    if let Some(gs) = gs {
        for ((d, x), y) in du.iter_mut().zip(us.iter()).zip(ut.iter()) {
            *d = k * (x - y);
        }
        attention_backward(s, us, ns, du, spec.student_channels, gs);
    }
    if let Some(gt) = gt {
        for ((d, x), y) in du.iter_mut().zip(us.iter()).zip(ut.iter()) {
            *d = -(k * (x - y));
        }
        attention_backward(t, ut, nt, du, spec.teacher_channels, gt);
    }
    acc.iter().sum()
}

type Scratch<'a> = (&'a mut [f64], &'a mut [f64], &'a mut [f64]);

/// `attention_sample` compiled for `simd` (a supported set).
fn attention_sample_for(
    simd: Simd,
    spec: &AttentionSpec,
    x: (&[f32], &[f32]),
    gs: Option<&mut [f32]>,
    gt: Option<&mut [f32]>,
    w: Scratch<'_>,
) -> f64 {
    type G<'a> = Option<&'a mut [f32]>;
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    fn avx512(spec: &AttentionSpec, x: (&[f32], &[f32]), gs: G, gt: G, w: Scratch<'_>) -> f64 {
        attention_sample(spec, x, gs, gt, w)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn avx2(spec: &AttentionSpec, x: (&[f32], &[f32]), gs: G, gt: G, w: Scratch<'_>) -> f64 {
        attention_sample(spec, x, gs, gt, w)
    }
    match simd {
        // SAFETY: the CPU supports `simd`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { avx512(spec, x, gs, gt, w) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2(spec, x, gs, gt, w) },
        _ => attention_sample(spec, x, gs, gt, w),
    }
}

/// Attention transfer: returns the loss; writes the gradients that are wanted.
pub fn attention(
    simd: Simd,
    max_threads: usize,
    spec: &AttentionSpec,
    s: &[f32],
    t: &[f32],
    gs: Option<&mut [f32]>,
    gt: Option<&mut [f32]>,
) -> f64 {
    let (n, hw) = (spec.n, spec.hw);
    let (ls, lt) = (spec.student_channels * hw, spec.teacher_channels * hw);
    let mut sums = vec![0.0f64; n];
    let threads = threads_for(s.len() + t.len(), max_threads).min(n);
    type Item<'a> = (
        usize,
        Option<&'a mut [f32]>,
        Option<&'a mut [f32]>,
        &'a mut f64,
    );
    let mut items: Vec<Item> = Vec::with_capacity(n);
    let mut gs_rows = gs.map(|g| g.chunks_mut(ls));
    let mut gt_rows = gt.map(|g| g.chunks_mut(lt));
    for (i, sum) in sums.iter_mut().enumerate() {
        let a = gs_rows.as_mut().and_then(|it| it.next());
        let b = gt_rows.as_mut().and_then(|it| it.next());
        items.push((i, a, b, sum));
    }
    let run = |part: &mut [Item]| {
        let (mut us, mut ut, mut du) = (vec![0.0f64; hw], vec![0.0f64; hw], vec![0.0f64; hw]);
        for (i, a, b, sum) in part.iter_mut() {
            let inputs = (&s[*i * ls..(*i + 1) * ls], &t[*i * lt..(*i + 1) * lt]);
            let scratch = (&mut us[..], &mut ut[..], &mut du[..]);
            **sum = attention_sample_for(
                simd,
                spec,
                inputs,
                a.as_deref_mut(),
                b.as_deref_mut(),
                scratch,
            );
        }
    };
    if threads <= 1 {
        run(&mut items);
    } else {
        let per = n.div_ceil(threads);
        std::thread::scope(|scope| {
            for part in items.chunks_mut(per) {
                scope.spawn(|| run(part));
            }
        });
    }
    sums.iter().sum::<f64>() / (n * hw) as f64
}
