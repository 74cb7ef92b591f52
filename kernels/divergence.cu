// Soft-target divergences (spec/LOSSES.md section 2; CPU reference src/ops/divergence.rs):
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
//   Given teacher, anchored pass: K + Q log Z_s cancels to second order when p ~ q (a teacher's
//   soft targets at T = 100), and log Z_s itself carries an f32 rounding of that size. So a second
//   pass takes x_j = x^s_j - log q_j - a around an anchor a (-K/Q, or B'/Z_s for reverse KL) and
//   sums in f64 Q, W = sum q (e^x - 1), S = sum q e^x = Q + W, E = sum q x, V = sum q x e^x,
//   R = sum_{q=0} e^(x^s - a): KL = Q log(S + R) - E, RKL = V/S - log S, and JSD's
//   log Z_s - a = log(S + R), each log taken as log1p((Q - 1) + W (+ R)) near S = 1;
//   the first-order terms cancel in f64. (Where some x > 80 the divergence is large, and the plain
//   forms above are used.)
//   JSD: only the softmax statistics (and dZ); pass 2 sums KL(q||M) and KL(p||M), the logs
//        taken from dl = log p_j - log q_j (= x^s_j - x^t_j - log(Z_s/Z_t) for teacher logits) in
//        the form without cancellation for each range of dl (jsd_logs).
// Gradient pass (last): with k = grad_scale * (1/N_valid for batchmean, else 1) * T, the factor
// read on the device from the count written by `count_valid` (reduce.cu):
//   forward KL: ds_j = k (p_j - q_j),  dt_j = k q_j (x^t_j - x^s_j - B/Z_t)   [= k q (log q - log p - KL)]
//   reverse KL: ds_j = k p_j (x^s_j - x^t_j - B'/Z_s) [= k p (log p - log q - RKL)],  dt_j = k (q_j - p_j)
//   JSD:        ds_j = k (1-beta) p_j (log p_j - log M_j - KL(p||M)),
//               dt_j = k beta q_j (log q_j - log M_j - KL(q||M))  (both centered as in jsd_logs)
// (terms with q_j = 0 are 0, as in the reference). Row loss = T^2 D_r.
//
// Rows: a label equal to ignore_index masks the row (row loss 0, gradients 0); any other label
// outside 0..C gives a NaN row (loss and gradients); a NaN or infinity in s or t gives a NaN row.
//
// In place: grad_s may equal s (and grad_t may equal t). Every pass before the last only reads;
// the last reads s_j and t_j and then writes index j, from the same thread. So none of the
// row pointers is __restrict__.
//
// Launch (src/backend/cuda.rs, `row_launch`): `divergence_warp` with 256 threads = 8 rows per
// block, ceil(N/8) blocks, when C <= 1024; `divergence_block` with one block (128..1024 threads)
// per row otherwise; preceded by count_valid and followed by reduce_rows.

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

// r_s - r_t = exp(ds/T) - exp(dt/T) (two rescale factors), without cancellation when close.
__device__ __forceinline__ float rescale_gap(float rs, float rt, float ds, float dt, float it) {
    const float e = (ds - dt) * it;
    return fabsf(e) < 0.5f ? rt * expm1f(e) : rs - rt;
}

// exp(xs) - exp(xt) of one element, without cancellation when close.
__device__ __forceinline__ float exp_gap(float xs, float xt, float es, float et) {
    const float e = xs - xt;
    return fabsf(e) < 0.5f ? et * expm1f(e) : es - et;
}

// log(Z_s / Z_t) from Z_s, Z_t and dZ = Z_s - Z_t.
__device__ __forceinline__ float log_ratio(float zs, float zt, float dz) {
    return fabsf(dz) < 0.5f * zt ? log1pf(dz / zt) : logf(zs) - logf(zt);
}

template <int TEACH>
__device__ __forceinline__ float given_log_q(float t) {
    return TEACH == TEACH_PROBS ? logf(t) : t;
}

template <int TEACH>
__device__ __forceinline__ float given_q(float t) {
    return TEACH == TEACH_PROBS ? t : expf(t);
}

