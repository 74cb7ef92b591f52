// Decoupled knowledge distillation, DKD (docs/LOSSES.md section 8; CPU reference src/ops/dkd/;
// WGSL dkd.wgsl):
//
//   L_r = w_ce CE_r(s, y) + T^2 (w_tc TCKD_r + w_nc NCKD_r)
//   TCKD_r = KL([q_g, 1 - q_g] || [p_g, 1 - p_g]),  NCKD_r = KL(q^ || p^) over j != g,
//   p = softmax(s/T), q = softmax(t/T), p^_j = p_j / (1 - p_g) (q^ likewise), g the label;
//   dL/ds_g = k [w_ce (p^1_g - target_g) + T w_tc (p_g - q_g)],
//   dL/ds_j = k [w_ce (p^1_j - target_j) + T (w_nc (p^_j - q^_j) - w_tc (p_g - q_g) p^_j)]  (j != g)
//
// with k = grad_scale * (1/N_valid for batchmean, else 1) from the count of `count_valid`, and CE_r
// as in cross_entropy.cu (label smoothing eps). The teacher is detached (no teacher gradient).
//
// Pass 1 reads s and t once and keeps the online statistics of the NON-TARGET classes only (their
// own max of s and of t, Zs = sum exp((s_j - ms)/T), Z1 = sum exp(s_j - ms) at T = 1, the sum of
// s_j - ms, Zt, and dZ = Zs - Zt summed without cancellation, each term e^x^t expm1(x^s - x^t)
// with x^s - x^t from f64 differences of the raw logits (logit_delta), so that log(Zs/Zt) keeps
// its digits where the student is close to its teacher), and s_g, t_g. CE's
// statistics over every class follow from the rest's and s_g (p^1_g - 1 = -Z1_rest / Z1: no 1 - p
// taken). The non-target mass 1 - p_g is never formed as 1 - p_g either: per row, in f64, the
// log-odds D = log Z_rest - x_g give q_g = sigmoid(-D_t), 1 - q_g = sigmoid(D_t) and the student's
// likewise from D_s, and with e = D_s - D_t = log(Zs/Zt) - (x^s_g - x^t_g) (the log ratio from dZ,
// the logit differences in f64) u = log p - log q of both bins as -log1p((1 - q_g) expm1(e)), -log1p(q_g expm1(-e))
// where |e| < 1/2 (softplus differences beyond): TCKD = q_g phi(u_g) + (1 - q_g) phi(u_r) and
// p_g - q_g = q expm1(u) of the bin with the smaller q, so both keep their digits at high T.
// Pass 2 sums NCKD = sum_{j != g} q^_j phi(u_j) (u_j = log p^_j - log q^_j from f64 logit
// differences, phi(u) = e^u - 1 - u by its series: non-negative second-order terms, summed in f64)
// and writes every gradient (p^_j - q^_j = q^_j expm1(u_j) where close, gap_pq); none needs the row's
// loss, so there are two passes. The last pass reads s_j and then writes index j from the same
// thread; s_g reaches the other threads through the pass-1 reduction (in-place safe).
//
// Rows: label == ignore_index -> loss 0 and gradient 0; another label outside 0..C -> NaN row;
// a NaN or infinity in s or t -> NaN row (loss and gradient). C >= 2 (validated on the host).
// Launch: like hinton.cu (`dkd_warp`: 256 threads, 8 rows per block, C <= 1024; `dkd_block`: a
// block per row), between count_valid and reduce_rows.

struct DkdState {
    float ms;   // running max of s over the non-target classes (empty: -inf)
    float zs;   // sum exp((s_j - ms)/T)
    float z1;   // sum exp(s_j - ms)   (T = 1, for CE)
    float sum;  // sum (s_j - ms)
    float cnt;  // elements seen
    float mt;   // running max of t over the non-target classes
    float zt;   // sum exp((t_j - mt)/T)
    float dz;   // Zs - Zt
    float sy;   // s_g (0 except in the thread that owns index g)
    float ty;   // t_g (likewise)
};

