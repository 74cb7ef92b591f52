// Shared helpers of every CUDA kernel of the crate.
//
// NVRTC has no standard headers: `src/backend/cuda/` prepends this file, as a string, to each
// kernel file before compiling it, so nothing here (or in a kernel file) may `#include` anything.
// Only compiler builtins are used: expf/logf/log1pf (the accurate versions: the kernels are never
// compiled with --use_fast_math), __shfl_xor_sync, __syncthreads_or, __int_as_float.
//
// Two ways a row (one example, C classes) maps onto threads, chosen by the host per launch:
// - WarpGroup: one warp per row, several rows per block (small C). No __syncthreads at all, so a
//   warp whose row is past the end may simply return.
// - BlockGroup: one block per row (large C). The reductions use __syncthreads, so every thread of
//   the block must reach them: a block returns early only as a whole (a condition that is the
//   same for all its threads: the row index, the row's label, a reduced flag).
// Reductions run in a fixed order (a shuffle butterfly, then the warps' results in warp order),
// so the same launch configuration gives bit-identical results run after run.

typedef unsigned int u32;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu

// ---- floats -------------------------------------------------------------------------------------

__device__ __forceinline__ float f_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float f_neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float f_nan() { return __int_as_float(0x7fffffff); }

// True when x is neither NaN nor +-infinity (exponent bits not all ones).
__device__ __forceinline__ bool is_finite_f(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// ---- element types: f32, bf16, f16 (docs/LOSSES.md, half precision) ---------------------------
// Codes 0 f32, 1 bf16, 2 f16. The row losses read their inputs and write their gradients in the
// buffers' own dtypes through RowIn / RowOut; all math is f32 (f64 where the kernels say so), and a
// gradient is rounded once, to nearest with ties to even, as it is stored. The conversions are
// bit manipulations (NVRTC has no cuda_fp16.h / cuda_bf16.h without the toolkit's headers, and the
// emulator runs the same code).

#define DT_F32 0u
#define DT_BF16 1u
#define DT_F16 2u

typedef unsigned short u16;

__device__ __forceinline__ float half_bits_to_f32(u16 h, u32 dt) {
    if (dt == DT_BF16) return __int_as_float((int)((u32)h << 16));
    const u32 sign = ((u32)h & 0x8000u) << 16;
    const u32 e = ((u32)h >> 10) & 0x1fu;
    const u32 m = (u32)h & 0x3ffu;
    if (e == 0x1fu) return __int_as_float((int)(sign | 0x7f800000u | (m << 13)));  // inf / NaN
    if (e == 0u) {                                                                   // zero, subnormal
        const float v = (float)m * 5.9604644775390625e-8f;                           // m * 2^-24, exact
        return sign != 0u ? -v : v;
    }
    return __int_as_float((int)(sign | ((e + 112u) << 23) | (m << 13)));
}

__device__ __forceinline__ u16 f32_to_half_bits(float v, u32 dt) {
    const u32 b = __float_as_uint(v);
    const u32 a = b & 0x7fffffffu;
    if (dt == DT_BF16) {
        if (a > 0x7f800000u) return (u16)((b >> 16) | 0x40u);  // NaN stays a quiet NaN
        return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
    }
    const u32 sign = (b >> 16) & 0x8000u;
    if (a > 0x7f800000u) return (u16)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (u16)(sign | 0x7c00u);  // 65520 and above: infinity
    if (a < 0x38800000u) {
        // Below 2^-14: a subnormal count of 2^-24, rounded to nearest even (exact scaling first).
        const float x = __int_as_float((int)a) * 16777216.0f;
        u32 k = (u32)x;
        const float frac = x - (float)k;
        if (frac > 0.5f || (frac == 0.5f && (k & 1u))) k += 1u;
        return (u16)(sign | k);
    }
    return (u16)(sign | (((a + 0xfffu + ((a >> 13) & 1u)) >> 13) - (112u << 10)));
}

// A read-only row (or array) of any dtype: s[j] is element j as f32.
struct RowIn {
    const void* p;
    u32 dt;
    __device__ __forceinline__ float operator[](u64 j) const {
        if (dt == DT_F32) return ((const float*)p)[j];
        return half_bits_to_f32(((const u16*)p)[j], dt);
    }
    __device__ __forceinline__ RowIn operator+(u64 off) const {
        RowIn r;
        r.p = dt == DT_F32 ? (const void*)((const float*)p + off) : (const void*)((const u16*)p + off);
        r.dt = dt;
        return r;
    }
};

// One element of a RowOut: `out[j] = v` stores v rounded to the row's dtype.
struct ElemOut {
    void* p;
    u64 j;
    u32 dt;
    __device__ __forceinline__ void operator=(float v) const {
        if (dt == DT_F32) {
            ((float*)p)[j] = v;
        } else {
            ((u16*)p)[j] = f32_to_half_bits(v, dt);
        }
    }
};

// A writable row (or array) of any dtype, or none (null: `out != 0` is false).
struct RowOut {
    void* p;
    u32 dt;
    __device__ __forceinline__ RowOut(void* ptr = 0, u32 dtype = DT_F32) : p(ptr), dt(dtype) {}
    __device__ __forceinline__ ElemOut operator[](u64 j) const {
        ElemOut e;
        e.p = p;
        e.j = j;
        e.dt = dt;
        return e;
    }
    __device__ __forceinline__ RowOut operator+(u64 off) const {
        if (p == 0) return RowOut(0, dt);
        return RowOut(dt == DT_F32 ? (void*)((float*)p + off) : (void*)((u16*)p + off), dt);
    }
    __device__ __forceinline__ bool operator!=(int) const { return p != 0; }
    __device__ __forceinline__ bool operator==(int) const { return p == 0; }
};

__device__ __forceinline__ RowIn row_in(const void* p, u32 dt) {
    RowIn r;
    r.p = p;
    r.dt = dt;
    return r;
}

// ---- grid indexing ------------------------------------------------------------------------------

// The linear index of this block in a 2D grid (the host splits more than 2^31-1 blocks over y;
// blocks past the end of the work must check their index).
__device__ __forceinline__ u64 block_linear() {
    return (u64)blockIdx.y * (u64)gridDim.x + (u64)blockIdx.x;
}

// Total number of threads of the (2D) grid, for grid-stride loops.
__device__ __forceinline__ u64 grid_threads() {
    return (u64)gridDim.x * (u64)gridDim.y * (u64)blockDim.x;
}

// ---- reductions ---------------------------------------------------------------------------------

// Shuffles any plain struct of 4-byte (or 8-byte) fields, one 32-bit word at a time.
template <class S>
__device__ __forceinline__ S shfl_xor_any(S v, int lane_mask) {
    static_assert(sizeof(S) % 4 == 0, "shuffled states are made of 32-bit words");
    union Words {
        S s;
        int w[sizeof(S) / 4];
    };
    Words in, out;
    in.s = v;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(S) / 4); ++i) {
        out.w[i] = __shfl_xor_sync(FULL_MASK, in.w[i], lane_mask);
    }
    return out.s;
}

