//! Sparse top-k teachers (`docs/LOSSES.md` section 10): the student dense, the teacher `k`
//! entries per row, every row on one thread (rows shared among threads: the same bits for any
//! thread count).
//!
//! Per row: the teacher's `log Q` and tail mass in f64 from its `k` values
//! (`ops::sparse::teacher_row`), the support marked in a per-thread byte mask; pass 1 per block
//! of 1024 columns (one read of the student): the block's max, then in f32 lanes the sums of
//! `e^x` over every class and over the off-support ones (with `x = (s - max) / T`; for the
//! uniform tail also `sum x` and `sum e^x x` off the support; for the bucket the off-support
//! classes' own max and sum, so that a tail far below the max keeps its digits; with a
//! hard-label term the T = 1 sum and the sum of the logits), merged over blocks in f64. The
//! support's terms are f64, from its `k` gathered logits and `log Q`. Then one pass writes the
//! dense gradient (each off-support class's closed form, the same for every class of a row up
//! to `p_j`), and the `k` support entries are written over it from their f64 values. JSD with
//! the uniform tail has a pass more (its off-support terms need `log M_j` per class).

use super::cross_entropy::Student;
use super::*;
use crate::backend::cpu_fast::rows::{threads_for, Simd, BLOCK};
use crate::ops::sparse::{event_terms, teacher_row, SparseSpec, SparseTail};
use crate::ops::Divergence;

pub struct SparseRows<'a> {
    pub spec: &'a SparseSpec,
    pub student: Student,
    /// `[N, k]`, checked (distinct classes in `0..C`).
    pub indices: &'a [i32],
    /// `[N, k]`.
    pub values: In,
    pub labels: Option<&'a [i32]>,
    /// `grad_scale` times the reduction's factor.
    pub k: f64,
}

/// One block's pass-1 sums (f32 lanes summed in f64), relative to the block's max `mb`.
#[derive(Clone, Copy, Default)]
struct Block {
    mb: f32,
    bad: bool,
    z: f64,
    z_off: f64,
    x_off: f64,
    ex_off: f64,
    n_off: usize,
    /// The bucket's: the off-support classes' max and their sum relative to it.
    mo: f32,
    zt: f64,
    /// With a hard-label term: `sum e^(s - mb)` and `sum s`.
    z1: f64,
    s_sum: f64,
}

/// How the dense pass forms an off-support class's `h_j` (`dD/ds_j` times T).
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// `c p_j` (renormalize and bucket), as `sign(c) e^(log p_j + log |c|)` (the bucket's `c`
    /// may be 1e130 where `p_j` is 1e-125).
    Scaled,
    /// `p_j - u` (uniform, forward KL).
    UniformFkl,
    /// `p_j (log p_j + c)` (uniform, reverse KL).
    UniformRkl,
    /// `p_j ((1 - beta) (log p_j - log M_j) - Abar)` (uniform, JSD).
    UniformJsd,
}

/// A row's constants for the dense passes.
#[derive(Clone, Copy)]
struct Dense {
    ms: f32,
    inv_t: f32,
    lnz: f32,
    c: f32,
    /// `log |c|` (Scaled).
    lc: f32,
    u: f32,
    beta: f32,
    abar: f32,
    /// `k (1 - alpha) T`.
    gk: f32,
    /// With a hard-label term: `log Z1` (at T = 1, after the max), `k alpha`, the label,
    /// `eps / C`, `1 - eps`.
    ce: Option<(f32, f32, usize, f32, f32)>,
}

/// One thread's reusable memory.
struct Scratch {
    mask: Vec<u8>,
    blocks: Vec<Block>,
    sv: Vec<f64>,
}

