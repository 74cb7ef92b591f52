// Vocab-sharded row losses (docs/LOSSES.md section 9; f64 reference src/ops/sharded/reference.rs,
// the stats layout src/ops/sharded/mod.rs; WGSL sharded.wgsl; fast CPU
// backend/cpu_fast/row_losses/sharded.rs). One block per row (256 threads): each thread strides
// over the shard's columns, elements in f32, each thread's sums in f64, merged by
// block_allreduce (fixed order: the same bits on every run).
//
//   sharded_stats:         phase 1, the row's maxima and the 9 sums relative to them (masked rows 0)
//   sharded_jsd_terms:     the JSD round, [sum q (log q - log M), sum p (log p - log M)] per row
//   sharded_loss_and_grad: phase 2, the row's loss part and the shard's gradient columns
//
// From the combined stats: log p = u/T - log Zs, log q - log p = (v - u)/T + log(Zs/Zt) with
// log(Zs/Zt) = log1p(D/Zt), KL(q||p) = Af/(T Zt) + log(Zs/Zt), KL(p||q) = Ar/(T Zs) - log(Zs/Zt).
// A teacher given as probabilities or log-probabilities (teacher_form 1, 2): m_t = 0 and
// v_j = T log q_j in the stats (Zt = sum q, Af = sum q (T log q - u), 0 where q = 0,
// Ar = sum e^{u/T} (u - T log q), +inf where q = 0); phase 2 reads log q from the input (log Zt = 0,
// not renormalised), log q - log p formed in f64: KL(q||p) = Af/T + Zt log Zs,
// KL(p||q) = Ar/(T Zs) - log Zs.
// DKD (teacher_form 3, its teacher as logits; div 3 in phase 2, beta its TCKD weight and w_div its
// NCKD weight): the stats are the rest of the row's (the label's column left out of the maxima and
// of every sum but S; Ar 0); phase 2 takes TCKD from the log-odds of the rest D = log Z_rest - x_y
// in f64 (sharded_dkd) at the label's column and NCKD's forward-KL terms over the rest; CE's
// normaliser is logaddexp(log Zs1, s_y - m_s).

#define SHARDED_MAXIMA 2u
#define SHARDED_SUMS 9u

