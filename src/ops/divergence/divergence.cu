// Soft-target divergences (docs/LOSSES.md section 2; CPU reference src/ops/divergence/):
// forward KL, reverse KL and JSD(beta), the teacher given as logits, probabilities or
// log-probabilities, with optional labels masking rows, the student's gradient (optionally in place
// over the student) and the teacher's gradient (teacher logits only).
//
// Notation per row: x^s_j = (s_j - m_s)/T and x^t_j = (t_j - m_t)/T (differences taken BEFORE
// dividing by T: exact enough for |logits| ~ 1e4 and T ~ 0.05), Z_s = sum_j exp(x^s_j),
// log p_j = x^s_j - log Z_s, and for teacher logits log q_j = x^t_j - log Z_t. For a teacher given
// as probabilities q_j = t_j, log q_j = log t_j; as log-probabilities log q_j = t_j (T applies to
// the student only).
//
// Pass 1 (one read of s and t): online softmax of both rows plus the divergence itself, online:
//   forward KL, logits:  B = sum_j e^t_j ((t_j - m_t) - (s_j - m_s))/T, e^t_j = exp(x^t_j), rescaled
//                        like Z_t whenever m_t or m_s grows;  KL = B/Z_t + log(Z_s/Z_t).
//                        (B/Z_t is the q-weighted mean of x^t - x^s: no large cancellation.)
//                        log(Z_s/Z_t) = log1p(dZ/Z_t) with dZ = Z_s - Z_t accumulated element by
//                        element as e^t_j expm1(x^s_j - x^t_j): when p ~ q (T = 100, small logits)
//                        KL is second order in x^s - x^t, and log Z_s - log Z_t would lose it.
//   reverse KL, logits:  the same with the roles swapped: RKL = B'/Z_s - log(Z_s/Z_t).
//   forward KL, given:   K = sum_{q_j != 0} q_j (log q_j - x^s_j), Q = sum q_j (KL = K + Q log Z_s).
//   reverse KL, given:   B' = sum_j e^s_j (x^s_j - log q_j) (RKL = B'/Z_s - log Z_s).
//   Teacher logits, refined pass (where d <= 1e-2 or d <= 0.05 (|center| + |lr|): p ~ q, large T
//   or a student close to its teacher): KL is second order in delta = x^s - x^t while B/Z_t and
//   log(Z_s/Z_t) are first order, so their f32 roundings would dominate. A second pass sums in f64,
//   with delta from f64 differences of the raw logits and y = +-delta - a around a = -center:
//   Z = sum w, E = sum w y, W = sum w (e^y - 1 - y) (w = e^t for KL, e^s for RKL):
//   D = (log1p(u) - u) + W/Z with u = (E + W)/Z, and log(Z_s/Z_t) = +-(a + log1p(u)).
//   Given teacher, anchored pass: K + Q log Z_s cancels to second order when p ~ q (a teacher's
//   soft targets at T = 100), and log Z_s itself carries an f32 rounding of that size. So a second
//   pass, in f64 per element (log q of an f32 probability and q of an f32 log-probability carry an
//   f32 rounding that is first order there), takes x_j = x^s_j - log q_j - a around an anchor a
//   (-K/Q, or B'/Z_s for reverse KL) and sums Q, W = sum q expm1(x), S = sum q e^x = sum e^(x^s - a),
//   E = sum q x, V = sum q x e^x, R = sum_{q=0} e^(x^s - a): KL = Q log(S + R) - E,
//   RKL = V/S - log S, log Z_s = a + log(S + R), each log as log1p((Q - 1) + W (+ R)) near 1; the
//   first-order terms cancel in f64. (|a| > 64: the divergence is large; the plain forms above.)
//   JSD: only the softmax statistics (and dZ); pass 2 sums KL(q||M), KL(p||M) (the gradients'
//        centers) and the divergence as sum_j c_j, c_j = beta q_j log(q_j/M_j) + (1-beta) p_j
//        log(p_j/M_j) >= 0, each term from dl = log p_j - log q_j without cancellation (a series
//        where |dl| < 0.1, jsd_logs elsewhere).
// Gradient pass (last): with k = grad_scale * (1/N_valid for batchmean, else 1) * T, the factor
// read on the device from the count written by `count_valid` (reduce.cu), dl = log p_j - log q_j
// (f64 differences, as above):
//   forward KL: ds_j = k (p_j - q_j) = k q_j expm1(dl) where |dl| < 1/2,
//               dt_j = k q_j (x^t_j - x^s_j - B/Z_t)   [= k q (log q - log p - KL)]
//   reverse KL: ds_j = k p_j (x^s_j - x^t_j - B'/Z_s) [= k p (log p - log q - RKL)],
//               dt_j = k (q_j - p_j) = k p_j expm1(-dl) where |dl| < 1/2
//   JSD:        ds_j = k (1-beta) p_j (log p_j - log M_j - KL(p||M)),
//               dt_j = k beta q_j (log q_j - log M_j - KL(q||M))  (both centered as in jsd_logs)
// (terms with q_j = 0 are 0, as in the reference). Row loss = T^2 D_r.
//
// Teachers with zeros (docs/LOSSES.md section 2): a given probability 0 or log-probability -inf is
// valid input. Forward KL: the term is 0, the student gradient k p_j. JSD: finite (M_j = (1-beta)
// p_j there). Reverse KL: `teacher_eps` > 0 floors the teacher inside the log, log max(q_j, eps)
// (the floored q enters everything reverse KL computes); without a floor a zero q_j makes the row
// loss +inf and its student gradient NaN (the host API and the CPU backends return an Err).
//
// Rows: a label equal to ignore_index masks the row (row loss 0, gradients 0); any other label
// outside 0..C gives a NaN row (loss and gradients); a NaN or infinity in s, a NaN or +inf in t
// (or -inf in teacher logits or probabilities) gives a NaN row.
//
// In place: grad_s may equal s (and grad_t may equal t). Every pass before the last only reads;
// the last reads s_j and t_j and then writes index j, from the same thread. So none of the
// row pointers is __restrict__.
//
// Launch (src/backend/cuda/, `row_launch`): `divergence_warp` with 256 threads = 8 rows per
// block, ceil(N/8) blocks, when C <= 1024; `divergence_block` with one block (128..1024 threads)
// per row otherwise; preceded by count_valid and followed by reduce_rows.
//
// (Over 600 lines on purpose: three divergences times three teacher forms share one two-pass row
// kernel and its merge rules; split per divergence, each file would repeat the passes.)

