//! The row-kernel driver of the fast CPU backend: blocks, threads and the instruction set.
//!
//! A row loss runs in passes over each row, as the GPU kernels do (`docs/ARCHITECTURE.md`):
//! pass 1 ([`RowOp::stats`]) reads the row once for its softmax statistics and keeps the
//! exponentials it computed in a per-thread scratch row (in cache for rows up to ~64k classes);
//! pass 2 ([`RowOp::sums`]) forms the loss sums and writes the gradients that do not need the
//! row's loss; pass 3 ([`RowOp::pass3`]), only where asked, writes the gradients that do.
//!
//! Each row is cut into blocks of [`BLOCK`] columns. Pass 1 gives each block its own statistics
//! (its own maxima), and [`RowOp::combine`] merges them in block order in f64: the results do not
//! depend on how rows or blocks are shared among threads, so every thread count gives the same
//! bits. Rows are shared out in contiguous ranges; when there are fewer rows than threads and the
//! rows are long, the threads share each row's blocks instead, meeting at a barrier between
//! passes (every thread merges the same blocks in the same order, so they agree).
//!
//! The passes run compiled for AVX-512, AVX2 or baseline x86-64 / other targets ([`Simd`]), chosen
//! once at run time: the same source and, since no operation is fused or reordered, the same bits.
//!
//! (Over 600 lines on purpose: the driver, its typed `In` / `Out` element access and the per-ISA
//! dispatch are one unit that every row kernel goes through; their invariants are stated together.)

use crate::dtype::{Dtype, HostVec};
use std::sync::{Barrier, Mutex};

/// Columns per block.
pub const BLOCK: usize = 1024;

/// Elements below which a call runs on the calling thread alone (about 50 microseconds).
const MIN_WORK_PER_THREAD: usize = 1 << 16;

/// The instruction set the row kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// 512-bit vectors (x86-64 AVX-512 F/BW/DQ/VL).
    Avx512,
    /// 256-bit vectors (x86-64 AVX2).
    Avx2,
    /// What the target guarantees (SSE2 on x86-64).
    Portable,
}

impl Simd {
    /// The widest set the running CPU has.
    pub fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
                return Simd::Avx512;
            }
            if has!("avx2") {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    }

    /// Whether the running CPU can execute code compiled for `self`.
    pub fn supported(self) -> bool {
        match self {
            Simd::Portable => true,
            Simd::Avx2 => matches!(Simd::detect(), Simd::Avx2 | Simd::Avx512),
            Simd::Avx512 => Simd::detect() == Simd::Avx512,
        }
    }
}

