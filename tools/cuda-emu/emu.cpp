// Runs the CUDA kernels (src/ops/*/*.cu) on the CPU (shim.h) with the launch configurations of src/backend/cuda/launch.rs and
// compares them with ports of the f64 CPU references of src/ops/*.rs.
//   g++ -std=c++20 -O1 -pthread tools/cuda-emu/emu.cpp -o /tmp/emu && /tmp/emu [cases]
#include "shim.h"

#include "../../src/backend/cuda/common.cuh"
#include "../../src/ops/softmax/softmax.cu"
#include "../../src/backend/cuda/reduce.cu"
#include "../../src/ops/divergence/divergence.cu"
#include "../../src/ops/cross_entropy/cross_entropy.cu"
#include "../../src/ops/hinton/hinton.cu"
#include "../../src/ops/dkd/dkd.cu"
#include "../../src/ops/sparse/sparse.cu"
#include "../../src/ops/sharded/sharded.cu"
#include "../../src/ops/feature/feature.cu"
#include "../../src/ops/dense/dense.cu"
#include "../../src/ops/optim/optim.cu"
#include "../../src/ops/conv/conv.cu"
#include "../../src/ops/relational/relational.cu"

#include <algorithm>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <string>

using std::vector;
static const double NaN = std::numeric_limits<double>::quiet_NaN();

// ---- launch configurations (mirror of src/backend/cuda/) ----
struct Cfg {
    dim3 grid, block;
    bool block_form;
};
static dim3 grid_for(unsigned long long blocks) { return dim3{(unsigned)std::max(1ull, blocks), 1, 1}; }
static Cfg row_launch(size_t rows, size_t cols) {
    if (cols <= 1024) return Cfg{grid_for((rows + 7) / 8), dim3{256, 1, 1}, false};
    unsigned threads = cols <= 4096 ? 128 : cols <= 16384 ? 256 : cols <= 65536 ? 512 : 1024;
    return Cfg{grid_for(rows), dim3{threads, 1, 1}, true};
}
static const dim3 ONE{1, 1, 1}, T1024{1024, 1, 1}, T256{256, 1, 1};
static dim3 stride_grid(unsigned long long e) { return grid_for(std::min((e + 255) / 256, 4ull * 65535)); }

// ---- references (ports of src/ops) ----
static vector<double> log_softmax_row(const double* z, size_t c, double t) {
    double m = -INFINITY;
    for (size_t j = 0; j < c; ++j) m = std::max(m, z[j]);
    double s = 0;
    for (size_t j = 0; j < c; ++j) s += exp((z[j] - m) / t);
    double lse = log(s);
    vector<double> r(c);
    for (size_t j = 0; j < c; ++j) r[j] = (z[j] - m) / t - lse;
    return r;
}
static bool all_finite(const double* z, size_t c) {
    for (size_t j = 0; j < c; ++j)
        if (!std::isfinite(z[j])) return false;
    return true;
}
static vector<double> to_d(const vector<float>& v) { return vector<double>(v.begin(), v.end()); }

// A reference result, with (where filled) a bound on the f64 reference's own rounding of each
// output (nloss, nrows, ngs, ngt): the comparison cannot resolve the kernel below it (check()).
struct RowRef {
    double loss = 0;
    vector<double> rows, gs, gt;
    double nloss = 0;
    vector<double> nrows, ngs, ngt;
};
// 4 ulps of f64: the unit of the reference's rounding bounds.
static const double REF_EPS = 4 * 2.220446049250313e-16;
static double fin_abs(double v) { return std::isfinite(v) ? fabs(v) : 0.0; }
static double red_factor(int red, size_t valid) { return red == 0 ? (valid == 0 ? 0.0 : 1.0 / valid) : 1.0; }
// sum_j a_j (log a_j - log b_j): a term with a_j = 0 exactly (log a_j = -inf) is 0, one with
// b_j = 0 exactly and a_j > 0 is +inf (src/ops/divergence/ `kl`).
static double kl(const vector<double>& la, const vector<double>& lb) {
    double s = 0;
    for (size_t j = 0; j < la.size(); ++j) {
        if (la[j] == -INFINITY) continue;
        s += lb[j] == -INFINITY ? INFINITY : exp(la[j]) * (la[j] - lb[j]);
    }
    return s;
}
static double log_add_exp(double x, double y) {
    double m = std::max(x, y);
    if (m == -INFINITY) return m;
    return m + log(exp(x - m) + exp(y - m));
}
// src/ops/divergence/ `teacher_valid`: logits and probabilities finite; log-probabilities
// finite or -inf (a probability 0).
static bool teacher_valid(const double* t, size_t c, int teach) {
    for (size_t j = 0; j < c; ++j)
        if (!std::isfinite(t[j]) && !(teach == 2 && t[j] == -INFINITY)) return false;
    return true;
}
// Labels: masked rows (ignore) 0; invalid labels NaN rows (the CUDA contract). eps: reverse KL's
// teacher floor. Reverse KL with a zero teacher probability and no floor: the row loss is +inf
// and, the device contract, the whole row's student gradient NaN (the f64 reference leaves 0 where
// p underflows to 0; the kernel does not look at p there).
static RowRef ref_div(int div, int teach, double temp, double beta, int red, double g, int ignore,
                      const vector<double>& s, const vector<double>& t, const vector<int>* labels, size_t n, size_t c,
                      double eps = 0) {
    size_t valid = 0;
    for (size_t r = 0; r < n; ++r) valid += !(labels && (*labels)[r] == ignore);
    double scale = red_factor(red, valid);
    RowRef o;
    o.rows.assign(n, 0);
    o.gs.assign(n * c, 0);
    o.gt.assign(n * c, 0);
    o.nrows.assign(n, 0);
    o.ngs.assign(n * c, 0);
    o.ngt.assign(n * c, 0);
    for (size_t r = 0; r < n; ++r) {
        if (labels && (*labels)[r] == ignore) continue;
        const double* sr = &s[r * c];
        const double* tr = &t[r * c];
        bool bad_label = labels && ((*labels)[r] < 0 || (*labels)[r] >= (int)c);
        if (bad_label || !all_finite(sr, c) || !teacher_valid(tr, c, teach)) {
            o.rows[r] = NaN;
            for (size_t j = 0; j < c; ++j) o.gs[r * c + j] = o.gt[r * c + j] = NaN;
            continue;
        }
        auto lp = log_softmax_row(sr, c, temp);
        vector<double> lq(c), lm;
        if (teach == 0) lq = log_softmax_row(tr, c, temp);
        else if (teach == 2) lq.assign(tr, tr + c);
        else for (size_t j = 0; j < c; ++j) lq[j] = log(tr[j]);
        double k = g * scale * temp, d;
        double* gs = &o.gs[r * c];
        double* gt = &o.gt[r * c];
        if (div == 0) {
            d = kl(lq, lp);
            for (size_t j = 0; j < c; ++j) {
                double p = exp(lp[j]), q = exp(lq[j]);
                gs[j] = k * (p - q);
                gt[j] = q == 0 ? 0 : k * q * (lq[j] - lp[j] - d);
            }
        } else if (div == 1) {
            if (eps > 0)
                for (auto& l : lq) l = std::fmax(l, log(eps));  // f64::max: a NaN gives the floor
            d = kl(lp, lq);
            for (size_t j = 0; j < c; ++j) {
                double p = exp(lp[j]), q = exp(lq[j]);
                gs[j] = std::isinf(d) ? NaN : p == 0 ? 0 : k * p * (lp[j] - lq[j] - d);
                gt[j] = k * (q - p);
            }
        } else {
            lm.resize(c);
            for (size_t j = 0; j < c; ++j) lm[j] = log_add_exp(log(beta) + lq[j], log1p(-beta) + lp[j]);
            double klq = kl(lq, lm), klp = kl(lp, lm);
            for (size_t j = 0; j < c; ++j) {
                double p = exp(lp[j]), q = exp(lq[j]);
                gs[j] = p == 0 ? 0 : k * (1 - beta) * p * (lp[j] - lm[j] - klp);
                gt[j] = q == 0 ? 0 : k * beta * q * (lq[j] - lm[j] - klq);
            }
            d = beta * klq + (1 - beta) * klp;
        }
        o.rows[r] = temp * temp * d;
        // The reference's rounding: each log-ratio term carries about REF_EPS (|log p| + |log q|
        // (+ |log M|) + ln C + 1) (the logs, their log-sum-exp, the subtraction), weighted by
        // p + q; D that sum (+ its own rounding); a gradient (p + q)(its term's + D's + 1 REF_EPS).
        const double lnc = log((double)c);
        vector<double> u(c);
        double nd = REF_EPS * fin_abs(d);
        for (size_t j = 0; j < c; ++j) {
            u[j] = REF_EPS * (fin_abs(lp[j]) + fin_abs(lq[j]) + (lm.empty() ? 0.0 : fin_abs(lm[j])) + lnc + 1);
            nd += (exp(lp[j]) + exp(lq[j])) * u[j];
        }
        o.nrows[r] = temp * temp * nd;
        for (size_t j = 0; j < c; ++j) {
            const double w = fabs(k) * (exp(lp[j]) + exp(lq[j]));
            o.ngs[r * c + j] = o.ngt[r * c + j] = w * (u[j] + nd + REF_EPS);
        }
    }
    double sum = 0, nsum = 0;
    for (double v : o.rows) sum += v;
    for (double v : o.nrows) nsum += v;
    o.loss = sum * scale;
    o.nloss = nsum * scale + REF_EPS * fin_abs(o.loss);
    return o;
}
// The divergences' row losses from cancellation-free forms in long double (64-bit mantissa), to
// judge the kernels where the f64 reference cannot (rows with T^2 D below its own rounding, e.g.
// p ~ q at T = 1e4, or JSD's beta ~ 1e-6). With dl = log p - log q taken directly (teacher logits:
// (x^s - x^t) - log E_q[e^(x^s - x^t)], the differences exact), em(x) = e^x - 1 - x:
//   KL  = sum_{q>0} q em(dl) + (Q - 1) + P0   (Q = sum q, P0 = sum_{q=0} p),
//   RKL = sum p em(-dl) - (Q~ - 1)             (Q~ = sum of the floored q; a zero q: +inf),
//   JSD = sum c_j, c_j = beta q log(q/M) + (1-beta) p log(p/M) >= 0 each, = q f(dl).
typedef long double LD;
static LD em_ld(LD x) {
    if (fabsl(x) < 1e-3L) return x * x * (0.5L + x * (1.0L / 6 + x * (1.0L / 24 + x * (1.0L / 120 + x / 720))));
    return expm1l(x) - x;
}
static LD jsd_f_ld(LD x, LD b) {  // c_j / q_j as a function of dl
    if (fabsl(x) < 1e-3L) {
        const LD c3 = (1 + b) / 6, c4 = (2 * b * b + 1) / 24, c5 = (3 * b + 1) * (2 * b * b - 2 * b + 1) / 120,
                 c6 = (24 * b * b * b * b - 30 * b * b * b + 10 * b * b + 1) / 720;
        return b * (1 - b) * x * x * (0.5L + x * (c3 + x * (c4 + x * (c5 + x * c6))));
    }
    return -b * log1pl((1 - b) * expm1l(x)) - (1 - b) * expl(x) * log1pl(b * expm1l(-x));
}
// noise: T^2 4 f64 ulps of sum (p + q) |dl| (of |log p| where q = 0), the f64 resolution of the
// first-order terms that the kernels' f64 sums cancel (0 where p = q exactly: then exactly 0).
static vector<double> truth_rows(int div, int teach, float T, float beta, float eps, const vector<float>& s,
                                 const vector<float>& t, const vector<int>* labels, size_t n, size_t c, int ignore,
                                 vector<double>& noise) {
    vector<double> rows(n, 0.0);
    noise.assign(n, 0.0);
    const LD it = 1.0L / (LD)T, b = beta;
    for (size_t r = 0; r < n; ++r) {
        if (labels && (*labels)[r] == ignore) continue;
        const float* sr = &s[r * c];
        const float* tr = &t[r * c];
        bool bad = labels && ((*labels)[r] < 0 || (*labels)[r] >= (int)c);
        for (size_t j = 0; j < c; ++j)
            bad = bad || !std::isfinite(sr[j]) || !(std::isfinite(tr[j]) || (teach == 2 && tr[j] == -INFINITY));
        if (bad) {
            rows[r] = NaN;
            continue;
        }
        LD ms = -INFINITY, mt = -INFINITY;
        for (size_t j = 0; j < c; ++j) {
            ms = std::max(ms, (LD)sr[j]);
            mt = std::max(mt, (LD)tr[j]);
        }
        LD zs = 0;
        for (size_t j = 0; j < c; ++j) zs += expl(((LD)sr[j] - ms) * it);
        const LD lzs = logl(zs);
        vector<LD> dl(c), p(c), q(c), lqv(c);
        for (size_t j = 0; j < c; ++j) p[j] = expl(((LD)sr[j] - ms) * it - lzs);
        if (teach == 0) {
            LD zt = 0;
            for (size_t j = 0; j < c; ++j) zt += expl(((LD)tr[j] - mt) * it);
            // log(Z_s/Z_t) = a + log1p(E_q[expm1(delta - a)]) around a = E_q[delta] where that is
            // small (lzs - lzt would carry ~1e-19, first order in D), else lzs - lzt.
            vector<LD> delta(c);
            LD a = 0, w = 0, spread = 0;
            for (size_t j = 0; j < c; ++j) {
                q[j] = expl(((LD)tr[j] - mt) * it) / zt;
                delta[j] = (((LD)sr[j] - ms) - ((LD)tr[j] - mt)) * it;
                a += q[j] * delta[j];
            }
            for (size_t j = 0; j < c; ++j) spread = std::max(spread, fabsl(delta[j] - a));
            for (size_t j = 0; j < c; ++j) w += q[j] * expm1l(delta[j] - a);
            const LD lr = spread < 1 ? a + log1pl(w) : lzs - logl(zt);
            for (size_t j = 0; j < c; ++j) dl[j] = delta[j] - lr;
        } else {
            for (size_t j = 0; j < c; ++j) {
                LD lq = teach == 1 ? logl((LD)tr[j]) : (LD)tr[j];
                q[j] = teach == 1 ? (LD)tr[j] : expl(lq);
                if (div == 1 && eps > 0) {
                    lq = std::isnan(lq) ? logl((LD)eps) : std::max(lq, logl((LD)eps));
                    q[j] = teach == 1 ? std::max(q[j], (LD)eps) : expl(lq);
                }
                lqv[j] = lq;
                dl[j] = (((LD)sr[j] - ms) * it - lzs) - lq;
            }
        }
        // Where |dl| >= 1 the terms do not cancel: q em(dl) = (p - q) - q dl (q may underflow), etc.
        // Q - 1 (a given teacher's own normalisation; 0 for logits, where the forms assume both
        // rows normalised): (n_big - 1) + sum_{q > 1/2} (q - 1) + sum_{q <= 1/2} q, q - 1 by expm1.
        LD qm1 = 0;
        if (teach != 0) {
            LD nbig = 0;
            for (size_t j = 0; j < c; ++j) {
                if (q[j] > 0.5L) {
                    nbig += 1;
                    qm1 += teach == 1 ? q[j] - 1 : expm1l(lqv[j]);
                } else {
                    qm1 += q[j];
                }
            }
            qm1 += nbig - 1;
        }
        LD d = 0;
        if (div == 0) {
            LD p0 = 0;
            for (size_t j = 0; j < c; ++j) {
                if (std::isinf(dl[j])) {  // q = 0 exactly
                    p0 += p[j];
                    continue;
                }
                d += fabsl(dl[j]) < 1 ? q[j] * em_ld(dl[j]) : (p[j] - q[j]) - q[j] * dl[j];
            }
            d += qm1 + (teach != 0 ? p0 : 0);
        } else if (div == 1) {
            bool inf = false;
            for (size_t j = 0; j < c; ++j) {
                inf = inf || std::isinf(dl[j]);
                if (!inf) d += fabsl(dl[j]) < 1 ? p[j] * em_ld(-dl[j]) : (q[j] - p[j]) + p[j] * dl[j];
            }
            d = inf ? INFINITY : d - qm1;
        } else {
            for (size_t j = 0; j < c; ++j) {
                if (std::isinf(dl[j])) {
                    d += (1 - b) * p[j] * -log1pl(-b);  // q = 0: M = (1-beta) p
                } else if (fabsl(dl[j]) < 1) {
                    d += q[j] * jsd_f_ld(dl[j], b);
                } else {
                    const LD lp = ((LD)sr[j] - ms) * it - lzs, lq = lp - dl[j];
                    const LD hi = std::max(logl(b) + lq, log1pl(-b) + lp);
                    const LD lm = hi + logl(expl(logl(b) + lq - hi) + expl(log1pl(-b) + lp - hi));
                    if (q[j] > 0) d += b * q[j] * (lq - lm);
                    if (p[j] > 0) d += (1 - b) * p[j] * (lp - lm);
                }
            }
        }
        rows[r] = (double)((LD)T * (LD)T * d);
        LD mag = 0;
        for (size_t j = 0; j < c; ++j)
            mag += (p[j] + q[j]) * (std::isinf(dl[j]) ? fabsl(((LD)sr[j] - ms) * it - lzs) : fabsl(dl[j]));
        noise[r] = 4 * 2.220446049250313e-16 * (double)((LD)T * (LD)T * mag);
    }
    return rows;
}

