// Temperature softmax and log-softmax over rows (docs/LOSSES.md section 1; CPU reference
// src/ops/softmax/).
//
//   forward  y = softmax(x/T)      backward dx_j = (1/T) y_j (dy_j - sum_k dy_k y_k)
//   forward  y = log_softmax(x/T)  backward dx_j = (1/T) (dy_j - exp(y_j) sum_k dy_k)
//
// Launch (src/backend/cuda/, `row_launch`): `*_warp` with 256 threads = 8 rows per block and
// ceil(N/8) blocks when C <= 1024; `*_block` with one block of 128..1024 threads per row otherwise.
// Grids are 2D when they would exceed 2^31-1 blocks in x. y may alias x (in-place) and dx may alias
// dy: each element is read and then written by the same thread, after every read of the row by the
// reduction pass.
// A row holding a NaN or an infinity gives a NaN row in the forward pass. The backward pass rewrites
// the element of a dominant max of y from the others (ComplementTracker, common.cuh).

template <class G>
__device__ void softmax_fwd_row(const G& g, RowIn x, RowOut y, u32 c, float inv_t, u32 log_out) {
    // Pass 1: online max and rescaled sum.
    SoftmaxState st = softmax_empty();
    bool bad = false;
    for (u32 j = g.rank; j < c; j += g.size()) {
        const float v = x[j];
        if (is_finite_f(v)) {
            softmax_push(st, v, inv_t);
        } else {
            bad = true;
        }
    }
    SoftmaxMerge merge;
    merge.inv_t = inv_t;
    st = g.reduce(st, merge);
    if (g.any(bad)) {
        fill_row(g, y, c, f_nan());
        return;
    }
    // Pass 2: y_j = exp((x_j - m)/T) / z, or its log.
    const float log_z = logf(st.z);
    const float inv_z = 1.f / st.z;
    for (u32 j = g.rank; j < c; j += g.size()) {
        const float xs = (x[j] - st.m) * inv_t;
        y[j] = log_out ? xs - log_z : expf(xs) * inv_z;
    }
}

// (sum, max) pairs: the backward pass's sum and the max of y in one reduction.
struct SumMax {
    float sum, max;
};

struct SumMaxMerge {
    __device__ __forceinline__ SumMax identity() const {
        SumMax r;
        r.sum = 0.f;
        r.max = f_neg_inf();
        return r;
    }
    __device__ __forceinline__ SumMax operator()(SumMax a, SumMax b) const {
        SumMax r;
        r.sum = a.sum + b.sum;
        r.max = fmaxf(a.max, b.max);
        return r;
    }
};

template <class G>
__device__ void softmax_bwd_row(const G& g, RowIn y, RowIn dy, RowOut dx, u32 c, float inv_t, u32 log_out) {
    // Pass 1: sum_k dy_k y_k (softmax) or sum_k dy_k (log-softmax), and the max of y.
    SumMax acc = SumMaxMerge().identity();
    for (u32 j = g.rank; j < c; j += g.size()) {
        const float yj = y[j];
        acc.sum += log_out ? dy[j] : dy[j] * yj;
        acc.max = fmaxf(acc.max, yj);
    }
    acc = g.reduce(acc, SumMaxMerge());
    // Pass 2: the input gradient; the element of the max of y is rewritten from the others where
    // it holds almost all the probability (ComplementTracker, common.cuh).
    ComplementTracker comp = complement_start();
    float own_weight = 0.f;  // w and y at this thread's max (y[owner] may be overwritten: in place)
    float own_y = 0.f;
    for (u32 j = g.rank; j < c; j += g.size()) {
        const float yj = y[j];
        const float dyj = dy[j];
        const float w = log_out ? expf(yj) : yj;  // softmax(x/T)_j
        const float dxj = log_out ? (dyj - w * acc.sum) * inv_t : yj * (dyj - acc.sum) * inv_t;
        dx[j] = dxj;
        const bool is_max = yj == acc.max;
        complement_add(comp, j, is_max, dxj, w);
        if (is_max) {
            own_weight = w;
            own_y = yj;
        }
    }
    FArr<3> sums;
    sums.v[0] = comp.rest;
    sums.v[1] = comp.mass;
    sums.v[2] = comp.ties;
    sums = g.reduce(sums, SumFArr<3>());
    if (complement_applies(comp, sums.v[0], sums.v[1], sums.v[2])) {
        // sum_j dx_j = S (1 - sum_j w_j)/T with S the pass-1 sum (w = y, or exp(y) for log-softmax):
        // not exactly 0 when y is not exactly normalised; 1 - w_max is exact near 1.
        const float one_m_w = log_out ? -expm1f(own_y) : 1.f - own_weight;
        dx[comp.owner] = acc.sum * (one_m_w - sums.v[1]) * inv_t - sums.v[0];
    }
}

// x, y: [n, c] row-major, of dtypes dt_x, dt_y (0 f32, 1 bf16, 2 f16). inv_t = 1/T. log_out: 0
// softmax, 1 log-softmax.
extern "C" __global__ void softmax_fwd_warp(const void* x, void* y, u32 n, u32 c, float inv_t, u32 log_out,
                                            u32 dt_x, u32 dt_y) {
    const u64 row = warp_row();
    if (row >= n) return;  // the whole warp: no block-wide barrier in this layout
    const u64 off = row * (u64)c;
    softmax_fwd_row(warp_group(), row_in(x, dt_x) + off, RowOut(y, dt_y) + off, c, inv_t, log_out);
}

extern "C" __global__ void softmax_fwd_block(const void* x, void* y, u32 n, u32 c, float inv_t, u32 log_out,
                                             u32 dt_x, u32 dt_y) {
    const u64 row = block_linear();
    if (row >= n) return;  // the whole block
    const u64 off = row * (u64)c;
    softmax_fwd_row(block_group(), row_in(x, dt_x) + off, RowOut(y, dt_y) + off, c, inv_t, log_out);
}

// y: the forward output, dy: upstream gradient, dx: input gradient, all [n, c], of dtypes dt_y,
// dt_dy, dt_dx.
extern "C" __global__ void softmax_bwd_warp(const void* y, const void* dy, void* dx, u32 n, u32 c, float inv_t,
                                            u32 log_out, u32 dt_y, u32 dt_dy, u32 dt_dx) {
    const u64 row = warp_row();
    if (row >= n) return;
    const u64 off = row * (u64)c;
    softmax_bwd_row(warp_group(), row_in(y, dt_y) + off, row_in(dy, dt_dy) + off, RowOut(dx, dt_dx) + off, c, inv_t,
                    log_out);
}

extern "C" __global__ void softmax_bwd_block(const void* y, const void* dy, void* dx, u32 n, u32 c, float inv_t,
                                             u32 log_out, u32 dt_y, u32 dt_dy, u32 dt_dx) {
    const u64 row = block_linear();
    if (row >= n) return;
    const u64 off = row * (u64)c;
    softmax_bwd_row(block_group(), row_in(y, dt_y) + off, row_in(dy, dt_dy) + off, RowOut(dx, dt_dx) + off, c,
                    inv_t, log_out);
}
