//! The soft-target statistics both Hinton and the divergences use (teacher logits at T):
//! `Zs`, `Zt`, `dz = Zs - Zt`, the block constants, and the forward-KL term.

use super::softmax::sum_exp;
use super::*;

/// A block's statistics with the teacher as logits: maxima, `Zs`, `Zt` and `dz = Zs - Zt`, the
/// last summed element by element as `e^xt expm1(xs - xt)` where the two are close (high T), so
/// that `log(Zs / Zt)` keeps its digits when `p ~ q`.
#[derive(Clone, Copy, Default)]
pub struct KdStats {
    pub(super) ms: f32,
    pub(super) mt: f32,
    pub(super) zs: f64,
    pub(super) zt: f64,
    pub(super) dz: f64,
    pub(super) bad: bool,
}

/// `e^a - e^b` from `a - b` and the values: `e^b expm1(a - b)` where they are close.
#[inline(always)]
pub(super) fn exp_gap(d: f32, ea: f32, eb: f32) -> f32 {
    let (_, em1) = vmath::phi_expm1_small(d);
    select(d.abs() < 0.5, eb * em1, ea - eb)
}

/// Pass 1 of a block with teacher logits; keeps `e^xs` in `keep_s` and `e^xt` in `keep_t`.
#[inline(always)]
pub(super) fn kd_stats(
    (s, t): (In, In),
    (base, j0, j1): (usize, usize, usize),
    inv_t: f32,
    keep_s: &mut [f32],
    keep_t: &mut [f32],
    s_max: Option<f32>,
) -> KdStats {
    // The student's block max, when the caller has it (Hinton's T = 1 pass, which has also
    // checked the block is finite).
    let (ms, bad_s) = match s_max {
        Some(m) => (m, false),
        None => max_and_bad(s, base, j0, j1),
    };
    let (mt, bad_t) = max_and_bad(t, base, j0, j1);
    if bad_s || bad_t {
        return KdStats {
            bad: true,
            ..Default::default()
        };
    }
    // Three simple loops over the block (in L1) rather than one that holds everything: fewer
    // live vectors, no spills.
    let zs = sum_exp(s, base, j0, j1, ms, inv_t, keep_s);
    let zt = sum_exp(t, base, j0, j1, mt, inv_t, keep_t);
    let mut dz = [0.0f32; LANES];
    for_steps!(j0, j1, |j, n| {
        // SAFETY: in bounds.
        let (sv, tv) = unsafe { (s.load(base + j, n), t.load(base + j, n)) };
        let (es, et) = (
            lanes(&keep_s[j - j0..j - j0 + n]),
            lanes(&keep_t[j - j0..j - j0 + n]),
        );
        let mut gap = [0.0f32; LANES];
        for l in 0..LANES {
            let xs = (sv[l] - ms) * inv_t;
            let xt = (tv[l] - mt) * inv_t;
            gap[l] = exp_gap(xs - xt, es[l], et[l]);
        }
        add(&mut dz, &gap, n);
    });
    KdStats {
        ms,
        mt,
        zs,
        zt,
        dz: total(&dz),
        bad: false,
    }
}

/// A row's merged soft-target statistics (teacher logits), f64.
#[derive(Clone, Copy, Default)]
pub struct KdRow {
    pub(super) ms: f32,
    pub(super) mt: f32,
    pub(super) lzs: f64,
    pub(super) lzt: f64,
    /// `log(Zs / Zt) = log1p(dz / Zt)`.
    pub(super) dlz: f64,
    pub(super) bad: bool,
}

