// The vocab-sharded losses (src/ops/sharded/sharded.cu; docs/LOSSES.md section 9) in the
// emulator: included by emu.cpp after its references (ref_div, ref_ce, ref_hinton) and check().
// Each case splits the columns of [N, C] logits into 1, 2, 3 or 7 shards (uneven widths, the first
// of width 1), runs sharded_stats per shard, combines the stats as a caller's all-reduce would
// (MAX of the maxima, each shard's sums rescaled to them, SUM; a port of
// src/ops/sharded/mod.rs's rescale_stats, in double, rounded to f32 like the host API), runs the
// JSD round for JSD, then sharded_loss_and_grad per shard, and compares the reassembled loss,
// row losses and gradients with the unsharded f64 references at 1e-4, with a floor for the f32
// rounding of the stats' magnitudes (tests/suite/sharded.rs's `floors`). The teacher as logits
// (teach 0), probabilities (1) or log-probabilities (2; both from log_softmax of random logits,
// some rows with exact zeros except for reverse KL, whose zeros the host rejects), the Hinton
// reference for a given teacher alpha CE + (1 - alpha) T^2 KL(q||p) from ref_ce and ref_div.
// DKD (kind 5: teacher_form 3, div 3, w_ce 0.7, TCKD weight 1 in beta, NCKD weight 2 in w_div)
// against ref_dkd (dkd_checks.h); its stats are the rest of the row's, so a shard holding only the
// label has -inf maxima and sums 0 (the rescale keeps them 0, as rescale_stats does).

static const unsigned SH_MAXIMA = 2, SH_SUMS = 9, SH_STATS = 11;

// One shard's stats rescaled to the global maxima gm (in place).
static void sharded_rescale(double T, vector<double>& st, const vector<double>& gm, size_t n) {
    for (size_t r = 0; r < n; ++r) {
        double* m = &st[r * SH_MAXIMA];
        double* z = &st[n * SH_MAXIMA + r * SH_SUMS];
        if (m[0] == -INFINITY && m[1] == -INFINITY) {
            // DKD's shard holding only the label: its rest is empty
            for (int i : {0, 1, 2, 3, 4, 8}) z[i] = 0.0;
            m[0] = gm[r * 2];
            m[1] = gm[r * 2 + 1];
            continue;
        }
        const double ds = m[0] - gm[r * 2], dt = m[1] - gm[r * 2 + 1];
        const double es = exp(ds / T), et = exp(dt / T);
        const double gap = -expm1(-fabs(ds - dt) / T) * exp(std::max(ds, dt) / T);
        z[8] = et * z[8] + z[0] * (ds >= dt ? gap : -gap);
        z[3] = et * (z[3] + z[2] * (dt - ds));
        z[4] = es * (z[4] + z[0] * (ds - dt));
        z[0] *= es;
        z[1] *= exp(ds);
        z[2] *= et;
        m[0] = gm[r * 2];
        m[1] = gm[r * 2 + 1];
    }
}

