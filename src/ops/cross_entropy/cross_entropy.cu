// Cross-entropy with hard labels and label smoothing eps (docs/LOSSES.md section 3; CPU reference
// src/ops/cross_entropy/):
//
//   CE_r = (1-eps) (lse - s_y) + eps (lse - mean_j s_j),   lse = m + log sum_j exp(s_j - m)
//   dCE_r/ds_j = p_j - target_j,   target_j = (1-eps) [j = y] + eps/C
//
// Pass 1 (one read of the row; s_y is picked up on the way): the online max m, Z - 1 =
// sum exp(s_j - m) less the max's own 1 (log Z = log1p(Z - 1) keeps a confident row's tiny loss),
// and S = sum (s_j - m) (rescaled by count * (m_old - m_new) when the max grows), so
// lse - s_y = (m - s_y) + log Z and
// lse - mean(s) = log Z - S/C: sums of non-negative terms, no cancellation for |s| ~ 1e4.
// Pass 2: the gradient k (p_j - target_j), k = grad_scale * (1/N_valid for batchmean, else 1) read
// from the count of `count_valid`; the max's element is rewritten as minus the sum of the others
// (ComplementTracker, common.cuh). The gradient may overwrite s (read j, then write j).
//
// Rows: label == ignore_index -> loss 0 and gradient 0; another label outside 0..C -> NaN row;
// a NaN or infinity in the row -> NaN row.
// Launch: like divergence.cu (`cross_entropy_warp`: 256 threads, 8 rows per block, C <= 1024;
// `cross_entropy_block`: a block per row), between count_valid and reduce_rows.

struct CeState {
    float m;    // running max (empty: -inf)
    float zm1;  // sum exp(s_j - m) - 1 (the max's own term left out)
    float sum;  // sum (s_j - m), <= 0
    float cnt;  // number of elements (as a float: only scales max shifts)
    float sy;   // s_y, seen by the one thread that owns index y (0 elsewhere; merged by adding)
};

__device__ __forceinline__ CeState ce_empty() {
    CeState st;
    st.m = f_neg_inf();
    st.zm1 = 0.f;
    st.sum = 0.f;
    st.cnt = 0.f;
    st.sy = 0.f;
    return st;
}

__device__ __forceinline__ void ce_push(CeState& st, float x) {
    if (x > st.m) {
        if (st.m != f_neg_inf()) {
            const float d = st.m - x;  // < 0
            // The old max's 1 joins the rescaled rest; x brings the new 1.
            st.zm1 = (st.zm1 + 1.f) * expf(d);
            st.sum += st.cnt * d;
        }
        st.m = x;
    } else {
        st.zm1 += expf(x - st.m);  // a tie adds 1
    }
    st.sum += x - st.m;
    st.cnt += 1.f;
}

struct CeMerge {
    __device__ __forceinline__ CeState identity() const { return ce_empty(); }
    __device__ __forceinline__ CeState operator()(CeState a, CeState b) const {
        if (b.m == f_neg_inf()) return a;
        if (a.m == f_neg_inf()) return b;
        CeState r;
        r.m = fmaxf(a.m, b.m);
        const float da = a.m - r.m;
        const float db = b.m - r.m;
        // Z - 1 of the merge: a side at the max keeps its Z - 1, the other brings all of its Z; two
        // sides at the max bring one extra 1.
        r.zm1 = zm1_merge(a.zm1, da, b.zm1, db, 1.f);
        r.sum = (a.sum + a.cnt * da) + (b.sum + b.cnt * db);
        r.cnt = a.cnt + b.cnt;
        r.sy = a.sy + b.sy;
        return r;
    }
};

template <class G>
__device__ __forceinline__ void cross_entropy_dispatch(const G& g, u64 row, RowIn s_all, const int* labels,
                                                       const u32* count, float* row_loss, RowOut grad_s, u32 c,
                                                       float eps, float grad_scale, int ignore_index,
                                                       u32 reduction) {
    const u64 off = row * (u64)c;
    const RowIn s = s_all + off;
    const RowOut gs = grad_s + off;
    const int y = labels[row];
    if (y == ignore_index) {
        fill_row(g, gs, c, 0.f);
        if (g.rank == 0) row_loss[row] = 0.f;
        return;  // the whole group
    }
    const bool bad_label = y < 0 || (u32)y >= c;
    // Pass 1.
    CeState st = ce_empty();
    bool bad = bad_label;
    if (!bad_label) {
        for (u32 j = g.rank; j < c; j += g.size()) {
            const float v = s[j];
            if (j == (u32)y) st.sy = v;
            if (is_finite_f(v)) {
                ce_push(st, v);
            } else {
                bad = true;
            }
        }
    }
    st = g.reduce(st, CeMerge());
    if (g.any(bad)) {
        fill_row(g, gs, c, f_nan());
        if (g.rank == 0) row_loss[row] = f_nan();
        return;
    }
    const float log_z = log1pf(st.zm1);
    // s_y comes from the reduction, not from memory: with an in-place gradient, another thread may
    // already be overwriting s_y.
    const float ce = (1.f - eps) * ((st.m - st.sy) + log_z) + eps * (log_z - st.sum / (float)c);
    // Pass 2: the gradient.
    if (gs != 0) {
        const float k = grad_scale * reduction_factor(reduction, count);
        const float smooth = eps / (float)c;
        ComplementTracker comp = complement_start();
        for (u32 j = g.rank; j < c; j += g.size()) {
            const float sj = s[j];
            const float p = expf((sj - st.m) - log_z);
            const float target = (j == (u32)y ? 1.f - eps : 0.f) + smooth;
            const float gj = k * (p - target);
            gs[j] = gj;
            complement_add(comp, j, sj == st.m, gj, p);
        }
        FArr<3> sums;
        sums.v[0] = comp.rest;
        sums.v[1] = comp.mass;
        sums.v[2] = comp.ties;
        sums = g.reduce(sums, SumFArr<3>());
        if (complement_applies(comp, sums.v[0], sums.v[1], sums.v[2])) gs[comp.owner] = -sums.v[0];
    }
    if (g.rank == 0) row_loss[row] = ce;
}

// s: [n, c] of dtype dt_s (0 f32, 1 bf16, 2 f16); labels: [n]; count: [1] (count_valid); row_loss:
// [n]; grad_s: [n, c] of dtype dt_gs, null, or s itself (then dt_gs = dt_s); eps: label smoothing;
// reduction: 0 batchmean, 1 sum, 2 none.
extern "C" __global__ void cross_entropy_warp(const void* s, const int* labels, const u32* count, float* row_loss,
                                              void* grad_s, u32 n, u32 c, float eps, float grad_scale,
                                              int ignore_index, u32 reduction, u32 dt_s, u32 dt_gs) {
    const u64 row = warp_row();
    if (row >= n) return;  // the whole warp
    cross_entropy_dispatch(warp_group(), row, row_in(s, dt_s), labels, count, row_loss, RowOut(grad_s, dt_gs), c,
                           eps, grad_scale, ignore_index, reduction);
}

extern "C" __global__ void cross_entropy_block(const void* s, const int* labels, const u32* count, float* row_loss,
                                               void* grad_s, u32 n, u32 c, float eps, float grad_scale,
                                               int ignore_index, u32 reduction, u32 dt_s, u32 dt_gs) {
    const u64 row = block_linear();
    if (row >= n) return;  // the whole block
    cross_entropy_dispatch(block_group(), row, row_in(s, dt_s), labels, count, row_loss, RowOut(grad_s, dt_gs), c,
                           eps, grad_scale, ignore_index, reduction);
}
