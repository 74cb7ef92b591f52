// common.wgsl: prepended to every shader of the crate (src/backend/wgpu/pipelines.rs).
//
// Layout of work: a workgroup of WG = 256 invocations is split into WG / TPR segments of TPR
// invocations; each segment owns one row (softmax, losses) and its TPR "lanes" stride over the row's
// columns (j = lane, lane + TPR, ...). TPR is a pipeline-overridable power of two chosen on the host
// from the row length: 256 for long rows (one row per workgroup), down to 1 for tiny rows.
// Reductions inside a segment are tree reductions in workgroup memory, in a fixed order, so results
// are bit-identical run to run.

const WG: u32 = 256u;
// Finite stand-in for -inf as the running max of an empty set (WGSL has no infinity literal).
const NEG_BIG: f32 = -3.4028235e38;

override TPR: u32 = 256u;

fn is_finite_f32(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

fn nan_f32() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

fn inf_f32() -> f32 {
    return bitcast<f32>(0x7f800000u);
}

// Linear workgroup index of a 2D dispatch (the host splits more than 65535 groups over y).
fn group_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

// Online softmax statistics of one row (or of the part of it one lane has seen).
//   ms: running max of s;  zs: sum exp((s - ms) / T);  zs1: sum exp(s - ms)   (T = 1, for CE)
//   mt: running max of t;  zt: sum exp((t - mt) / T)
//   sum_s: sum of s (label smoothing);  bad: 1 when a non-finite input was seen.
//   dz: Zs - Zt (teacher logits), summed element by element as e^xt expm1(xs - xt), so that
//       log(Zs / Zt) = log1p(dz / Zt) keeps its precision when p ~ q (high T): the divergences'
//       log q - log p and the gradients p - q are only as precise as that log ratio.
// The same max serves T and 1 because max(s / T) = max(s) / T for T > 0.
struct RowStats {
    ms: f32,
    zs: f32,
    zs1: f32,
    mt: f32,
    zt: f32,
    sum_s: f32,
    bad: f32,
    dz: f32,
}

fn stats_empty() -> RowStats {
    return RowStats(NEG_BIG, 0.0, 0.0, NEG_BIG, 0.0, 0.0, 0.0, 0.0);
}

// e^a - e^b for exponents a, b <= 0 with their values ea, eb: without cancellation when close.
fn exp_gap(a: f32, b: f32, ea: f32, eb: f32) -> f32 {
    let e = a - b;
    if (abs(e) < 0.5) {
        return eb * expm1_f32(e);
    }
    return ea - eb;
}

// log(Zs / Zt) of a row's final statistics (teacher logits).
fn log_ratio(st: RowStats) -> f32 {
    if (abs(st.dz) < 0.5 * st.zt) {
        return log1p_f32(st.dz / st.zt);
    }
    return log(st.zs / st.zt);
}

// Adds student value s (and teacher logit t when with_t) to a lane's statistics.
fn stats_push(st: RowStats, s: f32, t: f32, with_t: bool, inv_t: f32) -> RowStats {
    var r = st;
    if (!is_finite_f32(s) || (with_t && !is_finite_f32(t))) {
        r.bad = 1.0;
        return r;
    }
    let ms = max(r.ms, s);
    // Rescale the sums to the new max before adding this element.
    let das = (r.ms - ms) * inv_t;
    let ras = exp(das);
    let xs = (s - ms) * inv_t;
    let es = exp(xs);
    let zs_old = r.zs;
    r.zs = r.zs * ras + es;
    r.zs1 = r.zs1 * exp(r.ms - ms) + exp(s - ms);
    r.ms = ms;
    r.sum_s = r.sum_s + s;
    if (with_t) {
        let mt = max(r.mt, t);
        let dat = (r.mt - mt) * inv_t;
        let rat = exp(dat);
        let xt = (t - mt) * inv_t;
        let et = exp(xt);
        // dz' = ras Zs - rat Zt + (es - et) = rat dz + (ras - rat) Zs + (es - et).
        var rescale = 0.0;
        if (zs_old != 0.0) {
            rescale = exp_gap(das, dat, ras, rat) * zs_old;
        }
        r.dz = rat * r.dz + rescale + exp_gap(xs, xt, es, et);
        r.zt = r.zt * rat + et;
        r.mt = mt;
    }
    return r;
}

fn stats_combine(a: RowStats, b: RowStats, inv_t: f32) -> RowStats {
    var r: RowStats;
    r.ms = max(a.ms, b.ms);
    let das = (a.ms - r.ms) * inv_t;
    let dbs = (b.ms - r.ms) * inv_t;
    let ras = exp(das);
    let rbs = exp(dbs);
    r.zs = a.zs * ras + b.zs * rbs;
    r.zs1 = a.zs1 * exp(a.ms - r.ms) + b.zs1 * exp(b.ms - r.ms);
    r.mt = max(a.mt, b.mt);
    let dat = (a.mt - r.mt) * inv_t;
    let dbt = (b.mt - r.mt) * inv_t;
    let rat = exp(dat);
    let rbt = exp(dbt);
    r.zt = a.zt * rat + b.zt * rbt;
    // Each side's dz rescaled as in stats_push (an empty side has zs = 0 and dz = 0).
    var ga = 0.0;
    if (a.zs != 0.0) {
        ga = exp_gap(das, dat, ras, rat) * a.zs;
    }
    var gb = 0.0;
    if (b.zs != 0.0) {
        gb = exp_gap(dbs, dbt, rbs, rbt) * b.zs;
    }
    r.dz = (rat * a.dz + ga) + (rbt * b.dz + gb);
    r.sum_s = a.sum_s + b.sum_s;
    r.bad = max(a.bad, b.bad);
    return r;
}

var<workgroup> sh_stats: array<RowStats, 256>;
var<workgroup> sh_sum: array<vec4<f32>, 256>;

// Tree-reduces sh_stats within each segment of TPR invocations; the result is at the segment's
// first slot. Must be called by the whole workgroup (it holds barriers).
fn reduce_stats(lid: u32, inv_t: f32) -> RowStats {
    let lane = lid % TPR;
    workgroupBarrier();
    for (var stride = TPR / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            sh_stats[lid] = stats_combine(sh_stats[lid], sh_stats[lid + stride], inv_t);
        }
        workgroupBarrier();
    }
    let r = sh_stats[lid - lane];
    workgroupBarrier();
    return r;
}