static void smoothed_ce_row(const double* s, size_t c, int y, double eps, double& loss, vector<double>& grad) {
    auto lp = log_softmax_row(s, c, 1.0);
    loss = 0;
    grad.resize(c);
    for (size_t j = 0; j < c; ++j) {
        double target = ((int)j == y ? 1 - eps : 0.0) + eps / c;
        loss -= target * lp[j];
        grad[j] = exp(lp[j]) - target;
    }
}
static RowRef ref_ce(double eps, int red, double g, int ignore, const vector<double>& s, const vector<int>& labels,
                     size_t n, size_t c) {
    size_t valid = 0;
    for (size_t r = 0; r < n; ++r) valid += labels[r] != ignore;
    double scale = red_factor(red, valid), k = g * scale;
    RowRef o;
    o.rows.assign(n, 0);
    o.gs.assign(n * c, 0);
    for (size_t r = 0; r < n; ++r) {
        if (labels[r] == ignore) continue;
        const double* sr = &s[r * c];
        if (labels[r] < 0 || labels[r] >= (int)c || !all_finite(sr, c)) {
            o.rows[r] = NaN;
            for (size_t j = 0; j < c; ++j) o.gs[r * c + j] = NaN;
            continue;
        }
        double loss;
        vector<double> grad;
        smoothed_ce_row(sr, c, labels[r], eps, loss, grad);
        o.rows[r] = loss;
        for (size_t j = 0; j < c; ++j) o.gs[r * c + j] = k * grad[j];
    }
    double sum = 0;
    for (double v : o.rows) sum += v;
    o.loss = sum * scale;
    return o;
}
// ce_rows, ce_noise (when given): alpha CE_r and its part of nrows (for the long-double KL check).
static RowRef ref_hinton(double temp, double alpha, double eps, int red, double g, int ignore, const vector<double>& s,
                         const vector<double>& t, const vector<int>& labels, size_t n, size_t c,
                         vector<double>* ce_rows = nullptr, vector<double>* ce_noise = nullptr) {
    RowRef klr = ref_div(0, 0, temp, 0, red, g, ignore, s, t, &labels, n, c);
    size_t valid = 0;
    for (size_t r = 0; r < n; ++r) valid += labels[r] != ignore;
    double k = g * red_factor(red, valid);
    RowRef o;
    o.rows.assign(n, 0);
    o.gs.assign(n * c, 0);
    o.gt.resize(n * c);
    o.nrows.assign(n, 0);
    o.ngs.assign(n * c, 0);
    o.ngt.resize(n * c);
    for (size_t i = 0; i < n * c; ++i) {
        o.gt[i] = (1 - alpha) * klr.gt[i];
        o.ngt[i] = (1 - alpha) * klr.ngt[i];
    }
    for (size_t r = 0; r < n; ++r) {
        if (labels[r] == ignore) continue;
        if (labels[r] < 0 || labels[r] >= (int)c) {
            o.rows[r] = NaN;
            for (size_t j = 0; j < c; ++j) o.gs[r * c + j] = o.gt[r * c + j] = NaN;
            continue;
        }
        double ce;
        vector<double> ceg;
        smoothed_ce_row(&s[r * c], c, labels[r], eps, ce, ceg);
        o.rows[r] = alpha * ce + (1 - alpha) * klr.rows[r];
        if (ce_rows) (*ce_rows)[r] = alpha * ce;
        for (size_t j = 0; j < c; ++j) o.gs[r * c + j] = alpha * k * ceg[j] + (1 - alpha) * klr.gs[r * c + j];
        // The reference's rounding (as ref_div's): CE's log-probabilities at T = 1, and the KL part.
        auto lp = log_softmax_row(&s[r * c], c, 1.0);
        const double lnc = log((double)c);
        double nce = REF_EPS * fabs(o.rows[r]);
        for (size_t j = 0; j < c; ++j) {
            const double p = exp(lp[j]), u = REF_EPS * (fabs(lp[j]) + lnc + 2);
            nce += alpha * (p + 1.0) * u;
            o.ngs[r * c + j] = alpha * fabs(k) * (p + fabs(ceg[j])) * u + (1 - alpha) * klr.ngs[r * c + j];
        }
        o.nrows[r] = (1 - alpha) * klr.nrows[r] + nce;
        if (ce_noise) (*ce_noise)[r] = nce;
    }
    double sum = 0, nsum = 0;
    for (double v : o.rows) sum += v;
    for (double v : o.nrows) nsum += v;
    o.loss = sum * red_factor(red, valid);
    o.nloss = nsum * red_factor(red, valid) + REF_EPS * fin_abs(o.loss);
    return o;
}