#define DIV_FKL 0
#define DIV_RKL 1
#define DIV_JSD 2
#define TEACH_LOGITS 0
#define TEACH_PROBS 1
#define TEACH_LOGPROBS 2

// Pass-1 state. For a given (probs / log-probs) teacher m_t is unused and z_t holds Q (forward KL).
struct DivState {
    float ms, zs;  // student: running max of s, sum exp((s - ms)/T)
    float mt, zt;  // teacher logits: running max of t, sum exp((t - mt)/T)
    float acc;     // the online divergence accumulator (B, B', K above); 0 for JSD
    float dz;      // teacher logits: Z_s - Z_t, accumulated without cancellation
};

__device__ __forceinline__ DivState div_empty() {
    DivState st;
    st.ms = f_neg_inf();
    st.zs = 0.f;
    st.mt = f_neg_inf();
    st.zt = 0.f;
    st.acc = 0.f;
    st.dz = 0.f;
    return st;
}

template <int TEACH>
__device__ __forceinline__ float given_log_q(float t) {
    return TEACH == TEACH_PROBS ? logf(t) : t;
}

template <int TEACH>
__device__ __forceinline__ float given_q(float t) {
    return TEACH == TEACH_PROBS ? t : expf(t);
}

// The teacher's log q_j as the divergence uses it: reverse KL with a floor eps > 0 takes
// log max(q_j, eps) = max(log q_j, log eps) (a negative probability, log NaN, is floored to eps, as
// f64::max in the reference); otherwise log q_j (-inf for q_j = 0).
template <int DIV, int TEACH>
__device__ __forceinline__ float teacher_log_q(float t, float eps, float log_eps) {
    const float lq = given_log_q<TEACH>(t);
    return (DIV == DIV_RKL && eps > 0.f) ? fmaxf(lq, log_eps) : lq;
}

// The matching q_j (floored likewise), given its log lq = teacher_log_q(t).
template <int DIV, int TEACH>
__device__ __forceinline__ float teacher_q(float t, float lq, float eps) {
    if (TEACH == TEACH_PROBS) return (DIV == DIV_RKL && eps > 0.f) ? fmaxf(t, eps) : t;
    return expf(lq);
}

// Adds one valid pair (s_j, t_j) to the state (s_j finite; t_j finite, or -inf for log-probs).
// eps, log_eps: reverse KL's teacher floor (eps 0: none).
template <int DIV, int TEACH>
__device__ __forceinline__ void div_push(DivState& st, float s, float t, float it, float eps, float log_eps) {
    if (TEACH == TEACH_LOGITS) {
        if (s > st.ms || t > st.mt) {
            const float ms = fmaxf(st.ms, s);
            const float mt = fmaxf(st.mt, t);
            if (st.ms != f_neg_inf()) {  // not the first element: rescale to the new maxima
                const float ds = st.ms - ms;  // <= 0
                const float dt = st.mt - mt;  // <= 0
                const float rs = expf(ds * it);
                const float rt = expf(dt * it);
                // Each term's (t_j - m_t) - (s_j - m_s) gains (dt - ds); its weight scales by rt (or rs).
                if (DIV == DIV_FKL) st.acc = rt * (st.acc + st.zt * ((dt - ds) * it));
                if (DIV == DIV_RKL) st.acc = rs * (st.acc + st.zs * ((ds - dt) * it));
                // dZ' = rs Z_s - rt Z_t = rt dZ + (rs - rt) Z_s.
                st.dz = rt * st.dz + rescale_gap(rs, rt, ds, dt, it) * st.zs;
                st.zs *= rs;
                st.zt *= rt;
            }
            st.ms = ms;
            st.mt = mt;
        }
        const float xs = (s - st.ms) * it;
        const float xt = (t - st.mt) * it;
        const float es = expf(xs);
        const float et = expf(xt);
        st.zs += es;
        st.zt += et;
        st.dz += exp_gap(xs, xt, es, et);
        if (DIV == DIV_FKL) st.acc += et * (xt - xs);
        if (DIV == DIV_RKL) st.acc += es * (xs - xt);
    } else {
        if (s > st.ms) {
            if (st.ms != f_neg_inf()) {
                const float ds = st.ms - s;  // < 0
                const float rs = expf(ds * it);
                // K's terms -q_j (s_j - m_s)/T gain -q_j ds/T; B''s terms scale by rs and gain ds/T.
                if (DIV != DIV_RKL) st.acc -= st.zt * (ds * it);
                if (DIV == DIV_RKL) st.acc = rs * (st.acc + st.zs * (ds * it));
                st.zs *= rs;
            }
            st.ms = s;
        }
        const float xs = (s - st.ms) * it;
        const float es = expf(xs);
        st.zs += es;
        if (DIV != DIV_RKL) {  // forward KL and JSD: K and Q (JSD: for the anchor below)
            const float q = given_q<TEACH>(t);
            if (q != 0.f) {  // 0 log 0 = 0
                st.zt += q;
                st.acc += q * (given_log_q<TEACH>(t) - xs);
            }
        }
        if (DIV == DIV_RKL && es != 0.f) {
            const float lq = teacher_log_q<DIV, TEACH>(t, eps, log_eps);
            if (lq != f_neg_inf()) st.acc += es * (xs - lq);  // q = 0: the row is +inf (divergence_row)
        }
    }
}