// kind: 0 forward KL, 1 reverse KL, 2 JSD (T^2 D, no labels), 3 cross-entropy, 4 Hinton, 5 DKD.
static void test_sharded(size_t n, size_t c, int shards, int kind, float T, float beta, float alpha, float eps,
                         int red, double scale, bool masked, int teach = 0) {
    const int ignore = -100;
    vector<float> s = rand_logits(n * c, scale), t = rand_logits(n * c, scale);
    if (kind == 3 || kind == 5) teach = 0;
    if (teach != 0) {
        // log_softmax of the logits per row in double; zeros at j % 5 == 2 on even rows (not for
        // reverse KL)
        for (size_t r = 0; r < n; ++r) {
            const bool zeros = kind != 1 && r % 2 == 0 && c > 2;
            double m = -INFINITY, z = 0;
            for (size_t j = 0; j < c; ++j)
                if (!(zeros && j % 5 == 2)) m = std::max(m, (double)t[r * c + j]);
            for (size_t j = 0; j < c; ++j)
                if (!(zeros && j % 5 == 2)) z += exp((double)t[r * c + j] - m);
            const double lse = m + log(z);
            for (size_t j = 0; j < c; ++j) {
                const double lq = zeros && j % 5 == 2 ? -INFINITY : (double)t[r * c + j] - lse;
                t[r * c + j] = teach == 1 ? (float)exp(lq) : (float)lq;
            }
        }
    }
    const u32 form = kind == 5 ? 3u : (u32)teach;
    vector<int> labels(n);
    for (size_t r = 0; r < n; ++r) labels[r] = masked && r % 3 == 1 ? ignore : irand(0, (int)c - 1);
    const bool has_t = kind != 3, has_l = kind >= 3;
    // widths: the first 1 (when several), the rest cut at random
    int k = std::min<int>(shards, (int)c);
    vector<size_t> cuts{0};
    if (k > 1) cuts.push_back(1);
    while ((int)cuts.size() < k) {
        size_t x = (size_t)irand(2, (int)c - 1);
        if (std::find(cuts.begin(), cuts.end(), x) == cuts.end()) cuts.push_back(x);
    }
    std::sort(cuts.begin(), cuts.end());
    cuts.push_back(c);
    const double w_ce = kind == 3 ? 1.0 : kind == 4 ? alpha : kind == 5 ? 0.7 : 0.0;
    const double w_div = kind == 3 ? 0.0 : kind == 4 ? 1.0 - alpha : kind == 5 ? 2.0 : 1.0;
    const unsigned div = kind <= 2 ? (unsigned)kind : kind == 5 ? 3u : 0u;
    if (kind == 5) beta = 1.0f;  // DKD's TCKD weight
    size_t valid = 0;
    for (size_t r = 0; r < n; ++r) valid += !(has_l && labels[r] == ignore);
    const double factor = red_factor(red, valid);
    struct Part {
        size_t off, w;
        vector<float> s, t;
    };
    vector<Part> parts;
    for (int i = 0; i < k; ++i) {
        Part p{cuts[i], cuts[i + 1] - cuts[i], {}, {}};
        for (size_t r = 0; r < n; ++r)
            for (size_t j = 0; j < p.w; ++j) {
                p.s.push_back(s[r * c + p.off + j]);
                p.t.push_back(t[r * c + p.off + j]);
            }
        parts.push_back(std::move(p));
    }
    const dim3 grid{(unsigned)n, 1, 1};
    // phase 1 and the combine
    vector<vector<double>> stats;
    vector<double> gm(n * 2, -INFINITY);
    for (auto& p : parts) {
        vector<float> st(n * SH_STATS, FNAN);
        emu_launch(grid, T256, [&] {
            sharded_stats(p.s.data(), has_t ? p.t.data() : nullptr, has_l ? labels.data() : nullptr, st.data(),
                          (u32)n, (u32)p.w, (u32)p.off, 1.f / T, has_t, has_l, ignore, T, form);
        });
        stats.push_back(to_d(st));
        for (size_t i = 0; i < n * 2; ++i) gm[i] = std::max(gm[i], stats.back()[i]);
    }
    vector<double> global(n * SH_STATS, 0.0);
    for (size_t i = 0; i < n * 2; ++i) global[i] = gm[i];
    for (auto& st : stats) {
        sharded_rescale(T, st, gm, n);
        for (size_t i = n * 2; i < n * SH_STATS; ++i) global[i] += st[i];
    }
    vector<float> g32(global.begin(), global.end());
    // the JSD round
    vector<float> jsd(n * 2, 0.f);
    if (kind == 2) {
        for (auto& p : parts) {
            vector<float> part(n * 2, FNAN);
            emu_launch(grid, T256, [&] {
                sharded_jsd_terms(p.s.data(), p.t.data(), nullptr, g32.data(), part.data(), (u32)n, (u32)p.w,
                                  1.f / T, T, beta, 0u, ignore, form);
            });
            for (size_t i = 0; i < n * 2; ++i) jsd[i] += part[i];
        }
    }
    // phase 2, reassembled
    vector<float> rows(n, 0.f), gs(n * c, FNAN), gt(n * c, FNAN);
    double loss = 0;
    for (auto& p : parts) {
        vector<float> rl(n, FNAN), g(n * p.w, FNAN), h(n * p.w, FNAN);
        emu_launch(grid, T256, [&] {
            sharded_loss_and_grad(p.s.data(), has_t ? p.t.data() : nullptr, has_l ? labels.data() : nullptr,
                                  g32.data(), kind == 2 ? jsd.data() : nullptr, rl.data(), g.data(),
                                  has_t ? h.data() : nullptr, (u32)n, (u32)p.w, (u32)c, (u32)p.off, 1.f / T, T,
                                  (float)w_ce, (float)w_div, div, beta, eps, (float)factor, has_t, has_l, ignore,
                                  form);
        });
        double sum = 0;
        for (size_t r = 0; r < n; ++r) {
            rows[r] += rl[r];
            sum += rl[r];
            for (size_t j = 0; j < p.w; ++j) {
                gs[r * c + p.off + j] = g[r * p.w + j];
                gt[r * c + p.off + j] = h[r * p.w + j];
            }
        }
        loss += sum * factor;
    }
    const vector<double> sd = to_d(s), td = to_d(t);
    RowRef want = kind <= 2   ? ref_div(kind, teach, T, beta, red, 1.0, ignore, sd, td, nullptr, n, c)
                  : kind == 3 ? ref_ce(eps, red, 1.0, ignore, sd, labels, n, c)
                  : kind == 5 ? ref_dkd(T, w_ce, beta, w_div, eps, red, 1.0, ignore, sd, td, labels, n, c)
                              : ref_hinton(T, alpha, eps, red, 1.0, ignore, sd, td, labels, n, c);
    if (kind == 4 && teach != 0) {
        const RowRef ce = ref_ce(eps, red, 1.0, ignore, sd, labels, n, c);
        const RowRef kl = ref_div(0, teach, T, 0, red, 1.0, ignore, sd, td, &labels, n, c);
        want.loss = alpha * ce.loss + (1 - alpha) * kl.loss;
        for (size_t r = 0; r < n; ++r) want.rows[r] = alpha * ce.rows[r] + (1 - alpha) * kl.rows[r];
        for (size_t i = 0; i < n * c; ++i) want.gs[i] = alpha * ce.gs[i] + (1 - alpha) * kl.gs[i];
    }
    // floors: the f32 rounding of the stats' magnitudes (tests/suite/sharded.rs)
    double big = 0;
    for (double v : want.rows) big = std::max(big, fabs(v));
    const double kk = red == 0 ? 1.0 / std::max<size_t>(valid, 1) : 1.0;
    // a given teacher meets the student's normaliser absolutely: ~1e-7 T^2 (1 + log C) a row
    const double lc = teach != 0 ? 1 + log((double)c) : 0;
    const double row_floor = 1e-6 * (1 + scale * (1 + T) + big + (double)T * T * lc);
    const double grad_floor = 1e-6 * kk * (1 + scale * (1 + T) + big / T + big + T * lc);
    vector<double> nrows(n, row_floor), ngrad(n * c, grad_floor);
    char what[200];
    snprintf(what, sizeof what, "sharded kind=%d teach=%d n=%zu c=%zu shards=%d T=%g scale=%g red=%d", kind, teach,
             n, c, k, T, scale, red);
    check1(std::string(what) + " loss", (float)loss, want.loss, 1e-4, row_floor * n);
    check(std::string(what) + " rows", rows, want.rows, 1e-4, &nrows);
    check(std::string(what) + " grad_s", gs, want.gs, 1e-4, &ngrad);
    if (kind != 3 && kind != 5 && teach == 0) check(std::string(what) + " grad_t", gt, want.gt, 1e-4, &ngrad);
}