/// The three passes of a [`RowOp`], each compiled for every instruction set: a generic wrapper
/// per set with the target features on it, into which the op's `#[inline(always)]` pass is
/// inlined (a closure would not be: LLVM leaves a large closure body out of line, compiled for the
/// baseline).
macro_rules! passes_for {
    ($stats:ident, $sums:ident, $pass3:ident, $feature:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        fn $stats<O: RowOp>(op: &O, r: usize, j: (usize, usize), keep: &mut [f32]) -> O::Stats {
            op.stats(r, j.0, j.1, keep)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        fn $sums<O: RowOp>(
            op: &O,
            r: usize,
            j: (usize, usize),
            row: &O::Row,
            b: &O::Stats,
            keep: &[f32],
        ) -> O::Sums {
            op.sums(r, j.0, j.1, row, b, keep)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        fn $pass3<O: RowOp>(
            op: &O,
            r: usize,
            j: (usize, usize),
            row: &O::Row,
            b: &O::Stats,
            keep: &[f32],
        ) {
            op.pass3(r, j.0, j.1, row, b, keep)
        }
    };
}

passes_for!(
    stats_avx512,
    sums_avx512,
    pass3_avx512,
    "avx512f,avx512bw,avx512dq,avx512vl"
);
passes_for!(stats_avx2, sums_avx2, pass3_avx2, "avx2");

/// Pass 1 of a block, for `simd` (which the CPU supports: the backend holds no other).
#[inline(always)]
fn stats<O: RowOp>(simd: Simd, op: &O, r: usize, j: (usize, usize), keep: &mut [f32]) -> O::Stats {
    match simd {
        // SAFETY: `simd` is supported by this CPU (the backend only holds supported sets).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { stats_avx512(op, r, j, keep) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { stats_avx2(op, r, j, keep) },
        _ => op.stats(r, j.0, j.1, keep),
    }
}

/// Pass 2 of a block, for `simd`.
#[inline(always)]
fn sums<O: RowOp>(
    simd: Simd,
    op: &O,
    r: usize,
    j: (usize, usize),
    row: &O::Row,
    b: &O::Stats,
    keep: &[f32],
) -> O::Sums {
    match simd {
        // SAFETY: as in `stats`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { sums_avx512(op, r, j, row, b, keep) },
        // SAFETY: as in `stats`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { sums_avx2(op, r, j, row, b, keep) },
        _ => op.sums(r, j.0, j.1, row, b, keep),
    }
}

/// Pass 3 of a block, for `simd`.
#[inline(always)]
fn pass3<O: RowOp>(
    simd: Simd,
    op: &O,
    r: usize,
    j: (usize, usize),
    row: &O::Row,
    b: &O::Stats,
    keep: &[f32],
) {
    match simd {
        // SAFETY: as in `stats`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { pass3_avx512(op, r, j, row, b, keep) },
        // SAFETY: as in `stats`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { pass3_avx2(op, r, j, row, b, keep) },
        _ => op.pass3(r, j.0, j.1, row, b, keep),
    }
}

/// The number of threads for `work` elements, at most `max` (0: the machine's cores).
pub fn threads_for(work: usize, max: usize) -> usize {
    // `available_parallelism` reads cgroup files on Linux (tens of microseconds): once.
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = if max == 0 {
        *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    } else {
        max
    };
    (work / MIN_WORK_PER_THREAD).clamp(1, cores.max(1))
}

/// A row loss in passes (see the module documentation). Implementations read their inputs and
/// write their outputs through [`In`] / [`Out`]; the driver guarantees that concurrent calls
/// touch disjoint columns or rows, and that a row's passes run in order.
pub trait RowOp: Sync {
    /// A block's pass-1 result.
    type Stats: Copy + Default + Send;
    /// The row's merged statistics (and, after [`RowOp::finish`], its loss terms).
    type Row: Copy + Default + Send;
    /// A block's pass-2 result.
    type Sums: Copy + Default + Send;
    /// f32 values per element that pass 1 keeps for the later passes.
    const SCRATCH: usize;

    fn shape(&self) -> (usize, usize);
    /// Pass 1 over columns `j0..j1` of row `r`; `scratch` holds `SCRATCH * (j1 - j0)` floats.
    fn stats(&self, r: usize, j0: usize, j1: usize, scratch: &mut [f32]) -> Self::Stats;
    /// Merges a row's block statistics (in block order).
    fn combine(&self, r: usize, blocks: &[Self::Stats]) -> Self::Row;
    /// Pass 2 over one block.
    fn sums(
        &self,
        r: usize,
        j0: usize,
        j1: usize,
        row: &Self::Row,
        block: &Self::Stats,
        scratch: &[f32],
    ) -> Self::Sums;
    /// The row's loss from its blocks' sums (in block order); may record terms in `row` for
    /// pass 3. Returns the row loss and whether pass 3 runs.
    fn finish(&self, r: usize, row: &mut Self::Row, sums: &[Self::Sums]) -> (f64, bool);
    /// Pass 3 over one block.
    fn pass3(
        &self,
        r: usize,
        j0: usize,
        j1: usize,
        row: &Self::Row,
        block: &Self::Stats,
        scratch: &[f32],
    );
}

/// Runs `op` over all rows; returns each row's loss.
pub fn run<O: RowOp>(op: &O, simd: Simd, max_threads: usize) -> Vec<f64> {
    let (n, c) = op.shape();
    let threads = threads_for(n * c, max_threads);
    let blocks = c.div_ceil(BLOCK);
    let mut losses = vec![0.0f64; n];
    if threads == 1 {
        let mut w = Worker::new::<O>(c);
        for (r, l) in losses.iter_mut().enumerate() {
            *l = w.row(op, simd, r);
        }
    } else if n >= threads || blocks < 2 {
        // Contiguous row ranges, one per thread.
        let per = n.div_ceil(threads);
        std::thread::scope(|scope| {
            for (i, chunk) in losses.chunks_mut(per).enumerate() {
                scope.spawn(move || {
                    let mut w = Worker::new::<O>(c);
                    for (k, l) in chunk.iter_mut().enumerate() {
                        *l = w.row(op, simd, i * per + k);
                    }
                });
            }
        });
    } else {
        split_rows(op, simd, threads.min(blocks), &mut losses);
    }
    losses
}

/// One thread's reusable state: its scratch row and block results.
struct Worker<S, B> {
    scratch: Vec<f32>,
    stats: Vec<S>,
    sums: Vec<B>,
}

impl<S: Copy + Default, B: Copy + Default> Worker<S, B> {
    fn new<O: RowOp<Stats = S, Sums = B>>(cols: usize) -> Self {
        let blocks = cols.div_ceil(BLOCK);
        Worker {
            scratch: vec![0.0; O::SCRATCH * cols],
            stats: vec![S::default(); blocks],
            sums: vec![B::default(); blocks],
        }
    }

    /// All passes of row `r` on this thread.
    fn row<O: RowOp<Stats = S, Sums = B>>(&mut self, op: &O, simd: Simd, r: usize) -> f64 {
        let c = op.shape().1;
        let k = O::SCRATCH;
        for (b, st) in self.stats.iter_mut().enumerate() {
            let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(c));
            let scratch = &mut self.scratch[k * j0..k * j1];
            *st = stats(simd, op, r, (j0, j1), scratch);
        }
        let mut row = op.combine(r, &self.stats);
        for (b, (sm, st)) in self.sums.iter_mut().zip(&self.stats).enumerate() {
            let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(c));
            let scratch = &self.scratch[k * j0..k * j1];
            *sm = sums(simd, op, r, (j0, j1), &row, st, scratch);
        }
        let (loss, third) = op.finish(r, &mut row, &self.sums);
        if third {
            for (b, st) in self.stats.iter().enumerate() {
                let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(c));
                let scratch = &self.scratch[k * j0..k * j1];
                pass3(simd, op, r, (j0, j1), &row, st, scratch);
            }
        }
        loss
    }
}

