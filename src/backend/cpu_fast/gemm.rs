//! Single-precision matmul for the fast CPU backend, `C[m, n] (+)= op(A)[m, k] op(B)[k, n]`
//! (layouts as [`crate::ops::dense::MatmulSpec`]; the f64 reference is
//! [`crate::ops::dense::reference::matmul`]).
//!
//! BLIS-style: B is packed a `KC x NC` block at a time into panels `NR` columns wide (`[p][0..NR]`
//! contiguous, zero-padded past `n`), A an `MC x KC` block at a time into panels `MR` rows tall
//! (`[p][0..MR]`), and a register-blocked micro-kernel accumulates one `MR x NR` tile of C over
//! the block's `kc` steps. On x86-64 with AVX2 and FMA (detected at run time) the micro-kernel is
//! 12 ymm accumulators fed by broadcast-FMAs; elsewhere a portable loop of the same shape.
//!
//! Determinism: every element of C sums its `k` products in the same order (ascending `p`, one
//! partial sum per `KC` block added to C in block order) whatever the thread count, since threads
//! split C by column panels and never share an element. On one machine the same input gives the
//! same bits; the AVX2 path (fused multiply-add) and the portable one (separate multiply and add)
//! differ in the last bits.
//!
//! Half precision: `A` and `B` may be bf16 or f16 ([`Element`]); each element is converted
//! exactly to f32 as it is packed, so the products and sums are the f32 ones of the converted
//! values and no f32 copy of an operand is ever made (the fused linear losses read a bf16
//! weight matrix this way).

use std::cell::RefCell;

use crate::dtype::{Dtype, Element};
use crate::ops::dense::MatmulSpec;

/// Rows of the micro-kernel's C tile.
const MR: usize = 6;
/// Columns of the micro-kernel's C tile (two 8-lane vectors).
const NR: usize = 16;
/// Depth of one packed block: `KC x NR` floats of B (16 KiB) stay in L1 across a panel of A.
const KC: usize = 256;
/// Rows of A packed at once (`MC x KC`, 96 KiB, in L2).
const MC: usize = 96;
/// Columns of B packed at once (`KC x NC`, 2 MiB at most).
const NC: usize = 2048;

/// The micro-kernel in use on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// 256-bit FMA (x86-64 AVX2 + FMA).
    Avx2Fma,
    /// Plain multiply-add loops the compiler vectorises as it can.
    Portable,
}

impl Kernel {
    /// The best kernel the running CPU supports.
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Kernel::Avx2Fma;
            }
        }
        Kernel::Portable
    }
}

/// Packed operands, one set per thread, kept between calls.
#[derive(Default)]
struct Workspace {
    a: Vec<f32>,
    b: Vec<f32>,
}

thread_local! {
    static WORKSPACE: RefCell<Workspace> = RefCell::new(Workspace::default());
}

/// Multiply-adds per half below which a matmul is not split across threads: about half a
/// microsecond of work, against a few cache-line transfers for a spinning helper to take a half
/// (the best of 2^14..2^17 on the default experiment, `docs/PERF.md`).
const SPLIT_MIN_WORK: usize = 1 << 14;

/// `C (+)= op(A) op(B)`. `a`, `b`, `c` must hold `m*k`, `k*n`, `m*n` elements (the backend
/// validated them).
///
/// When a thread is lent to the backend (`helper.rs`) and the product is large enough,
/// the columns of C are split in two on a panel boundary and the second half is offered to
/// that thread; otherwise everything runs on the calling thread. Either way every element is
/// computed by the same code in the same order.
pub fn sgemm<A: Element, B: Element>(
    kernel: Kernel,
    spec: &MatmulSpec,
    a: &[A],
    b: &[B],
    c: &mut [f32],
) {
    let MatmulSpec { m, k, n, .. } = *spec;
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    let out = Out(c.as_mut_ptr());
    // SAFETY (both calls): `c` holds m*n elements and is borrowed mutably for the whole call,
    // and each call is given its own column range.
    let cols = |j0: usize, j1: usize| {
        WORKSPACE.with_borrow_mut(|ws| unsafe { sgemm_cols(kernel, spec, a, b, out, j0, j1, ws) })
    };
    if n > NR && m * k * n >= 2 * SPLIT_MIN_WORK && super::helper::available() {
        let mid = (n / 2).next_multiple_of(NR);
        super::helper::join(|| cols(0, mid), || cols(mid, n));
    } else {
        cols(0, n);
    }
}