// ---- comparison ----
static int failures = 0, checks = 0;
static const vector<float>* dbg_s = nullptr;  // the current row-loss inputs (EMU_VERBOSE dumps a row)
static const vector<float>* dbg_t = nullptr;
static size_t dbg_c = 0;
static double worst = 0;
static std::string worst_case;
// Per op family (the check name's first word): the worst relative error, its check, and how many
// checks the reference's rounding bound decided (|want| < |noise| / tol).
struct FamilyStat {
    double worst = 0;
    std::string what;
    int checks = 0, floored = 0;
};
static std::map<std::string, FamilyStat> families;
// Returns the relative error of the norm (infinity on a NaN / infinity mismatch).
// noise: a bound on the reference's own rounding per element (or null): where the want's norm is
// below |noise| / tol, the kernel must come within |noise| instead (the reference resolves no more).
static double check(const std::string& what, const vector<float>& got, const vector<double>& want, double tol = 1e-4,
                    const vector<double>* noise = nullptr) {
    ++checks;
    if (got.size() != want.size()) {
        printf("FAIL %s: size %zu vs %zu\n", what.c_str(), got.size(), want.size());
        ++failures;
        return INFINITY;
    }
    double d2 = 0, w2 = 0, n2 = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        bool wn = std::isnan(want[i]), gn = std::isnan(got[i]);
        if (wn != gn) {
            printf("FAIL %s: [%zu] got %g want %g (NaN mismatch)\n", what.c_str(), i, got[i], want[i]);
            ++failures;
            return INFINITY;
        }
        if (wn) continue;
        if (std::isinf(want[i]) || std::isinf(got[i])) {
            if (got[i] != want[i]) {
                printf("FAIL %s: [%zu] got %g want %g\n", what.c_str(), i, got[i], want[i]);
                ++failures;
                return INFINITY;
            }
            continue;
        }
        double d = got[i] - want[i];
        d2 += d * d;
        w2 += want[i] * want[i];
        if (noise) n2 += (*noise)[i] * (*noise)[i];
    }
    double rel = sqrt(d2) / std::max({sqrt(w2), sqrt(n2) / tol, 1e-30});
    if (sqrt(d2) <= 1e-30) rel = 0;
    FamilyStat& fam = families[what.substr(0, what.find(' '))];
    ++fam.checks;
    if (sqrt(n2) / tol > sqrt(w2)) {
        ++fam.floored;
        if (getenv("EMU_FLOOR"))
            printf("floor %s: |want| %.3g, reference rounding %.3g, |got - want| %.3g\n", what.c_str(), sqrt(w2),
                   sqrt(n2), sqrt(d2));
    }
    if (rel > fam.worst || fam.what.empty()) {
        fam.worst = rel;
        fam.what = what;
    }
    if (rel > worst) {
        worst = rel;
        worst_case = what;
    }
    if (rel > tol) {
        printf("FAIL %s: relative error of the norm %.3g (|want| %.3g)\n", what.c_str(), rel, sqrt(w2));
        if (getenv("EMU_VERBOSE")) {  // the 6 largest differences
            vector<size_t> idx(got.size());
            for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
            auto diff = [&](size_t i) { return std::isnan(want[i]) ? 0.0 : fabs(got[i] - want[i]); };
            std::sort(idx.begin(), idx.end(), [&](size_t x, size_t y) { return diff(x) > diff(y); });
            for (size_t k = 0; k < std::min(idx.size(), (size_t)6); ++k)
                printf("   [%zu] got %.9g want %.9g\n", idx[k], got[idx[k]], want[idx[k]]);
            if (dbg_s && dbg_c && got.size() == dbg_s->size() && getenv("EMU_DUMP")) {
                size_t r = idx[0] / dbg_c;
                for (size_t j = 0; j < dbg_c; ++j)
                    printf("     row %zu [%zu] s %.9g t %.9g got %.9g want %.9g\n", r, r * dbg_c + j,
                           (*dbg_s)[r * dbg_c + j], (*dbg_t)[r * dbg_c + j], got[r * dbg_c + j], want[r * dbg_c + j]);
            }
        }
        ++failures;
    }
    return rel;
}
static double check1(const std::string& what, float got, double want, double tol = 1e-4, double noise = 0) {
    vector<double> nv{noise};
    return check(what, vector<float>{got}, vector<double>{want}, tol, &nv);
}

// ---- runs ----
static std::mt19937_64 rng(getenv("EMU_SEED") ? strtoull(getenv("EMU_SEED"), nullptr, 10) : 12345);
static double uni(double a, double b) { return std::uniform_real_distribution<double>(a, b)(rng); }
static int irand(int a, int b) { return std::uniform_int_distribution<int>(a, b)(rng); }
static vector<float> rand_logits(size_t len, double scale) {
    vector<float> v(len);
    for (auto& x : v) x = (float)uni(-scale, scale);
    return v;
}
static const float FNAN = std::numeric_limits<float>::quiet_NaN();

static void test_softmax(size_t n, size_t c, float T, bool log_out, double scale) {
    auto x = rand_logits(n * c, scale);
    vector<float> y(n * c, FNAN), dy = rand_logits(n * c, 1.0), dx(n * c, FNAN);
    if (n > 1 && irand(0, 3) == 0) x[c + irand(0, (int)c - 1)] = irand(0, 1) ? FNAN : INFINITY;
    Cfg cfg = row_launch(n, c);
    float it = (float)(1.0 / T);
    emu_launch(cfg.grid, cfg.block, [&] {
        (cfg.block_form ? softmax_fwd_block : softmax_fwd_warp)(x.data(), y.data(), n, c, it, log_out, 0u, 0u);
    });
    emu_launch(cfg.grid, cfg.block, [&] {
        (cfg.block_form ? softmax_bwd_block : softmax_bwd_warp)(y.data(), dy.data(), dx.data(), n, c, it, log_out, 0u, 0u, 0u);
    });
    vector<double> want(n * c), wdx(n * c), ny(n * c), ndx(n * c);  // ny, ndx: the reference's rounding
    auto xd = to_d(x);
    for (size_t r = 0; r < n; ++r) {
        if (!all_finite(&xd[r * c], c)) {
            for (size_t j = 0; j < c; ++j) want[r * c + j] = NaN;
        } else {
            auto lp = log_softmax_row(&xd[r * c], c, T);
            for (size_t j = 0; j < c; ++j) {
                want[r * c + j] = log_out ? lp[j] : exp(lp[j]);
                ny[r * c + j] = REF_EPS * (fabs(lp[j]) + log((double)c) + 2) * (log_out ? 1.0 : exp(lp[j]));
            }
        }
        // backward from the kernel's own y (as the reference takes y as input)
        double acc = 0, acc_abs = 0;
        for (size_t j = 0; j < c; ++j) {
            const double term = log_out ? dy[r * c + j] : (double)dy[r * c + j] * y[r * c + j];
            acc += term;
            acc_abs += fabs(term);
        }
        for (size_t j = 0; j < c; ++j) {
            double yj = y[r * c + j], d = dy[r * c + j];
            wdx[r * c + j] = log_out ? (d - exp(yj) * acc) / T : yj * (d - acc) / T;
            const double w = log_out ? exp(yj) : fabs(yj);
            ndx[r * c + j] = REF_EPS * ((log_out ? fabs(d) : w * fabs(d)) + w * acc_abs * (1 + fin_abs(yj))) / T;
        }
    }
    char name[200];
    snprintf(name, sizeof name, "softmax n=%zu c=%zu T=%g log=%d scale=%g", n, c, T, log_out, scale);
    check(std::string(name) + " y", y, want, 1e-4, &ny);
    check(std::string(name) + " dx", dx, wdx, 1e-4, &ndx);
}

struct Flags {
    bool labels, gs, gt, inplace, rows;
};

// One divergence case. A given teacher (teach 1, 2) is softmax(random logits / teacher_temp) with
// optional exact zeros (probability 0, log-probability -inf) on some rows, renormalised over the
// rest: zeros 1 random classes, 2 a top-k teacher (k random), 3 one-hot.
struct DivCase {
    int div, teach;
    size_t n, c;
    float T, beta;
    int red;
    double scale;
    Flags f;
    bool inject;
    float eps = 0.f;  // reverse KL's teacher floor
    int zeros = 0;
    double teacher_temp = 1.0;
    double near = 0;  // > 0: the teacher's logits are the student's plus uniform(-near, near) * scale
                      // (a given teacher then at the student's T): p ~ q
};

// The per-family worst relative error, and the one at the extremes of T and beta.
struct Worst {
    double rel = 0;
    std::string what;
};
static Worst worst_family[3][3];  // [div][teach]
static Worst worst_t_lo, worst_t_hi, worst_b_lo, worst_b_hi;

static void test_div(const DivCase& k) {
    const int div = k.div, teach = k.teach;
    const size_t n = k.n, c = k.c;
    const float T = k.T, beta = k.beta;
    const Flags f = k.f;
    const int ignore = -100;
    auto s = rand_logits(n * c, k.scale);
    auto t = rand_logits(n * c, k.scale);
    if (k.near > 0)
        for (size_t i = 0; i < n * c; ++i) t[i] = (float)(s[i] + uni(-k.near, k.near) * k.scale);
    int zero_rows = 0;
    if (teach != 0) {
        auto td = to_d(t);
        for (size_t r = 0; r < n; ++r) {
            auto lq = log_softmax_row(&td[r * c], c, k.near > 0 ? (double)T : k.teacher_temp);
            vector<bool> zero(c, false);
            if (k.zeros != 0 && c > 1 && irand(0, 2) != 0) {
                ++zero_rows;
                if (k.zeros == 1) {
                    for (size_t j = 0; j < c; ++j) zero[j] = irand(0, 3) == 0;
                } else {  // keep the top k (one-hot: k = 1)
                    size_t keep = k.zeros == 3 ? 1 : (size_t)irand(1, (int)c);
                    vector<size_t> idx(c);
                    for (size_t j = 0; j < c; ++j) idx[j] = j;
                    std::stable_sort(idx.begin(), idx.end(), [&](size_t x, size_t y) { return lq[x] > lq[y]; });
                    for (size_t i = keep; i < c; ++i) zero[idx[i]] = true;
                }
                zero[(size_t)irand(0, (int)c - 1)] = false;  // at least one class left
                double m = -INFINITY, z = 0;
                for (size_t j = 0; j < c; ++j)
                    if (!zero[j]) m = std::max(m, lq[j]);
                for (size_t j = 0; j < c; ++j)
                    if (!zero[j]) z += exp(lq[j] - m);
                for (size_t j = 0; j < c; ++j) lq[j] = zero[j] ? -INFINITY : lq[j] - m - log(z);
            }
            for (size_t j = 0; j < c; ++j) t[r * c + j] = teach == 1 ? (float)exp(lq[j]) : (float)lq[j];
        }
    }
    vector<int> labels(n);
    for (auto& y : labels) y = irand(0, 3) == 0 ? ignore : irand(0, (int)c - 1);
    if (f.labels && n > 2 && irand(0, 2) == 0) labels[1] = (int)c + 3;  // invalid label -> NaN row
    if (k.inject && n > 2) {  // NaN, +inf or -inf (-inf is a valid teacher log-probability)
        size_t r = (size_t)irand(0, (int)n - 1), j = (size_t)irand(0, (int)c - 1);
        const int v = irand(0, 2);
        (irand(0, 1) ? s : t)[r * c + j] = v == 0 ? FNAN : v == 1 ? INFINITY : -INFINITY;
    }
    float g = (float)uni(0.5, 2.0);
    auto sd = to_d(s), td = to_d(t);
    dbg_s = &s;
    dbg_t = &t;
    dbg_c = c;
    RowRef want = ref_div(div, teach, T, beta, k.red, g, ignore, sd, td, f.labels ? &labels : nullptr, n, c, k.eps);

    vector<float> S = s, rows(n, FNAN), gs(n * c, FNAN), gt(n * c, FNAN);
    unsigned count = 12345;
    float loss = FNAN;
    const int* lab = f.labels ? labels.data() : nullptr;
    emu_launch(ONE, T1024, [&] { count_valid(lab, n, ignore, &count); });
    Cfg cfg = row_launch(n, c);
    float* gsp = f.gs ? (f.inplace ? S.data() : gs.data()) : nullptr;
    bool want_gt = f.gt && teach == 0;
    float it = (float)(1.0 / T);
    emu_launch(cfg.grid, cfg.block, [&] {
        (cfg.block_form ? divergence_block : divergence_warp)(S.data(), t.data(), lab, &count, rows.data(), gsp,
                                                              want_gt ? gt.data() : nullptr, n, c, it, T, beta, k.eps,
                                                              g, ignore, div, teach, k.red, 0u, 0u, 0u, 0u);
    });
    emu_launch(ONE, T1024, [&] { reduce_rows(rows.data(), n, &count, k.red, &loss); });
    if (f.inplace) gs = S;
    char name[400];
    snprintf(name, sizeof name,
             "div%d teach%d n=%zu c=%zu T=%g beta=%.9g eps=%g zeros=%d(%d rows) tT=%g near=%g red=%d scale=%g "
             "labels=%d inplace=%d inject=%d",
             div, teach, n, c, T, beta, k.eps, k.zeros, zero_rows, k.teacher_temp, k.near, k.red, k.scale, f.labels,
             f.inplace, k.inject);
    Worst here;
    auto keep = [&](double rel, const char* what) {
        if (rel > here.rel || here.what.empty()) here = Worst{rel, std::string(name) + what};
    };
    keep(check1(std::string(name) + " loss", loss, want.loss, 1e-4, want.nloss), " loss");
    keep(check(std::string(name) + " rows", rows, want.rows, 1e-4, &want.nrows), " rows");
    if (f.gs) keep(check(std::string(name) + " gs", gs, want.gs, 1e-4, &want.ngs), " gs");
    if (want_gt) keep(check(std::string(name) + " gt", gt, want.gt, 1e-4, &want.ngt), " gt");
    // The row losses against the long-double forms (floor: the f64 resolution of their terms).
    {
        vector<double> nt;
        vector<double> truth =
            truth_rows(div, teach, T, beta, k.eps, s, t, f.labels ? &labels : nullptr, n, c, ignore, nt);
        keep(check(std::string(name) + " rows(ld)", rows, truth, 1e-4, &nt), " rows(ld)");
    }
    auto note = [&](Worst& w) {
        if (here.rel > w.rel || w.what.empty()) w = here;
    };
    note(worst_family[div][teach]);
    if (T <= 1.5e-3f) note(worst_t_lo);
    if (T >= 5e3f) note(worst_t_hi);
    if (div == 2 && beta <= 1e-5f) note(worst_b_lo);
    if (div == 2 && beta >= 1.f - 1e-5f) note(worst_b_hi);
}