__device__ __forceinline__ DkdState dkd_empty() {
    DkdState st;
    st.ms = f_neg_inf();
    st.zs = 0.f;
    st.z1 = 0.f;
    st.sum = 0.f;
    st.cnt = 0.f;
    st.mt = f_neg_inf();
    st.zt = 0.f;
    st.dz = 0.f;
    st.sy = 0.f;
    st.ty = 0.f;
    return st;
}

// e^a - e^b from ea = e^a, eb = e^b and d = a - b (taken in f64 by the callers: a difference of
// f32 differences would carry their rounding, first order where the student is close to its
// teacher): eb expm1(d) where close, ea - eb elsewhere.
__device__ __forceinline__ float dkd_gap(float ea, float eb, float d) {
    return fabsf(d) < 0.5f ? eb * expm1f(d) : ea - eb;
}

// Adds one non-target class (finite s, t). it_d: 1/T in f64.
__device__ __forceinline__ void dkd_push(DkdState& st, float s, float t, float it, double it_d) {
    if (s > st.ms || t > st.mt) {
        const float ms = fmaxf(st.ms, s);
        const float mt = fmaxf(st.mt, t);
        if (st.ms != f_neg_inf()) {
            const float ds = st.ms - ms;  // <= 0
            const float dt = st.mt - mt;  // <= 0
            const float rt = expf(dt * it);
            const float rs = expf(ds * it);
            const float d = (float)logit_delta(st.ms, ms, st.mt, mt, it_d);  // (ds - dt) / T
            st.dz = rt * st.dz + dkd_gap(rs, rt, d) * st.zs;
            st.zt *= rt;
            st.zs *= rs;
            st.z1 *= expf(ds);
            st.sum += st.cnt * ds;
        }
        st.ms = ms;
        st.mt = mt;
    }
    const float d = s - st.ms;
    const float es = expf(d * it);
    const float et = expf((t - st.mt) * it);
    st.zs += es;
    st.z1 += expf(d);
    st.zt += et;
    st.dz += dkd_gap(es, et, (float)logit_delta(s, st.ms, t, st.mt, it_d));
    st.sum += d;
    st.cnt += 1.f;
}

struct DkdMerge {
    float inv_t;
    double inv_t_d;
    __device__ __forceinline__ DkdState identity() const { return dkd_empty(); }
    __device__ __forceinline__ DkdState operator()(DkdState a, DkdState b) const {
        DkdState r;
        r.sy = a.sy + b.sy;
        r.ty = a.ty + b.ty;
        if (b.ms == f_neg_inf()) {
            const float sy = r.sy, ty = r.ty;
            r = a;
            r.sy = sy;
            r.ty = ty;
            return r;
        }
        if (a.ms == f_neg_inf()) {
            const float sy = r.sy, ty = r.ty;
            r = b;
            r.sy = sy;
            r.ty = ty;
            return r;
        }
        const float it = inv_t;
        r.ms = fmaxf(a.ms, b.ms);
        r.mt = fmaxf(a.mt, b.mt);
        const float das = a.ms - r.ms;
        const float dbs = b.ms - r.ms;
        const float dat = a.mt - r.mt;
        const float dbt = b.mt - r.mt;
        const float ras = expf(das * it);
        const float rbs = expf(dbs * it);
        const float rat = expf(dat * it);
        const float rbt = expf(dbt * it);
        r.zs = a.zs * ras + b.zs * rbs;
        r.z1 = a.z1 * expf(das) + b.z1 * expf(dbs);
        r.zt = a.zt * rat + b.zt * rbt;
        const float ga = (float)logit_delta(a.ms, r.ms, a.mt, r.mt, inv_t_d);
        const float gb = (float)logit_delta(b.ms, r.ms, b.mt, r.mt, inv_t_d);
        r.dz = (rat * a.dz + dkd_gap(ras, rat, ga) * a.zs) + (rbt * b.dz + dkd_gap(rbs, rbt, gb) * b.zs);
        r.sum = (a.sum + a.cnt * das) + (b.sum + b.cnt * dbs);
        r.cnt = a.cnt + b.cnt;
        return r;
    }
};

