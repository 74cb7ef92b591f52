// Sparse top-k teachers (docs/LOSSES.md section 10; spec src/ops/sparse/mod.rs, f64 reference
// src/ops/sparse/reference.rs, fast CPU src/backend/cpu_fast/row_losses/sparse.rs):
//
//   L_r = alpha CE_r + (1 - alpha) T^2 D_r(Q || P),   D = sum_e f_e  over the row's events e,
//   dL_r/ds_j = k [ (1 - alpha) T (own_j - p_j sum_e G_e) + alpha (p^1_j - target_j) ],
//
// with p = softmax(s / T) over all C classes, the teacher's log Q_i on its k-entry support S
// (re-tempered log-probabilities or logits, renormalised, times 1 - m under a tail of mass m), the
// events: each support class, and off the support each class of its own (renormalize: Q = 0;
// uniform: Q = m / (C - k)) or one tail event (bucket: Q = m, P = sum_{j not in S} p_j);
// f_e, a_e = dD/dP_e and G_e = P_e a_e from sp_event (a port of `event_terms`, the
// cancellation-free `q phi(u)` forms of section 2); own_j = G_e(j) for a class of its own, and
// (p_j / P_tail) G_tail in the bucket; k = grad_scale * (1/N_valid for batchmean, else 1).
//
// One block per row (block_group; the host picks 128..1024 threads by C). The whole row's math is
// f64 per element: at high T (up to 1e4) the student is within ~1/T of uniform and the divergence
// is second order in log P - log Q, so f32 probabilities (or f32 sums of them) would leave only
// their rounding; the student's mass outside the support (the bucket's P_tail, renormalize's
// P_off) is summed over the off-support classes themselves, never as 1 - sum_S p, and the tail
// mass m = 1 - sum e^(l_i) comes from log sum e^(l_i) (m = -expm1(log(1 - m))), never from a
// difference either. The steps:
//   1. the k indices sorted in shared memory (a bitonic sort of (class, entry) pairs), so that
//      each class finds whether it is on the support by a binary search;
//   2. the support's student logits gathered (before any gradient is written: in-place safe) and
//      the teacher's values reduced (their max, sum e^((v - max)/T), sum e^(v - max));
//   3. one read of the student: the online max and sum of e^((s - max)/T) over every class and
//      over the off-support ones (their own max, so a tail far below the max keeps its log), and
//      with a hard-label term the T = 1 sum and the sum of the logits;
//   4. the support's terms (f, G per entry, G kept in shared memory), the off-support terms (a
//      read of the student for the uniform tail, whose terms are not linear in p_j; closed forms
//      of P_off or P_tail for the others), reduced;
//   5. one read of the student writing every gradient, once, in the gradient's dtype.
//
// Rows: label == ignore_index -> loss 0 and gradient 0 (no labels: no row is masked); a label
// outside 0..C -> NaN row; a NaN or infinity in s, a NaN in the values, a +inf log-probability,
// all -inf log-probabilities, a -inf log-probability under reverse KL or an infinite logit -> NaN
// row.
// Indices: the host API and the CPU backends check them (distinct, in 0..C, an error). Here an
// index outside 0..C or repeated in its row makes that row NaN, as on wgpu (found in the sorted
// support: out of range sorts last as SP_NONE, a repeat next to its twin); nothing is read or
// written out of bounds.

#define SP_MAX_K 1024u
#define SP_NONE 0xffffffffu

__device__ __forceinline__ double sp_neg_inf() { return -(double)f_inf(); }

// log(e^a + e^b).
__device__ __forceinline__ double sp_logaddexp(double a, double b) {
    const double m = fmax(a, b);
    if (m == sp_neg_inf()) return m;
    return m + log(exp(a - m) + exp(b - m));
}

// q phi(log p - log q), phi(u) = e^u - 1 - u (kl_term of src/ops/sparse/mod.rs): p where q = 0.
__device__ __forceinline__ double sp_kl_term(double lq, double lp) {
    if (lq == sp_neg_inf()) return exp(lp);
    const double u = lp - lq, q = exp(lq);
    if (fabs(u) < 1.0) return q * (expm1(u) - u);
    return (exp(lp) - q) - q * u;
}

// One event's f (its share of D) and G = P_e dD/dP_e from its log Q and log P (event_terms).
// div: 0 forward KL, 1 reverse KL, 2 JSD(beta).
__device__ __forceinline__ void sp_event(u32 div, double beta, double lq, double lp, double& f, double& g) {
    if (div == 0u) {
        f = sp_kl_term(lq, lp);
        g = -exp(lq);
    } else if (div == 1u) {
        const double a = lp - lq + 1.0;
        f = sp_kl_term(lp, lq);
        g = exp(lp) * a;
    } else {
        const double lm = sp_logaddexp(log(beta) + lq, log(1.0 - beta) + lp);
        const double a = (1.0 - beta) * (lp - lm);
        f = beta * sp_kl_term(lq, lm) + (1.0 - beta) * sp_kl_term(lp, lm);
        g = exp(lp) * a;
    }
}