// The contract's example (issue 11): t = [-inf, ln 0.5, ln 0.5] (log-probs), s = [0.5, 0.1, -0.3],
// T = 1, forward KL, batchmean, one row: loss 0.6581 (and the gradient k (p - q), p = softmax(s)).
static void test_div_fixed() {
    vector<float> s{0.5f, 0.1f, -0.3f}, t{-INFINITY, logf(0.5f), logf(0.5f)}, rows(1, FNAN), gs(3, FNAN);
    unsigned count = 0;
    float loss = FNAN;
    emu_launch(ONE, T1024, [&] { count_valid(nullptr, 1, -100, &count); });
    for (unsigned teach : {1u, 2u}) {
        vector<float> tt = t;
        if (teach == 1) tt = {0.f, 0.5f, 0.5f};
        emu_launch(dim3{1, 1, 1}, T256, [&] {
            divergence_warp(s.data(), tt.data(), nullptr, &count, rows.data(), gs.data(), nullptr, 1, 3, 1.f, 1.f, 0.5f,
                            0.f, 1.f, -100, 0, teach, 0, 0u, 0u, 0u, 0u);
        });
        emu_launch(ONE, T1024, [&] { reduce_rows(rows.data(), 1, &count, 0, &loss); });
        double p[3], z = 0;
        for (int j = 0; j < 3; ++j) z += exp((double)s[j]);
        for (int j = 0; j < 3; ++j) p[j] = exp((double)s[j]) / z;
        const double kl = 0.5 * (log(0.5) - log(p[1])) + 0.5 * (log(0.5) - log(p[2]));
        char name[80];
        snprintf(name, sizeof name, "div0 teach%u example (loss %.4f, want 0.6581)", teach, loss);
        check1(std::string(name) + " loss", loss, kl);
        check1(std::string(name) + " loss vs 0.6581", loss, 0.6581, 1e-4 / 0.6581 * 0.5);
        check(std::string(name) + " gs", gs, vector<double>{p[0], p[1] - 0.5, p[2] - 0.5});
    }
}

static void test_ce(size_t n, size_t c, float eps, int red, double scale, bool inplace, bool inject, bool all_masked) {
    const int ignore = -100;
    auto s = rand_logits(n * c, scale);
    vector<int> labels(n);
    for (auto& y : labels) y = all_masked || irand(0, 3) == 0 ? ignore : irand(0, (int)c - 1);
    if (!all_masked && n > 2 && irand(0, 2) == 0) labels[2] = -1;
    if (inject && n > 2) s[(size_t)irand(0, (int)n - 1) * c + irand(0, (int)c - 1)] = FNAN;
    float g = (float)uni(0.5, 2.0);
    RowRef want = ref_ce(eps, red, g, ignore, to_d(s), labels, n, c);
    vector<float> S = s, rows(n, FNAN), gs(n * c, FNAN);
    unsigned count = 777;
    float loss = FNAN;
    emu_launch(ONE, T1024, [&] { count_valid(labels.data(), n, ignore, &count); });
    Cfg cfg = row_launch(n, c);
    float* gsp = inplace ? S.data() : gs.data();
    emu_launch(cfg.grid, cfg.block, [&] {
        (cfg.block_form ? cross_entropy_block : cross_entropy_warp)(S.data(), labels.data(), &count, rows.data(), gsp,
                                                                    n, c, eps, g, ignore, red, 0u, 0u);
    });
    emu_launch(ONE, T1024, [&] { reduce_rows(rows.data(), n, &count, red, &loss); });
    if (inplace) gs = S;
    char name[300];
    snprintf(name, sizeof name, "ce n=%zu c=%zu eps=%g red=%d scale=%g inplace=%d inject=%d all_masked=%d", n, c, eps,
             red, scale, inplace, inject, all_masked);
    check1(std::string(name) + " loss", loss, want.loss);
    check(std::string(name) + " rows", rows, want.rows);
    check(std::string(name) + " gs", gs, want.gs);
}

// Hinton: the worst relative error over all cases and at the ends of T (EMU_HINTON prints them).
static Worst worst_hinton, worst_hinton_t_lo, worst_hinton_t_hi;

// near > 0: the teacher's logits are the student's plus uniform(-near, near) * scale (p ~ q).
static void test_hinton(size_t n, size_t c, float T, float alpha, float eps, int red, double scale, bool inplace,
                        bool want_gt, bool inject, double near = 0) {
    const int ignore = -100;
    auto s = rand_logits(n * c, scale);
    auto t = rand_logits(n * c, scale);
    if (near > 0)
        for (size_t i = 0; i < n * c; ++i) t[i] = (float)(s[i] + uni(-near, near) * scale);
    vector<int> labels(n);
    for (auto& y : labels) y = irand(0, 3) == 0 ? ignore : irand(0, (int)c - 1);
    if (n > 2 && irand(0, 2) == 0) labels[0] = (int)c;
    if (inject && n > 2) (irand(0, 1) ? s : t)[(size_t)irand(0, (int)n - 1) * c + irand(0, (int)c - 1)] = INFINITY;
    float g = (float)uni(0.5, 2.0);
    vector<double> ce_rows(n, 0.0), ce_noise(n, 0.0);
    RowRef want = ref_hinton(T, alpha, eps, red, g, ignore, to_d(s), to_d(t), labels, n, c, &ce_rows, &ce_noise);
    dbg_s = &s;
    dbg_t = &t;
    dbg_c = c;
    vector<float> S = s, rows(n, FNAN), gs(n * c, FNAN), gt(n * c, FNAN);
    unsigned count = 777;
    float loss = FNAN;
    emu_launch(ONE, T1024, [&] { count_valid(labels.data(), n, ignore, &count); });
    Cfg cfg = row_launch(n, c);
    float* gsp = inplace ? S.data() : gs.data();
    float it = (float)(1.0 / T);
    emu_launch(cfg.grid, cfg.block, [&] {
        (cfg.block_form ? hinton_block : hinton_warp)(S.data(), t.data(), labels.data(), &count, rows.data(), gsp,
                                                      want_gt ? gt.data() : nullptr, n, c, it, T, alpha, eps, g,
                                                      ignore, red, 0u, 0u, 0u, 0u);
    });
    emu_launch(ONE, T1024, [&] { reduce_rows(rows.data(), n, &count, red, &loss); });
    if (inplace) gs = S;
    char name[300];
    snprintf(name, sizeof name,
             "hinton n=%zu c=%zu T=%g alpha=%g eps=%g near=%g red=%d scale=%g inplace=%d inject=%d", n, c, T, alpha,
             eps, near, red, scale, inplace, inject);
    Worst here;
    auto keep = [&](double rel, const char* what) {
        if (rel > here.rel || here.what.empty()) here = Worst{rel, std::string(name) + what};
    };
    keep(check1(std::string(name) + " loss", loss, want.loss, 1e-4, want.nloss), " loss");
    keep(check(std::string(name) + " rows", rows, want.rows, 1e-4, &want.nrows), " rows");
    keep(check(std::string(name) + " gs", gs, want.gs, 1e-4, &want.ngs), " gs");
    if (want_gt) keep(check(std::string(name) + " gt", gt, want.gt, 1e-4, &want.ngt), " gt");
    // The row losses with the KL part from the long-double forms (truth_rows), where the f64
    // reference's KL is its own rounding (p ~ q at T = 1e4): alpha CE_r + (1 - alpha) T^2 KL_r.
    {
        vector<double> nt;
        vector<double> truth = truth_rows(0, 0, T, 0.f, 0.f, s, t, &labels, n, c, ignore, nt);
        for (size_t r = 0; r < n; ++r) {
            if (labels[r] == ignore || std::isnan(truth[r])) continue;
            truth[r] = ce_rows[r] + (1 - (double)alpha) * truth[r];
            nt[r] = ce_noise[r] + (1 - (double)alpha) * nt[r];
        }
        keep(check(std::string(name) + " rows(ld)", rows, truth, 1e-4, &nt), " rows(ld)");
    }
    auto note = [&](Worst& w) {
        if (here.rel > w.rel || w.what.empty()) w = here;
    };
    note(worst_hinton);
    if (T <= 1.5e-3f) note(worst_hinton_t_lo);
    if (T >= 5e3f) note(worst_hinton_t_hi);
}

#include "dkd_checks.h"  // test_dkd, dkd_cases (src/ops/dkd/dkd.cu)
#include "sharded_checks.h"  // test_sharded, sharded_cases (src/ops/sharded/sharded.cu)

// mode 0: MSE; mode 1: smooth L1 (src/ops/relational/ smooth_l1_reference).
static void test_mse(size_t m, bool grads, bool inject, unsigned mode = 0) {
    auto a = rand_logits(m, 3.0), b = rand_logits(m, 3.0);
    if (inject) a[(size_t)irand(0, (int)m - 1)] = INFINITY;
    float g = (float)uni(0.5, 2.0);
    unsigned long long blocks = std::min(std::max((m + 2047) / 2048, (size_t)1), (size_t)1024);
    vector<double> partials(blocks, NaN);
    vector<float> ga(m, FNAN), gb(m, FNAN);
    float loss = FNAN;
    float k = (float)((mode == 0 ? 2.0 : 1.0) * g / (double)m);
    emu_launch(grid_for(blocks), T256, [&] {
        mse_partial(a.data(), b.data(), grads ? ga.data() : nullptr, grads ? gb.data() : nullptr, m, k, partials.data(),
                    mode);
    });
    emu_launch(ONE, T1024, [&] { mse_final(partials.data(), (unsigned)blocks, (double)m, &loss); });
    double l = 0;
    vector<double> wa(m), wb(m);
    for (size_t i = 0; i < m; ++i) {
        double d = (double)a[i] - b[i];
        if (mode == 0) {
            l += d * d;
            wa[i] = 2.0 * g / m * d;
        } else {
            double ad = fabs(d);
            l += ad < 1.0 ? 0.5 * d * d : ad - 0.5;
            wa[i] = g * std::clamp(d, -1.0, 1.0) / m;
        }
        wb[i] = -wa[i];
    }
    l /= m;
    if (inject) l = NaN;  // the spec: a non-finite input gives a NaN loss
    char name[100];
    snprintf(name, sizeof name, "%s m=%zu inject=%d", mode == 0 ? "mse" : "smooth_l1", m, inject);
    check1(std::string(name) + " loss", loss, l);
    if (grads) {
        check(std::string(name) + " ga", ga, wa);
        check(std::string(name) + " gb", gb, wb);
    }
}