// Merges two pass-1 states (symmetric in a and b; an empty state has ms = -inf).
template <int DIV, int TEACH>
struct DivMerge {
    float inv_t;
    __device__ __forceinline__ DivState identity() const { return div_empty(); }
    __device__ __forceinline__ DivState operator()(DivState a, DivState b) const {
        if (b.ms == f_neg_inf()) return a;
        if (a.ms == f_neg_inf()) return b;
        const float it = inv_t;
        DivState r;
        r.ms = fmaxf(a.ms, b.ms);
        const float das = a.ms - r.ms;
        const float dbs = b.ms - r.ms;
        const float ras = expf(das * it);
        const float rbs = expf(dbs * it);
        r.zs = a.zs * ras + b.zs * rbs;
        if (TEACH == TEACH_LOGITS) {
            r.mt = fmaxf(a.mt, b.mt);
            const float dat = a.mt - r.mt;
            const float dbt = b.mt - r.mt;
            const float rat = expf(dat * it);
            const float rbt = expf(dbt * it);
            r.zt = a.zt * rat + b.zt * rbt;
            r.dz = (rat * a.dz + rescale_gap(ras, rat, das, dat, it) * a.zs) +
                   (rbt * b.dz + rescale_gap(rbs, rbt, dbs, dbt, it) * b.zs);
            if (DIV == DIV_FKL) {
                r.acc = rat * (a.acc + a.zt * ((dat - das) * it)) + rbt * (b.acc + b.zt * ((dbt - dbs) * it));
            } else if (DIV == DIV_RKL) {
                r.acc = ras * (a.acc + a.zs * ((das - dat) * it)) + rbs * (b.acc + b.zs * ((dbs - dbt) * it));
            } else {
                r.acc = 0.f;
            }
        } else {
            r.mt = a.mt;
            r.zt = a.zt + b.zt;
            r.dz = 0.f;
            if (DIV == DIV_RKL) {
                r.acc = ras * (a.acc + a.zs * (das * it)) + rbs * (b.acc + b.zs * (dbs * it));
            } else {
                r.acc = (a.acc - a.zt * (das * it)) + (b.acc - b.zt * (dbs * it));
            }
        }
        return r;
    }
};

// Per-launch constants.
struct DivArgs {
    float inv_t;  // 1/T
    float temp;   // T
    float beta;   // JSD's beta
    float k;      // grad_scale * reduction factor * T
    double inv_t_d;  // 1/T in f64 (the f64 paths: f32(1/T) is off by up to 3e-8 relative)
    float eps;    // reverse KL, given teacher: the floor on q inside the log (0: none)
    float log_eps;  // log eps (-inf when eps = 0)
};

// Teacher logits: x^s_j - x^t_j in f64 (logit_delta, common.cuh).
__device__ __forceinline__ double logit_delta_d(float s, float t, const DivState& st, double it) {
    return logit_delta(s, st.ms, t, st.mt, it);
}

// Given teacher, in f64: x^s_j, log q_j and q_j (floored as teacher_log_q / teacher_q: the
// reference's f64 log and exp of the f32 input), and x^s_j - log q_j.
__device__ __forceinline__ double given_xs_d(float s, const DivState& st, double it) {
    return ((double)s - (double)st.ms) * it;
}

template <int DIV, int TEACH>
__device__ __forceinline__ double teacher_log_q_d(float t, const DivArgs& a);

template <int DIV, int TEACH>
__device__ __forceinline__ double teacher_q_d(float t, double lq, const DivArgs& a);

template <int DIV, int TEACH>
__device__ __forceinline__ double given_ratio_d(float s, float t, const DivState& st, const DivArgs& a) {
    return given_xs_d(s, st, a.inv_t_d) - teacher_log_q_d<DIV, TEACH>(t, a);
}