// Tree-reduces sh_sum within each segment; every lane gets the segment's total.
fn reduce_sum(lid: u32) -> vec4<f32> {
    let lane = lid % TPR;
    workgroupBarrier();
    for (var stride = TPR / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            sh_sum[lid] = sh_sum[lid] + sh_sum[lid + stride];
        }
        workgroupBarrier();
    }
    let r = sh_sum[lid - lane];
    workgroupBarrier();
    return r;
}

// expm1(x) = e^x - 1 without the cancellation of exp(x) - 1 near 0 (WGSL has no expm1): Taylor
// to x^9 for |x| < 0.5 (relative error below 3e-9, under f32's rounding), exp(x) - 1 beyond.
fn expm1_f32(x: f32) -> f32 {
    if (abs(x) < 0.5) {
        return x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0
            + x * (1.0 / 720.0 + x * (1.0 / 5040.0 + x * (1.0 / 40320.0 + x / 362880.0))))))));
    }
    return exp(x) - 1.0;
}

// phi(x) = e^x - 1 - x (>= 0), the second-order remainder the divergences sum: a series for
// |x| < 0.5 (relative error below 1e-10), exp(x) - 1 - x beyond (no cancellation there).
fn phi_f32(x: f32) -> f32 {
    if (abs(x) < 0.5) {
        return x * x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0
            + x * (1.0 / 5040.0 + x * (1.0 / 40320.0 + x * (1.0 / 362880.0 + x / 3628800.0))))))));
    }
    return exp(x) - 1.0 - x;
}

// log1p(x) = log(1 + x) without the rounding of 1 + x near 0 (WGSL has no log1p, and its log is
// specified only to an absolute 2^-21 near 1): 2 atanh(z), z = x / (2 + x), as a series to z^11
// for |x| < 0.25 (|z| < 1/7: relative error below 1e-11), log(1 + x) beyond.
fn log1p_f32(x: f32) -> f32 {
    if (abs(x) < 0.25) {
        let z = x / (2.0 + x);
        let z2 = z * z;
        return 2.0 * z * (1.0 + z2 * (1.0 / 3.0 + z2 * (0.2 + z2 * (1.0 / 7.0 + z2 * (1.0 / 9.0
            + z2 / 11.0)))));
    }
    return log(1.0 + x);
}

// The forward-KL pieces the divergence and Hinton kernels share (see divergence.wgsl, high T).
// q phi(u), u = log p - log q (its limit p where q underflows to 0): KL = sum q phi(u).
fn kl_term(q: f32, pv: f32, u: f32) -> f32 {
    if (q == 0.0) {
        return pv;
    }
    if (abs(u) < 0.5) {
        return q * phi_f32(u);
    }
    return (pv - q) - q * u;
}

// p - q, from q expm1(u) where they are close.
fn gap_pq(q: f32, pv: f32, u: f32) -> f32 {
    if (q == 0.0 || abs(u) >= 0.5) {
        return pv - q;
    }
    return q * expm1_f32(u);
}