static void attention_map_ref(const double* a, size_t ch, size_t hw, vector<double>& u, double& norm) {
    vector<double> q(hw);
    for (size_t i = 0; i < hw; ++i) {
        double s = 0;
        for (size_t c = 0; c < ch; ++c) s += a[c * hw + i] * a[c * hw + i];
        q[i] = s / ch;
    }
    double nn = 0;
    for (double v : q) nn += v * v;
    norm = std::max(sqrt(nn), 1e-12);
    u.resize(hw);
    for (size_t i = 0; i < hw; ++i) u[i] = q[i] / norm;
}
static void attention_bwd_ref(const double* a, const vector<double>& u, double norm, const vector<double>& du,
                              size_t ch, double* out) {
    size_t hw = u.size();
    vector<double> dq(hw);
    if (norm > 1e-12) {
        double dot = 0;
        for (size_t i = 0; i < hw; ++i) dot += u[i] * du[i];
        for (size_t i = 0; i < hw; ++i) dq[i] = (du[i] - u[i] * dot) / norm;
    } else {
        for (size_t i = 0; i < hw; ++i) dq[i] = du[i] / norm;
    }
    for (size_t c = 0; c < ch; ++c)
        for (size_t i = 0; i < hw; ++i) out[c * hw + i] = dq[i] * 2.0 * a[c * hw + i] / ch;
}
// scale: the features' magnitude (up to 3e38: attention maps are scale-free, and Q = A^2, ||Q||
// must not overflow); spike: one student element per sample is 1e10 (the issue-11 example's shape);
// fixed: s = [1e10, 1, 2, 3], t = [1, 2, 3, 4] as [1, 1, 4] (reference loss 0.4734).
static void test_at(size_t n, size_t cs, size_t ct, size_t hw, bool zero_sample, double scale = 2.0,
                    bool spike = false, bool fixed = false) {
    auto s = rand_logits(n * cs * hw, scale), t = rand_logits(n * ct * hw, scale);
    if (fixed) s = {1e10f, 1.f, 2.f, 3.f}, t = {1.f, 2.f, 3.f, 4.f};
    if (spike)
        for (size_t k = 0; k < n; ++k) s[k * cs * hw + (size_t)irand(0, (int)(cs * hw) - 1)] = 1e10f;
    if (zero_sample)
        for (size_t i = 0; i < cs * hw; ++i) s[i] = 0.f;  // sample 0 of the student: ||Q|| = 0
    float g = (float)uni(0.5, 2.0);
    vector<float> qs(n * hw, FNAN), qt(n * hw, FNAN), diff(n * hw, FNAN), gs(s.size(), FNAN), gt(t.size(), FNAN);
    vector<double> stats(n * 8, NaN);
    float loss = FNAN;
    float kk = (float)(g * 2.0 / (double)(n * hw));
    emu_launch(stride_grid(n * hw), T256, [&] { at_map(s.data(), qs.data(), n, cs, hw); });
    emu_launch(stride_grid(n * hw), T256, [&] { at_map(t.data(), qt.data(), n, ct, hw); });
    emu_launch(grid_for(n), T256, [&] { at_norm(qs.data(), qt.data(), n, hw, stats.data(), diff.data()); });
    emu_launch(ONE, T1024, [&] { at_loss(stats.data(), n, (double)(n * hw), &loss); });
    emu_launch(stride_grid(n * cs * hw), T256,
               [&] { at_grad(s.data(), gs.data(), qs.data(), diff.data(), stats.data(), 0, n, cs, hw, kk); });
    emu_launch(stride_grid(n * ct * hw), T256,
               [&] { at_grad(t.data(), gt.data(), qt.data(), diff.data(), stats.data(), 1, n, ct, hw, kk); });
    auto sd = to_d(s), td = to_d(t);
    double l = 0, denom = (double)(n * hw);
    vector<double> ws(s.size()), wt(t.size());
    for (size_t k = 0; k < n; ++k) {
        vector<double> us, ut;
        double ns, nt;
        attention_map_ref(&sd[k * cs * hw], cs, hw, us, ns);
        attention_map_ref(&td[k * ct * hw], ct, hw, ut, nt);
        vector<double> du(hw), dut(hw);
        for (size_t i = 0; i < hw; ++i) {
            l += (us[i] - ut[i]) * (us[i] - ut[i]);
            du[i] = g * 2.0 * (us[i] - ut[i]) / denom;
            dut[i] = -du[i];
        }
        attention_bwd_ref(&sd[k * cs * hw], us, ns, du, cs, &ws[k * cs * hw]);
        attention_bwd_ref(&td[k * ct * hw], ut, nt, dut, ct, &wt[k * ct * hw]);
    }
    char name[100];
    snprintf(name, sizeof name, "at n=%zu cs=%zu ct=%zu hw=%zu zero=%d scale=%g spike=%d fixed=%d", n, cs, ct, hw,
             zero_sample, scale, spike, fixed);
    check1(std::string(name) + " loss", loss, l / denom);
    if (fixed) check1(std::string(name) + " loss vs 0.4734", loss, 0.4734, 0.5e-4 / 0.4734);
    check(std::string(name) + " gs", gs, ws);
    check(std::string(name) + " gt", gt, wt);
}

// ---- the tape's kernels (dense.cu, optim.cu, conv.cu) against ports of src/ops/{dense,optim,conv}.rs
static dim3 elem_grid(size_t len) { return grid_for((len + 255) / 256); }

static void test_matmul(size_t m, size_t k, size_t n, bool ta, bool tb, bool acc) {
    auto a = rand_logits(m * k, 1.0), b = rand_logits(k * n, 1.0), c0 = rand_logits(m * n, 1.0);
    vector<float> c = acc ? c0 : vector<float>(m * n, FNAN);
    unsigned long long tiles = (unsigned long long)((m + 15) / 16) * ((n + 15) / 16);
    emu_launch(grid_for(tiles), T256, [&] { matmul(a.data(), b.data(), c.data(), m, k, n, ta, tb, acc); });
    // The reference (f64) and the kernel's own order in f32 (q ascending, fused multiply-add),
    // which must match bit for bit (up to the sign of a zero).
    auto A = [&](size_t i, size_t q) { return ta ? a[q * m + i] : a[i * k + q]; };
    auto B = [&](size_t q, size_t j) { return tb ? b[j * k + q] : b[q * n + j]; };
    vector<double> want(m * n);
    size_t exact_mismatch = 0;
    for (size_t i = 0; i < m; ++i)
        for (size_t j = 0; j < n; ++j) {
            double s = 0;
            float f = 0.f;
            for (size_t q = 0; q < k; ++q) {
                s += (double)A(i, q) * B(q, j);
                f = fmaf(A(i, q), B(q, j), f);
            }
            want[i * n + j] = acc ? c0[i * n + j] + s : s;
            float fe = acc ? c0[i * n + j] + f : f;
            exact_mismatch += !(fe == c[i * n + j]);
        }
    char name[200];
    snprintf(name, sizeof name, "matmul m=%zu k=%zu n=%zu ta=%d tb=%d acc=%d", m, k, n, ta, tb, acc);
    ++checks;
    if (exact_mismatch) {
        printf("FAIL %s: %zu entries differ from the sequential f32 order\n", name, exact_mismatch);
        ++failures;
    }
    check(name, c, want, 1e-5);
}

static void test_dense_elementwise(size_t rows, size_t cols, bool acc) {
    size_t len = rows * cols;
    auto x = rand_logits(len, 2.0), bias = rand_logits(cols, 2.0), dy = rand_logits(len, 2.0), out0 = rand_logits(cols, 1.0);
    if (len > 3) x[1] = FNAN;
    vector<float> y(len, FNAN), out = acc ? out0 : vector<float>(cols, FNAN), dx(len, FNAN), r(len, FNAN), ay = dy;
    emu_launch(elem_grid(len), T256, [&] { bias_add(x.data(), bias.data(), y.data(), len, cols); });
    emu_launch(elem_grid(cols), T256, [&] { sum_rows(x.data(), out.data(), rows, cols, acc); });
    emu_launch(elem_grid(len), T256, [&] { relu(x.data(), r.data(), len); });
    emu_launch(elem_grid(len), T256, [&] { relu_backward(r.data(), dy.data(), dx.data(), len); });
    emu_launch(elem_grid(len), T256, [&] { axpy(x.data(), ay.data(), len, -0.5f); });
    vector<double> wy(len), wout(cols), wr(len), wdx(len), way(len);
    for (size_t i = 0; i < len; ++i) {
        wy[i] = (double)x[i] + bias[i % cols];
        wr[i] = x[i] > 0 ? x[i] : 0.0;
        wdx[i] = wr[i] > 0 ? dy[i] : 0.0;
        way[i] = (double)dy[i] - 0.5 * x[i];
    }
    for (size_t j = 0; j < cols; ++j) {
        double s = 0;
        for (size_t i = 0; i < rows; ++i) s += x[i * cols + j];
        wout[j] = acc ? out0[j] + s : s;
    }
    char name[100];
    snprintf(name, sizeof name, "dense rows=%zu cols=%zu acc=%d", rows, cols, acc);
    check(std::string(name) + " bias_add", y, wy, 1e-6);
    check(std::string(name) + " sum_rows", out, wout, 1e-5);
    check(std::string(name) + " relu", r, wr, 0);
    check(std::string(name) + " relu_backward", dx, wdx, 0);
    check(std::string(name) + " axpy", ay, way, 1e-6);
}

static void test_optim(size_t len, unsigned step) {
    auto w = rand_logits(len, 1.0), g = rand_logits(len, 1.0), m = rand_logits(len, 0.1), v = rand_logits(len, 0.01);
    for (auto& x : v) x = fabsf(x);
    const double lr = 1e-3, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.01f;
    // AdamSpec::corrections (f64 on the host)
    const float lr_c1 = (float)((double)(float)lr / (1.0 - pow(b1, step))), inv_c2 = (float)(1.0 / (1.0 - pow(b2, step)));
    vector<float> W = w, M = m, V = v;
    emu_launch(elem_grid(len), T256,
               [&] { adam_step(W.data(), g.data(), M.data(), V.data(), len, lr_c1, inv_c2, b1, b2, eps, wd); });
    vector<double> ww(len), wm(len), wv(len);
    for (size_t i = 0; i < len; ++i) {
        double gi = g[i] + wd * w[i];
        wm[i] = b1 * m[i] + (1 - b1) * gi;
        wv[i] = b2 * v[i] + (1 - b2) * gi * gi;
        ww[i] = w[i] - (double)(float)lr * (wm[i] / (1 - pow(b1, step))) / (sqrt(wv[i] / (1 - pow(b2, step))) + eps);
    }
    char name[100];
    snprintf(name, sizeof name, "adam len=%zu step=%u", len, step);
    check(std::string(name) + " w", W, ww, 1e-5);
    check(std::string(name) + " m", M, wm, 1e-5);
    check(std::string(name) + " v", V, wv, 1e-5);
    const float slr = 0.1f, mom = 0.9f, swd = 1e-4f;
    W = w, M = m;
    emu_launch(elem_grid(len), T256, [&] { sgd_step(W.data(), g.data(), M.data(), len, slr, mom, swd); });
    for (size_t i = 0; i < len; ++i) {
        double gi = g[i] + (double)swd * w[i];
        wm[i] = (double)mom * m[i] + gi;
        ww[i] = w[i] - (double)slr * wm[i];
    }
    snprintf(name, sizeof name, "sgd len=%zu", len);
    check(std::string(name) + " w", W, ww, 1e-5);
    check(std::string(name) + " velocity", M, wm, 1e-5);
}

struct Conv {
    size_t n, h, w, c, k, stride, pad;
    size_t oh() const { return (h + 2 * pad - k) / stride + 1; }
    size_t ow() const { return (w + 2 * pad - k) / stride + 1; }
    size_t in_len() const { return n * h * w * c; }
    size_t width() const { return k * k * c; }
    size_t cols_len() const { return n * oh() * ow() * width(); }
    // The input pixel a column entry reads, or false in the padding.
    bool source(size_t oy, size_t ox, size_t ky, size_t kx, size_t& y, size_t& x) const {
        long yy = (long)(oy * stride + ky) - (long)pad, xx = (long)(ox * stride + kx) - (long)pad;
        if (yy < 0 || xx < 0 || yy >= (long)h || xx >= (long)w) return false;
        y = yy, x = xx;
        return true;
    }
};

