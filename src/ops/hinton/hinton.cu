// The fused Hinton distillation loss (docs/LOSSES.md section 4; CPU reference src/ops/hinton/):
//
//   L_r = alpha CE_r(s, y) + (1 - alpha) T^2 KL_r(q^T || p^T),   q^T = softmax(t/T), p^T = softmax(s/T)
//   dL/ds_j = k [alpha (p^1_j - target_j) + (1 - alpha) T (p^T_j - q^T_j)]
//   dL/dt_j = k (1 - alpha) T q_j (log q_j - log p_j - KL_r)          (optional, online distillation)
//
// with k = grad_scale * (1/N_valid for batchmean, else 1), read on the device from the count of
// `count_valid`, and CE_r as in cross_entropy.cu (label smoothing eps).
//
// Pass 1 reads s and t once. ONE running max m of s serves both temperatures: Z1 = sum exp(s_j - m)
// (T = 1, for CE) and ZT = sum exp((s_j - m)/T); S = sum (s_j - m) for the smoothing term; and the
// teacher's online softmax with the KL accumulator B = sum e^t_j ((t_j - m_t) - (s_j - m))/T, all
// rescaled whenever a max grows (see divergence.cu): KL = B/Z_t + log(ZT/Z_t), the log taken as
// log1p(dZ/Z_t) with dZ = ZT - Z_t accumulated without cancellation (exp_gap, rescale_gap). s_y is
// picked up on the way (the gradient may be written in place over s, so it is not re-read later).
// High temperature (divergence.cu's forms, shared through common.cuh): where p^T ~ q (large T, or a
// student close to its teacher) KL is second order in delta = x^s - x^t while B/Z_t and the log
// are first order, so a refined pass (refine_kl_row: only reads) takes KL, log(ZT/Z_t) and the
// center B/Z_t again in f64, KL as sum q (e^y - 1 - y) around the q-mean of delta; the gradients
// take delta from f64 logit differences (logit_delta) and p^T - q as q expm1(dl), dl = delta -
// log(ZT/Z_t) = log p^T - log q (gap_pq). The loss and gradients then meet 1e-4 of the f64
// reference up to T = 1e4 (tools/cuda-emu).
// The last pass writes the gradients, reading s_j and t_j and then writing index j from the same
// thread; the elements of the max of s (of t) are rewritten from the others (ComplementTracker).
// Z1 is kept as Z1 - 1 (cross_entropy.cu) so that log Z1 = log1p(Z1 - 1) keeps a confident row.
//
// Rows: label == ignore_index -> loss 0 and gradients 0; another label outside 0..C -> NaN row;
// a NaN or infinity in s or t -> NaN row (loss and gradients).
// Launch: like divergence.cu (`hinton_warp`: 256 threads, 8 rows per block, C <= 1024;
// `hinton_block`: a block per row), between count_valid and reduce_rows.

struct HintonState {
    float ms;   // running max of s (empty: -inf)
    float z1m1; // sum exp(s_j - ms) - 1, the max's own 1 left out (see cross_entropy.cu)
    float zs;   // sum exp((s_j - ms)/T)
    float sum;  // sum (s_j - ms)
    float cnt;  // elements seen
    float mt;   // running max of t
    float zt;   // sum exp((t_j - mt)/T)
    float acc;  // B
    float dz;   // ZT - Z_t
    float sy;   // s_y (0 except in the thread that owns index y)
};

__device__ __forceinline__ HintonState hinton_empty() {
    HintonState st;
    st.ms = f_neg_inf();
    st.z1m1 = 0.f;
    st.zs = 0.f;
    st.sum = 0.f;
    st.cnt = 0.f;
    st.mt = f_neg_inf();
    st.zt = 0.f;
    st.acc = 0.f;
    st.dz = 0.f;
    st.sy = 0.f;
    return st;
}

__device__ __forceinline__ void hinton_push(HintonState& st, float s, float t, float it) {
    if (s > st.ms || t > st.mt) {
        const float ms = fmaxf(st.ms, s);
        const float mt = fmaxf(st.mt, t);
        const bool new_max = s > st.ms;  // s brings the new max's 1 (not added to z1m1)
        if (st.ms != f_neg_inf()) {
            const float ds = st.ms - ms;  // <= 0
            const float dt = st.mt - mt;  // <= 0
            const float rt = expf(dt * it);
            const float rs = expf(ds * it);
            st.acc = rt * (st.acc + st.zt * ((dt - ds) * it));
            st.dz = rt * st.dz + rescale_gap(rs, rt, ds, dt, it) * st.zs;
            st.zt *= rt;
            // When s is a new max, the old max's 1 joins the rescaled rest and s brings the new 1.
            if (new_max) st.z1m1 = (st.z1m1 + 1.f) * expf(ds);
            st.zs *= rs;
            st.sum += st.cnt * ds;
        }
        st.ms = ms;
        st.mt = mt;
        if (!new_max) st.z1m1 += expf(s - st.ms);
    } else {
        st.z1m1 += expf(s - st.ms);  // a tie adds 1
    }
    const float d = s - st.ms;
    const float xs = d * it;
    const float xt = (t - st.mt) * it;
    const float et = expf(xt);
    const float es = expf(xs);
    st.zs += es;
    st.dz += exp_gap(xs, xt, es, et);
    st.sum += d;
    st.cnt += 1.f;
    st.zt += et;
    st.acc += et * (xt - xs);
}