// 1 / (1 + e^-x) without overflow (exp of a non-positive argument only).
fn sigmoid_f32(x: f32) -> f32 {
    let e = exp(-abs(x));
    return select(e / (1.0 + e), 1.0 / (1.0 + e), x >= 0.0);
}

// log(1 + e^x) without overflow or cancellation.
fn softplus_f32(x: f32) -> f32 {
    return max(x, 0.0) + log1p_f32(exp(-abs(x)));
}

// x^s - x^t times T, (a - am) - (b - bm) for logits a, b and their maxima, in whichever of two
// orders has the smaller rounding bound: as written, or (a - b) - (am - bm), which is exact where
// the teacher is close to the student (then each difference is of two nearby floats). The f32
// difference of x^s and x^t would carry their rounding, first order in the divergences there.
fn logit_gap(a: f32, am: f32, b: f32, bm: f32) -> f32 {
    let x = a - am;
    let y = b - bm;
    let u = a - b;
    let v = am - bm;
    return select(x - y, u - v, abs(u) + abs(v) < abs(x) + abs(y));
}

// DKD's binary distributions (docs/LOSSES.md section 8; dkd.wgsl, sharded.wgsl): from the
// log-odds of the rest D = log Z_rest - x_g of the student (d_s) and the teacher (d_t) and
// e = d_s - d_t formed without their cancellation, (TCKD, p_g - q_g): q_g = sigmoid(-d_t),
// 1 - q_g = sigmoid(d_t), u = log p - log q of both bins as -log1p((1 - q_g) expm1(e)),
// -log1p(q_g expm1(-e)) where |e| < 1/2 (softplus differences beyond), TCKD = sum q phi(u)
// (kl_term), p_g - q_g from the bin with the smaller teacher probability (gap_pq).
fn dkd_bins(d_s: f32, d_t: f32, e: f32) -> vec2<f32> {
    let qg = sigmoid_f32(-d_t);
    let qr = sigmoid_f32(d_t);
    let pg = sigmoid_f32(-d_s);
    let pr = sigmoid_f32(d_s);
    var ug = softplus_f32(d_t) - softplus_f32(d_s);
    var ur = softplus_f32(-d_t) - softplus_f32(-d_s);
    if (abs(e) < 0.5) {
        ug = -log1p_f32(qr * expm1_f32(e));
        ur = -log1p_f32(qg * expm1_f32(-e));
    }
    let tckd = kl_term(qg, pg, ug) + kl_term(qr, pr, ur);
    let gap = select(-gap_pq(qr, pr, ur), gap_pq(qg, pg, ug), qg <= qr);
    return vec2<f32>(tckd, gap);
}

// ---- bf16 / f16 (docs/LOSSES.md, half precision) ----
// Dtype codes: 0 f32, 1 bf16, 2 f16. A buffer of 16-bit elements is an array<u32> of pairs, the
// element of even index in the low half. Conversions are exact bit manipulations (no
// unpack2x16float, whose handling of infinities and NaN WGSL leaves to the implementation).

// The 16-bit value in the low half of `h` as an f32 (exact: every bf16 and f16 is an f32).
fn half_to_f32(h: u32, dt: u32) -> f32 {
    let b = h & 0xffffu;
    if (dt == 1u) {
        return bitcast<f32>(b << 16u);
    }
    let sign = (b & 0x8000u) << 16u;
    let e = (b >> 10u) & 0x1fu;
    let m = b & 0x3ffu;
    if (e == 0x1fu) {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u)); // infinity or NaN
    }
    if (e == 0u) {
        // Zero or subnormal: m * 2^-24, exact in f32.
        let v = f32(m) * 5.9604644775390625e-8;
        return select(v, -v, sign != 0u);
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

// v rounded to bf16 (dt 1) or f16 (dt 2), to nearest with ties to even, in the low 16 bits.
fn f32_to_half(v: f32, dt: u32) -> u32 {
    let b = bitcast<u32>(v);
    let a = b & 0x7fffffffu;
    if (dt == 1u) {
        if (a > 0x7f800000u) {
            return ((b >> 16u) | 0x40u) & 0xffffu; // NaN stays a (quiet) NaN
        }
        return ((b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u) & 0xffffu;
    }
    let sign = (b >> 16u) & 0x8000u;
    if (a > 0x7f800000u) {
        return sign | 0x7e00u;
    }
    if (a >= 0x477ff000u) {
        return sign | 0x7c00u; // 65520 and above round to infinity
    }
    if (a < 0x38800000u) {
        // Below f16's smallest normal 2^-14: a subnormal count of 2^-24 (round is ties-to-even).
        return sign | u32(round(bitcast<f32>(a) * 16777216.0));
    }
    return sign | (((a + 0xfffu + ((a >> 13u) & 1u)) >> 13u) - (112u << 10u));
}