/// Few long rows: `threads` threads share each row's blocks (contiguous block ranges), with a
/// barrier after each pass. Every thread merges all blocks itself, in block order.
fn split_rows<O: RowOp>(op: &O, simd: Simd, threads: usize, losses: &mut [f64]) {
    let (n, c) = op.shape();
    let blocks = c.div_ceil(BLOCK);
    let k = O::SCRATCH;
    let shared_stats = Mutex::new(vec![O::Stats::default(); blocks]);
    let shared_sums = Mutex::new(vec![O::Sums::default(); blocks]);
    let barrier = Barrier::new(threads);
    let out = Mutex::new(losses);
    std::thread::scope(|scope| {
        for i in 0..threads {
            let (shared_stats, shared_sums, barrier, out) =
                (&shared_stats, &shared_sums, &barrier, &out);
            scope.spawn(move || {
                let (b0, b1) = (i * blocks / threads, (i + 1) * blocks / threads);
                let first = b0 * BLOCK;
                let cols = (b1 * BLOCK).min(c) - first;
                let mut scratch = vec![0.0f32; k * cols];
                let mut mine_st = vec![O::Stats::default(); b1 - b0];
                let mut mine_sm = vec![O::Sums::default(); b1 - b0];
                for r in 0..n {
                    for (b, st) in (b0..b1).zip(mine_st.iter_mut()) {
                        let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(c));
                        let s = &mut scratch[k * (j0 - first)..k * (j1 - first)];
                        *st = stats(simd, op, r, (j0, j1), s);
                    }
                    lock(shared_stats)[b0..b1].copy_from_slice(&mine_st);
                    barrier.wait();
                    let all = lock(shared_stats).clone();
                    let mut row = op.combine(r, &all);
                    for (b, sm) in (b0..b1).zip(mine_sm.iter_mut()) {
                        let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(c));
                        let s = &scratch[k * (j0 - first)..k * (j1 - first)];
                        *sm = sums(simd, op, r, (j0, j1), &row, &all[b], s);
                    }
                    lock(shared_sums)[b0..b1].copy_from_slice(&mine_sm);
                    barrier.wait();
                    let all_sums = lock(shared_sums).clone();
                    let (loss, third) = op.finish(r, &mut row, &all_sums);
                    if third {
                        for (b, st) in all.iter().enumerate().take(b1).skip(b0) {
                            let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(c));
                            let s = &scratch[k * (j0 - first)..k * (j1 - first)];
                            pass3(simd, op, r, (j0, j1), &row, st, s);
                        }
                    }
                    if i == 0 {
                        lock(out)[r] = loss;
                    }
                    // No thread overwrites the shared block results before all have read them.
                    barrier.wait();
                }
            });
        }
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic in another thread of the scope is re-raised by the scope itself.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A read-only input array shared by the threads of a call, of any [`Dtype`]: elements are
/// read as f32 (exactly: bf16 and f16 widen without rounding).
#[derive(Clone, Copy)]
pub struct In {
    p: *const u8,
    dtype: Dtype,
}