struct HintonMerge {
    float inv_t;
    __device__ __forceinline__ HintonState identity() const { return hinton_empty(); }
    __device__ __forceinline__ HintonState operator()(HintonState a, HintonState b) const {
        if (b.ms == f_neg_inf()) return a;
        if (a.ms == f_neg_inf()) return b;
        const float it = inv_t;
        HintonState r;
        r.ms = fmaxf(a.ms, b.ms);
        r.mt = fmaxf(a.mt, b.mt);
        const float das = a.ms - r.ms;
        const float dbs = b.ms - r.ms;
        const float dat = a.mt - r.mt;
        const float dbt = b.mt - r.mt;
        const float rat = expf(dat * it);
        const float rbt = expf(dbt * it);
        const float ras = expf(das * it);
        const float rbs = expf(dbs * it);
        r.z1m1 = zm1_merge(a.z1m1, das, b.z1m1, dbs, 1.f);
        r.zs = a.zs * ras + b.zs * rbs;
        r.dz = (rat * a.dz + rescale_gap(ras, rat, das, dat, it) * a.zs) +
               (rbt * b.dz + rescale_gap(rbs, rbt, dbs, dbt, it) * b.zs);
        r.sum = (a.sum + a.cnt * das) + (b.sum + b.cnt * dbs);
        r.cnt = a.cnt + b.cnt;
        r.zt = a.zt * rat + b.zt * rbt;
        r.acc = rat * (a.acc + a.zt * ((dat - das) * it)) + rbt * (b.acc + b.zt * ((dbt - dbs) * it));
        r.sy = a.sy + b.sy;
        return r;
    }
};