impl SparseRows<'_> {
    /// Every row's loss (masked rows 0), the gradients written.
    pub fn run(&self, simd: Simd, max_threads: usize) -> Vec<f64> {
        let (n, c) = (self.spec.shape.rows, self.spec.shape.cols);
        let threads = threads_for(n * c, max_threads).min(n);
        let mut losses = vec![0.0f64; n];
        let per = n.div_ceil(threads.max(1));
        std::thread::scope(|scope| {
            for (i, chunk) in losses.chunks_mut(per).enumerate() {
                let mut body = move || {
                    let mut sc = Scratch {
                        mask: vec![0; c + LANES],
                        blocks: vec![Block::default(); c.div_ceil(BLOCK)],
                        sv: vec![0.0; self.spec.k],
                    };
                    for (j, l) in chunk.iter_mut().enumerate() {
                        *l = self.row_for(simd, i * per + j, &mut sc);
                    }
                };
                if threads <= 1 {
                    body();
                } else {
                    scope.spawn(body);
                }
            }
        });
        losses
    }

    fn row_for(&self, simd: Simd, r: usize, sc: &mut Scratch) -> f64 {
        match simd {
            // SAFETY: `simd` is supported by this CPU (the backend only holds supported sets).
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => unsafe { row_avx512(self, r, sc) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { row_avx2(self, r, sc) },
            _ => self.row(r, sc),
        }
    }

    /// One row: its loss, its gradient written.
    #[inline(always)]
    fn row(&self, r: usize, sc: &mut Scratch) -> f64 {
        let spec = self.spec;
        let (c, k) = (spec.shape.cols, spec.k);
        let base = r * c;
        let g_out = self.student.g;
        let live = self.labels.is_none_or(|l| l[r] != spec.ignore_index);
        if !live {
            fill(g_out, base, 0, c, 0.0);
            return 0.0;
        }
        let idx = &self.indices[r * k..(r + 1) * k];
        // SAFETY: the values hold `[N, k]` elements (the caller's validation).
        let vals: Vec<f64> = (0..k)
            .map(|i| unsafe { self.values.at(r * k + i) } as f64)
            .collect();
        let Some((lq, m)) = teacher_row(spec, &vals) else {
            fill(g_out, base, 0, c, f32::NAN);
            return f64::NAN;
        };
        for (i, &j) in idx.iter().enumerate() {
            sc.mask[j as usize] = 1;
            // SAFETY: `j` is a checked class of this row.
            sc.sv[i] = unsafe { self.student.s.at(base + j as usize) } as f64;
        }
        let loss = self.row_after_gather(r, sc, &lq, m);
        for &j in idx {
            sc.mask[j as usize] = 0;
        }
        loss
    }

    #[inline(always)]
    fn row_after_gather(&self, r: usize, sc: &mut Scratch, lq: &[f64], m: f64) -> f64 {
        let spec = self.spec;
        let (c, k) = (spec.shape.cols, spec.k);
        let base = r * c;
        let t = spec.temperature as f64;
        let inv_t = 1.0 / spec.temperature;
        let alpha = spec.alpha as f64;
        let tail = spec.has_tail();
        let uniform = tail && spec.tail == SparseTail::Uniform;
        let bucket = tail && spec.tail == SparseTail::Bucket;
        let ce = alpha > 0.0 && self.labels.is_some();
        let mut bad = false;
        for (b, blk) in sc.blocks.iter_mut().enumerate() {
            let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(c));
            let (m, j) = (&sc.mask, (j0, j1));
            // One loop per combination (const parameters), so that no branch sits in the lanes.
            *blk = match (uniform, bucket, ce) {
                (false, false, false) => self.block_stats::<false, false, false>(m, base, j, inv_t),
                (false, false, true) => self.block_stats::<false, false, true>(m, base, j, inv_t),
                (true, _, false) => self.block_stats::<true, false, false>(m, base, j, inv_t),
                (true, _, true) => self.block_stats::<true, false, true>(m, base, j, inv_t),
                (false, true, false) => self.block_stats::<false, true, false>(m, base, j, inv_t),
                (false, true, true) => self.block_stats::<false, true, true>(m, base, j, inv_t),
            };
            bad |= blk.bad;
        }
        if bad {
            fill(self.student.g, base, 0, c, f32::NAN);
            return f64::NAN;
        }
        // Merge the blocks in f64.
        let ms = sc.blocks.iter().fold(f32::NEG_INFINITY, |a, b| a.max(b.mb));
        let (mut z, mut z_off, mut x_off, mut ex_off, mut z1, mut s_sum) =
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        let mo = sc.blocks.iter().fold(f32::NEG_INFINITY, |a, b| a.max(b.mo));
        let mut zt = 0.0;
        for b in &sc.blocks {
            let d = (b.mb as f64 - ms as f64) / t;
            let e = d.exp();
            z += b.z * e;
            z_off += b.z_off * e;
            x_off += b.x_off + b.n_off as f64 * d;
            ex_off += e * (b.ex_off + d * b.z_off);
            z1 += b.z1 * (b.mb as f64 - ms as f64).exp();
            s_sum += b.s_sum;
            if bucket && b.mo > f32::NEG_INFINITY {
                zt += b.zt * ((b.mo as f64 - mo as f64) / t).exp();
            }
        }
        let lnz = z.ln();
        let div = spec.divergence;
        let beta = div.beta() as f64;
        // The support's events.
        let (mut d_sum, mut g_sum) = (0.0, 0.0);
        let mut support = Vec::with_capacity(k);
        for (i, &lqi) in lq.iter().enumerate() {
            let lp = (sc.sv[i] - ms as f64) / t - lnz;
            let (f, _, g) = event_terms(div, lqi, lp);
            d_sum += f;
            g_sum += g;
            support.push((lp.exp(), g));
        }
        // The off-support classes (section 10: each tail's terms).
        let off = (c - k) as f64;
        let p_tail = z_off / z;
        let (mut mode, mut coff, mut u, mut lu) = (Mode::Scaled, 0.0f64, 0.0f64, 0.0f64);
        let mut tail_g: Option<(f64, f64)> = None;
        if c > k {
            match spec.tail {
                _ if bucket => {
                    let lp_tail = (mo as f64 - ms as f64) / t + zt.ln() - lnz;
                    let (f, _, g) = event_terms(div, m.ln(), lp_tail);
                    d_sum += f;
                    g_sum += g;
                    // `a = G / P_tail` in log form: forward KL's `m / P_tail` can overflow
                    // where `p_j` underflows, their product finite.
                    tail_g = Some((g, lp_tail));
                }
                _ if uniform => {
                    u = m / off;
                    lu = u.ln();
                    match div {
                        Divergence::ForwardKl => {
                            mode = Mode::UniformFkl;
                            let classic = if u > 0.0 {
                                u * (off * lu - (x_off - off * lnz))
                            } else {
                                0.0
                            };
                            d_sum += classic + p_tail - m;
                            g_sum -= m;
                        }
                        Divergence::ReverseKl => {
                            mode = Mode::UniformRkl;
                            let classic = ex_off / z - p_tail * (lnz + lu);
                            d_sum += classic + (m - p_tail);
                            g_sum += classic + p_tail;
                        }
                        Divergence::Jsd { .. } => mode = Mode::UniformJsd,
                    }
                }
                _ => match div {
                    // Renormalize: Q = 0 off the support.
                    Divergence::ForwardKl => d_sum += p_tail,
                    Divergence::Jsd { .. } => {
                        let a = -(1.0 - beta) * (1.0 - beta).ln();
                        d_sum += a * p_tail;
                        g_sum += a * p_tail;
                        coff = a;
                    }
                    Divergence::ReverseKl => unreachable!("rejected by the spec's validation"),
                },
            }
        }
        let mut dn = Dense {
            ms,
            inv_t,
            lnz: lnz as f32,
            c: 0.0,
            lc: 0.0,
            u: u as f32,
            beta: beta as f32,
            abar: 0.0,
            gk: (self.k * (1.0 - alpha) * t) as f32,
            ce: None,
        };
        let mut ce_loss = 0.0;
        let lse1 = ms as f64 + z1.ln();
        let (y, eps) = (
            self.labels.map_or(0, |l| l[r] as usize),
            spec.label_smoothing as f64,
        );
        if ce {
            // SAFETY: the label is a checked class.
            let sy = unsafe { self.student.s.at(base + y) } as f64;
            ce_loss = (1.0 - eps) * (lse1 - sy) + eps * (lse1 - s_sum / c as f64);
            dn.ce = Some((
                z1.ln() as f32,
                (self.k * alpha) as f32,
                y,
                (eps / c as f64) as f32,
                (1.0 - eps) as f32,
            ));
        }
        if mode == Mode::UniformJsd {
            dn.abar = 0.0;
            let (f, g) = self.jsd_uniform_sums(&sc.mask, base, &dn);
            d_sum += f;
            g_sum += g;
        }
        let abar = if div == Divergence::ForwardKl {
            -1.0
        } else {
            g_sum
        };
        dn.abar = abar as f32;
        let cc = match mode {
            Mode::UniformRkl => -lu + 1.0 - abar,
            _ => coff - abar,
        };
        dn.c = match mode {
            Mode::Scaled => cc.signum() as f32,
            _ => cc as f32,
        };
        dn.lc = cc.abs().ln() as f32;
        if let Some((g, lp_tail)) = tail_g {
            // c = G e^(-log P_tail) - Abar, with |G| e^(-log P_tail) possibly past f64's range.
            let la = g.abs().ln() - lp_tail;
            if la > 600.0 {
                dn.c = g.signum() as f32;
                dn.lc = la as f32;
            } else {
                let cc = g.signum() * la.exp() - abar;
                dn.c = cc.signum() as f32;
                dn.lc = cc.abs().ln() as f32;
            }
        }
        if let Some(o) = self.student.g {
            for b in 0..sc.blocks.len() {
                let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(c));
                let j = (j0, j1);
                match (mode, dn.ce.is_some()) {
                    (Mode::Scaled, false) => self.block_grad::<0, false>(base, j, &dn, o),
                    (Mode::Scaled, true) => self.block_grad::<0, true>(base, j, &dn, o),
                    (Mode::UniformFkl, false) => self.block_grad::<1, false>(base, j, &dn, o),
                    (Mode::UniformFkl, true) => self.block_grad::<1, true>(base, j, &dn, o),
                    (Mode::UniformRkl, false) => self.block_grad::<2, false>(base, j, &dn, o),
                    (Mode::UniformRkl, true) => self.block_grad::<2, true>(base, j, &dn, o),
                    (Mode::UniformJsd, false) => self.block_grad::<3, false>(base, j, &dn, o),
                    (Mode::UniformJsd, true) => self.block_grad::<3, true>(base, j, &dn, o),
                }
            }
            // The support's entries, from their f64 values.
            let idx = &self.indices[r * k..(r + 1) * k];
            for (i, (&j, &(p, g))) in idx.iter().zip(&support).enumerate() {
                let j = j as usize;
                let mut v = self.k * (1.0 - alpha) * t * (g - p * abar);
                if ce {
                    let p1 = (sc.sv[i] - lse1).exp();
                    let target = eps / c as f64 + if j == y { 1.0 - eps } else { 0.0 };
                    v += self.k * alpha * (p1 - target);
                }
                // SAFETY: a class of this row, which this thread alone writes.
                unsafe { o.set(base + j, v as f32) };
            }
        }
        alpha * ce_loss + (1.0 - alpha) * t * t * d_sum
    }

    /// Pass 1 over one block (see the module documentation).
    #[inline(always)]
    fn block_stats<const UNIFORM: bool, const BUCKET: bool, const CE: bool>(
        &self,
        mask: &[u8],
        base: usize,
        (j0, j1): (usize, usize),
        inv_t: f32,
    ) -> Block {
        let (uniform, bucket, ce) = (UNIFORM, BUCKET, CE);
        let s = self.student.s;
        let (mb, bad) = max_and_bad(s, base, j0, j1);
        let mut blk = Block {
            mb,
            bad,
            mo: f32::NEG_INFINITY,
            ..Default::default()
        };
        if bad {
            return blk;
        }
        if bucket {
            let mut mo = [f32::NEG_INFINITY; LANES];
            for_steps!(j0, j1, |j, n| {
                // SAFETY: in bounds.
                let v = unsafe { s.load(base + j, n) };
                let mk: &[u8; LANES] = mask[j..j + LANES].try_into().expect("padded mask");
                for l in 0..LANES {
                    let off = l < n && mk[l] == 0;
                    mo[l] = select(off, vmath::max(mo[l], v[l]), mo[l]);
                }
            });
            blk.mo = mo.iter().fold(f32::NEG_INFINITY, |a, &b| vmath::max(a, b));
        }
        let mo = blk.mo;
        // The sums of exponentials in f64 lanes: a row whose max dominates has Z = 1 + small,
        // whose small part decides `1 - p_max` (and the gradient there).
        let (mut z, mut zo, mut zt, mut z1) = (
            [0.0f64; LANES],
            [0.0f64; LANES],
            [0.0f64; LANES],
            [0.0f64; LANES],
        );
        let (mut xo, mut exo, mut ss, mut no) = (
            [0.0f32; LANES],
            [0.0f32; LANES],
            [0.0f32; LANES],
            [0.0f32; LANES],
        );
        for_steps!(j0, j1, |j, n| {
            // SAFETY: in bounds.
            let v = unsafe { s.load(base + j, n) };
            let mk: &[u8; LANES] = mask[j..j + LANES].try_into().expect("padded mask");
            for l in 0..LANES {
                let on = l < n;
                let off = on && mk[l] == 0;
                let x = (v[l] - mb) * inv_t;
                let e = vmath::exp_nonpos(select(on, x, 0.0));
                z[l] += select(on, e, 0.0) as f64;
                zo[l] += select(off, e, 0.0) as f64;
                no[l] += select(off, 1.0, 0.0);
                if uniform {
                    xo[l] += select(off, x, 0.0);
                    exo[l] += select(off, e * x, 0.0);
                }
                if bucket {
                    let eo = vmath::exp_nonpos(select(off, (v[l] - mo) * inv_t, 0.0));
                    zt[l] += select(off, eo, 0.0) as f64;
                }
                if ce {
                    z1[l] += select(on, vmath::exp_nonpos(select(on, v[l] - mb, 0.0)), 0.0) as f64;
                    ss[l] += select(on, v[l], 0.0);
                }
            }
        });
        let total64 = |a: &[f64; LANES]| a.iter().sum::<f64>();
        blk.z = total64(&z);
        blk.z_off = total64(&zo);
        blk.n_off = total(&no) as usize;
        blk.x_off = total(&xo);
        blk.ex_off = total(&exo);
        blk.zt = total64(&zt);
        blk.z1 = total64(&z1);
        blk.s_sum = total(&ss);
        blk
    }

    /// `log p_j`, `p_j` and the off-support `h_j` (see [`Mode`]; `MODE` its index) of one lane.
    #[inline(always)]
    fn off_h<const MODE: u8>(dn: &Dense, v: f32) -> (f32, f32, f32) {
        let x = (v - dn.ms) * dn.inv_t - dn.lnz;
        if MODE == 0 {
            // Scaled: one exponential.
            return (x, 0.0, dn.c * vmath::exp(x + dn.lc));
        }
        let p = vmath::exp(x);
        let mode = [
            Mode::Scaled,
            Mode::UniformFkl,
            Mode::UniformRkl,
            Mode::UniformJsd,
        ][MODE as usize];
        let h = match mode {
            Mode::Scaled => dn.c * vmath::exp(x + dn.lc),
            Mode::UniformFkl => p - dn.u,
            Mode::UniformRkl => p * (x + dn.c),
            Mode::UniformJsd => {
                // log p - log M = -log1p(beta (u / p - 1)), first order in u / p - 1.
                let lpm = -vmath::log1p(dn.beta * (dn.u / p - 1.0));
                select(p > 0.0, p * ((1.0 - dn.beta) * lpm - dn.abar), 0.0)
            }
        };
        (x, p, h)
    }

    /// JSD with the uniform tail: the off-support classes' `sum f` and `sum G` (f32 lanes, f64
    /// across them).
    #[inline(always)]
    fn jsd_uniform_sums(&self, mask: &[u8], base: usize, dn: &Dense) -> (f64, f64) {
        let (s, c) = (self.student.s, self.spec.shape.cols);
        let (b, u) = (dn.beta, dn.u);
        let (lb, l1b) = (b.ln(), (1.0 - b).ln());
        let (mut f_sum, mut g_sum) = (0.0f64, 0.0f64);
        for blk in 0..c.div_ceil(BLOCK) {
            let (j0, j1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(c));
            let (mut f, mut g) = ([0.0f32; LANES], [0.0f32; LANES]);
            for_steps!(j0, j1, |j, n| {
                // SAFETY: in bounds.
                let v = unsafe { s.load(base + j, n) };
                let mk: &[u8; LANES] = mask[j..j + LANES].try_into().expect("padded mask");
                for l in 0..LANES {
                    let off = l < n && mk[l] == 0;
                    let x = (v[l] - dn.ms) * dn.inv_t - dn.lnz;
                    let p = vmath::exp(x);
                    // The terms `beta u phi(log M - log u) + (1 - beta) p phi(log M - log p)`
                    // (section 2's second-order forms), with `log M - log u =
                    // log1p((1 - beta) (p / u - 1))` and `log M - log p = log1p(beta (u / p - 1))`;
                    // where u = 0 or p = 0 the limits.
                    let u1 = vmath::log1p((1.0 - b) * (p / u - 1.0));
                    let u2 = vmath::log1p(b * (u / p - 1.0));
                    let phi = |x: f32| vmath::expm1(x) - x;
                    let both = b * u * phi(u1) + (1.0 - b) * p * phi(u2);
                    let no_u = (1.0 - b) * p * (b + phi(l1b));
                    // (p -> 0: (1 - beta) p phi(u2) -> (1 - beta) M = (1 - beta) beta u)
                    let no_p = b * u * (phi(lb) + (1.0 - b));
                    let term = select(u > 0.0, select(p > 0.0, both, no_p), no_u);
                    f[l] += select(off, term, 0.0);
                    g[l] += select(off && p > 0.0, -(1.0 - b) * p * u2, 0.0);
                }
            });
            f_sum += total(&f);
            g_sum += total(&g);
        }
        (f_sum, g_sum)
    }

    /// The dense gradient over one block (the support's entries are written over it after).
    #[inline(always)]
    fn block_grad<const MODE: u8, const CE: bool>(
        &self,
        base: usize,
        (j0, j1): (usize, usize),
        dn: &Dense,
        o: Out,
    ) {
        let s = self.student.s;
        let (lnz1, ka, y, eps_c, one_m_eps) = dn.ce.unwrap_or((0.0, 0.0, 0, 0.0, 0.0));
        for_steps!(j0, j1, |j, n| {
            // SAFETY: in bounds; this row is this thread's (an in-place gradient writes each
            // element right after reading it).
            let v = unsafe { s.load(base + j, n) };
            let mut g = [0.0f32; LANES];
            for l in 0..LANES {
                let (_, _, h) = Self::off_h::<MODE>(dn, v[l]);
                let mut gl = dn.gk * h;
                if CE {
                    // (s - max) first: `max + log Z1` in f32 would lose log Z1 at large logits.
                    let p1 = vmath::exp((v[l] - dn.ms) - lnz1);
                    gl += ka * (p1 - eps_c - select(j + l == y, one_m_eps, 0.0));
                }
                g[l] = gl;
            }
            // SAFETY: as above.
            unsafe { o.store(base + j, &g, n) };
        });
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn row_avx512(op: &SparseRows, r: usize, sc: &mut Scratch) -> f64 {
    op.row(r, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn row_avx2(op: &SparseRows, r: usize, sc: &mut Scratch) -> f64 {
    op.row(r, sc)
}
