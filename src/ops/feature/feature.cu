// Feature-based losses (docs/LOSSES.md sections 5 and 6; CPU reference src/ops/feature/).
//
// MSE (FitNets hint): L = (1/M) sum_i (a_i - b_i)^2, dL/da = g 2 (a - b)/M, dL/db = -dL/da.
// Smooth L1 (Huber, delta 1; the RKD comparison, section 7, src/ops/relational/), mode 1:
//   L = (1/M) sum_i h(a_i - b_i), h(d) = d^2/2 if |d| < 1 else |d| - 1/2,
//   dL/da = g clamp(a - b, -1, 1)/M, dL/db = -dL/da (mse.wgsl, `mode`).
//   mse_partial: a fixed grid (the host derives it from M alone) of grid-stride threads; each thread
//                sums its elements in f64 and writes the gradients on the way; each block writes one
//                partial sum.  mse_final: ONE block sums the partials in a fixed order.  So the loss
//                is bit-identical run after run.  A NaN or infinity in a or b makes the loss NaN
//                (both modes).
//
// Attention transfer (Zagoruyko and Komodakis), per sample n of [N, C, HW] maps:
//   Q_n = mean_c A[n,c,:]^2, r_n = max(||Q_n||, 1e-12), u_n = Q_n / r_n,
//   L = sum_{n,i} (u_s - u_t)^2 / (N HW),
//   du_s = g 2 (u_s - u_t)/(N HW), du_t = -du_s,
//   dQ = (du - u (u . du)) / r  when ||Q|| > 1e-12, else du / r,
//   dA[n,c,i] = dQ_i 2 A[n,c,i] / C.
//   at_map  (student, then teacher): sqrt(Q) = the channel RMS of A, summed in f64, grid-stride
//                                    over N*HW. (Q itself overflows f32 from |A| ~ 1.8e19, Q^2 from
//                                    |A| ~ 4e9; the RMS is at most max |A|, so it never overflows.)
//   at_norm (one block per sample):  Q = RMS^2 and ||Q|| in f64 (Q^2 < 1.2e154: no overflow for any
//                                    finite A); per sample {loss_n, r_s, r_t, u_s.(u_s-u_t),
//                                    u_t.(u_t-u_s), 1/r_s, 1/r_t}, f64; and per element u_s, u_t
//                                    (over the RMS maps) and u_s - u_t, taken in f64 (exactly 0
//                                    where the maps agree).
// N*C*HW < 2^32 (AttentionSpec::validate), so per-element index arithmetic is done in u32.
//   at_loss (one block):             L = sum_n loss_n / (N HW), fixed order.
//   at_grad (student, then teacher): dA, grid-stride over N*C*HW; the factor 1/r (down to ~1e-77)
//                                    and A in f64, so that neither underflows f32 on the way.

// ---- MSE ----------------------------------------------------------------------------------------

// a, b: [m]; ga, gb: [m] or null; k = 2 g / M (mode 0, MSE) or g / M (mode 1, smooth L1);
// partials: [gridDim.x * gridDim.y] f64. Launch: 256 threads; blocks = min(ceil(M / 2048), 1024), 1D.
extern "C" __global__ void mse_partial(const float* a, const float* b, float* ga, float* gb, u64 m, float k,
                                       double* partials, u32 mode) {
    double acc = 0.0;
    const u64 stride = grid_threads();
    for (u64 i = block_linear() * blockDim.x + threadIdx.x; i < m; i += stride) {
        const float ai = a[i];
        const float bi = b[i];
        const float d = ai - bi;
        float g;
        double term;
        if (mode == 0u) {
            term = (double)d * (double)d;
            g = k * d;
        } else {
            const double ad = fabs((double)d);
            term = ad < 1.0 ? 0.5 * ad * ad : ad - 0.5;
            // clamp(d, -1, 1) that keeps a NaN (fminf/fmaxf would drop it).
            g = k * (d > 1.f ? 1.f : (d < -1.f ? -1.f : d));
        }
        // inf - inf is NaN but inf^2 would be inf: make any non-finite input a NaN loss.
        acc += (is_finite_f(ai) && is_finite_f(bi)) ? term : (double)f_nan();
        if (ga != 0) ga[i] = g;
        if (gb != 0) gb[i] = -g;
    }
    acc = block_allreduce(acc, SumOp<double>());
    if (threadIdx.x == 0) partials[block_linear()] = acc;
}

// partials: [parts]; loss: [1] = sum / m. Launch: ONE block of 1024 threads.
extern "C" __global__ void mse_final(const double* partials, u32 parts, double m, float* loss) {
    double acc = 0.0;
    for (u32 i = threadIdx.x; i < parts; i += blockDim.x) acc += partials[i];
    acc = block_allreduce(acc, SumOp<double>());
    if (threadIdx.x == 0) loss[0] = (float)(acc / m);
}

// ---- attention transfer -------------------------------------------------------------------------

#define AT_EPS 1e-12
#define AT_STATS 8  // f64 values per sample in `stats`

// a: [n, ch, hw]; q: [n, hw] = sqrt(mean over channels of a^2) (f64 sum: a NaN or infinity gives
// NaN / inf). Launch: 256 threads, grid-stride over n*hw (consecutive threads take consecutive i:
// coalesced reads of each channel plane).
extern "C" __global__ void at_map(const float* a, float* q, u32 n, u32 ch, u32 hw) {
    const u64 total = (u64)n * (u64)hw;
    const u64 stride = grid_threads();
    for (u64 e = block_linear() * blockDim.x + threadIdx.x; e < total; e += stride) {
        const u32 sample = (u32)e / hw;  // e < 2^32
        const u32 i = (u32)e - sample * hw;
        const float* base = a + (u64)sample * (u64)ch * (u64)hw + i;
        double acc = 0.0;
        for (u32 c = 0; c < ch; ++c) {
            const double v = (double)base[(u64)c * (u64)hw];
            acc += v * v;
        }
        q[e] = (float)sqrt(acc / (double)ch);
    }
}