// Butterfly all-reduce over the 32 lanes of a warp: every lane ends with the merge of all 32
// values. All 32 lanes must call it (lanes without data pass merge.identity()).
template <class S, class M>
__device__ __forceinline__ S warp_allreduce(S v, const M& merge) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = merge(v, shfl_xor_any(v, offset));
    }
    return v;
}

// All-reduce over a block (blockDim.x a multiple of 32, at most 1024): each warp reduces, lane 0
// of each warp parks its result in shared memory, then every warp reduces those (in warp order)
// so that every thread gets the result. Every thread of the block must call it.
template <class S, class M>
__device__ __forceinline__ S block_allreduce(S v, const M& merge) {
    __shared__ S parked[32];
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    const u32 warps = (blockDim.x + 31u) >> 5;
    v = warp_allreduce(v, merge);
    __syncthreads();  // a previous call may still be reading `parked`
    if (lane == 0) parked[warp] = v;
    __syncthreads();
    v = lane < warps ? parked[lane] : merge.identity();
    return warp_allreduce(v, merge);
}

template <class T>
struct SumOp {
    __device__ __forceinline__ T identity() const { return (T)0; }
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

struct D3 {
    double a, b, c;
};

// N floats summed together.
template <int N>
struct FArr {
    float v[N];
};

template <int N>
struct SumFArr {
    __device__ __forceinline__ FArr<N> identity() const {
        FArr<N> r;
#pragma unroll
        for (int i = 0; i < N; ++i) r.v[i] = 0.f;
        return r;
    }
    __device__ __forceinline__ FArr<N> operator()(FArr<N> x, FArr<N> y) const {
        FArr<N> r;
#pragma unroll
        for (int i = 0; i < N; ++i) r.v[i] = x.v[i] + y.v[i];
        return r;
    }
};

// N doubles summed together.
template <int N>
struct DArr {
    double v[N];
};

template <int N>
struct SumDArr {
    __device__ __forceinline__ DArr<N> identity() const {
        DArr<N> r;
#pragma unroll
        for (int i = 0; i < N; ++i) r.v[i] = 0.0;
        return r;
    }
    __device__ __forceinline__ DArr<N> operator()(DArr<N> x, DArr<N> y) const {
        DArr<N> r;
#pragma unroll
        for (int i = 0; i < N; ++i) r.v[i] = x.v[i] + y.v[i];
        return r;
    }
};

struct SumD3 {
    __device__ __forceinline__ D3 identity() const {
        D3 r;
        r.a = 0.0;
        r.b = 0.0;
        r.c = 0.0;
        return r;
    }
    __device__ __forceinline__ D3 operator()(D3 x, D3 y) const {
        D3 r;
        r.a = x.a + y.a;
        r.b = x.b + y.b;
        r.c = x.c + y.c;
        return r;
    }
};

// ---- online softmax -----------------------------------------------------------------------------

// The online-softmax state of a stream of logits at temperature T: the running maximum m of the
// raw logits (empty: -inf) and z = sum_j exp((x_j - m) / T). Differences x_j - m are taken before
// dividing by T, which keeps precision for |x| ~ 1e4 and T ~ 0.05.
struct SoftmaxState {
    float m, z;
};

__device__ __forceinline__ SoftmaxState softmax_empty() {
    SoftmaxState s;
    s.m = f_neg_inf();
    s.z = 0.f;
    return s;
}

// Adds one finite logit.
__device__ __forceinline__ void softmax_push(SoftmaxState& st, float x, float inv_t) {
    if (x > st.m) {
        // expf(-inf) = 0 handles the first element (z = 0 then anyway).
        st.z *= expf((st.m - x) * inv_t);
        st.m = x;
    }
    st.z += expf((x - st.m) * inv_t);
}

struct SoftmaxMerge {
    float inv_t;
    __device__ __forceinline__ SoftmaxState identity() const { return softmax_empty(); }
    __device__ __forceinline__ SoftmaxState operator()(SoftmaxState a, SoftmaxState b) const {
        if (b.m == f_neg_inf()) return a;
        if (a.m == f_neg_inf()) return b;
        SoftmaxState r;
        r.m = fmaxf(a.m, b.m);
        r.z = a.z * expf((a.m - r.m) * inv_t) + b.z * expf((b.m - r.m) * inv_t);
        return r;
    }
};

// Merges two "Z - 1" sums (Z = sum_j exp((x_j - m)/T), the max's own 1 left out, so that a confident
// row keeps log Z = log1p(Z - 1) and 1 - p_max = (Z - 1)/Z). da = m_a - m and db = m_b - m (<= 0; 0
// for a side at the merged max m), ra and rb the matching rescale factors. A side at the max keeps
// its Z - 1; the other brings all of its Z, rescaled; two sides at the max bring one extra 1.
__device__ __forceinline__ float zm1_merge_r(float a_zm1, float da, float ra, float b_zm1, float db, float rb) {
    return (da == 0.f ? a_zm1 : (a_zm1 + 1.f) * ra) + (db == 0.f ? b_zm1 : (b_zm1 + 1.f) * rb) +
           (da == 0.f && db == 0.f ? 1.f : 0.f);
}

// zm1_merge_r at temperature 1/inv_t (rescale factors exp(d * inv_t)).
__device__ __forceinline__ float zm1_merge(float a_zm1, float da, float b_zm1, float db, float inv_t) {
    return zm1_merge_r(a_zm1, da, expf(da * inv_t), b_zm1, db, expf(db * inv_t));
}

// ---- the two row layouts ------------------------------------------------------------------------

// Rows per block in the warp-per-row layout: blockDim.x / 32 (the host launches 256 threads).
struct WarpGroup {
    u32 rank;  // lane, 0..31
    __device__ __forceinline__ u32 size() const { return 32u; }
    template <class S, class M>
    __device__ __forceinline__ S reduce(S v, const M& merge) const {
        return warp_allreduce(v, merge);
    }
    __device__ __forceinline__ bool any(bool p) const { return __any_sync(FULL_MASK, p) != 0; }
};

struct BlockGroup {
    u32 rank;  // threadIdx.x
    __device__ __forceinline__ u32 size() const { return blockDim.x; }
    template <class S, class M>
    __device__ __forceinline__ S reduce(S v, const M& merge) const {
        return block_allreduce(v, merge);
    }
    __device__ __forceinline__ bool any(bool p) const { return __syncthreads_or(p ? 1 : 0) != 0; }
};

// The row of this warp in the warp-per-row layout (may be past the end: check it).
__device__ __forceinline__ u64 warp_row() {
    return block_linear() * (u64)(blockDim.x >> 5) + (u64)(threadIdx.x >> 5);
}

__device__ __forceinline__ WarpGroup warp_group() {
    WarpGroup g;
    g.rank = threadIdx.x & 31u;
    return g;
}

__device__ __forceinline__ BlockGroup block_group() {
    BlockGroup g;
    g.rank = threadIdx.x;
    return g;
}

// Fills a row's output with one value (a masked row's zeros, a bad row's NaN). Null: nothing.
template <class G>
__device__ __forceinline__ void fill_row(const G& g, RowOut out, u32 c, float value) {
    if (out == 0) return;
    for (u32 j = g.rank; j < c; j += g.size()) out[j] = value;
}

// The gradient of a row loss through a softmax sums to a known total over the row (0, mostly).
// Where one element holds almost all the probability (confident rows, small T), its direct value
// is a difference of O(1) terms that f32 rounding wipes out (p_j - q_j with p, q ~ 1, or
// p_j (x_j - sum_i p_i x_i)), while the other elements' values are accurate. So the gradient pass
// writes every element directly, then sums the others' gradients and probability mass, and where
// the row has a unique maximum whose rest mass (sum of the other elements' weights) is below
// COMPLEMENT_MASS, its owner rewrites it as (total - sum of the others). Where the rest mass is
// larger the direct value is the more accurate one (the others' sum carries the rounding of the
// softmax normalisation), so it stays.
#define COMPLEMENT_MASS 0.01f

struct ComplementTracker {
    float rest;  // sum of the gradient over the elements that are not the maximum
    float mass;  // sum of the weight (p or q) over those elements
    float ties;  // number of elements equal to the maximum
    u32 owner;   // this thread's index holding the maximum (0xffffffff: none)
};

__device__ __forceinline__ ComplementTracker complement_start() {
    ComplementTracker c;
    c.rest = 0.f;
    c.mass = 0.f;
    c.ties = 0.f;
    c.owner = 0xffffffffu;
    return c;
}

__device__ __forceinline__ void complement_add(ComplementTracker& c, u32 j, bool is_max, float grad, float weight) {
    if (is_max) {
        c.ties += 1.f;
        c.owner = j;
    } else {
        c.rest += grad;
        c.mass += weight;
    }
}

// After the reduction of (rest, mass, ties): whether the owner should rewrite its element.
__device__ __forceinline__ bool complement_applies(const ComplementTracker& c, float rest, float mass, float ties) {
    return c.owner != 0xffffffffu && ties == 1.f && mass < COMPLEMENT_MASS && is_finite_f(rest);
}

// The factor that turns a row sum into the reduced loss (Reduction codes of src/ops/mod/:
// 0 batchmean, 1 sum, 2 none), from the valid-row count written by `count_valid`.
__device__ __forceinline__ float reduction_factor(u32 reduction, const u32* count) {
    if (reduction != 0u) return 1.f;
    const u32 valid = count[0];
    return valid == 0u ? 0.f : 1.f / (float)valid;
}

// ---- divergences of teacher logits at high temperature ------------------------------------------
//
// Shared by divergence.cu (forward and reverse KL) and hinton.cu (its KL part); the forms are
// described in divergence.cu's header. Where p ~ q (large T, or a student close to its teacher) a
// KL-type divergence is second order in the log-ratio while the terms it is computed from are
// first order, so every piece below avoids a difference of nearly equal f32 values.

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

// log(Z_s / Z_t) from Z_s, Z_t and dZ = Z_s - Z_t (dZ summed through exp_gap / rescale_gap).
__device__ __forceinline__ float log_ratio(float zs, float zt, float dz) {
    return fabsf(dz) < 0.5f * zt ? log1pf(dz / zt) : logf(zs) - logf(zt);
}

// p - q from q, p and u = log p - log q: q expm1(u) where they are close (the difference of the
// two f32 probabilities would keep only their rounding), p - q elsewhere and where q is 0.
// (q - p is gap_pq(p, q, -u).)
__device__ __forceinline__ float gap_pq(float q, float p, float u) {
    return fabsf(u) < 0.5f && q != 0.f ? q * expm1f(u) : p - q;
}

// x^s_j - x^t_j = ((s_j - m_s) - (t_j - m_t))/T with the differences in f64 (exact for f32 inputs),
// so that it keeps its relative precision where the student matches the teacher (s_j - t_j ~
// m_s - m_t) as well as where one logit is at its max and the other far below. it: 1/T in f64.
__device__ __forceinline__ double logit_delta(float s, float ms, float t, float mt, double it) {
    return (((double)s - (double)ms) - ((double)t - (double)mt)) * it;
}

// e^y - 1 - y in f64 without cancellation (the series where |y| < 1e-2: relative error < 1e-10).
__device__ __forceinline__ double expm1_minus_x(double y) {
    if (fabs(y) < 1e-2) return y * y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0))));
    return expm1(y) - y;
}