/// An output array shared by the threads of a call, each writing its own elements; values are
/// rounded once to the array's [`Dtype`] (to nearest, ties to even) as they are stored.
#[derive(Clone, Copy)]
pub struct Out {
    p: *mut u8,
    dtype: Dtype,
}

// SAFETY: the arrays outlive the call (the driver's threads are scoped), `In` is only read, and
// the driver hands each element of an `Out` to one thread (see `RowOp`). An in-place gradient
// (`In` and `Out` over the same student array) is written only in a pass after the last read of
// the same elements, or at the same index right after reading it. bf16 and f16 elements are 2
// bytes each: no two threads write the same byte.
unsafe impl Send for In {}
unsafe impl Sync for In {}
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// bf16 bits as f32 (exact).
#[inline(always)]
fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f16 bits as f32 (exact), without branches so that a lane of them vectorises: the magnitude's
/// bits moved to f32's position and scaled by 2^112 give normals and subnormals alike; an
/// all-ones exponent (infinity, NaN) is set to f32's.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let mag = h & 0x7fff;
    let scaled = (f32::from_bits(mag << 13) * f32::from_bits(0x7780_0000)).to_bits();
    let special = 0x7f80_0000 | ((mag & 0x3ff) << 13);
    f32::from_bits(select_u32(mag >= 0x7c00, special, scaled) | ((h & 0x8000) << 16))
}

#[inline(always)]
fn select_u32(c: bool, a: u32, b: u32) -> u32 {
    let m = (c as u32).wrapping_neg();
    (a & m) | (b & !m)
}

/// f32 to bf16 bits, rounded to nearest even (NaN stays a quiet NaN), without branches.
#[inline(always)]
fn f32_to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16;
    select_u32(v.is_nan(), (b >> 16) | 0x40, rounded) as u16
}

/// Element `i` of a 2-byte array as f32.
#[inline(always)]
unsafe fn half_at(p: *const u8, dtype: Dtype, i: usize) -> f32 {
    // SAFETY: the caller's bound; 2-byte elements, read unaligned (host memory from C may be).
    let bits = unsafe { p.cast::<u16>().add(i).read_unaligned() };
    match dtype {
        Dtype::Bf16 => bf16_to_f32(bits),
        _ => f16_to_f32(bits),
    }
}

impl In {
    pub fn new(data: &[f32]) -> In {
        In {
            p: data.as_ptr().cast(),
            dtype: Dtype::F32,
        }
    }

    /// Over a host vector of any dtype.
    pub fn of(data: &HostVec) -> In {
        In {
            p: data.as_ptr(),
            dtype: data.dtype(),
        }
    }