template <int DIV, int TEACH>
__device__ __forceinline__ double teacher_log_q_d(float t, const DivArgs& a) {
    double lq = TEACH == TEACH_PROBS ? log((double)t) : (double)t;  // log 0 = -inf, log(<0) = NaN
    if (DIV == DIV_RKL && a.eps > 0.f) lq = fmax(lq, log((double)a.eps));  // fmax(NaN, x) = x
    return lq;
}

template <int DIV, int TEACH>
__device__ __forceinline__ double teacher_q_d(float t, double lq, const DivArgs& a) {
    if (TEACH == TEACH_PROBS) return (DIV == DIV_RKL && a.eps > 0.f) ? fmax((double)t, (double)a.eps) : (double)t;
    return exp(lq);
}

// log p_j, p_j, log q_j, q_j of one element, from the final statistics (q floored as the divergence
// uses it: teacher_log_q).
template <int DIV, int TEACH>
__device__ __forceinline__ void div_probs(float s, float t, const DivState& st, float log_zs, float log_zt, float it,
                                          const DivArgs& a, float& xs, float& lp, float& p, float& xt, float& lq,
                                          float& q) {
    xs = (s - st.ms) * it;
    lp = xs - log_zs;
    p = expf(lp);
    if (TEACH == TEACH_LOGITS) {
        xt = (t - st.mt) * it;
        lq = xt - log_zt;
        q = expf(lq);
    } else {
        xt = 0.f;
        lq = teacher_log_q<DIV, TEACH>(t, a.eps, a.log_eps);
        q = teacher_q<DIV, TEACH>(t, lq, a.eps);
    }
}

// log(1 + e^z) without overflow (softplus(-inf) = 0, softplus(+inf) = +inf).
__device__ __forceinline__ float softplus(float z) {
    return z > 0.f ? z + log1pf(expf(-z)) : log1pf(expf(z));
}

// JSD's per-element logs, from dl = log p_j - log q_j (accurate for teacher logits):
//   lq_m = log q_j - log M_j,  lp_m = log p_j - log M_j,
//   aq = lq_m + log beta,      ap = lp_m + log(1-beta).
// With rho = beta/(1-beta): M_j = beta q_j (1 + e^(dl - log rho)) = (1-beta) p_j (1 + e^(log rho - dl))
//   = q_j (1 + (1-beta) expm1(dl)) = p_j (1 + beta expm1(-dl)), so
//   aq = -softplus(dl - log rho), ap = -softplus(log rho - dl)   (no cancellation anywhere: ap -> 0
//   where p >> q, aq -> 0 where q >> p), and
//   lq_m = -log1p((1-beta) expm1(dl)), lp_m = -log1p(beta expm1(-dl))   (no cancellation while the
//   log1p argument is >= -1/2, i.e. M >= q/2 (M >= p/2): there lq_m (lp_m) may be tiny, as where
//   p ~ q, or where beta -> 1 (beta -> 0) makes M ~ q (M ~ p), and must not come from a difference
//   of O(1) terms); below that |lq_m| >= log 2 and aq - log beta (ap - log(1-beta)) is exact enough.
// The gradients use ap - sum_i p_i ap_i or lp_m - KL(p||M) (equal since sum p = 1), whichever row
// mean is smaller, which keeps the tiny gradient of elements where p >> q or M ~ p.
struct JsdLogs {
    float lq_m, lp_m, aq, ap;
};

__device__ __forceinline__ JsdLogs jsd_logs(float dl, float log_beta, float log_1m_beta, float beta, float one_m_beta) {
    JsdLogs r;
    const float log_rho = log_beta - log_1m_beta;
    r.aq = -softplus(dl - log_rho);  // q = 0 (dl = +inf): -inf
    r.ap = -softplus(log_rho - dl);  // q = 0: 0
    const float arg_q = one_m_beta * expm1f(dl);
    const float arg_p = beta * expm1f(-dl);
    r.lq_m = (arg_q >= -0.5f && arg_q <= 3.0e38f) ? -log1pf(arg_q) : r.aq - log_beta;
    r.lp_m = (arg_p >= -0.5f && arg_p <= 3.0e38f) ? -log1pf(arg_p) : r.ap - log_1m_beta;
    return r;
}