// ---- DKD's binary distributions (dkd.cu, sharded.cu) ----

// Forward KL's term q phi(u) and p - q in f64, u = log p - log q (the binary distributions,
// once per row).
__device__ __forceinline__ void dkd_term_gap(double q, double p, double u, double& term, double& gap) {
    if (q == 0.0) {
        term = p;
        gap = p;
    } else if (fabs(u) < 0.5) {
        const double em1 = expm1(u);
        term = q * expm1_minus_x(u);
        gap = q * em1;
    } else {
        term = (p - q) - q * u;
        gap = p - q;
    }
}

__device__ __forceinline__ double dkd_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ double dkd_softplus(double x) { return fmax(x, 0.0) + log1p(exp(-fabs(x))); }

// TCKD and p_g - q_g from the log-odds d_t, d_s and e = D_s - D_t taken without cancellation
// (dkd.cu's header; docs/LOSSES.md section 8).
__device__ __forceinline__ void dkd_binary(double d_t, double d_s, double e, double& tckd, double& gap) {
    const double qg = dkd_sigmoid(-d_t), qr = dkd_sigmoid(d_t);
    const double pg = dkd_sigmoid(-d_s), pr = dkd_sigmoid(d_s);
    double ug, ur;
    if (fabs(e) < 0.5) {
        ug = -log1p(qr * expm1(e));
        ur = -log1p(qg * expm1(-e));
    } else {
        ug = dkd_softplus(d_t) - dkd_softplus(d_s);
        ur = dkd_softplus(-d_t) - dkd_softplus(-d_s);
    }
    double tg, gg, tr, gr;
    dkd_term_gap(qg, pg, ug, tg, gg);
    dkd_term_gap(qr, pr, ur, tr, gr);
    tckd = tg + tr;
    gap = qg <= qr ? gg : -gr;  // the bin with the smaller teacher probability has the digits
}