    /// Over a raw array of `dtype` (host memory of the C ABI).
    ///
    /// # Safety
    /// `p` is readable for every index the call uses, for as long as the call runs.
    pub unsafe fn from_raw(p: *const u8, dtype: Dtype) -> In {
        In { p, dtype }
    }

    /// Over an array that is also written in place (the in-place gradient).
    pub fn over(out: Out) -> In {
        In {
            p: out.p,
            dtype: out.dtype,
        }
    }

    /// The array's element type.
    pub fn dtype(self) -> Dtype {
        self.dtype
    }

    /// Element `i`.
    ///
    /// # Safety
    /// `i` is in bounds of the array this was made from.
    #[inline(always)]
    pub unsafe fn at(self, i: usize) -> f32 {
        // SAFETY: the caller's bound.
        unsafe {
            match self.dtype {
                Dtype::F32 => self.p.cast::<f32>().add(i).read_unaligned(),
                d => half_at(self.p, d, i),
            }
        }
    }

    /// `n <= LANES` elements from `i`, zeros after them.
    ///
    /// # Safety
    /// `i + n` is within the array this was made from.
    #[inline(always)]
    pub unsafe fn load(self, i: usize, n: usize) -> [f32; super::vmath::LANES] {
        let mut v = [0.0f32; super::vmath::LANES];
        match self.dtype {
            // SAFETY: the caller's bound; `v` is a local of LANES >= n floats.
            Dtype::F32 => unsafe {
                std::ptr::copy_nonoverlapping(self.p.cast::<f32>().add(i), v.as_mut_ptr(), n)
            },
            d => {
                // A lane of 16-bit elements, then converted as a whole (vectorises).
                let mut h = [0u16; super::vmath::LANES];
                // SAFETY: the caller's bound; `h` holds LANES >= n elements.
                unsafe {
                    std::ptr::copy_nonoverlapping(self.p.cast::<u16>().add(i), h.as_mut_ptr(), n)
                };
                if d == Dtype::Bf16 {
                    for (vk, &hk) in v.iter_mut().zip(&h) {
                        *vk = bf16_to_f32(hk);
                    }
                } else {
                    for (vk, &hk) in v.iter_mut().zip(&h) {
                        *vk = f16_to_f32(hk);
                    }
                }
                // Lanes past n are 0 as for f32 (the 0 bits of both convert to 0).
            }
        }
        v
    }
}

impl Out {
    pub fn new(data: &mut [f32]) -> Out {
        Out {
            p: data.as_mut_ptr().cast(),
            dtype: Dtype::F32,
        }
    }

    /// Over a host vector of any dtype.
    pub fn of(data: &mut HostVec) -> Out {
        Out {
            dtype: data.dtype(),
            p: data.as_mut_ptr(),
        }
    }

    /// Over a raw array of `dtype` (host memory of the C ABI).
    ///
    /// # Safety
    /// `p` is writable for every index the call uses, for as long as the call runs, and nothing
    /// else reads or writes it meanwhile (other than the in-place student it may be).
    pub unsafe fn from_raw(p: *mut u8, dtype: Dtype) -> Out {
        Out { p, dtype }
    }

    /// The array's element type.
    pub fn dtype(self) -> Dtype {
        self.dtype
    }

    /// Writes the first `n` lanes of `v` from `i`.
    ///
    /// # Safety
    /// `i + n` is within the array, and no other thread touches these elements now.
    #[inline(always)]
    pub unsafe fn store(self, i: usize, v: &[f32; super::vmath::LANES], n: usize) {
        match self.dtype {
            // SAFETY: the caller's bound and exclusivity.
            Dtype::F32 => unsafe {
                std::ptr::copy_nonoverlapping(v.as_ptr(), self.p.cast::<f32>().add(i), n)
            },
            Dtype::Bf16 => {
                let mut h = [0u16; super::vmath::LANES];
                for (hk, &vk) in h.iter_mut().zip(v) {
                    *hk = f32_to_bf16(vk);
                }
                // SAFETY: the caller's bound and exclusivity.
                unsafe {
                    std::ptr::copy_nonoverlapping(h.as_ptr(), self.p.cast::<u16>().add(i), n)
                };
            }
            Dtype::F16 => {
                for (k, &vk) in v.iter().enumerate().take(n) {
                    // SAFETY: the caller's bound and exclusivity.
                    unsafe { self.set(i + k, vk) };
                }
            }
        }
    }