// One row: s, t, gs, gt point at the row (gs / gt null when not wanted; gt only for logits).
template <class G, int DIV, int TEACH>
__device__ void divergence_row(const G& g, RowIn s, RowIn t, RowOut gs, RowOut gt, float* row_loss,
                               bool bad_label, const DivArgs& a, u32 c) {
    const float it = a.inv_t;
    // Pass 1.
    DivState st = div_empty();
    bool bad = bad_label;
    bool zero = false;  // reverse KL from a given teacher without a floor: some q_j = 0
    if (!bad_label) {  // the same for the whole group
        for (u32 j = g.rank; j < c; j += g.size()) {
            const float sj = s[j];
            const float tj = t[j];
            // A log-probability -inf is a probability 0: valid (as a probability 0 is).
            const bool t_ok = is_finite_f(tj) || (TEACH == TEACH_LOGPROBS && tj == f_neg_inf());
            if (is_finite_f(sj) && t_ok) {
                if (DIV == DIV_RKL && TEACH != TEACH_LOGITS &&
                    teacher_log_q<DIV, TEACH>(tj, a.eps, a.log_eps) == f_neg_inf()) {
                    zero = true;
                }
                div_push<DIV, TEACH>(st, sj, tj, it, a.eps, a.log_eps);
            } else {
                bad = true;
            }
        }
    }
    DivMerge<DIV, TEACH> merge;
    merge.inv_t = it;
    st = g.reduce(st, merge);
    if (g.any(bad)) {
        fill_row(g, gs, c, f_nan());
        fill_row(g, gt, c, f_nan());
        if (g.rank == 0) row_loss[0] = f_nan();
        return;
    }
    if (DIV == DIV_RKL && TEACH != TEACH_LOGITS && g.any(zero)) {
        // sum_j p_j (log p_j - log q_j) with q_j = 0 < p_j: +inf, and the gradient NaN (docs/LOSSES.md
        // section 2; the host API and the CPU backends reject this input, teacher_eps floors it).
        fill_row(g, gs, c, f_nan());
        if (g.rank == 0) row_loss[0] = f_inf();
        return;
    }
    const float log_zs = logf(st.zs);
    const float log_zt = TEACH == TEACH_LOGITS ? logf(st.zt) : 0.f;
    const float lr = TEACH == TEACH_LOGITS ? log_ratio(st.zs, st.zt, st.dz) : 0.f;  // log(Z_s/Z_t)
    float d = 0.f;       // the divergence D_r
    float center = 0.f;  // KL / RKL: the weighted mean of the log-ratio in shifted units
    float uq = 0.f;      // JSD: sum_j q_j aq_j (KL(q||M) + log beta)
    float up = 0.f;      // JSD: sum_j p_j ap_j (KL(p||M) + log(1-beta))
    float kl_q = 0.f;    // JSD: KL(q||M)
    float kl_p = 0.f;    // JSD: KL(p||M)
    const float log_beta = logf(a.beta);
    const float log_1m_beta = log1pf(-a.beta);
    const float one_m_beta = 1.f - a.beta;
    // Given teacher: the anchored pass (file header) for the loss, in f64 per element (log q of a
    // given f32 probability, and q of a given log-probability, carry an f32 rounding that is first
    // order where p ~ q), and the shift that gives the gradients' dl = log p - log q.
    float anchor = 0.f;     // a: E_q[x^s - log q] (forward KL, JSD) or E_p[x^s - log q] (reverse KL)
    double dl_shift = 0.0;  // dl = (x^s - log q) - dl_shift  (= a + log(S + R) = log Z_s)
    double rkl_shift = 0.0; // reverse KL: log p - log q - RKL = (x^s - log q) - rkl_shift (= a + V/S)
    double q_m1 = 0.0;      // sum_j q_j - 1 (f64, without the rounding of Q near 1)
    bool anchored = false;  // false: |a| > 64; the plain forms
    if (TEACH != TEACH_LOGITS) {
        anchor = DIV == DIV_RKL ? st.acc / st.zs : (st.zt > 0.f ? -st.acc / st.zt : 0.f);
        // |a| > 64: the divergence is large (a = log Z_s - KL, or log Z_s + RKL, 0 <= log Z_s <= ln C),
        // the weights e^(x^s - a) may all underflow, and the plain forms have no cancellation.
        anchored = fabsf(anchor) <= 64.f;  // (NaN: not; the plain forms carry the NaN)
        dl_shift = (double)log_zs;
        rkl_shift = (double)(st.acc / st.zs);
        q_m1 = (double)st.zt - 1.0;
    }
    if (TEACH != TEACH_LOGITS && anchored) {  // the same for the whole group
        // With x = x^s - log q - a and y = x^s - a = log(q e^x), in f64: Q = sum q, W = sum q expm1(x),
        // E = sum q x, V = sum x q e^x, R = sum_{q=0} e^y, S = sum q e^x = Q + W. Q - 1 is summed as
        // (n_big - 1) + sum_{q > 1/2} (q - 1) + sum_{q <= 1/2} q (v[0], v[6]: n_big): a teacher
        // probability within 1e-16 of 1 keeps its q - 1 = expm1(log q) (Q itself would round it).
        const double anc = (double)anchor;
        DArr<7> w = SumDArr<7>().identity();
        for (u32 j = g.rank; j < c; j += g.size()) {
            const double xs = given_xs_d(s[j], st, a.inv_t_d);
            const float tj = t[j];
            const double lq = teacher_log_q_d<DIV, TEACH>(tj, a);
            const double y = xs - anc;
            if (lq == -(double)f_inf()) {  // q = 0 exactly (not reverse KL: that row returned above)
                w.v[4] += exp(y);
            } else if (lq != lq) {
                w.v[0] += (double)f_nan();  // a negative probability: NaN, as the reference
            } else {
                const double q = teacher_q_d<DIV, TEACH>(tj, lq, a);
                const bool big = lq > -0.6931471805599453;  // q > 1/2: q - 1 exactly (probs) or by expm1
                const double qm1 = TEACH == TEACH_PROBS ? q - 1.0 : expm1(lq);
                const double x = y - lq;
                // q e^x = e^y (y <= 64: finite; also where q is below the f64 normal range), and
                // q (e^x - 1) through expm1 where it is small (q + q expm1(x) would lose q e^x
                // where x << 0, e^y - q would cancel where x ~ 0).
                const double qex = exp(y);
                const double wx = fabs(x) < 0.5 ? q * expm1(x) : qex - q;
                w.v[0] += big ? qm1 : q;
                w.v[6] += big ? 1.0 : 0.0;
                w.v[1] += wx;
                w.v[2] += q * x;
                w.v[3] += x * qex;
                w.v[5] += qex;
            }
        }
        w = g.reduce(w, SumDArr<7>());
        q_m1 = w.v[0] + (w.v[6] - 1.0);
        const double qs = 1.0 + q_m1;
        // log(S + R) = log1p((Q - 1) + W + R) near S + R = 1 (no cancellation), else log(S + R)
        // (far below 1 the difference from 1 would cancel).
        const double gap = q_m1 + w.v[1] + w.v[4];
        const double log_sr = fabs(gap) < 0.5 ? log1p(gap) : log(w.v[5] + w.v[4]);
        if (DIV == DIV_FKL) {
            // KL = Q log(S + R) - E: the first-order terms cancel in f64.
            d = (float)(qs * log_sr - w.v[2]);
        } else if (DIV == DIV_RKL) {
            // RKL = V/S - log S (R = 0: a zero q returned above).
            const double vs = w.v[3] / w.v[5];
            d = (float)(vs - log_sr);
            rkl_shift = anc + vs;
        }
        dl_shift = anc + log_sr;  // log Z_s
    }
    float lr_g = lr;  // teacher logits: log(Z_s/Z_t) for the gradients (refined below)
    if (DIV == DIV_FKL) {
        if (TEACH == TEACH_LOGITS) {
            center = st.acc / st.zt;
            d = center + lr;
        } else if (!anchored) {
            d = st.acc + st.zt * log_zs;  // KL is large here: no cancellation to fear
        }
    } else if (DIV == DIV_RKL) {
        center = st.acc / st.zs;
        if (TEACH == TEACH_LOGITS) {
            d = center - lr;
        } else if (!anchored) {
            d = center - log_zs;
        }
    }
    // Teacher logits, p ~ q (large T, or a student close to its teacher): the divergence is second
    // order while center and lr are first order, so their f32 roundings would dominate d: the
    // refined pass in f64 (refine_kl_row, common.cuh) takes d, lr and center again.
    if (TEACH == TEACH_LOGITS && DIV != DIV_JSD && kl_needs_refining(d, center, lr)) {
        refine_kl_row(g, s, t, c, st.ms, st.mt, it, a.inv_t_d, DIV == DIV_FKL, d, lr_g, center);
    }
    if (DIV == DIV_JSD) {
        // Pass 2 (JSD): KL(q||M), KL(p||M) and their shifted forms (jsd_logs) for the gradients, and
        // the divergence as a sum of its per-element terms
        //   c_j = beta q_j log(q_j/M_j) + (1-beta) p_j log(p_j/M_j) >= 0   (log-sum inequality),
        // each accurate on its own, so the f32 sum has no cancellation: where p ~ q the two halves
        // are first order in dl and cancel to second order (KL(q||M) and KL(p||M) summed separately
        // would keep only their rounding). With p_j = q_j e^dl, c_j = q_j f(dl),
        //   f(x) = beta (1-beta) (x^2/2 + (1+beta) x^3/6 + (2 beta^2+1) x^4/24
        //          + (3 beta+1)(2 beta^2 - 2 beta + 1) x^5/120 + (24 beta^4 - 30 beta^3 + 10 beta^2 + 1) x^6/720 + ...),
        // taken from this series where |dl| < 0.1 (truncation < 3e-8 relative), from the jsd_logs
        // terms elsewhere (their cancellation costs at most ~2/|dl| f32 roundings).
        const float bb = a.beta;
        const float f_c2 = 0.5f * bb * one_m_beta;
        const float f_c3 = (1.f + bb) * (1.f / 6.f);
        const float f_c4 = (2.f * bb * bb + 1.f) * (1.f / 24.f);
        const float f_c5 = (3.f * bb + 1.f) * (2.f * bb * bb - 2.f * bb + 1.f) * (1.f / 120.f);
        const float f_c6 = (((24.f * bb - 30.f) * bb + 10.f) * bb * bb + 1.f) * (1.f / 720.f);
        FArr<5> kl = SumFArr<5>().identity();  // KL(q||M), KL(p||M), sum q aq, sum p ap, sum c
        for (u32 j = g.rank; j < c; j += g.size()) {
            float xs, lp, p, xt, lq, q;
            div_probs<DIV, TEACH>(s[j], t[j], st, log_zs, log_zt, it, a, xs, lp, p, xt, lq, q);
            const float dl = TEACH == TEACH_LOGITS ? (float)logit_delta_d(s[j], t[j], st, a.inv_t_d) - lr
                                                   : (float)(given_ratio_d<DIV, TEACH>(s[j], t[j], st, a) - dl_shift);
            const JsdLogs l = jsd_logs(dl, log_beta, log_1m_beta, a.beta, one_m_beta);
            if (q != 0.f) {  // 0 log 0 = 0
                kl.v[0] += q * l.lq_m;
                kl.v[2] += q * l.aq;
            }
            if (p != 0.f) {
                kl.v[1] += p * l.lp_m;
                kl.v[3] += p * l.ap;
            }
            if (fabsf(dl) < 0.1f && q != 0.f) {
                const float x = dl;
                kl.v[4] += q * (f_c2 * x * x * (1.f + 2.f * x * (f_c3 + x * (f_c4 + x * (f_c5 + x * f_c6)))));
            } else {
                kl.v[4] += (q != 0.f ? a.beta * (q * l.lq_m) : 0.f) + (p != 0.f ? one_m_beta * (p * l.lp_m) : 0.f);
            }
        }
        kl = g.reduce(kl, SumFArr<5>());
        kl_q = kl.v[0];
        kl_p = kl.v[1];
        uq = kl.v[2];
        up = kl.v[3];
        d = kl.v[4];
    }
    // Gradient pass: read index j, then write index j (in-place safe). The element holding the
    // unique max of s (of t) is rewritten at the end from the others (ComplementTracker, common.cuh).
    if (gs != 0 || gt != 0) {
        const float k = a.k;
        ComplementTracker cs = complement_start();
        ComplementTracker ct = complement_start();
        for (u32 j = g.rank; j < c; j += g.size()) {
            const float sj = s[j];
            const float tj = t[j];
            float xs, lp, p, xt, lq, q;
            div_probs<DIV, TEACH>(sj, tj, st, log_zs, log_zt, it, a, xs, lp, p, xt, lq, q);
            // delta = x^s - x^t (teacher logits); dl = log p - log q, accurate where p ~ q: the
            // gradients p - q = q expm1(dl) and q - p = p expm1(-dl) are taken from it there (gap_pq,
            // common.cuh: the difference of the two f32 probabilities would keep only their rounding).
            const float delta = TEACH == TEACH_LOGITS ? (float)logit_delta_d(sj, tj, st, a.inv_t_d) : 0.f;
            const double ratio = TEACH == TEACH_LOGITS ? 0.0 : given_ratio_d<DIV, TEACH>(sj, tj, st, a);
            const float dl = TEACH == TEACH_LOGITS ? delta - lr_g : (float)(ratio - dl_shift);
            float dsj, dtj;
            if (DIV == DIV_FKL) {
                dsj = k * gap_pq(q, p, dl);
                dtj = q == 0.f ? 0.f : k * q * (-delta - center);
            } else if (DIV == DIV_RKL) {
                // log p - log q - RKL: delta - B'/Z_s (refined), or from a given teacher
                // (x^s - log q) - (a + V/S) (anchored; else - B'/Z_s).
                const float rel = TEACH == TEACH_LOGITS ? delta - center : (float)(ratio - rkl_shift);
                dsj = k * p * rel;
                dtj = k * gap_pq(p, q, -dl);
            } else {
                const JsdLogs l = jsd_logs(dl, log_beta, log_1m_beta, a.beta, one_m_beta);
                // lp_m - KL(p||M) = ap - sum p ap (sum p = 1), likewise for q (teacher logits):
                // centered in whichever form has the smaller row mean (ap ~ 0 where p >> q,
                // lp_m ~ 0 where p ~ q), so that the f32 subtraction keeps the small difference.
                const float cp = fabsf(up) < fabsf(kl_p) ? l.ap - up : l.lp_m - kl_p;
                const float cq = fabsf(uq) < fabsf(kl_q) ? l.aq - uq : l.lq_m - kl_q;
                dsj = k * one_m_beta * p * cp;
                dtj = q == 0.f ? 0.f : k * a.beta * q * cq;
            }
            if (gs != 0) gs[j] = dsj;
            if (TEACH == TEACH_LOGITS && gt != 0) gt[j] = dtj;
            complement_add(cs, j, sj == st.ms, dsj, p);
            if (TEACH == TEACH_LOGITS) complement_add(ct, j, tj == st.mt, dtj, q);
        }
        FArr<6> sums;
        sums.v[0] = cs.rest;
        sums.v[1] = cs.mass;
        sums.v[2] = cs.ties;
        sums.v[3] = ct.rest;
        sums.v[4] = ct.mass;
        sums.v[5] = ct.ties;
        sums = g.reduce(sums, SumFArr<6>());
        // The student's gradient sums to 0, except forward KL from a given teacher: k (1 - sum q).
        const float s_total = (DIV == DIV_FKL && TEACH != TEACH_LOGITS) ? (float)(-(double)k * q_m1) : 0.f;
        if (gs != 0 && complement_applies(cs, sums.v[0], sums.v[1], sums.v[2])) gs[cs.owner] = s_total - sums.v[0];
        if (TEACH == TEACH_LOGITS && gt != 0 && complement_applies(ct, sums.v[3], sums.v[4], sums.v[5])) {
            gt[ct.owner] = -sums.v[3];
        }
    }
    if (g.rank == 0) row_loss[0] = a.temp * a.temp * d;
}