/// Merges blocks in order: `Zs = sum e^os Zs_b`, `Zt = sum e^ot Zt_b` and
/// `dz = sum e^ot dz_b + (e^os - e^ot) Zs_b`, with `os = (ms_b - ms) / T` (likewise `ot`) and
/// `e^os - e^ot = e^ot expm1(os - ot)`.
pub(super) fn merge_kd<'a>(blocks: impl Iterator<Item = &'a KdStats> + Clone, inv_t: f64) -> KdRow {
    let ms = blocks
        .clone()
        .fold(f32::NEG_INFINITY, |a, b| vmath::max(a, b.ms));
    let mt = blocks
        .clone()
        .fold(f32::NEG_INFINITY, |a, b| vmath::max(a, b.mt));
    let (mut zs, mut zt, mut dz, mut bad) = (0.0f64, 0.0f64, 0.0f64, false);
    for b in blocks {
        bad |= b.bad;
        let os = (b.ms as f64 - ms as f64) * inv_t;
        let ot = (b.mt as f64 - mt as f64) * inv_t;
        let (ras, rat) = (os.exp(), ot.exp());
        zs += ras * b.zs;
        zt += rat * b.zt;
        // e^os - e^ot without cancellation where close (and without 0 * inf where far apart).
        let gap = if (os - ot).abs() < 0.5 {
            rat * (os - ot).exp_m1()
        } else {
            ras - rat
        };
        dz += rat * b.dz + gap * b.zs;
    }
    KdRow {
        ms,
        mt,
        lzs: zs.ln(),
        lzt: zt.ln(),
        dlz: (dz / zt).ln_1p(),
        bad,
    }
}

/// A block's constants for its elements: `p_j = e^xs_j ps`, `q_j = e^xt_j pt` and
/// `u_j = log p_j - log q_j = (xs_j - xt_j) - w`, with `xs_j = (s_j - ms_b) / T`.
#[derive(Clone, Copy)]
pub(super) struct KdBlock {
    pub(super) ms: f32,
    pub(super) mt: f32,
    pub(super) ps: f32,
    pub(super) pt: f32,
    pub(super) w: f32,
    /// `w` in f64, for the gradients that subtract the row's divergence from `u`.
    pub(super) w64: f64,
}

pub(super) fn kd_block(row: &KdRow, b: &KdStats, inv_t: f64) -> KdBlock {
    let os = (b.ms as f64 - row.ms as f64) * inv_t;
    let ot = (b.mt as f64 - row.mt as f64) * inv_t;
    KdBlock {
        ms: b.ms,
        mt: b.mt,
        ps: (os - row.lzs).exp() as f32,
        pt: (ot - row.lzt).exp() as f32,
        w: (row.dlz - (os - ot)) as f32,
        w64: row.dlz - (os - ot),
    }
}

/// `u_j - d` in f64 for a step (teacher logits): where one class dominates, `u_j` and the row's
/// divergence `d` are large and nearly cancel (the teacher gradient `q (-u - KL)` at the
/// teacher's top class), more than f32 can resolve.
#[inline(always)]
pub(super) fn u_minus(sv: &Lanes, tv: &Lanes, kb: &KdBlock, inv_t: f64, d: f64) -> Lanes {
    let mut out = [0.0f32; LANES];
    let (ms, mt) = (kb.ms as f64, kb.mt as f64);
    for l in 0..LANES {
        let xs = (sv[l] as f64 - ms) * inv_t;
        let xt = (tv[l] as f64 - mt) * inv_t;
        out[l] = (((xs - xt) - kb.w64) - d) as f32;
    }
    out
}

/// `(p, q, u)` of a step of LANES elements, teacher logits.
#[inline(always)]
pub(super) fn kd_elems(
    sv: &Lanes,
    tv: &Lanes,
    es: &[f32],
    et: &[f32],
    kb: &KdBlock,
    inv_t: f32,
) -> (Lanes, Lanes, Lanes) {
    let (es, et) = (lanes(es), lanes(et));
    let (mut p, mut q, mut u) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
    for l in 0..LANES {
        let xs = (sv[l] - kb.ms) * inv_t;
        let xt = (tv[l] - kb.mt) * inv_t;
        p[l] = es[l] * kb.ps;
        q[l] = et[l] * kb.pt;
        u[l] = (xs - xt) - kb.w;
    }
    (p, q, u)
}

/// Forward KL's term `q phi(u)` (its limit `p` where `q` is 0) and `p - q` (as `q expm1(u)`
/// where they are close): `KL = sum q phi(u)` because `sum q e^u = sum p = 1`.
#[inline(always)]
pub(super) fn kl_and_gap(q: f32, p: f32, u: f32) -> (f32, f32) {
    let (phi, em1) = vmath::phi_expm1_small(u);
    let small = u.abs() < 0.5;
    let term = select(q == 0.0, p, select(small, q * phi, (p - q) - q * u));
    let gap = select((q == 0.0) | !small, p - q, q * em1);
    (term, gap)
}