// log(1 + u) - u in f64 without cancellation (the series where |u| < 1e-2).
__device__ __forceinline__ double log1p_minus_x(double u) {
    if (fabs(u) < 1e-2) return u * u * (-0.5 + u * (1.0 / 3.0 + u * (-0.25 + u * (0.2 + u * (-1.0 / 6.0)))));
    return log1p(u) - u;
}

// Whether the plain forms' divergence d = center +- lr (center the weighted mean of the log-ratio,
// lr = log(Z_s/Z_t)) must be refined: they carry an f32 rounding of about 1e-7 (|center| +
// sqrt(2 d)) (the size of the summed terms), so they are kept only where d > 1e-2 and
// d > 0.05 (|center| + |lr|). (NaN: refined, and the refined pass carries the NaN.)
__device__ __forceinline__ bool kl_needs_refining(float d, float center, float lr) {
    return !(d > 1e-2f && d > 0.05f * (fabsf(center) + fabsf(lr)));
}

// The refined pass over a row (teacher logits, every element finite; the whole group calls it).
// With the weights w (e^t = exp((t_j - m_t)/T) for forward KL, e^s for reverse KL), delta_j =
// logit_delta and y = +-delta - a around the anchor a = -center (the w-mean of +-delta), in f64:
// Z = sum w, E = sum w y, W = sum w (e^y - 1 - y) (expm1_minus_x, the sum q phi(u) of the WGSL
// kernels around a), u = (E + W)/Z,
//   D = log E_w[e^y] - E_w[y] = (log1p(u) - u) + W/Z,
// exact to the f64 rounding of second-order terms. Rewrites d, lr = log(Z_s/Z_t) = +-(a + log1p(u))
// (for the gradients' dl = delta - lr) and center = -(a + E/Z) (the teacher's gradient). Reads
// s and t only (in-place safe before the gradient pass).
template <class G>
__device__ __forceinline__ void refine_kl_row(const G& g, RowIn s, RowIn t, u32 c, float ms, float mt,
                                              float it, double it_d, bool forward, float& d, float& lr,
                                              float& center) {
    const double anc = -(double)center;
    D3 w = SumD3().identity();
    for (u32 j = g.rank; j < c; j += g.size()) {
        const float sj = s[j];
        const float tj = t[j];
        const double delta = logit_delta(sj, ms, tj, mt, it_d);
        const double y = (forward ? delta : -delta) - anc;
        const float wj = forward ? expf((tj - mt) * it) : expf((sj - ms) * it);
        if (wj > 0.f) {
            w.a += (double)wj;
            w.b += (double)wj * y;
            w.c += (double)wj * expm1_minus_x(y);
        }
    }
    w = g.reduce(w, SumD3());
    const double u = (w.b + w.c) / w.a;
    const double l1 = log1p(u);
    d = (float)(log1p_minus_x(u) + w.c / w.a);
    lr = forward ? (float)(anc + l1) : (float)(-(anc + l1));
    center = (float)(-(anc + w.b / w.a));
}