template <class G>
__device__ __forceinline__ void hinton_dispatch(const G& g, u64 row, RowIn s_all, RowIn t_all, const int* labels,
                                                const u32* count, float* row_loss, RowOut grad_s, RowOut grad_t,
                                                u32 c, float inv_t, float temp, float alpha, float eps,
                                                float grad_scale, int ignore_index, u32 reduction) {
    const u64 off = row * (u64)c;
    const RowIn s = s_all + off;
    const RowIn t = t_all + off;
    const RowOut gs = grad_s + off;
    const RowOut gt = grad_t + off;
    const int y = labels[row];
    if (y == ignore_index) {
        fill_row(g, gs, c, 0.f);
        fill_row(g, gt, c, 0.f);
        if (g.rank == 0) row_loss[row] = 0.f;
        return;  // the whole group
    }
    const bool bad_label = y < 0 || (u32)y >= c;
    const float it = inv_t;
    // Pass 1.
    HintonState st = hinton_empty();
    bool bad = bad_label;
    if (!bad_label) {
        for (u32 j = g.rank; j < c; j += g.size()) {
            const float sj = s[j];
            const float tj = t[j];
            if (j == (u32)y) st.sy = sj;
            if (is_finite_f(sj) && is_finite_f(tj)) {
                hinton_push(st, sj, tj, it);
            } else {
                bad = true;
            }
        }
    }
    HintonMerge merge;
    merge.inv_t = it;
    st = g.reduce(st, merge);
    if (g.any(bad)) {
        fill_row(g, gs, c, f_nan());
        fill_row(g, gt, c, f_nan());
        if (g.rank == 0) row_loss[row] = f_nan();
        return;
    }
    const float log_z1 = log1pf(st.z1m1);
    const float log_zs = logf(st.zs);
    const float log_zt = logf(st.zt);
    const float ce = (1.f - eps) * ((st.ms - st.sy) + log_z1) + eps * (log_z1 - st.sum / (float)c);
    const double it_d = 1.0 / (double)temp;  // f32(1/T) is off by up to 3e-8 relative
    float center = st.acc / st.zt;  // sum_j q_j (x^t_j - x^s_j)
    float lr = log_ratio(st.zs, st.zt, st.dz);  // log(ZT/Z_t)
    float kl = center + lr;
    // p ~ q (large T, or a student close to its teacher): KL is second order while center and lr
    // are first order; the refined pass (common.cuh) takes kl, lr and center again in f64.
    if (kl_needs_refining(kl, center, lr)) refine_kl_row(g, s, t, c, st.ms, st.mt, it, it_d, true, kl, lr, center);
    // The gradient pass.
    if (gs != 0 || gt != 0) {
        const float k = grad_scale * reduction_factor(reduction, count);
        const float soft = (1.f - alpha) * temp;  // d(T^2 KL)/dz carries one factor T
        const float smooth = eps / (float)c;
        ComplementTracker c_ce = complement_start();  // the CE part of ds (weight p^1)
        ComplementTracker c_kl = complement_start();  // the KL part of ds (weight p^T)
        ComplementTracker ct = complement_start();    // dt (weight q)
        float own_ce = 0.f;                           // this thread's direct parts at the max of s
        float own_kl = 0.f;
        for (u32 j = g.rank; j < c; j += g.size()) {
            const float sj = s[j];
            const float tj = t[j];
            const float d = sj - st.ms;
            const float xs = d * it;
            const float xt = (tj - st.mt) * it;
            const float p1 = expf(d - log_z1);
            const float pt = expf(xs - log_zs);
            const float q = expf(xt - log_zt);
            // delta = x^s - x^t from f64 differences, dl = log p^T - log q: p^T - q = q expm1(dl)
            // where they are close (gap_pq), and the teacher's log q - log p - KL = -delta - center.
            const float delta = (float)logit_delta(sj, st.ms, tj, st.mt, it_d);
            const float dl = delta - lr;
            const float target = (j == (u32)y ? 1.f - eps : 0.f) + smooth;
            // The two parts of the student's gradient each sum to 0 and each get their own
            // complement (their dominance differs: p^1 may be ~1 where p^T is not).
            const float ce_part = k * alpha * (p1 - target);
            const float kl_part = k * soft * gap_pq(q, pt, dl);
            const float dtj = q == 0.f ? 0.f : k * soft * q * (-delta - center);
            if (gs != 0) gs[j] = ce_part + kl_part;
            if (gt != 0) gt[j] = dtj;
            const bool smax = sj == st.ms;
            complement_add(c_ce, j, smax, ce_part, p1);
            complement_add(c_kl, j, smax, kl_part, pt);
            complement_add(ct, j, tj == st.mt, dtj, q);
            if (smax) {
                own_ce = ce_part;
                own_kl = kl_part;
            }
        }
        FArr<8> sums;
        sums.v[0] = c_ce.rest;
        sums.v[1] = c_ce.mass;
        sums.v[2] = c_kl.rest;
        sums.v[3] = c_kl.mass;
        sums.v[4] = c_ce.ties;
        sums.v[5] = ct.rest;
        sums.v[6] = ct.mass;
        sums.v[7] = ct.ties;
        sums = g.reduce(sums, SumFArr<8>());
        if (gs != 0 && c_ce.owner != 0xffffffffu && sums.v[4] == 1.f) {
            const bool ce_c = complement_applies(c_ce, sums.v[0], sums.v[1], sums.v[4]);
            const bool kl_c = complement_applies(c_kl, sums.v[2], sums.v[3], sums.v[4]);
            if (ce_c || kl_c) gs[c_ce.owner] = (ce_c ? -sums.v[0] : own_ce) + (kl_c ? -sums.v[2] : own_kl);
        }
        if (gt != 0 && complement_applies(ct, sums.v[5], sums.v[6], sums.v[7])) gt[ct.owner] = -sums.v[5];
    }
    if (g.rank == 0) row_loss[row] = alpha * ce + (1.f - alpha) * temp * temp * kl;
}

// s, t: [n, c] of dtypes dt_s, dt_t (0 f32, 1 bf16, 2 f16); labels: [n]; count: [1] (count_valid);
// row_loss: [n]; grad_s: [n, c] of dtype dt_gs, null or s itself (dt_gs = dt_s); grad_t: [n, c] of
// dtype dt_gt or null; eps: label smoothing; reduction: 0 batchmean, 1 sum, 2 none.
extern "C" __global__ void hinton_warp(const void* s, const void* t, const int* labels, const u32* count,
                                       float* row_loss, void* grad_s, void* grad_t, u32 n, u32 c, float inv_t,
                                       float temp, float alpha, float eps, float grad_scale, int ignore_index,
                                       u32 reduction, u32 dt_s, u32 dt_t, u32 dt_gs, u32 dt_gt) {
    const u64 row = warp_row();
    if (row >= n) return;  // the whole warp
    hinton_dispatch(warp_group(), row, row_in(s, dt_s), row_in(t, dt_t), labels, count, row_loss,
                    RowOut(grad_s, dt_gs), RowOut(grad_t, dt_gt), c, inv_t, temp, alpha, eps, grad_scale,
                    ignore_index, reduction);
}

extern "C" __global__ void hinton_block(const void* s, const void* t, const int* labels, const u32* count,
                                        float* row_loss, void* grad_s, void* grad_t, u32 n, u32 c, float inv_t,
                                        float temp, float alpha, float eps, float grad_scale, int ignore_index,
                                        u32 reduction, u32 dt_s, u32 dt_t, u32 dt_gs, u32 dt_gt) {
    const u64 row = block_linear();
    if (row >= n) return;  // the whole block
    hinton_dispatch(block_group(), row, row_in(s, dt_s), row_in(t, dt_t), labels, count, row_loss,
                    RowOut(grad_s, dt_gs), RowOut(grad_t, dt_gt), c, inv_t, temp, alpha, eps, grad_scale,
                    ignore_index, reduction);
}