static void test_conv(Conv s) {
    auto x = rand_logits(s.in_len(), 1.0), dcols = rand_logits(s.cols_len(), 1.0);
    vector<float> cols(s.cols_len(), FNAN), dx(s.in_len(), FNAN);
    emu_launch(elem_grid(cols.size()), T256, [&] {
        im2col(x.data(), cols.data(), s.h, s.w, s.c, s.k, s.stride, s.pad, s.oh(), s.ow(), cols.size());
    });
    emu_launch(elem_grid(dx.size()), T256, [&] {
        col2im(dcols.data(), dx.data(), s.h, s.w, s.c, s.k, s.stride, s.pad, s.oh(), s.ow(), dx.size());
    });
    vector<double> wcols(s.cols_len(), 0.0), wdx(s.in_len(), 0.0);
    for (size_t n = 0; n < s.n; ++n)
        for (size_t oy = 0; oy < s.oh(); ++oy)
            for (size_t ox = 0; ox < s.ow(); ++ox) {
                size_t row = (n * s.oh() + oy) * s.ow() + ox;
                for (size_t ky = 0; ky < s.k; ++ky)
                    for (size_t kx = 0; kx < s.k; ++kx) {
                        size_t y, xx;
                        if (!s.source(oy, ox, ky, kx, y, xx)) continue;
                        for (size_t ch = 0; ch < s.c; ++ch) {
                            size_t ci = row * s.width() + (ky * s.k + kx) * s.c + ch;
                            size_t xi = ((n * s.h + y) * s.w + xx) * s.c + ch;
                            wcols[ci] = x[xi];
                            wdx[xi] += dcols[ci];
                        }
                    }
            }
    char name[200];
    snprintf(name, sizeof name, "conv n=%zu h=%zu w=%zu c=%zu k=%zu stride=%zu pad=%zu", s.n, s.h, s.w, s.c, s.k,
             s.stride, s.pad);
    check(std::string(name) + " im2col", cols, wcols, 0);
    check(std::string(name) + " col2im", dx, wdx, 1e-6);
}

static void test_pool(size_t N, size_t h, size_t w, size_t c, size_t k, bool max, bool ties) {
    size_t oh = h / k, ow = w / k, in = N * h * w * c, outl = N * oh * ow * c;
    auto x = rand_logits(in, 1.0), dy = rand_logits(outl, 1.0);
    if (ties)  // few distinct values: many equal maxima (the first, row-major, takes the gradient)
        for (auto& v : x) v = (float)irand(-2, 2);
    vector<float> y(outl, FNAN), dx(in, FNAN), t(in, FNAN);
    emu_launch(elem_grid(outl), T256, [&] { pool(x.data(), y.data(), h, w, c, k, oh, ow, max, outl); });
    emu_launch(elem_grid(in), T256, [&] { pool_backward(x.data(), dy.data(), dx.data(), h, w, c, k, oh, ow, max, in); });
    emu_launch(elem_grid(in), T256, [&] { transpose(x.data(), t.data(), h * w, c, in); });
    vector<double> wy(outl), wdx(in, 0.0), wt(in);
    for (size_t n = 0; n < N; ++n)
        for (size_t oy = 0; oy < oh; ++oy)
            for (size_t ox = 0; ox < ow; ++ox)
                for (size_t ch = 0; ch < c; ++ch) {
                    auto at = [&](size_t t) { return ((n * h + oy * k + t / k) * w + ox * k + t % k) * c + ch; };
                    size_t o = ((n * oh + oy) * ow + ox) * c + ch;
                    double best = -INFINITY, sum = 0;
                    size_t arg = 0;
                    for (size_t t = 0; t < k * k; ++t) {
                        best = std::max(best, (double)x[at(t)]);
                        sum += x[at(t)];
                        if (x[at(t)] > x[at(arg)]) arg = t;
                    }
                    wy[o] = max ? best : sum / (k * k);
                    if (max) wdx[at(arg)] += dy[o];
                    else
                        for (size_t t = 0; t < k * k; ++t) wdx[at(t)] += dy[o] / (double)(k * k);
                }
    size_t rows = h * w;
    for (size_t b = 0; b < N; ++b)
        for (size_t i = 0; i < rows; ++i)
            for (size_t j = 0; j < c; ++j) wt[(b * c + j) * rows + i] = x[(b * rows + i) * c + j];
    char name[200];
    snprintf(name, sizeof name, "pool n=%zu h=%zu w=%zu c=%zu k=%zu max=%d ties=%d", N, h, w, c, k, max, ties);
    check(std::string(name) + " y", y, wy, 1e-6);
    check(std::string(name) + " dx", dx, wdx, 1e-6);
    check(std::string(name) + " transpose", t, wt, 0);
}

// ---- relational.cu (ports of src/ops/relational/) ----

static void test_relational(size_t n, size_t dim, int dup) {
    auto f = rand_logits(n * dim, 2.0);
    if (dup) {  // duplicate rows: floored distances (skipped in the backward pass)
        for (size_t k = 0; k < dim; ++k) f[(n - 1) * dim + k] = f[k];
        if (dup == 2 && n > 2)  // and a row of zeros: a floored norm
            for (size_t k = 0; k < dim; ++k) f[1 * dim + k] = 0.f;
    }
    char name[100];
    snprintf(name, sizeof name, "relational n=%zu dim=%zu dup=%d", n, dim, dup);
    const std::string nm(name);
    // row_normalize and its backward over [n, dim].
    auto dy = rand_logits(n * dim, 1.0);
    vector<float> y(n * dim, FNAN), dx(n * dim, FNAN);
    dim3 rows_grid = grid_for((n + 7) / 8);
    emu_launch(rows_grid, T256, [&] { row_normalize(f.data(), y.data(), n, dim); });
    emu_launch(rows_grid, T256, [&] { row_normalize_backward(f.data(), dy.data(), dx.data(), n, dim); });
    // nwdx: the f32 rounding of the terms of dy - y (y . dy), the floor of the comparison where they
    // cancel exactly (dim 1: the gradient is 0, the kernel's f32 difference ~1e-7 |dy| / |x|).
    vector<double> wy(n * dim), wdx(n * dim), nwdx(n * dim, 0.0);
    for (size_t r = 0; r < n; ++r) {
        double s = 0;
        for (size_t j = 0; j < dim; ++j) s += (double)f[r * dim + j] * f[r * dim + j];
        double nrm = sqrt(s);
        double fl = std::max(nrm, 1e-12);
        for (size_t j = 0; j < dim; ++j) wy[r * dim + j] = f[r * dim + j] / fl;
        if (nrm > 1e-12) {
            double dot = 0;
            for (size_t j = 0; j < dim; ++j) dot += f[r * dim + j] / nrm * dy[r * dim + j];
            for (size_t j = 0; j < dim; ++j) {
                wdx[r * dim + j] = (dy[r * dim + j] - f[r * dim + j] / nrm * dot) / nrm;
                nwdx[r * dim + j] = 4 * 5.96e-8 * (fabs(dy[r * dim + j]) + fabs(f[r * dim + j] / nrm * dot)) / nrm;
            }
        } else {
            for (size_t j = 0; j < dim; ++j) wdx[r * dim + j] = dy[r * dim + j] / 1e-12;
        }
    }
    check(nm + " row_normalize", y, wy, 1e-5);
    check(nm + " row_normalize_backward", dx, wdx, 1e-4, &nwdx);
    // pairwise distances and the backward pass (from the kernel's own D, as tests/suite/relational.rs).
    vector<float> d(n * n, FNAN), df(n * dim, FNAN);
    unsigned long long tiles = (unsigned long long)((n + 15) / 16) * ((n + 15) / 16);
    emu_launch(grid_for(tiles), T256, [&] { pairwise_distance(f.data(), d.data(), n, dim); });
    vector<double> wd(n * n, 0.0);
    for (size_t i = 0; i < n; ++i)
        for (size_t j = 0; j < n; ++j)
            if (i != j) {
                double s = 0;
                for (size_t k = 0; k < dim; ++k) s += pow((double)f[i * dim + k] - f[j * dim + k], 2);
                wd[i * n + j] = sqrt(std::max(s, 1e-12));
            }
    check(nm + " pairwise_distance", d, wd, 1e-5);
    auto ddv = rand_logits(n * n, 1.0);
    emu_launch(elem_grid(n * dim), T256, [&] { pairwise_distance_backward(f.data(), d.data(), ddv.data(), df.data(), n, dim); });
    vector<double> wdf(n * dim, 0.0);
    for (size_t i = 0; i < n; ++i)
        for (size_t j = 0; j < n; ++j) {
            double dij = d[i * n + j];
            if (i == j || dij * dij <= 1e-12) continue;
            double g = ((double)ddv[i * n + j] + ddv[j * n + i]) / dij;
            for (size_t k = 0; k < dim; ++k) wdf[i * dim + k] += g * ((double)f[i * dim + k] - f[j * dim + k]);
        }
    check(nm + " pairwise_distance_backward", df, wdf, 1e-4);
    // off-diagonal normalisation (of the kernel's D) and its backward; the forward also in place.
    vector<float> yo(n * n, FNAN), dd2(n * n, FNAN), inplace = d;
    emu_launch(ONE, T1024, [&] { offdiag_normalize(d.data(), yo.data(), n); });
    emu_launch(ONE, T1024, [&] { offdiag_normalize(inplace.data(), inplace.data(), n); });
    emu_launch(ONE, T1024, [&] { offdiag_normalize_backward(d.data(), ddv.data(), dd2.data(), n); });
    double s = 0, dot = 0;
    for (size_t k = 0; k < n * n; ++k) {
        if (k / n != k % n) s += d[k];
        dot += (double)d[k] * ddv[k];
    }
    double m = s / (double)(n * (n - 1));
    double c = dot / (m * m * (double)(n * (n - 1)));
    vector<double> wyo(n * n), wdd(n * n);
    for (size_t k = 0; k < n * n; ++k) {
        wyo[k] = d[k] / m;
        wdd[k] = ddv[k] / m - (k / n != k % n ? c : 0.0);
    }
    check(nm + " offdiag_normalize", yo, wyo, 1e-5);
    check(nm + " offdiag_normalize in place", inplace, wyo, 1e-5);
    check(nm + " offdiag_normalize_backward", dd2, wdd, 1e-4);
}

static void test_relational_kernels(int cases) {
    test_relational(2, 1, 0);
    test_relational(2, 1, 1);
    test_relational(17, 33, 2);
    test_relational(40, 70, 1);
    test_relational(33, 1000, 0);  // row_normalize: a warp loops over long rows
    for (int i = 0; i < cases; ++i) test_relational((size_t)irand(2, 40), (size_t)irand(1, 50), irand(0, 2));
    for (size_t m : {1ul, 5ul, 300ul, 4097ul, 100000ul}) {
        test_mse(m, true, false, 1);
        test_mse(m, m > 1, m > 4, 1);
    }
}

// copy_rows (dense.cu): a strided block between every pair of dtypes, odd offsets and strides, a
// broadcast (src_stride 0); each element converted exactly and rounded once, others untouched.
static void test_copy_rows(size_t rows, size_t cols, size_t so, size_t ss, size_t d_o, size_t ds) {
    const size_t src_len = so + (rows - 1) * ss + cols + 1, dst_len = d_o + (rows - 1) * ds + cols + 2;
    for (u32 sd = 0; sd < 3; ++sd)
        for (u32 dd = 0; dd < 3; ++dd) {
            auto sv = rand_logits(src_len, 3.0), dv = rand_logits(dst_len, 1.0);
            vector<u16> sh(src_len), dh(dst_len);
            for (size_t i = 0; i < src_len; ++i) {
                if (sd) sh[i] = f32_to_half_bits(sv[i], sd), sv[i] = half_bits_to_f32(sh[i], sd);
            }
            for (size_t i = 0; i < dst_len; ++i) {
                if (dd) dh[i] = f32_to_half_bits(dv[i], dd), dv[i] = half_bits_to_f32(dh[i], dd);
            }
            vector<float> want = dv;
            for (size_t r = 0; r < rows; ++r)
                for (size_t c = 0; c < cols; ++c) {
                    const float v = sv[so + r * ss + c];
                    want[d_o + r * ds + c] = dd ? half_bits_to_f32(f32_to_half_bits(v, dd), dd) : v;
                }
            const void* src = sd ? (const void*)sh.data() : (const void*)sv.data();
            void* dst = dd ? (void*)dh.data() : (void*)dv.data();
            emu_launch(elem_grid(rows * cols), T256, [&] {
                copy_rows(src, dst, (u32)rows, (u32)cols, (u32)so, (u32)ss, (u32)d_o, (u32)ds, sd, dd);
            });
            size_t bad = 0;
            for (size_t i = 0; i < dst_len; ++i) {
                const float got = dd ? half_bits_to_f32(dh[i], dd) : dv[i];
                bad += !(got == want[i]);
            }
            ++checks;
            if (bad) {
                printf("FAIL copy_rows %zux%zu src %u dst %u: %zu elements differ\n", rows, cols, sd, dd, bad);
                ++failures;
            }
        }
}