// phi(u) = e^u - 1 - u: the Taylor series where |u| < 1/2 (relative error below 1e-9), e^u - 1 - u
// beyond (no cancellation there).
__device__ __forceinline__ float dkd_phi(float u) {
    if (fabsf(u) < 0.5f)
        return u * u *
               (0.5f + u * (1.f / 6.f + u * (1.f / 24.f + u * (1.f / 120.f + u * (1.f / 720.f + u * (1.f / 5040.f +
                u * (1.f / 40320.f + u * (1.f / 362880.f + u * (1.f / 3628800.f)))))))));
    return expf(u) - 1.f - u;
}

// Forward KL's term q phi(u), u = log p - log q (its limit p where q underflows to 0).
__device__ __forceinline__ float dkd_kl_term(float q, float p, float u) {
    if (q == 0.f) return p;
    if (fabsf(u) < 0.5f) return q * dkd_phi(u);
    return (p - q) - q * u;
}

// (dkd_term_gap, dkd_binary: common.cuh, shared with sharded.cu.)

template <class G>
__device__ __forceinline__ void dkd_dispatch(const G& g, u64 row, RowIn s_all, RowIn t_all,
                                             const int* labels, const u32* count, float* row_loss, RowOut grad_s,
                                             u32 c, float inv_t, float temp, float w_ce, float w_tc, float w_nc,
                                             float eps, float grad_scale, int ignore_index, u32 reduction) {
    const u64 off = row * (u64)c;
    const RowIn s = s_all + off;
    const RowIn t = t_all + off;
    const RowOut gs = grad_s + off;
    const int y = labels[row];
    if (y == ignore_index) {
        fill_row(g, gs, c, 0.f);
        if (g.rank == 0) row_loss[row] = 0.f;
        return;  // the whole group
    }
    const bool bad_label = y < 0 || (u32)y >= c;
    const float it = inv_t;
    const double it_d = 1.0 / (double)temp;  // f32(1/T) is off by up to 3e-8 relative
    // Pass 1.
    DkdState st = dkd_empty();
    bool bad = bad_label;
    if (!bad_label) {
        for (u32 j = g.rank; j < c; j += g.size()) {
            const float sj = s[j];
            const float tj = t[j];
            if (!is_finite_f(sj) || !is_finite_f(tj)) {
                bad = true;
            } else if (j == (u32)y) {
                st.sy = sj;
                st.ty = tj;
            } else {
                dkd_push(st, sj, tj, it, it_d);
            }
        }
    }
    DkdMerge merge;
    merge.inv_t = it;
    merge.inv_t_d = it_d;
    st = g.reduce(st, merge);
    if (g.any(bad)) {
        fill_row(g, gs, c, f_nan());
        if (g.rank == 0) row_loss[row] = f_nan();
        return;
    }
    const float sy = st.sy, ty = st.ty;
    // CE over every class from the rest's statistics and s_g.
    const float m1 = fmaxf(st.ms, sy);
    const float z1_rest = st.z1 * expf(st.ms - m1);
    const float z1 = z1_rest + expf(sy - m1);
    const float lz1 = sy >= st.ms ? log1pf(z1_rest) : logf(z1);
    const float sum_all = (st.sum + st.cnt * (st.ms - m1)) + (sy - m1);  // sum_j (s_j - m1)
    const float ce = (1.f - eps) * ((m1 - sy) + lz1) + eps * (lz1 - sum_all / (float)c);
    // The binary distributions, in f64.
    const double lr = fabsf(st.dz) < 0.5f * st.zt ? log1p((double)st.dz / (double)st.zt)
                                                   : log((double)st.zs) - log((double)st.zt);
    const double d_t = log((double)st.zt) - ((double)ty - (double)st.mt) * it_d;
    const double d_s = log((double)st.zs) - ((double)sy - (double)st.ms) * it_d;
    const double e = lr - (((double)sy - (double)st.ms) - ((double)ty - (double)st.mt)) * it_d;
    double tckd, gap;
    dkd_binary(d_t, d_s, e, tckd, gap);
    // Pass 2: NCKD and every gradient.
    const float k = grad_scale * reduction_factor(reduction, count);
    const float ktc = (float)((double)k * (double)temp * (double)w_tc * gap);
    const float knc = k * temp * w_nc;
    const float kce = k * w_ce;
    const float smooth = eps / (float)c;
    const float log_zs = logf(st.zs);
    const float log_zt = logf(st.zt);
    double nckd = 0.0;
    for (u32 j = g.rank; j < c; j += g.size()) {
        if (j == (u32)y) {
            if (gs != 0) gs[j] = kce * (-z1_rest / z1 + (eps - smooth)) + ktc;
            continue;
        }
        const float sj = s[j];
        const float tj = t[j];
        const float ph = expf((sj - st.ms) * it - log_zs);
        const float qh = expf((tj - st.mt) * it - log_zt);
        const float u = (float)(logit_delta(sj, st.ms, tj, st.mt, it_d) - lr);  // log p^ - log q^
        nckd += (double)dkd_kl_term(qh, ph, u);
        if (gs != 0) {
            const float p1 = expf((sj - m1) - lz1);
            gs[j] = kce * (p1 - smooth) + (knc * gap_pq(qh, ph, u) - ktc * ph);
        }
    }
    nckd = g.reduce(nckd, SumOp<double>());
    if (g.rank == 0)
        row_loss[row] = (float)((double)w_ce * (double)ce +
                                (double)temp * (double)temp * ((double)w_tc * tckd + (double)w_nc * nckd));
}