    /// Writes element `i`.
    ///
    /// # Safety
    /// As [`Out::store`].
    #[inline(always)]
    pub unsafe fn set(self, i: usize, v: f32) {
        // SAFETY: the caller's bound and exclusivity; unaligned writes (host memory from C).
        unsafe {
            match self.dtype {
                Dtype::F32 => self.p.cast::<f32>().add(i).write_unaligned(v),
                Dtype::Bf16 => self.p.cast::<u16>().add(i).write_unaligned(f32_to_bf16(v)),
                Dtype::F16 => {
                    let b = half::f16::from_f32(v).to_bits();
                    self.p.cast::<u16>().add(i).write_unaligned(b)
                }
            }
        }
    }
}

/// Nanoseconds per element of [`super::vmath::exp`] over a cache-resident array, compiled for
/// `simd` (the cost the row losses are bound by; `examples/cpu_bench.rs` prints it beside the
/// losses). `Err` when the CPU lacks `simd`.
pub fn exp_ns_per_element(simd: Simd) -> crate::Result<f64> {
    use super::vmath::{exp, LANES};
    if !simd.supported() {
        return Err(crate::Error::Unsupported(format!(
            "this CPU cannot run {simd:?} code"
        )));
    }
    #[inline(always)]
    fn sweep(x: &[f32], out: &mut [f32]) -> f32 {
        let mut acc = [0.0f32; LANES];
        for (cx, co) in x.chunks_exact(LANES).zip(out.chunks_exact_mut(LANES)) {
            let mut e = [0.0f32; LANES];
            for l in 0..LANES {
                e[l] = exp(cx[l]);
                acc[l] += e[l];
            }
            co.copy_from_slice(&e);
        }
        acc.iter().sum()
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    fn avx512(x: &[f32], out: &mut [f32]) -> f32 {
        sweep(x, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn avx2(x: &[f32], out: &mut [f32]) -> f32 {
        sweep(x, out)
    }
    let x: Vec<f32> = (0..1024).map(|i| -(i as f32) / 64.0).collect();
    let mut out = vec![0.0f32; x.len()];
    let reps = 20_000;
    let start = std::time::Instant::now();
    let mut sink = 0.0f32;
    for _ in 0..reps {
        sink += match simd {
            // SAFETY: `simd` is supported (checked above).
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => unsafe { avx512(&x, &mut out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { avx2(&x, &mut out) },
            _ => sweep(&x, &mut out),
        };
    }
    std::hint::black_box(sink);
    Ok(start.elapsed().as_secs_f64() * 1e9 / (reps * x.len()) as f64)
}

#[cfg(test)]
mod conversion_tests {
    use super::*;

    /// The branch-free conversions agree with the `half` crate's on every 16-bit pattern, and
    /// the rounding on values around every tie.
    #[test]
    fn half_conversions_match_the_half_crate() {
        for h in 0..=u16::MAX {
            let (a, b) = (f16_to_f32(h), half::f16::from_bits(h).to_f32());
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "f16 {h:#x}"
            );
            let (a, b) = (bf16_to_f32(h), half::bf16::from_bits(h).to_f32());
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "bf16 {h:#x}"
            );
        }
        let mut x = 0x1234_5678u32;
        for _ in 0..200_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let v = f32::from_bits(x);
            let (a, b) = (f32_to_bf16(v), half::bf16::from_f32(v).to_bits());
            assert!(
                a == b || (v.is_nan() && a & 0x7fc0 == 0x7fc0),
                "{v:e}: {a:#x} vs {b:#x}"
            );
            // Ties: the low 16 bits exactly 0x8000.
            let t = f32::from_bits((x & 0xffff_0000) | 0x8000);
            let (a, b) = (f32_to_bf16(t), half::bf16::from_f32(t).to_bits());
            assert!(a == b || t.is_nan(), "tie {t:e}: {a:#x} vs {b:#x}");
        }
    }
}