// Adds one (finite) pair (s_j, t_j) to the state.
template <int DIV, int TEACH>
__device__ __forceinline__ void div_push(DivState& st, float s, float t, float it) {
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
        if (DIV == DIV_RKL && es != 0.f) st.acc += es * (xs - given_log_q<TEACH>(t));
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
};

// log p_j, p_j, log q_j, q_j of one element, from the final statistics.
template <int TEACH>
__device__ __forceinline__ void div_probs(float s, float t, const DivState& st, float log_zs, float log_zt, float it,
                                          float& xs, float& lp, float& p, float& xt, float& lq, float& q) {
    xs = (s - st.ms) * it;
    lp = xs - log_zs;
    p = expf(lp);
    if (TEACH == TEACH_LOGITS) {
        xt = (t - st.mt) * it;
        lq = xt - log_zt;
        q = expf(lq);
    } else {
        xt = 0.f;
        lq = given_log_q<TEACH>(t);
        q = given_q<TEACH>(t);
    }
}

// JSD's per-element logs, from dl = log p_j - log q_j (accurate for teacher logits) and log q_j:
//   lq_m = log q_j - log M_j,  lp_m = log p_j - log M_j,
//   aq = lq_m + log beta,      ap = lp_m + log(1-beta)
// M_j = beta q_j + (1-beta) p_j = q_j (1 + (1-beta) expm1(dl)) = beta q_j (1 + e^dl (1-beta)/beta)
//     = (1-beta) p_j (1 + e^-dl beta/(1-beta)), so each form is computed where it has no
// cancellation: ap -> 0 where p >> q and aq -> 0 where q >> p. The gradients use ap - sum_i p_i ap_i
// (= lp_m - KL(p||M) since sum p = 1), which keeps the tiny gradient of elements where p >> q.
struct JsdLogs {
    float lq_m, lp_m, aq, ap;
};

__device__ __forceinline__ JsdLogs jsd_logs(float dl, float log_beta, float log_1m_beta, float beta, float one_m_beta) {
    JsdLogs r;
    if (dl >= 1.f) {  // p >> q (also q = 0: dl = +inf)
        r.ap = -log1pf((beta / one_m_beta) * expf(-dl));
        r.lp_m = r.ap - log_1m_beta;
        r.lq_m = r.lp_m - dl;
        r.aq = r.lq_m + log_beta;
    } else if (dl <= -1.f) {  // q >> p
        r.aq = -log1pf((one_m_beta / beta) * expf(dl));
        r.lq_m = r.aq - log_beta;
        r.lp_m = dl + r.lq_m;
        r.ap = r.lp_m + log_1m_beta;
    } else {
        r.lq_m = -log1pf(one_m_beta * expm1f(dl));
        r.lp_m = dl + r.lq_m;
        r.aq = r.lq_m + log_beta;
        r.ap = r.lp_m + log_1m_beta;
    }
    return r;
}