// f64 max(norm, 1e-12) that keeps a NaN norm NaN (fmax would drop it).
__device__ __forceinline__ double at_clamp_norm(double norm) {
    return norm > AT_EPS ? norm : (norm != norm ? norm : AT_EPS);
}

// qs, qt: [n, hw], sqrt(Q) on input (at_map), overwritten with u_s, u_t (each element read, then
// written, by one thread); diff: [n, hw] = u_s - u_t; stats: [n, 8] f64 = {sum_i (u_s - u_t)^2, r_s, r_t,
// u_s.(u_s - u_t), u_t.(u_t - u_s), 1/r_s, 1/r_t, 0}.
// Launch: 256 threads, one block per sample (2D grid past 2^31-1 samples).
extern "C" __global__ void at_norm(float* qs, float* qt, u32 n, u32 hw, double* stats, float* diff) {
    const u64 sample = block_linear();
    if (sample >= n) return;  // the whole block
    float* a = qs + sample * (u64)hw;
    float* b = qt + sample * (u64)hw;
    float* dif = diff + sample * (u64)hw;
    // The two squared norms.
    D3 sq;
    sq.a = 0.0;
    sq.b = 0.0;
    sq.c = 0.0;
    for (u32 i = threadIdx.x; i < hw; i += blockDim.x) {
        const double x = (double)a[i] * (double)a[i];  // Q_i
        const double y = (double)b[i] * (double)b[i];
        sq.a += x * x;
        sq.b += y * y;
    }
    sq = block_allreduce(sq, SumD3());
    const double rs = at_clamp_norm(sqrt(sq.a));
    const double rt = at_clamp_norm(sqrt(sq.b));
    // The loss of the sample and the two dot products of the backward pass.
    D3 acc;
    acc.a = 0.0;
    acc.b = 0.0;
    acc.c = 0.0;
    for (u32 i = threadIdx.x; i < hw; i += blockDim.x) {
        const double us = ((double)a[i] * (double)a[i]) / rs;
        const double ut = ((double)b[i] * (double)b[i]) / rt;
        const double d = us - ut;
        acc.a += d * d;
        acc.b += us * d;
        acc.c -= ut * d;
        a[i] = (float)us;
        b[i] = (float)ut;
        dif[i] = (float)d;
    }
    acc = block_allreduce(acc, SumD3());
    if (threadIdx.x == 0) {
        double* out = stats + sample * AT_STATS;
        out[0] = acc.a;
        out[1] = rs;
        out[2] = rt;
        out[3] = acc.b;
        out[4] = acc.c;
        out[5] = 1.0 / rs;
        out[6] = 1.0 / rt;
        out[7] = 0.0;
    }
}

// stats: [n, 8]; loss: [1] = sum_n stats[n][0] / denom (denom = N*HW). Launch: ONE block of 1024.
extern "C" __global__ void at_loss(const double* stats, u32 n, double denom, float* loss) {
    double acc = 0.0;
    for (u64 i = threadIdx.x; i < n; i += blockDim.x) acc += stats[i * AT_STATS];
    acc = block_allreduce(acc, SumOp<double>());
    if (threadIdx.x == 0) loss[0] = (float)(acc / denom);
}

// The gradient of one side: a: [n, ch, hw] (that side's features), grad: same shape (may alias a:
// index e is read, then written, by one thread), u_this: [n, hw] (this side's u, from at_norm),
// diff: [n, hw] = u_s - u_t (at_norm), stats from at_norm, side: 0 student, 1 teacher,
// kk = g 2/(N HW). Per element in f32, but for the factor 1/r and A (f64: 1/r reaches ~1e-77 for
// |A| ~ 3e38, and A/r would underflow f32 before it is multiplied back up).
// Launch: 256 threads, grid-stride over n*ch*hw.
extern "C" __global__ void at_grad(const float* a, float* grad, const float* u_this, const float* diff,
                                   const double* stats, u32 side, u32 n, u32 ch, u32 hw, float kk) {
    const u32 plane = ch * hw;  // < 2^32
    const u64 total = (u64)n * (u64)plane;
    const u64 stride = grid_threads();
    const float two_over_ch = 2.f / (float)ch;
    const float sign = side == 0u ? kk : -kk;  // du_s = kk (u_s - u_t), du_t = -du_s
    for (u64 e = block_linear() * blockDim.x + threadIdx.x; e < total; e += stride) {
        const u32 sample = (u32)e / plane;  // e < 2^32
        const u32 i = ((u32)e - sample * plane) % hw;
        const double* st = stats + (u64)sample * AT_STATS;
        const bool at_floor = !(st[1 + side] > AT_EPS);  // ||Q|| <= 1e-12: the norm is the floor
        const double inv_r = st[5 + side];
        const float dot = kk * (float)st[3 + side];  // u . du
        const u64 qi = (u64)sample * hw + i;
        const float u = u_this[qi];
        const float du = sign * diff[qi];
        const float dq = (at_floor ? du : du - u * dot) * two_over_ch;  // times r dL/dQ 2/C
        grad[e] = (float)((double)dq * (inv_r * (double)a[e]));
    }
}