static void test_tape_kernels(int cases) {
    const size_t dims[] = {1, 2, 3, 15, 16, 17, 31, 33, 47, 70};
    for (int ta = 0; ta < 2; ++ta)
        for (int tb = 0; tb < 2; ++tb)
            for (int acc = 0; acc < 2; ++acc) {
                test_matmul(1, 1, 1, ta, tb, acc);
                test_matmul(17, 33, 5, ta, tb, acc);
                test_matmul(70, 300, 69, ta, tb, acc);
                for (int i = 0; i < cases / 4 + 1; ++i)
                    test_matmul(dims[irand(0, 9)], (size_t)irand(1, 80), dims[irand(0, 9)], ta, tb, acc);
            }
    for (int i = 0; i < cases; ++i) test_dense_elementwise((size_t)irand(1, 40), (size_t)irand(1, 600), irand(0, 1));
    test_copy_rows(3, 5, 1, 7, 3, 9);
    test_copy_rows(4, 3, 2, 0, 1, 3);  // a broadcast
    test_copy_rows(1, 17, 4, 17, 5, 17);
    for (int i = 0; i < cases / 4 + 1; ++i) {
        const size_t r = (size_t)irand(1, 9), c = (size_t)irand(1, 40);
        test_copy_rows(r, c, (size_t)irand(0, 5), c + (size_t)irand(0, 3), (size_t)irand(0, 5), c + (size_t)irand(0, 3));
    }
    for (size_t len : {1ul, 255ul, 257ul, 3000ul})
        for (unsigned step : {1u, 10u, 1999u}) test_optim(len, step);
    test_conv(Conv{1, 1, 1, 1, 1, 1, 0});
    test_conv(Conv{2, 5, 7, 3, 3, 1, 1});
    test_conv(Conv{1, 9, 8, 2, 3, 2, 1});
    test_conv(Conv{2, 6, 6, 1, 2, 3, 1});  // stride > kernel: pixels nobody reads
    test_conv(Conv{1, 3, 4, 2, 4, 1, 1});  // kernel larger than the image
    for (int i = 0; i < cases * 2; ++i) {
        Conv s{(size_t)irand(1, 3), (size_t)irand(1, 9), (size_t)irand(1, 9), (size_t)irand(1, 5), (size_t)irand(1, 3),
               (size_t)irand(1, 3), (size_t)irand(0, 2)};
        if (s.k > s.h + 2 * s.pad || s.k > s.w + 2 * s.pad) continue;
        test_conv(s);
    }
    test_pool(1, 1, 1, 1, 1, true, false);
    test_pool(2, 6, 7, 3, 2, true, true);  // ties, a dropped partial window
    test_pool(1, 9, 10, 2, 3, true, true);
    test_pool(2, 7, 5, 3, 2, false, false);
    for (int i = 0; i < cases * 2; ++i) {
        size_t k = (size_t)irand(1, 3);
        test_pool((size_t)irand(1, 3), std::max(k, (size_t)irand(1, 11)), std::max(k, (size_t)irand(1, 11)),
                  (size_t)irand(1, 5), k, irand(0, 1), irand(0, 1));
    }
}

// ---- bf16 / f16 (EMU_HALF): the row kernels on 16-bit inputs and gradients, against the error
// budget of docs/LOSSES.md: the gradient within 1.5x of the error of rounding the exact (f64)
// gradient of the same inputs, in the mean and the norm, faithfully rounded for >= 99.9% of the
// elements; the loss within 1e-4. ----

static vector<u16> to_half(const vector<float>& v, u32 dt) {
    vector<u16> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) h[i] = f32_to_half_bits(v[i], dt);
    return h;
}
static vector<float> from_half(const vector<u16>& h, u32 dt) {
    vector<float> v(h.size());
    for (size_t i = 0; i < h.size(); ++i) v[i] = half_bits_to_f32(h[i], dt);
    return v;
}
// w rounded to the dtype (through f32: the rare double-rounding tie is far below the budget).
static double round_half(double w, u32 dt) { return half_bits_to_f32(f32_to_half_bits((float)w, dt), dt); }
static double ulp_half(double w, u32 dt) {
    const u16 b = f32_to_half_bits((float)fabs(w), dt);
    return (double)half_bits_to_f32((u16)(b + 1), dt) - (double)half_bits_to_f32(b, dt);
}

static void check_budget(const std::string& what, u32 dt, const vector<u16>& got_h, const vector<double>& want) {
    const vector<float> got = from_half(got_h, dt);
    double es = 0, rs = 0, e2 = 0, r2 = 0, w2 = 0;
    size_t unfaithful = 0, n = got.size();
    for (size_t i = 0; i < n; ++i) {
        const double w = want[i], g = got[i];
        if (std::isnan(w) || std::isnan(g)) {
            if (std::isnan(w) != std::isnan(g)) unfaithful = n;  // a NaN mismatch fails
            continue;
        }
        const double e = fabs(g - w), r = fabs(round_half(w, dt) - w);
        es += e, rs += r, e2 += e * e, r2 += r * r, w2 += w * w;
        if (e > ulp_half(w, dt)) ++unfaithful;
    }
    const double floor = 1e-6 * sqrt(w2);
    const double mean_ratio = es / (rs + floor * sqrt((double)n)), norm_ratio = sqrt(e2) / (sqrt(r2) + floor);
    ++checks;
    const bool ok = mean_ratio <= 1.5 && norm_ratio <= 1.5 && (double)unfaithful <= 1e-3 * (double)n;
    if (!ok) {
        ++failures;
        printf("FAIL %s: mean %.3fx, norm %.3fx of rounding, %zu of %zu not faithful\n", what.c_str(), mean_ratio,
               norm_ratio, unfaithful, n);
    }
    auto& f = families["half"];
    ++f.checks;
    if (norm_ratio > f.worst) {
        f.worst = norm_ratio;
        f.what = what;
    }
}

static void test_half(u32 dt, size_t n, size_t c, float T) {
    const int ignore = -100;
    const char* dn = dt == DT_BF16 ? "bf16" : "f16";
    const vector<u16> sh = to_half(rand_logits(n * c, 6.0), dt), th = to_half(rand_logits(n * c, 6.0), dt);
    const vector<float> s = from_half(sh, dt), t = from_half(th, dt);
    vector<int> labels(n);
    for (size_t r = 0; r < n; ++r) labels[r] = r % 5 == 3 ? ignore : irand(0, (int)c - 1);
    const float g = 1.f, it = (float)(1.0 / T);
    const Cfg cfg = row_launch(n, c);
    unsigned count = 0;
    emu_launch(ONE, T1024, [&] { count_valid(labels.data(), n, ignore, &count); });
    char tag[200];
    // Hinton, student and teacher gradients in the inputs' dtype.
    {
        vector<u16> gs(n * c, 0xffffu), gt(n * c, 0xffffu);
        vector<float> rows(n, FNAN);
        float loss = FNAN;
        emu_launch(cfg.grid, cfg.block, [&] {
            (cfg.block_form ? hinton_block : hinton_warp)(sh.data(), th.data(), labels.data(), &count, rows.data(),
                                                          gs.data(), gt.data(), n, c, it, T, 0.3f, 0.f, g, ignore, 0,
                                                          dt, dt, dt, dt);
        });
        emu_launch(ONE, T1024, [&] { reduce_rows(rows.data(), n, &count, 0, &loss); });
        RowRef want = ref_hinton(T, 0.3, 0.0, 0, g, ignore, to_d(s), to_d(t), labels, n, c);
        snprintf(tag, sizeof tag, "half %s hinton n=%zu c=%zu T=%g", dn, n, c, T);
        check1(std::string(tag) + " loss", loss, want.loss);
        check_budget(std::string(tag) + " gs", dt, gs, want.gs);
        check_budget(std::string(tag) + " gt", dt, gt, want.gt);
    }
    // The divergences, teacher logits, with both gradients.
    for (int div = 0; div < 3; ++div) {
        vector<u16> gs(n * c, 0xffffu), gt(n * c, 0xffffu);
        vector<float> rows(n, FNAN);
        float loss = FNAN;
        emu_launch(cfg.grid, cfg.block, [&] {
            (cfg.block_form ? divergence_block : divergence_warp)(sh.data(), th.data(), labels.data(), &count,
                                                                  rows.data(), gs.data(), gt.data(), n, c, it, T, 0.5f,
                                                                  0.f, g, ignore, div, 0, 0, dt, dt, dt, dt);
        });
        emu_launch(ONE, T1024, [&] { reduce_rows(rows.data(), n, &count, 0, &loss); });
        RowRef want = ref_div(div, 0, T, 0.5, 0, g, ignore, to_d(s), to_d(t), &labels, n, c);
        snprintf(tag, sizeof tag, "half %s div=%d n=%zu c=%zu T=%g", dn, div, n, c, T);
        check1(std::string(tag) + " loss", loss, want.loss);
        check_budget(std::string(tag) + " gs", dt, gs, want.gs);
        check_budget(std::string(tag) + " gt", dt, gt, want.gt);
    }
    // Cross-entropy, the gradient in place over the half student.
    {
        vector<u16> S = sh;
        vector<float> rows(n, FNAN);
        float loss = FNAN;
        emu_launch(cfg.grid, cfg.block, [&] {
            (cfg.block_form ? cross_entropy_block : cross_entropy_warp)(S.data(), labels.data(), &count, rows.data(),
                                                                        S.data(), n, c, 0.1f, g, ignore, 0, dt, dt);
        });
        emu_launch(ONE, T1024, [&] { reduce_rows(rows.data(), n, &count, 0, &loss); });
        RowRef want = ref_ce(0.1, 0, g, ignore, to_d(s), labels, n, c);
        snprintf(tag, sizeof tag, "half %s ce in place n=%zu c=%zu", dn, n, c);
        check1(std::string(tag) + " loss", loss, want.loss);
        check_budget(std::string(tag) + " gs", dt, S, want.gs);
    }
    // DKD (paper's weights, label smoothing), the student gradient in the student's dtype.
    if (c >= 2) {
        vector<u16> gs(n * c, 0xffffu);
        vector<float> rows(n, FNAN);
        float loss = FNAN;
        emu_launch(cfg.grid, cfg.block, [&] {
            (cfg.block_form ? dkd_block : dkd_warp)(sh.data(), th.data(), labels.data(), &count, rows.data(),
                                                    gs.data(), n, c, it, T, 1.f, 1.f, 8.f, 0.1f, g, ignore, 0, dt,
                                                    dt, dt);
        });
        emu_launch(ONE, T1024, [&] { reduce_rows(rows.data(), n, &count, 0, &loss); });
        RowRef want = ref_dkd(T, 1.0, 1.0, 8.0, 0.1, 0, g, ignore, to_d(s), to_d(t), labels, n, c);
        snprintf(tag, sizeof tag, "half %s dkd n=%zu c=%zu T=%g", dn, n, c, T);
        check1(std::string(tag) + " loss", loss, want.loss);
        check_budget(std::string(tag) + " gs", dt, gs, want.gs);
    }
    // A bf16 / f16 student with an f32 teacher and f32 gradients: the f32 contract.
    {
        vector<float> gs(n * c, FNAN), rows(n, FNAN);
        float loss = FNAN;
        emu_launch(cfg.grid, cfg.block, [&] {
            (cfg.block_form ? hinton_block : hinton_warp)(sh.data(), t.data(), labels.data(), &count, rows.data(),
                                                          gs.data(), nullptr, n, c, it, T, 0.3f, 0.f, g, ignore, 0,
                                                          dt, DT_F32, DT_F32, DT_F32);
        });
        emu_launch(ONE, T1024, [&] { reduce_rows(rows.data(), n, &count, 0, &loss); });
        RowRef want = ref_hinton(T, 0.3, 0.0, 0, g, ignore, to_d(s), to_d(t), labels, n, c);
        snprintf(tag, sizeof tag, "half %s student, f32 teacher and gradient n=%zu c=%zu T=%g", dn, n, c, T);
        check1(std::string(tag) + " loss", loss, want.loss);
        check(std::string(tag) + " gs", gs, want.gs, 1e-4, &want.ngs);
    }
}