// One row: s, t, gs, gt point at the row (gs / gt null when not wanted; gt only for logits).
template <class G, int DIV, int TEACH>
__device__ void divergence_row(const G& g, const float* s, const float* t, float* gs, float* gt, float* row_loss,
                               bool bad_label, const DivArgs& a, u32 c) {
    const float it = a.inv_t;
    // Pass 1.
    DivState st = div_empty();
    bool bad = bad_label;
    if (!bad_label) {  // the same for the whole group
        for (u32 j = g.rank; j < c; j += g.size()) {
            const float sj = s[j];
            const float tj = t[j];
            if (is_finite_f(sj) && is_finite_f(tj)) {
                div_push<DIV, TEACH>(st, sj, tj, it);
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
    // Given teacher: the anchored pass (file header) for the loss, and JSD's log Z_s.
    float anchor = 0.f;     // a: E_q[x^s - log q] (forward KL, JSD) or E_p[x^s - log q] (reverse KL)
    float log_zs_a = 0.f;   // JSD: log Z_s - a
    float q_total = 1.f;    // sum_j q_j (f64 sum, rounded)
    bool anchored = false;  // false: x^s - log q - a overflowed; fall back to the plain forms
    if (TEACH != TEACH_LOGITS) {
        anchor = DIV == DIV_RKL ? st.acc / st.zs : (st.zt > 0.f ? -st.acc / st.zt : 0.f);
        // Q, W = sum q expm1(x), E = sum q x, V = sum q x e^x, R = sum_{q=0} e^(x^s - a),
        // count of q = 0, count of overflows, S = sum q e^x (= Q + W, without cancellation where
        // it is far from 1); x = x^s - log q - a.
        DArr<8> w = SumDArr<8>().identity();
        for (u32 j = g.rank; j < c; j += g.size()) {
            const float xs = (s[j] - st.ms) * it;
            const float tj = t[j];
            const float q = given_q<TEACH>(tj);
            if (q > 0.f) {
                const float x = (xs - given_log_q<TEACH>(tj)) - anchor;
                if (x > 80.f) {
                    w.v[6] += 1.0;
                } else {
                    const float qex = q * expf(x);
                    const float wx = fabsf(x) < 0.5f ? q * expm1f(x) : qex - q;  // q (e^x - 1)
                    w.v[0] += (double)q;
                    w.v[1] += (double)wx;
                    w.v[2] += (double)q * (double)x;
                    w.v[3] += (double)x * (double)qex;
                    w.v[7] += (double)qex;
                }
            } else if (q == 0.f) {
                const float y = xs - anchor;
                if (y > 80.f) {
                    w.v[6] += 1.0;
                } else {
                    w.v[4] += (double)expf(y);
                }
                w.v[5] += 1.0;
            } else {
                w.v[0] += (double)f_nan();  // a negative (or NaN) probability: NaN, as the reference
            }
        }
        w = g.reduce(w, SumDArr<8>());
        anchored = w.v[6] == 0.0;
        if (anchored) {
            const double qs = w.v[0];
            q_total = (float)qs;
            // log(Q + W + R) = log(S + R): through log1p of the small difference from 1 near 1.
            const double gap = (qs - 1.0) + w.v[1] + w.v[4];
            const double log_sr = fabs(gap) < 0.5 ? log1p(gap) : log(w.v[7] + w.v[4]);
            if (DIV == DIV_FKL) {
                // KL = Q log(Q + W + R) - E: the first-order terms cancel in f64.
                d = (float)(qs * log_sr - w.v[2]);
            } else if (DIV == DIV_RKL) {
                // RKL = V/S - log S, S = Q + W (a zero q: infinite, below).
                const double gap_s = (qs - 1.0) + w.v[1];
                const double log_s = fabs(gap_s) < 0.5 ? log1p(gap_s) : log(w.v[7]);
                d = (float)(w.v[3] / w.v[7] - log_s);
            } else {
                log_zs_a = (float)log_sr;
            }
        } else {
            q_total = st.zt;
            log_zs_a = log_zs - anchor;
        }
        if (DIV == DIV_RKL && w.v[5] > 0.0) d = f_inf();  // a zero q under p > 0: infinite, either way
    }
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
        } else if (!anchored && !(d == f_inf())) {
            d = center - log_zs;
        }
    } else {
        // Pass 2 (JSD): KL(q||M), KL(p||M) and their shifted forms (jsd_logs).
        FArr<4> kl = SumFArr<4>().identity();  // KL(q||M), KL(p||M), sum q aq, sum p ap
        for (u32 j = g.rank; j < c; j += g.size()) {
            float xs, lp, p, xt, lq, q;
            div_probs<TEACH>(s[j], t[j], st, log_zs, log_zt, it, xs, lp, p, xt, lq, q);
            const float dl = TEACH == TEACH_LOGITS ? (xs - xt) - lr : ((xs - lq) - anchor) - log_zs_a;
            const JsdLogs l = jsd_logs(dl, log_beta, log_1m_beta, a.beta, one_m_beta);
            if (q != 0.f) {  // 0 log 0 = 0
                kl.v[0] += q * l.lq_m;
                kl.v[2] += q * l.aq;
            }
            if (p != 0.f) {
                kl.v[1] += p * l.lp_m;
                kl.v[3] += p * l.ap;
            }
        }
        kl = g.reduce(kl, SumFArr<4>());
        kl_q = kl.v[0];
        kl_p = kl.v[1];
        uq = kl.v[2];
        up = kl.v[3];
        d = a.beta * kl.v[0] + one_m_beta * kl.v[1];
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
            div_probs<TEACH>(sj, tj, st, log_zs, log_zt, it, xs, lp, p, xt, lq, q);
            float dsj, dtj;
            if (DIV == DIV_FKL) {
                dsj = k * (p - q);
                dtj = q == 0.f ? 0.f : k * q * ((xt - xs) - center);
            } else if (DIV == DIV_RKL) {
                const float ratio = TEACH == TEACH_LOGITS ? xs - xt : xs - lq;
                dsj = k * p * (ratio - center);
                dtj = k * (q - p);
            } else {
                const float dl = TEACH == TEACH_LOGITS ? (xs - xt) - lr : ((xs - lq) - anchor) - log_zs_a;
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
        const float s_total = (DIV == DIV_FKL && TEACH != TEACH_LOGITS) ? k * (1.f - q_total) : 0.f;
        if (gs != 0 && complement_applies(cs, sums.v[0], sums.v[1], sums.v[2])) gs[cs.owner] = s_total - sums.v[0];
        if (TEACH == TEACH_LOGITS && gt != 0 && complement_applies(ct, sums.v[3], sums.v[4], sums.v[5])) {
            gt[ct.owner] = -sums.v[3];
        }
    }
    if (g.rank == 0) row_loss[0] = a.temp * a.temp * d;
}

// Masking, the label check and the dispatch to the (divergence, teacher form) instantiation.
template <class G>
__device__ __forceinline__ void divergence_dispatch(const G& g, u64 row, const float* s, const float* t,
                                                    const int* labels, const u32* count, float* row_loss,
                                                    float* grad_s, float* grad_t, u32 c, float inv_t, float temp,
                                                    float beta, float grad_scale, int ignore_index, u32 div,
                                                    u32 teacher, u32 reduction) {
    const u64 off = row * (u64)c;
    float* gs = grad_s != 0 ? grad_s + off : 0;
    float* gt = grad_t != 0 ? grad_t + off : 0;
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
    const float* sr = s + off;
    const float* tr = t + off;
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

// s, t: [n, c]; labels: [n] or null; count: [1] (count_valid); row_loss: [n]; grad_s: [n, c], null, or
// s itself; grad_t: [n, c] or null (teacher logits only); div: 0 forward KL, 1 reverse KL, 2 JSD;
// teacher: 0 logits, 1 probs, 2 log-probs; reduction: 0 batchmean, 1 sum, 2 none.
extern "C" __global__ void divergence_warp(const float* s, const float* t, const int* labels, const u32* count,
                                           float* row_loss, float* grad_s, float* grad_t, u32 n, u32 c, float inv_t,
                                           float temp, float beta, float grad_scale, int ignore_index, u32 div,
                                           u32 teacher, u32 reduction) {
    const u64 row = warp_row();
    if (row >= n) return;  // the whole warp
    divergence_dispatch(warp_group(), row, s, t, labels, count, row_loss, grad_s, grad_t, c, inv_t, temp, beta,
                        grad_scale, ignore_index, div, teacher, reduction);
}

extern "C" __global__ void divergence_block(const float* s, const float* t, const int* labels, const u32* count,
                                            float* row_loss, float* grad_s, float* grad_t, u32 n, u32 c, float inv_t,
                                            float temp, float beta, float grad_scale, int ignore_index, u32 div,
                                            u32 teacher, u32 reduction) {
    const u64 row = block_linear();
    if (row >= n) return;  // the whole block
    divergence_dispatch(block_group(), row, s, t, labels, count, row_loss, grad_s, grad_t, c, inv_t, temp, beta,
                        grad_scale, ignore_index, div, teacher, reduction);
}