static void sharded_cases(int cases) {
    const int shard_counts[4] = {1, 2, 3, 7};
    const double scales[3] = {0.1, 3.0, 20.0};
    for (int i = 0; i < cases; ++i) {
        const size_t c = (size_t)(irand(0, 3) == 0 ? irand(1, 9) : irand(10, 700));
        const size_t n = (size_t)irand(1, 5);
        const float T = (float)exp(uni(log(0.1), log(30.0)));
        test_sharded(n, c, shard_counts[irand(0, 3)], irand(0, 4), T, (float)uni(0.1, 0.9), (float)uni(0, 1),
                     irand(0, 1) ? 0.f : (float)uni(0, 0.3), irand(0, 2), scales[irand(0, 2)], irand(0, 1));
    }
    // DKD (at least 2 classes; the first shard of width 1 often holds the label alone)
    for (int i = 0; i < cases; ++i) {
        const size_t c = (size_t)(irand(0, 3) == 0 ? irand(2, 9) : irand(10, 700));
        const size_t n = (size_t)irand(1, 5);
        const float T = (float)exp(uni(log(0.1), log(30.0)));
        test_sharded(n, c, shard_counts[irand(0, 3)], 5, T, 1.f, 0.f, irand(0, 1) ? 0.f : (float)uni(0, 0.3),
                     irand(0, 2), scales[irand(0, 2)], irand(0, 1));
    }
    // the teacher as probabilities and log-probabilities (every teacher loss, 2, 3 and 7 shards)
    const int kinds[4] = {0, 1, 2, 4};
    for (int i = 0; i < cases; ++i) {
        const size_t c = (size_t)(irand(0, 3) == 0 ? irand(2, 9) : irand(10, 700));
        const size_t n = (size_t)irand(1, 5);
        const float T = (float)exp(uni(log(0.1), log(30.0)));
        test_sharded(n, c, shard_counts[irand(1, 3)], kinds[irand(0, 3)], T, (float)uni(0.1, 0.9),
                     (float)uni(0, 1), irand(0, 1) ? 0.f : (float)uni(0, 0.3), irand(0, 2), scales[irand(0, 2)],
                     irand(0, 1), 1 + irand(0, 1));
    }
}