// s, t: [n, c] of dtypes dt_s, dt_t (0 f32, 1 bf16, 2 f16); labels: [n]; count: [1] (count_valid);
// row_loss: [n]; grad_s: [n, c] of dtype dt_gs, null or s itself (dt_gs = dt_s); eps: label
// smoothing; reduction: 0 batchmean, 1 sum, 2 none.
extern "C" __global__ void dkd_warp(const void* s, const void* t, const int* labels, const u32* count,
                                    float* row_loss, void* grad_s, u32 n, u32 c, float inv_t, float temp, float w_ce,
                                    float w_tc, float w_nc, float eps, float grad_scale, int ignore_index,
                                    u32 reduction, u32 dt_s, u32 dt_t, u32 dt_gs) {
    const u64 row = warp_row();
    if (row >= n) return;  // the whole warp
    dkd_dispatch(warp_group(), row, row_in(s, dt_s), row_in(t, dt_t), labels, count, row_loss, RowOut(grad_s, dt_gs), c, inv_t, temp, w_ce, w_tc, w_nc, eps,
                 grad_scale, ignore_index, reduction);
}

extern "C" __global__ void dkd_block(const void* s, const void* t, const int* labels, const u32* count,
                                     float* row_loss, void* grad_s, u32 n, u32 c, float inv_t, float temp,
                                     float w_ce, float w_tc, float w_nc, float eps, float grad_scale,
                                     int ignore_index, u32 reduction, u32 dt_s, u32 dt_t, u32 dt_gs) {
    const u64 row = block_linear();
    if (row >= n) return;  // the whole block
    dkd_dispatch(block_group(), row, row_in(s, dt_s), row_in(t, dt_t), labels, count, row_loss, RowOut(grad_s, dt_gs), c, inv_t, temp, w_ce, w_tc, w_nc, eps,
                 grad_scale, ignore_index, reduction);
}