struct ShardedMax {
    __device__ __forceinline__ float identity() const { return f_neg_inf(); }
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__device__ __forceinline__ bool sharded_masked(const int* labels, u32 has_labels, u64 r, int ignore) {
    return has_labels != 0u && labels[r] == ignore;
}

// The row's label as a column of the shard, or -1.
__device__ __forceinline__ int sharded_local(const int* labels, u32 has_labels, u64 r, u32 offset, u32 width) {
    if (has_labels == 0u) return -1;
    const int y = labels[r];
    if (y < (int)offset || (long long)y >= (long long)offset + (long long)width) return -1;
    return y - (int)offset;
}

// A given teacher's log q (f64; -inf where q = 0) and q from its value t.
__device__ __forceinline__ double sharded_given_lq(u32 form, float t) {
    return form == 1u ? (t > 0.f ? log((double)t) : (double)f_neg_inf()) : (double)t;
}
__device__ __forceinline__ float sharded_given_q(u32 form, float t) {
    return form == 1u ? t : expf(t);
}

// e^a - e^b for a, b <= 0, around the larger: no cancellation, no overflow.
__device__ __forceinline__ float sharded_exp_diff(float a, float b) {
    const float mag = expf(fmaxf(a, b)) * -expm1f(-fabsf(a - b));
    return a >= b ? mag : -mag;
}

extern "C" __global__ void sharded_stats(const float* student, const float* teacher, const int* labels,
                                         float* stats, u32 rows, u32 width, u32 offset, float inv_t,
                                         u32 has_teacher, u32 has_labels, int ignore_index,
                                         float temperature, u32 teacher_form) {
    const u64 r = block_linear();
    if (r >= rows) return;
    const u64 base = r * (u64)width;
    const bool dkd = teacher_form == 3u;
    // DKD: the label's column, left out of the rest's stats (-1: none in this shard)
    const int skip = dkd ? sharded_local(labels, has_labels, r, offset, width) : -1;
    float ms = f_neg_inf(), mt = f_neg_inf();
    for (u32 j = threadIdx.x; j < width; j += blockDim.x) {
        if ((int)j == skip) continue;
        ms = fmaxf(ms, student[base + j]);
        if (has_teacher) mt = fmaxf(mt, teacher[base + j]);
    }
    ms = block_allreduce(ms, ShardedMax());
    mt = block_allreduce(mt, ShardedMax());
    if (!has_teacher || (teacher_form != 0u && !dkd)) mt = 0.f;
    // zs, zs1, zt, af, ar, sum s, dz
    DArr<7> acc = SumDArr<7>().identity();
    for (u32 j = threadIdx.x; j < width; j += blockDim.x) {
        const float s = student[base + j];
        if ((int)j == skip) {
            acc.v[5] += s;
            continue;
        }
        const float u = s - ms;
        const float us = u * inv_t;
        const float eu = expf(us);
        acc.v[0] += eu;
        acc.v[1] += expf(u);
        acc.v[5] += s;
        if (has_teacher && teacher_form != 0u && !dkd) {
            // v_j = T log q_j: e^{v_j/T} = q_j
            const float tv = teacher[base + j];
            const double lq = sharded_given_lq(teacher_form, tv);
            const double q = teacher_form == 1u ? (double)tv : exp((double)tv);
            acc.v[2] += q;
            acc.v[3] += q > 0.0 ? q * ((double)temperature * lq - (double)u) : 0.0;
            acc.v[4] += lq == (double)f_neg_inf() ? (double)f_inf() : (double)eu * ((double)u - (double)temperature * lq);
            acc.v[6] += (double)eu - q;
        } else if (has_teacher) {
            const float v = teacher[base + j] - mt;
            const float vs = v * inv_t;
            const float ev = expf(vs);
            acc.v[2] += ev;
            acc.v[3] += ev * (v - u);
            if (!dkd) acc.v[4] += eu * (u - v);
            acc.v[6] += sharded_exp_diff(us, vs);
        }
    }
    acc = block_allreduce(acc, SumDArr<7>());
    if (threadIdx.x == 0) {
        const bool keep = !sharded_masked(labels, has_labels, r, ignore_index);
        float* m = stats + r * SHARDED_MAXIMA;
        float* z = stats + (u64)rows * SHARDED_MAXIMA + r * SHARDED_SUMS;
        m[0] = keep ? ms : 0.f;
        m[1] = keep ? mt : 0.f;
        const int order[7] = {0, 1, 2, 3, 4, 5, 8};  // acc's sums in the stats' columns
        for (int i = 0; i < 7; ++i) z[order[i]] = keep ? (float)acc.v[i] : 0.f;
        const int y = sharded_local(labels, has_labels, r, offset, width);
        z[6] = keep && y >= 0 ? student[base + y] : 0.f;
        z[7] = keep && y >= 0 && has_teacher ? teacher[base + y] : 0.f;
    }
}

// A row's constants from the combined stats (in f64, used in f32).
// (A given teacher: log_zs64, the f64 log Zs of its f64 log q - log p.)
struct ShardedRow {
    float ms, mt, log_zs, log_zt, log_zs1, ratio, forward, reverse;
    double log_zs64;
};

__device__ __forceinline__ ShardedRow sharded_row(const float* stats, u32 rows, u64 r, float temperature,
                                                  u32 teacher_form) {
    const float* m = stats + r * SHARDED_MAXIMA;
    const float* z = stats + (u64)rows * SHARDED_MAXIMA + r * SHARDED_SUMS;
    const double zs = z[0], zt = z[2];
    if (teacher_form == 1u || teacher_form == 2u) {
        // a given teacher: log Zt = 0 (not renormalised)
        ShardedRow g;
        const double log_zs = log(zs);
        g.ms = m[0];
        g.mt = 0.f;
        g.log_zs = (float)log_zs;
        g.log_zs64 = log_zs;
        g.log_zt = 0.f;
        g.log_zs1 = (float)log((double)z[1]);
        g.ratio = (float)log_zs;
        g.forward = (float)((double)z[3] / (double)temperature + zt * log_zs);
        g.reverse = (float)((double)z[4] / ((double)temperature * zs) - log_zs);
        return g;
    }
    const double ratio = log1p((double)z[8] / zt);
    ShardedRow g;
    g.log_zs64 = log(zs);
    g.ms = m[0];
    g.mt = m[1];
    g.log_zs = (float)log(zs);
    g.log_zt = (float)(log(zs) - ratio);
    g.log_zs1 = (float)log((double)z[1]);
    g.ratio = (float)ratio;
    g.forward = (float)((double)z[3] / ((double)temperature * zt) + ratio);
    g.reverse = (float)((double)z[4] / ((double)temperature * zs) - ratio);
    return g;
}

// DKD's row constants (in f64) from its rest-of-row stats: TCKD, p_y - q_y and CE's log Zs1 of the
// whole row relative to the rest's m_s, from the log-odds of the rest D = log Z_rest - x_y
// (common.cuh's dkd_binary, as dkd.cu).
struct ShardedDkd {
    float tckd, gap, log_zs1;
};

__device__ __forceinline__ ShardedDkd sharded_dkd(const float* stats, u32 rows, u64 r, float temperature) {
    const float* m = stats + r * SHARDED_MAXIMA;
    const float* z = stats + (u64)rows * SHARDED_MAXIMA + r * SHARDED_SUMS;
    const double ms = m[0], mt = m[1], sy = z[6], ty = z[7], t = temperature;
    const double zs = z[0], zt = z[2], ratio = log1p((double)z[8] / zt);
    const double a = log((double)z[1]), b = sy - ms;
    const double d_s = log(zs) + (ms - sy) / t, d_t = log(zt) + (mt - ty) / t;
    const double e = ratio + ((ms - sy) - (mt - ty)) / t;
    double tckd, gap;
    dkd_binary(d_t, d_s, e, tckd, gap);
    ShardedDkd d;
    d.tckd = (float)tckd;
    d.gap = (float)gap;
    d.log_zs1 = (float)(fmax(a, b) + log1p(exp(-fabs(a - b))));
    return d;
}

// JSD's per-element pieces from dl = log p - log q (as divergence.cu's jsd_logs and its series):
// lq_m = log q - log M = -log1p((1-beta) expm1(dl)), lp_m = log p - log M = -log1p(beta expm1(-dl))
// (the softplus forms where the log1p argument is below -1/2), and the divergence's term
// c = beta q lq_m + (1-beta) p lp_m >= 0, from its series q f(dl) where |dl| < 0.1 (first-order
// halves that cancel to second order where p ~ q).
struct ShardedJsd {
    float beta, one_m_beta, log_beta, log_1m_beta, c2, c3, c4, c5, c6;
};

__device__ __forceinline__ ShardedJsd sharded_jsd_consts(float beta) {
    ShardedJsd j;
    j.beta = beta;
    j.one_m_beta = 1.f - beta;
    j.log_beta = logf(beta);
    j.log_1m_beta = logf(1.f - beta);
    j.c2 = 0.5f * beta * (1.f - beta);
    j.c3 = (1.f + beta) * (1.f / 6.f);
    j.c4 = (2.f * beta * beta + 1.f) * (1.f / 24.f);
    j.c5 = (3.f * beta + 1.f) * (2.f * beta * beta - 2.f * beta + 1.f) * (1.f / 120.f);
    j.c6 = (((24.f * beta - 30.f) * beta + 10.f) * beta * beta + 1.f) * (1.f / 720.f);
    return j;
}

__device__ __forceinline__ float sharded_softplus(float z) {
    return fmaxf(z, 0.f) + log1pf(expf(-fabsf(z)));
}

// (lq_m, lp_m) of one element, and its term c (given p and q).
__device__ __forceinline__ void sharded_jsd(const ShardedJsd& j, float dl, float p, float q, float* lq_m,
                                            float* lp_m, float* c) {
    const float log_rho = j.log_beta - j.log_1m_beta;
    const float arg_q = j.one_m_beta * expm1f(dl), arg_p = j.beta * expm1f(-dl);
    *lq_m = arg_q >= -0.5f && arg_q <= 3.0e38f ? -log1pf(arg_q) : -sharded_softplus(dl - log_rho) - j.log_beta;
    *lp_m = arg_p >= -0.5f && arg_p <= 3.0e38f ? -log1pf(arg_p) : -sharded_softplus(log_rho - dl) - j.log_1m_beta;
    if (fabsf(dl) < 0.1f) {
        const float x = dl;
        *c = q * (j.c2 * x * x * (1.f + 2.f * x * (j.c3 + x * (j.c4 + x * (j.c5 + x * j.c6)))));
    } else {
        // (a given probability of 0: its half is 0 log 0 = 0)
        *c = (q > 0.f ? j.beta * q * *lq_m : 0.f) + j.one_m_beta * p * *lp_m;
    }
}

// One element's (log p, log q - log p, p, q); a given teacher's difference in f64.
__device__ __forceinline__ void sharded_elem(const ShardedRow& g, float s, float t, float inv_t, float temperature,
                                             u32 teacher_form, float* lp, float* dq, float* p, float* q) {
    const float u = s - g.ms;
    if (teacher_form != 0u) {
        const double lp64 = ((double)s - (double)g.ms) / (double)temperature - g.log_zs64;
        *lp = (float)lp64;
        *dq = (float)(sharded_given_lq(teacher_form, t) - lp64);
        *p = expf(*lp);
        *q = sharded_given_q(teacher_form, t);
        return;
    }
    const float v = t - g.mt;
    *lp = u * inv_t - g.log_zs;
    *dq = (v - u) * inv_t + g.ratio;
    *p = expf(*lp);
    *q = expf(v * inv_t - g.log_zt);
}

extern "C" __global__ void sharded_jsd_terms(const float* student, const float* teacher, const int* labels,
                                             const float* stats, float* terms, u32 rows, u32 width,
                                             float inv_t, float temperature, float beta, u32 has_labels,
                                             int ignore_index, u32 teacher_form) {
    const u64 r = block_linear();
    if (r >= rows) return;
    const u64 base = r * (u64)width;
    const ShardedRow g = sharded_row(stats, rows, r, temperature, teacher_form);
    const ShardedJsd jc = sharded_jsd_consts(beta);
    DArr<2> acc = SumDArr<2>().identity();
    for (u32 j = threadIdx.x; j < width; j += blockDim.x) {
        float lp, dq, p, q;
        sharded_elem(g, student[base + j], teacher[base + j], inv_t, temperature, teacher_form, &lp, &dq, &p, &q);
        float lq_m, lp_m, c;
        sharded_jsd(jc, -dq, p, q, &lq_m, &lp_m, &c);
        acc.v[0] += q > 0.f ? q * lq_m : 0.f;
        acc.v[1] += p * lp_m;
    }
    acc = block_allreduce(acc, SumDArr<2>());
    if (threadIdx.x == 0) {
        const bool keep = !sharded_masked(labels, has_labels, r, ignore_index);
        terms[r * 2] = keep ? (float)acc.v[0] : 0.f;
        terms[r * 2 + 1] = keep ? (float)acc.v[1] : 0.f;
    }
}

// div: 0 forward KL, 1 reverse KL, 2 JSD; k = grad_scale times the reduction's factor; grad_t
// may be 0 (no teacher gradient), jsd 0 unless div 2.
extern "C" __global__ void sharded_loss_and_grad(const float* student, const float* teacher, const int* labels,
                                                 const float* stats, const float* jsd, float* row_loss,
                                                 float* grad_s, float* grad_t, u32 rows, u32 width,
                                                 u32 classes, u32 offset, float inv_t, float temperature,
                                                 float w_ce, float w_div, u32 div, float beta, float eps,
                                                 float k, u32 has_teacher, u32 has_labels, int ignore_index,
                                                 u32 teacher_form) {
    const u64 r = block_linear();
    if (r >= rows) return;
    const u64 base = r * (u64)width;
    const bool keep = !sharded_masked(labels, has_labels, r, ignore_index);
    ShardedRow g = sharded_row(stats, rows, r, temperature, teacher_form);
    const int y = sharded_local(labels, has_labels, r, offset, width);
    const bool dkd = div == 3u;
    ShardedDkd dk = {0.f, 0.f, 0.f};
    if (dkd && keep) {
        dk = sharded_dkd(stats, rows, r, temperature);
        g.log_zs1 = dk.log_zs1;
    }
    const bool with_t = has_teacher != 0u && w_div != 0.f && !dkd;
    const float kl_q = div == 2u && with_t ? jsd[r * 2] : 0.f;
    const float kl_p = div == 2u && with_t ? jsd[r * 2 + 1] : 0.f;
    const float uniform_part = eps / (float)classes;
    const float k_ce = k * w_ce, k_div = k * w_div * temperature;
    const float w_div_t2 = w_div * temperature * temperature;
    const ShardedJsd jc = sharded_jsd_consts(beta);
    double part = 0.0;
    for (u32 j = threadIdx.x; j < width; j += blockDim.x) {
        const float s = student[base + j];
        float gs = 0.f, gt = 0.f;
        if (w_ce != 0.f) {
            const float lp1 = s - g.ms - g.log_zs1;
            const float tgt = ((int)j == y ? 1.f - eps : 0.f) + uniform_part;
            part -= (double)(w_ce * tgt * lp1);
            gs += k_ce * (expf(lp1) - tgt);
        }
        if (dkd) {
            // TCKD at the label's column; NCKD's forward-KL terms over the rest.
            if ((int)j == y) {
                part += (double)temperature * temperature * beta * dk.tckd;
                gs += k * temperature * beta * dk.gap;
            } else {
                float lp, dq, p, q;
                sharded_elem(g, s, teacher[base + j], inv_t, temperature, 0u, &lp, &dq, &p, &q);
                double term, unused;
                dkd_term_gap(q, p, -dq, term, unused);  // q phi(log p - log q), common.cuh
                part += (double)w_div_t2 * term;
                gs += k_div * (p - q) - k * temperature * beta * dk.gap * p;
            }
        } else if (with_t) {
            float lp, dq, p, q;
            sharded_elem(g, s, teacher[base + j], inv_t, temperature, teacher_form, &lp, &dq, &p, &q);
            float d, ds, dt;
            if (div == 0u) {
                d = q > 0.f ? q * dq : 0.f;
                ds = p - q;
                dt = q * (dq - g.forward);
            } else if (div == 1u) {
                d = -p * dq;
                ds = p * (-dq - g.reverse);
                dt = q - p;
            } else {
                float lq_m, lp_m;
                sharded_jsd(jc, -dq, p, q, &lq_m, &lp_m, &d);
                ds = (1.f - beta) * p * (lp_m - kl_p);
                dt = beta * q * (lq_m - kl_q);
            }
            part += (double)(w_div_t2 * d);
            gs += k_div * ds;
            gt = k_div * dt;
        }
        grad_s[base + j] = keep ? gs : 0.f;
        if (grad_t) grad_t[base + j] = keep ? gt : 0.f;
    }
    part = block_allreduce(part, SumOp<double>());
    if (threadIdx.x == 0) row_loss[r] = keep ? (float)part : 0.f;
}