// The student's statistics of pass 3: the max m of the logits and z = sum e^((s - m)/T); the
// off-support classes' own max mo and zt = sum e^((s - mo)/T); with a hard-label term
// z1 = sum e^(s - m) and the sum of the logits. (Maxima held as doubles: exact, and the state is
// all 8-byte words for the shuffles.)
struct SpStats {
    double m, z, mo, zt, z1, sum;
};

__device__ __forceinline__ SpStats sp_stats_empty() {
    SpStats st;
    st.m = sp_neg_inf();
    st.z = 0.0;
    st.mo = sp_neg_inf();
    st.zt = 0.0;
    st.z1 = 0.0;
    st.sum = 0.0;
    return st;
}

// Adds one finite logit x (off: not on the support). it: 1/T.
__device__ __forceinline__ void sp_push(SpStats& st, double x, bool off, bool ce, double it) {
    if (x > st.m) {
        // exp(-inf) = 0 on the first element (the sums are 0 then anyway).
        st.z *= exp((st.m - x) * it);
        if (ce) st.z1 *= exp(st.m - x);
        st.m = x;
    }
    st.z += exp((x - st.m) * it);
    if (ce) {
        st.z1 += exp(x - st.m);
        st.sum += x;
    }
    if (off) {
        if (x > st.mo) {
            st.zt *= exp((st.mo - x) * it);
            st.mo = x;
        }
        st.zt += exp((x - st.mo) * it);
    }
}

// a's sum rescaled from its max ma to the merged max m (0 for an empty side).
__device__ __forceinline__ double sp_rescaled(double z, double ma, double m, double it) {
    return ma == sp_neg_inf() ? 0.0 : z * exp((ma - m) * it);
}

struct SpMerge {
    double it;
    __device__ __forceinline__ SpStats identity() const { return sp_stats_empty(); }
    __device__ __forceinline__ SpStats operator()(SpStats a, SpStats b) const {
        SpStats r;
        r.m = fmax(a.m, b.m);
        r.z = sp_rescaled(a.z, a.m, r.m, it) + sp_rescaled(b.z, b.m, r.m, it);
        r.z1 = sp_rescaled(a.z1, a.m, r.m, 1.0) + sp_rescaled(b.z1, b.m, r.m, 1.0);
        r.mo = fmax(a.mo, b.mo);
        r.zt = sp_rescaled(a.zt, a.mo, r.mo, it) + sp_rescaled(b.zt, b.mo, r.mo, it);
        r.sum = a.sum + b.sum;
        return r;
    }
};

struct SpMax {
    __device__ __forceinline__ double identity() const { return sp_neg_inf(); }
    __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
};

// The slot of class j in the sorted support (keys: class << 32 | entry, ascending; the skipped
// out-of-range entries sort last with class SP_NONE), or SP_NONE.
__device__ __forceinline__ u32 sp_find(const u64* keys, u32 k, u32 j) {
    u32 lo = 0u, hi = k;
    while (lo < hi) {
        const u32 mid = (lo + hi) >> 1;
        if ((u32)(keys[mid] >> 32) < j)
            lo = mid + 1u;
        else
            hi = mid;
    }
    return lo < k && (u32)(keys[lo] >> 32) == j ? lo : SP_NONE;
}