static void test_half_cases(int cases) {
    const size_t Cs[] = {2, 3, 33, 1000, 1031, 5000};
    const float Ts[] = {0.5f, 1.f, 4.f, 20.f};
    for (u32 dt : {DT_BF16, DT_F16}) {
        for (int k = 0; k < cases; ++k) test_half(dt, (size_t)irand(1, 17), Cs[irand(0, 5)], Ts[irand(0, 3)]);
        test_half(dt, 16, 131072, 2.f);
    }
}

static int finish() {
    for (auto& [name, f] : families)
        printf("family %-10s %5d checks (%d at the reference's rounding bound), worst %.3g (%s)\n", name.c_str(),
               f.checks, f.floored, f.worst, f.what.c_str());
    printf("%d checks, %d failed; worst relative error %.3g (%s)\n", checks, failures, worst, worst_case.c_str());
    return failures != 0;
}

static void print_div_summary() {
    const char* dn[] = {"KL", "RKL", "JSD"};
    const char* tn[] = {"logits", "probs", "logprobs"};
    for (int d = 0; d < 3; ++d)
        for (int t = 0; t < 3; ++t)
            printf("div %s/%s: worst %.3g (%s)\n", dn[d], tn[t], worst_family[d][t].rel, worst_family[d][t].what.c_str());
    printf("div T=1e-3: worst %.3g (%s)\n", worst_t_lo.rel, worst_t_lo.what.c_str());
    printf("div T>=5e3: worst %.3g (%s)\n", worst_t_hi.rel, worst_t_hi.what.c_str());
    printf("div beta<=1e-5: worst %.3g (%s)\n", worst_b_lo.rel, worst_b_lo.what.c_str());
    printf("div beta>=1-1e-5: worst %.3g (%s)\n", worst_b_hi.rel, worst_b_hi.what.c_str());
}

#include "sparse_checks.h"  // test_sparse, sparse_cases (src/ops/sparse/sparse.cu)

int main(int argc, char** argv) {
    int cases = argc > 1 ? atoi(argv[1]) : 40;
    if (getenv("EMU_SELFTEST")) {  // one deliberate mismatch: the exit status must be non-zero (CI checks)
        check1("selftest (a deliberate mismatch)", 1.f, 2.0);
        return finish();
    }
    if (getenv("EMU_REL")) {  // only relational.cu and smooth L1
        test_relational_kernels(cases);
        return finish();
    }
    if (getenv("EMU_HALF")) {  // only bf16 / f16 inputs and gradients of the row losses
        test_half_cases(cases);
        return finish();
    }
    if (getenv("EMU_TAPE")) {  // only the tape's kernels (dense.cu, optim.cu, conv.cu)
        test_tape_kernels(cases);
        return finish();
    }
    const size_t Cs[] = {1, 2, 7, 32, 33, 100, 1024, 1025, 3000, 5000};
    const size_t Ns[] = {1, 3, 9, 17};
    const float Ts[] = {0.05f, 1.f, 3.7f, 100.f};
    const double scales[] = {1.0, 10.0, 1e4};
    auto pickC = [&] { return Cs[irand(0, 9)]; };
    // The whole range validation accepts: T in [1e-3, 1e4] (log-uniform, the ends and the old
    // fixed values often), beta in [1e-6, 1 - 1e-6] (the ends, log-uniform near each, mid).
    auto pickT = [&] {
        const int r = irand(0, 7);
        if (r == 0) return 1e-3f;
        if (r == 1) return 1e4f;
        if (r <= 3) return Ts[irand(0, 3)];
        return (float)exp(uni(log(1e-3), log(1e4)));
    };
    auto pickBeta = [&] {
        const int r = irand(0, 5);
        if (r == 0) return 1e-6f;
        if (r == 1) return (float)(1.0 - 1e-6);
        if (r == 2) return (float)exp(uni(log(1e-6), log(0.5)));
        if (r == 3) return (float)(1.0 - exp(uni(log(1e-6), log(0.5))));
        return (float)uni(0.05, 0.95);
    };
    auto pickNear = [&] { return std::pow(10.0, -irand(0, 4)); };  // a teacher close to the student
    auto pickTeacherT = [&] { return exp(uni(log(0.05), log(20.0))); };  // how sharp a given teacher is
    auto pickEps = [&] {
        const double e[] = {1e-8, 1e-4, 0.1, 0.0};
        const double v = e[irand(0, 3)];
        return (float)(v != 0.0 ? v : exp(uni(log(1e-12), log(0.5))));
    };
    auto pickN = [&] { return Ns[irand(0, 3)]; };
    // Hinton over the whole accepted T range (hinton.cu has divergence.cu's high-T forms), a
    // quarter of the cases with a teacher close to the student; EMU_HINTON_T fixes T.
    const float hinton_t = getenv("EMU_HINTON_T") ? (float)atof(getenv("EMU_HINTON_T")) : 0.f;
    auto hinton_cases = [&](int count) {
        for (int i = 0; i < count; ++i)
            test_hinton(pickN(), pickC(), hinton_t > 0.f ? hinton_t : pickT(), (float)uni(0, 1),
                        irand(0, 1) ? 0.f : 0.1f, irand(0, 2), scales[irand(0, 2)], irand(0, 1), irand(0, 1),
                        irand(0, 4) == 0, irand(0, 3) == 0 ? pickNear() : 0.0);
    };
    if (getenv("EMU_HINTON")) {  // only the Hinton cases, with a summary at the T ends
        hinton_cases(cases);
        printf("hinton: worst %.3g (%s)\n", worst_hinton.rel, worst_hinton.what.c_str());
        printf("hinton T=1e-3: worst %.3g (%s)\n", worst_hinton_t_lo.rel, worst_hinton_t_lo.what.c_str());
        printf("hinton T>=5e3: worst %.3g (%s)\n", worst_hinton_t_hi.rel, worst_hinton_t_hi.what.c_str());
        return finish();
    }
    // DKD over the whole accepted T range, C from 2 to 2^15; EMU_DKD_T fixes T.
    const float dkd_t = getenv("EMU_DKD_T") ? (float)atof(getenv("EMU_DKD_T")) : 0.f;
    if (getenv("EMU_SHARDED")) {  // only the vocab-sharded losses (1, 2, 3, 7 shards)
        sharded_cases(cases);
        return finish();
    }
    if (getenv("EMU_SPARSE")) {  // only the sparse top-k teachers (sparse.cu, sparse_checks.h)
        sparse_cases(cases);
        return finish();
    }
    if (getenv("EMU_DKD")) {  // only the DKD cases, with a summary at the T ends
        dkd_cases(cases, dkd_t, pickT, pickN);
        print_dkd_summary();
        return finish();
    }
    for (int i = 0; i < cases; ++i) {
        size_t c = pickC(), n = pickN();
        test_softmax(n, c, pickT(), irand(0, 1), scales[irand(0, 2)]);
    }
    if (getenv("EMU_FOCUS")) {  // EMU_FOCUS=div,teach,T,scale: divergence cases only
        int div, teach;
        float T;
        double scale;
        sscanf(getenv("EMU_FOCUS"), "%d,%d,%f,%lf", &div, &teach, &T, &scale);
        for (int i = 0; i < cases; ++i) {
            DivCase k{div, teach, pickN(), pickC(), T, pickBeta(), 1, scale, Flags{false, true, true, false, true},
                      false};
            if (irand(0, 3) == 0) k.near = pickNear();
            if (teach != 0) {
                k.zeros = irand(0, 3);
                k.teacher_temp = pickTeacherT();
                if (div == 1 && irand(0, 1)) k.eps = pickEps();
            }
            test_div(k);
        }
        print_div_summary();
        return finish();
    }
    test_div_fixed();
    for (int div = 0; div < 3; ++div)
        for (int teach = 0; teach < 3; ++teach)
            for (int i = 0; i < cases; ++i) {
                size_t c = pickC(), n = pickN();
                Flags f{irand(0, 1) == 1, irand(0, 4) != 0, irand(0, 1) == 1, irand(0, 2) == 0, true};
                DivCase k{div, teach, n, c, pickT(), pickBeta(), irand(0, 2), scales[irand(0, 2)], f, irand(0, 4) == 0};
                if (irand(0, 3) == 0) k.near = pickNear();
                if (teach != 0) {
                    k.zeros = irand(0, 3);
                    k.teacher_temp = pickTeacherT();
                    if (div == 1 && irand(0, 1)) k.eps = pickEps();
                }
                test_div(k);
            }
    print_div_summary();
    if (getenv("EMU_DIV")) {  // only the divergences (after the softmax cases)
        return finish();
    }
    for (int i = 0; i < cases; ++i)
        test_ce(pickN(), pickC(), irand(0, 1) ? 0.f : 0.1f, irand(0, 2), scales[irand(0, 2)], irand(0, 1),
                irand(0, 4) == 0, irand(0, 9) == 0);
    hinton_cases(cases);
    {
        // DKD's cases draw from a stream of their own, so that the families after them get the
        // cases they had before DKD was added, seed for seed.
        const std::mt19937_64 saved = rng;
        rng.seed(rng() ^ 0xd1cd1cull);
        dkd_cases(cases, dkd_t, pickT, pickN);
        rng = saved;
    }
    for (size_t m : {1ul, 5ul, 300ul, 4097ul, 100000ul}) {
        test_mse(m, true, false);
        test_mse(m, m > 1, m > 4);
    }
    test_at(1, 1, 1, 1, false);
    test_at(3, 4, 6, 49, false);
    test_at(2, 3, 2, 300, true);
    test_at(5, 16, 8, 64, false);
    test_at(1, 1, 1, 4, false, 1.0, false, true);  // the issue-11 example: 1e10 among small values
    test_at(3, 4, 6, 49, false, 2.0, true);
    test_at(2, 3, 5, 300, true, 1e19);             // Q = A^2 past f32
    test_at(2, 7, 2, 33, false, 3e38);             // the largest finite features
    test_at(2, 2, 3, 17, false, 1e-20);            // tiny features (Q ~ 1e-40: below f32's normal range)
    for (int i = 0; i < cases / 4 + 1; ++i)
        test_at((size_t)irand(1, 4), (size_t)irand(1, 9), (size_t)irand(1, 9), (size_t)irand(1, 300), irand(0, 3) == 0,
                std::pow(10.0, uni(-15, 38)), irand(0, 1));
    test_tape_kernels(cases);
    test_relational_kernels(cases);
    {
        // The sharded cases draw from a stream of their own (the other families keep their cases).
        const std::mt19937_64 saved = rng;
        rng.seed(rng() ^ 0x5a4dedull);
        sharded_cases(cases);
        rng = saved;
    }
    {
        // The sparse cases likewise.
        const std::mt19937_64 saved = rng;
        rng.seed(rng() ^ 0x5ba75eull);
        sparse_cases(cases);
        rng = saved;
    }
    return finish();
}