/// C as a raw pointer, so that threads can write disjoint column ranges of the same rows.
#[derive(Clone, Copy)]
struct Out(*mut f32);

// SAFETY: an `Out` is only dereferenced by `sgemm_cols`, whose callers give each thread its own
// column range while the `&mut [f32]` it came from is held.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `C[.., j0..j1] (+)= op(A) op(B)[.., j0..j1]` on this thread.
///
/// # Safety
/// `out` must point to `m * n` floats, and nothing else may read or write columns `j0..j1`
/// of them during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_cols<A: Element, B: Element>(
    kernel: Kernel,
    spec: &MatmulSpec,
    a: &[A],
    b: &[B],
    out: Out,
    j0: usize,
    j1: usize,
    ws: &mut Workspace,
) {
    let MatmulSpec { m, k, n, .. } = *spec;
    for jc in (j0..j1).step_by(NC) {
        let nc = NC.min(j1 - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            // The first depth block overwrites C unless the spec accumulates.
            let add = pc > 0 || spec.accumulate;
            pack_b(kernel, spec, b, pc, kc, jc, nc, &mut ws.b);
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                pack_a(spec, a, ic, mc, pc, kc, &mut ws.a);
                for jr in (0..nc).step_by(NR) {
                    let panel_b = &ws.b[jr * kc..(jr + NR) * kc];
                    for ir in (0..mc).step_by(MR) {
                        let panel_a = &ws.a[ir * kc..(ir + MR) * kc];
                        let tile = micro_kernel(kernel, kc, panel_a, panel_b);
                        let rows = MR.min(mc - ir);
                        let cols = NR.min(nc - jr);
                        for (r, tile_row) in tile.iter().enumerate().take(rows) {
                            let start = (ic + ir + r) * n + jc + jr;
                            // SAFETY: row ic+ir+r < m, columns jc+jr.. +cols <= j1 <= n: inside
                            // C and inside this call's column range (caller's contract).
                            let dst =
                                unsafe { std::slice::from_raw_parts_mut(out.0.add(start), cols) };
                            match (add, <&mut [f32; NR]>::try_from(&mut *dst)) {
                                // Full-width rows as fixed-size arrays: vector moves, no memcpy call.
                                (true, Ok(full)) => {
                                    for (d, &t) in full.iter_mut().zip(tile_row) {
                                        *d += t;
                                    }
                                }
                                (false, Ok(full)) => *full = *tile_row,
                                (true, Err(_)) => {
                                    for (d, &t) in dst.iter_mut().zip(tile_row) {
                                        *d += t;
                                    }
                                }
                                (false, Err(_)) => dst.copy_from_slice(&tile_row[..cols]),
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Packs `op(B)[pc..pc+kc, jc..jc+nc]` into `NR`-wide panels: element `(p, j)` of panel `jp` at
/// `jp*NR*kc + p*NR + j`, zeros past column `nc`.
#[allow(clippy::too_many_arguments)]
fn pack_b<B: Element>(
    kernel: Kernel,
    spec: &MatmulSpec,
    b: &[B],
    pc: usize,
    kc: usize,
    jc: usize,
    nc: usize,
    out: &mut Vec<f32>,
) {
    let panels = nc.div_ceil(NR);
    // Full panels are written whole; only an edge panel is zeroed first (for its padding), so
    // the buffer is not cleared on every call.
    out.resize(panels * NR * kc, 0.0);
    let (k, n) = (spec.k, spec.n);
    for jp in 0..panels {
        let panel = &mut out[jp * NR * kc..(jp + 1) * NR * kc];
        let j0 = jc + jp * NR;
        let width = NR.min(jc + nc - j0);
        if width < NR {
            panel.fill(0.0);
        }
        let b32 = as_f32(b);
        let vector_load = B::DTYPE == Dtype::F32 || B::DTYPE == Dtype::Bf16;
        if spec.trans_b && width == NR && kernel == Kernel::Avx2Fma && vector_load {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2Fma` means the CPU has AVX2; rows j0..j0+NR of B hold k >= pc + kc
            // elements each and the panel NR * kc (both checked by the slicing in the callee);
            // B is f32 or bf16 (checked above).
            unsafe {
                pack_b_transposed_avx2(&b[j0 * k..(j0 + NR) * k], k, pc, kc, panel)
            };
        } else if spec.trans_b {
            // B stored [n, k]: column j of op(B) is row j of B, contiguous in p.
            for j in 0..width {
                let src = &b[(j0 + j) * k + pc..(j0 + j) * k + pc + kc];
                for (p, &v) in src.iter().enumerate() {
                    panel[p * NR + j] = v.to_f32();
                }
            }
        } else {
            for p in 0..kc {
                let src = &b[(pc + p) * n + j0..(pc + p) * n + j0 + width];
                let dst = &mut panel[p * NR..(p + 1) * NR];
                match (b32, <&[B; NR]>::try_from(src)) {
                    (Some(_), Ok(full)) => {
                        let full: &[f32; NR] = bytemuck_f32(full);
                        *<&mut [f32; NR]>::try_from(dst).expect("NR floats") = *full
                    }
                    #[cfg(target_arch = "x86_64")]
                    (None, Ok(full)) if B::DTYPE == Dtype::Bf16 && kernel == Kernel::Avx2Fma => {
                        let out = <&mut [f32; NR]>::try_from(dst).expect("NR floats");
                        // SAFETY: `Avx2Fma` means the CPU has AVX2; B is bf16 (checked).
                        unsafe { widen_bf16_avx2(full, out) }
                    }
                    _ => {
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d = v.to_f32();
                        }
                    }
                }
            }
        }
    }
}

/// One full panel of a transposed B: `rows` holds the panel's `NR` rows of B (`k` f32 or bf16
/// elements each, a bf16 converted exactly to f32 as it is loaded);
/// writes `panel[p*NR + j] = rows[j*k + pc + p]` for `p < kc`, eight `p` at a time by 8x8
/// register transposes (rows `j` and `j+8` handled as two 8x8 blocks), the tail one by one.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_b_transposed_avx2<T: Element>(
    rows: &[T],
    k: usize,
    pc: usize,
    kc: usize,
    panel: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(rows.len() >= NR * k && pc + kc <= k && panel.len() >= NR * kc);
    assert!(T::DTYPE == Dtype::F32 || T::DTYPE == Dtype::Bf16);
    // Eight elements from `p` as f32: a bf16 is the high half of its f32 (exact).
    let load8 = |p: *const T| -> __m256 {
        if T::DTYPE == Dtype::F32 {
            // SAFETY: the caller's index keeps 8 elements inside `rows`.
            unsafe { _mm256_loadu_ps(p.cast::<f32>()) }
        } else {
            // SAFETY: as above; 8 bf16 are 16 bytes.
            unsafe {
                let h = _mm_loadu_si128(p.cast::<__m128i>());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
    };
    let full = kc - kc % 8;
    for p in (0..full).step_by(8) {
        for half in 0..2 {
            // r[i]: row j = half*8 + i of B at p..p+8.
            let mut r = [_mm256_setzero_ps(); 8];
            for (i, ri) in r.iter_mut().enumerate() {
                let at = (half * 8 + i) * k + pc + p;
                // SAFETY: at + 8 <= (half*8 + i) * k + pc + kc <= NR * k (asserted above).
                *ri = load8(unsafe { rows.as_ptr().add(at) });
            }
            // Standard 8x8 transpose: pairs, then quads, then 128-bit halves.
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let cols = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (q, col) in cols.iter().enumerate() {
                // SAFETY: (p + q) * NR + half * 8 + 8 <= kc * NR.
                unsafe { _mm256_storeu_ps(panel.as_mut_ptr().add((p + q) * NR + half * 8), *col) };
            }
        }
    }
    for j in 0..NR {
        for p in full..kc {
            panel[p * NR + j] = rows[j * k + pc + p].to_f32();
        }
    }
}

/// Packs `op(A)[ic..ic+mc, pc..pc+kc]` into `MR`-tall panels: element `(i, p)` of panel `ip` at
/// `ip*MR*kc + p*MR + i`, zeros past row `mc`.
fn pack_a<A: Element>(
    spec: &MatmulSpec,
    a: &[A],
    ic: usize,
    mc: usize,
    pc: usize,
    kc: usize,
    out: &mut Vec<f32>,
) {
    let panels = mc.div_ceil(MR);
    out.resize(panels * MR * kc, 0.0);
    let (m, k) = (spec.m, spec.k);
    for ip in 0..panels {
        let panel = &mut out[ip * MR * kc..(ip + 1) * MR * kc];
        let i0 = ic + ip * MR;
        let height = MR.min(ic + mc - i0);
        if height < MR {
            panel.fill(0.0);
        }
        if spec.trans_a {
            // A stored [k, m]: row p of A holds op(A)[.., p], contiguous in i.
            for p in 0..kc {
                let src = &a[(pc + p) * m + i0..(pc + p) * m + i0 + height];
                let dst = &mut panel[p * MR..(p + 1) * MR];
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = v.to_f32();
                }
            }
        } else {
            for i in 0..height {
                let src = &a[(i0 + i) * k + pc..(i0 + i) * k + pc + kc];
                for (p, &v) in src.iter().enumerate() {
                    panel[p * MR + i] = v.to_f32();
                }
            }
        }
    }
}

/// `NR` bf16 elements widened to f32 (exact: a bf16 is the high half of its f32), two vectors
/// of 8.
///
/// # Safety
/// The CPU must support AVX2, and `T` must be bf16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_bf16_avx2<T: Element>(src: &[T; NR], dst: &mut [f32; NR]) {
    use std::arch::x86_64::*;
    assert_eq!(T::DTYPE, Dtype::Bf16);
    for half in 0..2 {
        // SAFETY: 8 bf16 (16 bytes) at src[half*8..] and 8 f32 at dst[half*8..], inside the arrays.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(half * 8).cast::<__m128i>());
            let v = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
            _mm256_storeu_ps(dst.as_mut_ptr().add(half * 8), v);
        }
    }
}

/// `x` as f32 when its element type is f32.
fn as_f32<T: Element>(x: &[T]) -> Option<&[f32]> {
    if T::DTYPE == Dtype::F32 {
        // SAFETY: T is f32 (the only Element of dtype F32), so the cast is the identity.
        Some(unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
    } else {
        None
    }
}

/// A full row of NR elements known to be f32 (the caller checked `T::DTYPE`).
fn bytemuck_f32<T: Element>(x: &[T; NR]) -> &[f32; NR] {
    assert_eq!(T::DTYPE, Dtype::F32);
    // SAFETY: T is f32 (asserted), so the cast is the identity.
    unsafe { &*(x as *const [T; NR]).cast::<[f32; NR]>() }
}

/// One `MR x NR` tile: `sum_p a[p*MR + r] * b[p*NR + j]` over `p < kc`.
fn micro_kernel(kernel: Kernel, kc: usize, a: &[f32], b: &[f32]) -> [[f32; NR]; MR] {
    assert!(a.len() >= kc * MR && b.len() >= kc * NR);
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::Avx2Fma` is only produced by `detect` when the CPU has AVX2 and FMA,
        // and the slices were just checked to hold `kc` steps.
        Kernel::Avx2Fma => unsafe { micro_kernel_avx2(kc, a.as_ptr(), b.as_ptr()) },
        _ => micro_kernel_portable(kc, a, b),
    }
}

fn micro_kernel_portable(kc: usize, a: &[f32], b: &[f32]) -> [[f32; NR]; MR] {
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..kc {
        let bp: &[f32; NR] = b[p * NR..(p + 1) * NR].try_into().expect("NR floats");
        for (r, row) in acc.iter_mut().enumerate() {
            let ar = a[p * MR + r];
            for (o, &bv) in row.iter_mut().zip(bp) {
                *o += ar * bv;
            }
        }
    }
    acc
}

/// The AVX2 micro-kernel: C tile in 12 ymm registers (6 rows x 2 vectors of 8), each step one
/// broadcast of `a[p, r]` per row and two FMAs.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `a` must hold `kc * MR` floats and `b` `kc * NR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_kernel_avx2(kc: usize, a: *const f32, b: *const f32) -> [[f32; NR]; MR] {
    use std::arch::x86_64::*;
    let mut c = [[_mm256_setzero_ps(); 2]; MR];
    for p in 0..kc {
        // SAFETY: p < kc, so both loads stay inside the panels (caller's contract).
        let (b0, b1) = unsafe {
            (
                _mm256_loadu_ps(b.add(p * NR)),
                _mm256_loadu_ps(b.add(p * NR + 8)),
            )
        };
        for (r, cr) in c.iter_mut().enumerate() {
            // SAFETY: as above; p*MR + r < kc*MR.
            let ar = _mm256_set1_ps(unsafe { *a.add(p * MR + r) });
            cr[0] = _mm256_fmadd_ps(ar, b0, cr[0]);
            cr[1] = _mm256_fmadd_ps(ar, b1, cr[1]);
        }
    }
    let mut out = [[0.0f32; NR]; MR];
    for (o, cr) in out.iter_mut().zip(&c) {
        // SAFETY: each row of `out` holds NR = 16 floats.
        unsafe {
            _mm256_storeu_ps(o.as_mut_ptr(), cr[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), cr[1]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::dense::reference::matmul as matmul_reference;

    /// Deterministic operands with varied values for `spec`.
    fn operands(spec: &MatmulSpec) -> (Vec<f32>, Vec<f32>) {
        let a = (0..spec.m * spec.k).map(|i| ((i * 7919 % 23) as f32 - 11.0) / 8.0);
        let b = (0..spec.k * spec.n).map(|i| ((i * 104729 % 31) as f32 - 15.0) / 16.0);
        (a.collect(), b.collect())
    }

    fn check(kernel: Kernel, spec: MatmulSpec) {
        let (a, b) = operands(&spec);
        let c0: Vec<f32> = (0..spec.m * spec.n).map(|i| (i % 5) as f32).collect();
        let mut want: Vec<f64> = c0.iter().map(|&v| v as f64).collect();
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        matmul_reference(&spec, &f64s(&a), &f64s(&b), &mut want);
        let mut got = c0.clone();
        sgemm(kernel, &spec, &a, &b, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{spec:?} {kernel:?} element {i}: {g} vs {w}"
            );
        }
    }

    /// With a thread lent, large products are split across two threads: the same bits.
    #[test]
    fn a_helper_thread_gives_the_same_bits() {
        use super::super::helper;
        let kernel = Kernel::detect();
        let specs = [
            (32, 256, 256, false, true),
            (256, 32, 256, true, false),
            (33, 300, 530, false, false),
        ];
        for (m, k, n, trans_a, trans_b) in specs {
            let spec = MatmulSpec {
                m,
                k,
                n,
                trans_a,
                trans_b,
                accumulate: true,
            };
            let (a, b) = operands(&spec);
            let c0: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32).collect();
            let mut alone = c0.clone();
            sgemm(kernel, &spec, &a, &b, &mut alone);
            let before = helper::helped();
            // At least 20 runs, and more while no half has run on the helper yet: on a loaded
            // machine the spinning helper can be descheduled through a whole run.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let helped = helper::tests::with_helper(|_| {
                let mut runs = Vec::new();
                while runs.len() < 20
                    || (helper::helped() == before && std::time::Instant::now() < deadline)
                {
                    let mut c = c0.clone();
                    sgemm(kernel, &spec, &a, &b, &mut c);
                    runs.push(c);
                }
                runs
            });
            assert!(
                helper::helped() > before,
                "{spec:?}: no half ran on the helper"
            );
            for c in helped {
                assert!(
                    c.iter()
                        .zip(&alone)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{spec:?}: different bits with a helper"
                );
            }
        }
    }

    #[test]
    fn matches_the_reference_over_block_edges() {
        for kernel in [Kernel::Portable, Kernel::detect()] {
            for (m, k, n) in [
                (1, 1, 1),
                (7, 3, 17),
                (97, 300, 33),
                (13, 513, 2100),
                (32, 64, 256),
            ] {
                for (ta, tb, acc) in [
                    (false, false, false),
                    (true, false, true),
                    (false, true, false),
                    (true, true, true),
                ] {
                    let spec = MatmulSpec {
                        m,
                        k,
                        n,
                        trans_a: ta,
                        trans_b: tb,
                        accumulate: acc,
                    };
                    check(kernel, spec);
                }
            }
        }
    }
}