// s: [n, c] of dtype dt_s; indices: [n, k] i32; values: [n, k] of dtype dt_v (log-probabilities
// when logits == 0, logits when 1); labels: [n] or null; count: [1] (count_valid); row_loss: [n];
// grad_s: [n, c] of dtype dt_gs, null or s itself (dt_gs = dt_s). div: 0 forward KL, 1 reverse KL,
// 2 JSD(beta); tail: 0 renormalize, 1 bucket, 2 uniform; eps: label smoothing (with alpha > 0);
// reduction: 0 batchmean, 1 sum, 2 none. 1 <= k <= min(c, 1024) (validated on the host).
// Launch: a block per row (blockDim.x a multiple of 32, up to 1024), grid_for(n).
extern "C" __global__ void sparse_kd(const void* s_all, const int* indices, const void* values_all, const int* labels,
                                     const u32* count, float* row_loss, void* grad_s, u32 n, u32 c, u32 k, float temp,
                                     float alpha_f, float eps_f, float beta_f, float grad_scale, int ignore_index,
                                     u32 div, u32 tail, u32 logits, u32 reduction, u32 dt_s, u32 dt_v, u32 dt_gs) {
    __shared__ u64 keys[SP_MAX_K];   // the support sorted by class: class << 32 | entry
    __shared__ double sv[SP_MAX_K];  // per slot: the student's logit, then log p
    __shared__ double vq[SP_MAX_K];  // per slot: the teacher's value
    __shared__ double gq[SP_MAX_K];  // per slot: G of the support class's event
    const u64 row = block_linear();
    if (row >= n) return;  // the whole block
    const BlockGroup g = block_group();
    const RowIn s = row_in(s_all, dt_s) + row * (u64)c;
    const RowIn v = row_in(values_all, dt_v) + row * (u64)k;
    const int* idx = indices + row * (u64)k;
    const RowOut gs = RowOut(grad_s, dt_gs) + row * (u64)c;
    const int y = labels != 0 ? labels[row] : 0;
    if (labels != 0 && y == ignore_index) {
        fill_row(g, gs, c, 0.f);
        if (g.rank == 0) row_loss[row] = 0.f;
        return;  // the whole block
    }
    const double alpha = (double)alpha_f, eps = (double)eps_f, beta = (double)beta_f;
    const double t = (double)temp, it = 1.0 / t;
    const bool ce = alpha > 0.0 && labels != 0;
    const bool has_tail = tail != 0u && k < c;
    const bool bucket = has_tail && tail == 1u;
    const bool uniform = has_tail && tail == 2u;
    // (A label out of range is bad with or without the cross-entropy term, as on wgpu.)
    bool bad = labels != 0 && (y < 0 || (u32)y >= c);
    // (k past the shared arrays is refused by the host's validation; here a NaN row, in bounds.)
    if (k == 0u || k > SP_MAX_K) {
        fill_row(g, gs, c, f_nan());
        if (g.rank == 0) row_loss[row] = f_nan();
        return;  // the whole block
    }

    // 1. The support sorted by class (n2: k rounded up to a power of two).
    u32 n2 = 1u;
    while (n2 < k) n2 <<= 1;
    for (u32 i = g.rank; i < n2; i += g.size()) {
        u64 key = ~0ull;
        if (i < k) {
            const int j = idx[i];
            const u32 cls = j >= 0 && (u32)j < c ? (u32)j : SP_NONE;  // out of range: skipped
            key = ((u64)cls << 32) | (u64)i;
        }
        keys[i] = key;
    }
    __syncthreads();
    for (u32 size = 2u; size <= n2; size <<= 1) {
        for (u32 stride = size >> 1; stride > 0u; stride >>= 1) {
            for (u32 i = g.rank; i < n2; i += g.size()) {
                const u32 p = i ^ stride;
                if (p > i) {
                    const u64 a = keys[i], b = keys[p];
                    const bool up = (i & size) == 0u;
                    if ((a > b) == up) {
                        keys[i] = b;
                        keys[p] = a;
                    }
                }
            }
            __syncthreads();
        }
    }

    // 2. The support's student logits and teacher values; the values' max and validity.
    double vmax = sp_neg_inf();
    for (u32 i = g.rank; i < k; i += g.size()) {
        const u64 key = keys[i];
        const u32 cls = (u32)(key >> 32);
        const float vf = v[(u32)(key & 0xffffffffu)];
        vq[i] = (double)vf;
        sv[i] = cls != SP_NONE ? (double)s[cls] : 0.0;
        if (logits != 0u ? !is_finite_f(vf) : (vf != vf || vf == f_inf())) bad = true;
        // An index out of range (sorted last as SP_NONE) or repeated (adjacent once sorted): a
        // NaN row, as on wgpu. Reverse KL is +inf at a support class the teacher rules out.
        if (cls == SP_NONE || (i + 1u < k && (u32)(keys[i + 1u] >> 32) == cls)) bad = true;
        if (div == 1u && logits == 0u && vf == -f_inf()) bad = true;
        vmax = fmax(vmax, (double)vf);
    }
    vmax = g.reduce(vmax, SpMax());
    // (Log-probabilities all -inf: no mass on the support.)
    bad = bad || vmax == sp_neg_inf();
    DArr<2> ts = SumDArr<2>().identity();
    if (!g.any(bad)) {
        for (u32 i = g.rank; i < k; i += g.size()) {
            ts.v[0] += exp((vq[i] - vmax) * it);
            ts.v[1] += exp(vq[i] - vmax);
        }
    }
    ts = g.reduce(ts, SumDArr<2>());
    // log Q_i = (v_i - vmax)/T - lse + l1m; l1m = log(1 - m) = log sum e^(v_i) (at most 0: a sum
    // above 1 within the host's tolerance is rounding); m = -expm1(l1m).
    const double lse = log(ts.v[0]);
    const double l1m = has_tail ? fmin(vmax + log(ts.v[1]), 0.0) : 0.0;
    const double m = -expm1(l1m);
    // A label's logit, read before any gradient is written (in place).
    const double sy = ce && !bad ? (double)s[(u32)y] : 0.0;

    // 3. One read of the student.
    SpStats st = sp_stats_empty();
    for (u32 j = g.rank; j < c; j += g.size()) {
        const float x = s[j];
        if (!is_finite_f(x)) {
            bad = true;
            continue;
        }
        const bool off = sp_find(keys, k, j) == SP_NONE;
        sp_push(st, (double)x, off, ce, it);
    }
    SpMerge merge;
    merge.it = it;
    st = g.reduce(st, merge);
    if (g.any(bad)) {
        fill_row(g, gs, c, f_nan());
        if (g.rank == 0) row_loss[row] = f_nan();
        return;  // the whole block
    }
    const double lnz = log(st.z);
    // log of the student's mass off the support (-inf where there is none).
    const double lp_off = st.mo == sp_neg_inf() ? sp_neg_inf() : (st.mo - st.m) * it + log(st.zt) - lnz;

    // 4. The support's events, then the off-support ones.
    DArr<2> fg = SumDArr<2>().identity();  // sum f, sum G
    for (u32 i = g.rank; i < k; i += g.size()) {
        if ((u32)(keys[i] >> 32) == SP_NONE) continue;
        const double lp = (sv[i] - st.m) * it - lnz;
        const double lq = (vq[i] - vmax) * it - lse + l1m;
        double f, gg;
        sp_event(div, beta, lq, lp, f, gg);
        gq[i] = gg;
        fg.v[0] += f;
        fg.v[1] += gg;
    }
    // Uniform: each off-support class is an event of its own with Q = m / (C - k).
    const double lq_off = uniform ? log(m / (double)(c - k)) : sp_neg_inf();
    if (uniform) {
        for (u32 j = g.rank; j < c; j += g.size()) {
            if (sp_find(keys, k, j) != SP_NONE) continue;
            const double lp = ((double)s[j] - st.m) * it - lnz;
            double f, gg;
            sp_event(div, beta, lq_off, lp, f, gg);
            fg.v[0] += f;
            fg.v[1] += gg;
        }
    }
    fg = g.reduce(fg, SumDArr<2>());
    double d_sum = fg.v[0], g_sum = fg.v[1];
    double g_tail = 0.0;
    if (bucket) {
        // The tail event: Q = m against P_tail.
        double f;
        sp_event(div, beta, log(m), lp_off, f, g_tail);
        d_sum += f;
        g_sum += g_tail;
    } else if (!uniform && lp_off != sp_neg_inf()) {
        // Renormalize (Q = 0 off the support): each class's f and G are p_j times a constant, so
        // their sums are the event's terms at P_off.
        double f, gg;
        sp_event(div, beta, sp_neg_inf(), lp_off, f, gg);
        d_sum += f;
        g_sum += gg;
    }
    // Cross-entropy at T = 1 with label smoothing: (1 - eps)(lse1 - s_y) + eps (lse1 - mean s).
    const double lse1 = st.m + log(st.z1);
    double ce_loss = 0.0;
    if (ce) ce_loss = (1.0 - eps) * (lse1 - sy) + eps * (lse1 - st.sum / (double)c);
    if (g.rank == 0) row_loss[row] = (float)((ce ? alpha * ce_loss : 0.0) + (1.0 - alpha) * t * t * d_sum);

    // 5. The gradient, each element written once.
    if (gs == 0) return;
    double kk = (double)grad_scale;
    if (reduction == 0u) kk *= count[0] == 0u ? 0.0 : 1.0 / (double)count[0];
    const double kd = kk * (1.0 - alpha) * t, kc = kk * alpha, smooth = eps / (double)c;
    for (u32 j = g.rank; j < c; j += g.size()) {
        const double x = (double)s[j];
        const double lp = (x - st.m) * it - lnz;
        const u32 slot = sp_find(keys, k, j);
        double own;
        if (slot != SP_NONE) {
            own = gq[slot];
        } else if (bucket) {
            own = exp(lp - lp_off) * g_tail;  // (p_j / P_tail) G_tail, p_j <= P_tail
        } else {
            double f;
            sp_event(div, beta, lq_off, lp, f, own);
        }
        double gv = kd * (own - exp(lp) * g_sum);
        if (ce) gv += kc * (exp(x - lse1) - smooth - (j == (u32)y ? 1.0 - eps : 0.0));
        gs[j] = (float)gv;
    }
}