// Masking, the label check and the dispatch to the (divergence, teacher form) instantiation.
template <class G>
__device__ __forceinline__ void divergence_dispatch(const G& g, u64 row, RowIn s, RowIn t,
                                                    const int* labels, const u32* count, float* row_loss,
                                                    RowOut grad_s, RowOut grad_t, u32 c, float inv_t, float temp,
                                                    float beta, float teacher_eps, float grad_scale, int ignore_index,
                                                    u32 div, u32 teacher, u32 reduction) {
    const u64 off = row * (u64)c;
    const RowOut gs = grad_s + off;
    const RowOut gt = grad_t + off;
    bool bad_label = false;
    if (labels != 0) {
        const int y = labels[row];
        if (y == ignore_index) {  // masked: loss 0, gradients 0
            fill_row(g, gs, c, 0.f);
            fill_row(g, gt, c, 0.f);
            if (g.rank == 0) row_loss[row] = 0.f;
            return;  // the whole group (same label)
        }
        bad_label = y < 0 || (u32)y >= c;
    }
    DivArgs a;
    a.inv_t = inv_t;
    a.temp = temp;
    a.beta = beta;
    a.k = grad_scale * reduction_factor(reduction, count) * temp;
    a.inv_t_d = 1.0 / (double)temp;
    a.eps = teacher_eps;
    a.log_eps = teacher_eps > 0.f ? logf(teacher_eps) : f_neg_inf();
    const RowIn sr = s + off;
    const RowIn tr = t + off;
    float* rl = row_loss + row;
    switch (div * 3u + teacher) {
        case 0: divergence_row<G, DIV_FKL, TEACH_LOGITS>(g, sr, tr, gs, gt, rl, bad_label, a, c); break;
        case 1: divergence_row<G, DIV_FKL, TEACH_PROBS>(g, sr, tr, gs, 0, rl, bad_label, a, c); break;
        case 2: divergence_row<G, DIV_FKL, TEACH_LOGPROBS>(g, sr, tr, gs, 0, rl, bad_label, a, c); break;
        case 3: divergence_row<G, DIV_RKL, TEACH_LOGITS>(g, sr, tr, gs, gt, rl, bad_label, a, c); break;
        case 4: divergence_row<G, DIV_RKL, TEACH_PROBS>(g, sr, tr, gs, 0, rl, bad_label, a, c); break;
        case 5: divergence_row<G, DIV_RKL, TEACH_LOGPROBS>(g, sr, tr, gs, 0, rl, bad_label, a, c); break;
        case 6: divergence_row<G, DIV_JSD, TEACH_LOGITS>(g, sr, tr, gs, gt, rl, bad_label, a, c); break;
        case 7: divergence_row<G, DIV_JSD, TEACH_PROBS>(g, sr, tr, gs, 0, rl, bad_label, a, c); break;
        default: divergence_row<G, DIV_JSD, TEACH_LOGPROBS>(g, sr, tr, gs, 0, rl, bad_label, a, c); break;
    }
}

// s, t: [n, c] of dtypes dt_s, dt_t (0 f32, 1 bf16, 2 f16); labels: [n] or null; count: [1]
// (count_valid); row_loss: [n]; grad_s: [n, c] of dtype dt_gs, null, or s itself (dt_gs = dt_s);
// grad_t: [n, c] of dtype dt_gt or null (teacher logits only); div: 0 forward KL, 1 reverse KL, 2
// JSD; teacher: 0 logits, 1 probs, 2 log-probs; reduction: 0 batchmean, 1 sum, 2 none;
// teacher_eps: reverse KL's floor on a given teacher's probabilities (0: none; > 0 only with div 1
// and teacher 1 or 2, DivergenceSpec::validate).
extern "C" __global__ void divergence_warp(const void* s, const void* t, const int* labels, const u32* count,
                                           float* row_loss, void* grad_s, void* grad_t, u32 n, u32 c, float inv_t,
                                           float temp, float beta, float teacher_eps, float grad_scale,
                                           int ignore_index, u32 div, u32 teacher, u32 reduction, u32 dt_s,
                                           u32 dt_t, u32 dt_gs, u32 dt_gt) {
    const u64 row = warp_row();
    if (row >= n) return;  // the whole warp
    divergence_dispatch(warp_group(), row, row_in(s, dt_s), row_in(t, dt_t), labels, count, row_loss,
                        RowOut(grad_s, dt_gs), RowOut(grad_t, dt_gt), c, inv_t, temp, beta, teacher_eps, grad_scale,
                        ignore_index, div, teacher, reduction);
}

extern "C" __global__ void divergence_block(const void* s, const void* t, const int* labels, const u32* count,
                                            float* row_loss, void* grad_s, void* grad_t, u32 n, u32 c, float inv_t,
                                            float temp, float beta, float teacher_eps, float grad_scale,
                                            int ignore_index, u32 div, u32 teacher, u32 reduction, u32 dt_s,
                                            u32 dt_t, u32 dt_gs, u32 dt_gt) {
    const u64 row = block_linear();
    if (row >= n) return;  // the whole block
    divergence_dispatch(block_group(), row, row_in(s, dt_s), row_in(t, dt_t), labels, count, row_loss,
                        RowOut(grad_s, dt_gs), RowOut(grad_t, dt_gt), c, inv_t, temp, beta, teacher_eps, grad_scale,
                        ignore_index, div, teacher, reduction);
}
