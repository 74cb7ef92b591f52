// Sparse top-k teachers (src/ops/sparse/sparse.cu; docs/LOSSES.md section 10) in the emulator:
// included by emu.cpp after its helpers (check, RowRef, rand_logits, count_valid / reduce_rows,
// log_softmax_row). ref_sparse is a port of the f64 reference (src/ops/sparse/reference.rs and
// teacher_row / event_terms / kl_term of src/ops/sparse/mod.rs). The cases (sparse_cases): every
// tail (renormalize, bucket, uniform), divergence (forward KL, reverse KL, JSD at mid and extreme
// beta) and values kind (log-probabilities of a full teacher row at its top-k or at random classes,
// with -inf entries; logits); alpha > 0 with labels and label smoothing; masked rows, NaN / inf
// inputs; every reduction, grad_scale, in place, no gradient; f32, bf16 and f16 students, values
// and gradients; logits up to |1e4| and confident rows; T from 1e-3 and 0.05 to 1e4 (both ends
// often); k from 1 to C (k = C and k = 1 often), C from 1 to 5000 (not multiples of the block).
// Outputs are poisoned (NaN) so that a missed write fails. A tenth of the cases also launch with
// indices out of range and repeated: those rows must come out NaN (as on wgpu), and nothing is read
// or written out of bounds (which the ASan build checks).

static double sp_kl_term_ref(double lq, double lp) {
    if (lq == -INFINITY) return exp(lp);
    const double u = lp - lq, q = exp(lq);
    return fabs(u) < 1.0 ? q * (expm1(u) - u) : (exp(lp) - q) - q * u;
}

// event_terms: (f, G).
static void sp_event_ref(int div, double b, double lq, double lp, double& f, double& g) {
    if (div == 0) {
        f = sp_kl_term_ref(lq, lp);
        g = -exp(lq);
    } else if (div == 1) {
        const double a = lp - lq + 1.0;
        f = sp_kl_term_ref(lp, lq);
        g = exp(lp) * a;
    } else {
        const double lm = log_add_exp(log(b) + lq, log(1.0 - b) + lp);
        const double a = (1.0 - b) * (lp - lm);
        f = b * sp_kl_term_ref(lq, lm) + (1.0 - b) * sp_kl_term_ref(lp, lm);
        g = exp(lp) * a;
    }
}

struct SparseCase {
    size_t n, c, k;
    int div;      // 0 forward KL, 1 reverse KL, 2 JSD
    double beta;  // JSD
    int logits;   // values: 0 log-probabilities, 1 logits
    int tail;     // 0 renormalize, 1 bucket, 2 uniform
    float T, alpha, eps;
    int red;
    float gsc;
    bool has_labels;
};

// The f64 reference (indices checked: distinct, in 0..C).
static RowRef ref_sparse(const SparseCase& sc, const vector<double>& s, const vector<int>& idx,
                         const vector<double>& vals, const vector<int>& labels, int ignore) {
    const size_t n = sc.n, c = sc.c, k = sc.k;
    const double t = sc.T, alpha = sc.alpha;
    const bool has_tail = sc.tail != 0 && k < c;
    size_t valid = 0;
    for (size_t r = 0; r < n; ++r) valid += !(sc.has_labels && labels[r] == ignore);
    const double scale = red_factor(sc.red, valid), kk = sc.gsc * scale;
    RowRef o;
    o.rows.assign(n, 0);
    o.gs.assign(n * c, 0);
    o.nrows.assign(n, 0);
    o.ngs.assign(n * c, 0);
    vector<long> member(c, -1);
    for (size_t r = 0; r < n; ++r) {
        if (sc.has_labels && labels[r] == ignore) continue;
        const double* sr = &s[r * c];
        const double* v = &vals[r * k];
        // teacher_row
        bool ok = true;
        if (sc.logits) {
            for (size_t i = 0; i < k; ++i) ok = ok && std::isfinite(v[i]);
        } else {
            bool any = false;
            for (size_t i = 0; i < k; ++i) {
                ok = ok && !std::isnan(v[i]) && v[i] != INFINITY;
                // reverse KL is +inf at a support class the teacher rules out: refused (NaN row)
                ok = ok && !(sc.div == 1 && v[i] == -INFINITY);
                any = any || std::isfinite(v[i]);
            }
            ok = ok && any;
        }
        if (!ok || !all_finite(sr, c)) {
            o.rows[r] = NaN;
            for (size_t j = 0; j < c; ++j) o.gs[r * c + j] = NaN;
            continue;
        }
        double mx = -INFINITY;
        for (size_t i = 0; i < k; ++i) mx = std::max(mx, v[i]);
        double z = 0;
        for (size_t i = 0; i < k; ++i) z += exp((v[i] - mx) / t);
        const double lse = log(z);
        double l1m = 0;
        if (has_tail) {
            double z1 = 0;
            for (size_t i = 0; i < k; ++i) z1 += exp(v[i] - mx);
            l1m = std::min(mx + log(z1), 0.0);
        }
        const double m = -expm1(l1m);
        vector<double> lq(k);
        for (size_t i = 0; i < k; ++i) lq[i] = (v[i] - mx) / t - lse + l1m;
        // the student
        const vector<double> lp = log_softmax_row(sr, c, t);
        for (size_t i = 0; i < k; ++i) member[idx[r * k + i]] = (long)i;
        const size_t off = c - k;
        const double lq_off = sc.tail == 2 && has_tail ? log(m / (double)off) : -INFINITY;
        const bool bucket = sc.tail == 1 && has_tail;
        double d = 0, g_sum = 0, lp_tail = 0, g_tail = 0, d_abs = 0, g_abs = 0;
        if (bucket) {
            lp_tail = -INFINITY;
            for (size_t j = 0; j < c; ++j)
                if (member[j] < 0) lp_tail = log_add_exp(lp_tail, lp[j]);
            double f;
            sp_event_ref(sc.div, sc.beta, log(m), lp_tail, f, g_tail);
            d += f;
            g_sum += g_tail;
            d_abs += fin_abs(f);
            g_abs += fin_abs(g_tail);
        }
        vector<double> own(c, NaN);
        vector<bool> has_own(c, false);
        for (size_t j = 0; j < c; ++j) {
            double lqj;
            if (member[j] < 0) {
                if (bucket) continue;
                lqj = lq_off;
            } else {
                lqj = lq[member[j]];
            }
            double f, g;
            sp_event_ref(sc.div, sc.beta, lqj, lp[j], f, g);
            d += f;
            g_sum += g;
            d_abs += fin_abs(f);
            g_abs += fin_abs(g);
            own[j] = g;
            has_own[j] = true;
        }
        const bool ce = sc.has_labels && alpha > 0;
        double ce_loss = 0;
        vector<double> ceg;
        if (ce) smoothed_ce_row(sr, c, labels[r], sc.eps, ce_loss, ceg);
        o.rows[r] = (1 - alpha) * t * t * d + (ce ? alpha * ce_loss : 0.0);
        // The reference's own rounding (check()'s floor): 4 ulps of the terms summed, and of each
        // gradient's two terms (a confident row's gradient is a difference of O(|G|) terms that
        // cancel to far below them).
        o.nrows[r] = REF_EPS * ((1 - alpha) * t * t * d_abs + (ce ? alpha * fin_abs(ce_loss) : 0.0) + fin_abs(o.rows[r]));
        for (size_t j = 0; j < c; ++j) {
            const double pj = exp(lp[j]);
            const double ow = has_own[j] ? own[j] : exp(lp[j] - lp_tail) * g_tail;
            const double dd = (ow - pj * g_sum) / t;
            o.gs[r * c + j] = kk * ((1 - alpha) * t * t * dd + (ce ? alpha * ceg[j] : 0.0));
            o.ngs[r * c + j] = REF_EPS * fabs(kk) *
                               ((1 - alpha) * t * (fin_abs(ow) + pj * g_abs) + (ce ? alpha * (pj + 1.0) : 0.0));
        }
        for (size_t i = 0; i < k; ++i) member[idx[r * k + i]] = -1;
    }
    double sum = 0;
    for (double x : o.rows) sum += x;
    o.loss = sum * scale;
    double nsum = 0;
    for (double x : o.nrows) nsum += x;
    o.nloss = nsum * scale + REF_EPS * fin_abs(o.loss);
    return o;
}

// The kernel's launch (ops::sparse::cuda::threads_for).
static unsigned sparse_threads(size_t c) { return c <= 4096 ? 128 : c <= 16384 ? 256 : c <= 65536 ? 512 : 1024; }

static double sparse_worst = 0;
static std::string sparse_worst_case;

// dt_s: the student's (and gradient's) dtype, dt_v the values'; 0 f32, 1 bf16, 2 f16.
static void test_sparse(const SparseCase& sc0, double scale, u32 dt_s, u32 dt_v, bool inplace, bool want_gs,
                        bool inject, bool top, bool garbage) {
    SparseCase sc = sc0;
    const int ignore = -100;
    const size_t n = sc.n, c = sc.c, k = sc.k;
    vector<float> s = rand_logits(n * c, scale);
    if (irand(0, 3) == 0)  // a confident row: one logit far above the rest
        s[irand(0, (int)(n - 1)) * c + irand(0, (int)c - 1)] += (float)(scale * uni(2, 20));
    vector<int> labels(n, 0);
    for (size_t r = 0; r < n; ++r) labels[r] = irand(0, (int)c - 1);
    if (sc.has_labels && n > 1) labels[irand(0, (int)n - 1)] = ignore;
    // The teacher: a full row's log-softmax at its top-k or at k random classes (or logits).
    const double tscale = std::pow(10.0, uni(-1, 2)), ttemp = exp(uni(log(0.05), log(20.0)));
    vector<int> idx(n * k);
    vector<float> vals(n * k);
    for (size_t r = 0; r < n; ++r) {
        vector<double> tl(c);
        for (auto& x : tl) x = uni(-tscale, tscale);
        vector<double> lt = log_softmax_row(tl.data(), c, ttemp);
        vector<int> order(c);
        for (size_t j = 0; j < c; ++j) order[j] = (int)j;
        if (top) {
            std::sort(order.begin(), order.end(), [&](int a, int b) { return lt[a] > lt[b]; });
        } else {
            std::shuffle(order.begin(), order.end(), rng);
        }
        vector<int> pick(order.begin(), order.begin() + k);
        std::shuffle(pick.begin(), pick.end(), rng);  // indices in any order
        for (size_t i = 0; i < k; ++i) {
            idx[r * k + i] = pick[i];
            vals[r * k + i] = (float)(sc.logits ? tl[pick[i]] * uni(0.5, 2) : lt[pick[i]]);
        }
        if (!sc.logits && k > 1 && irand(0, 5) == 0) vals[r * k + irand(0, (int)k - 1)] = -INFINITY;
    }
    if (inject && n > 1) {
        const size_t r = (size_t)irand(0, (int)n - 1);
        if (irand(0, 1))
            s[r * c + irand(0, (int)c - 1)] = irand(0, 1) ? FNAN : -INFINITY;
        else
            vals[r * k + irand(0, (int)k - 1)] = sc.logits ? INFINITY : FNAN;
    }
    // The inputs as the kernel sees them (rounded to their dtypes).
    vector<u16> sh = to_half(s, dt_s), vh = to_half(vals, dt_v);
    if (dt_s != 0) s = from_half(sh, dt_s);
    if (dt_v != 0) vals = from_half(vh, dt_v);
    // Reverse KL under a tail needs tail mass (the host rejects a row without).
    if (sc.div == 1 && sc.tail != 0 && k < c) {
        for (size_t r = 0; r < n; ++r) {
            double sum = 0;
            for (size_t i = 0; i < k; ++i) sum += exp((double)vals[r * k + i]);
            if (!(sum < 1.0)) sc.div = 0;
        }
    }
    vector<float> rows(n, FNAN), gs(n * c, FNAN);
    vector<u16> gsh(n * c, 0x7fff);
    float loss = FNAN;
    u32 count = 12345;
    emu_launch(ONE, T1024, [&] { count_valid(sc.has_labels ? labels.data() : nullptr, n, ignore, &count); });
    vector<float> S = s;  // in place: the gradient is written over the student
    vector<u16> SH = sh;
    const void* sp = dt_s == 0 ? (const void*)S.data() : (const void*)SH.data();
    void* gp = !want_gs ? nullptr : inplace ? (void*)sp : dt_s == 0 ? (void*)gs.data() : (void*)gsh.data();
    const void* vp = dt_v == 0 ? (const void*)vals.data() : (const void*)vh.data();
    const dim3 grid = grid_for(n), block{sparse_threads(c), 1, 1};
    emu_launch(grid, block, [&] {
        sparse_kd(sp, idx.data(), vp, sc.has_labels ? labels.data() : nullptr, &count, rows.data(), gp, (u32)n,
                  (u32)c, (u32)k, sc.T, sc.alpha, sc.eps, (float)sc.beta, sc.gsc, ignore, (u32)sc.div, (u32)sc.tail,
                  (u32)sc.logits, (u32)sc.red, dt_s, dt_v, dt_s);
    });
    emu_launch(ONE, T1024, [&] { reduce_rows(rows.data(), n, &count, sc.red, &loss); });
    if (inplace) {
        if (dt_s == 0)
            gs = S;
        else
            gsh = SH;
    }
    if (dt_s != 0) gs = from_half(gsh, dt_s);
    const RowRef want = ref_sparse(sc, to_d(s), idx, to_d(vals), labels, ignore);
    char name[300];
    snprintf(name, sizeof name,
             "sparse n=%zu c=%zu k=%zu div=%d beta=%g logits=%d tail=%d T=%g alpha=%g eps=%g red=%d scale=%g "
             "dt=%u/%u inplace=%d top=%d",
             n, c, k, sc.div, sc.beta, sc.logits, sc.tail, sc.T, sc.alpha, sc.eps, sc.red, scale, dt_s, dt_v, inplace,
             top);
    // f32: 1e-4 of the norm (the kernel is f64 inside); a half gradient: its rounding (2^-8 bf16, 2^-11 f16).
    const double gtol = dt_s == 1 ? 8e-3 : dt_s == 2 ? 1e-3 : 1e-4;
    double worst = std::max(check1(std::string(name) + " loss", loss, want.loss, 1e-4, want.nloss),
                            check(std::string(name) + " rows", rows, want.rows, 1e-4, &want.nrows));
    // A half gradient's floor also holds half an ulp of each element (f16's subnormals below 6e-5
    // have an absolute resolution of 6e-8).
    vector<double> ngs = want.ngs;
    if (dt_s != 0)
        for (size_t e = 0; e < ngs.size(); ++e)
            if (std::isfinite(want.gs[e])) ngs[e] += 0.5 * ulp_half(want.gs[e], dt_s);
    if (want_gs) worst = std::max(worst, check(std::string(name) + " gs", gs, want.gs, gtol, &ngs) * (1e-4 / gtol));
    if (worst > sparse_worst || sparse_worst_case.empty()) {
        sparse_worst = worst;
        sparse_worst_case = name;
    }
    if (garbage) {
        // Indices out of range and repeated: those rows NaN (as on wgpu), the others as a launch
        // with good indices; nothing read or written out of bounds (ASan).
        for (auto& j : idx) j = irand(0, 3) == 0 ? irand(-5, (int)c + 5) : j;
        if (k > 1) idx[1] = idx[0];
        vector<float> g2(n * c, FNAN), r2(n, FNAN);
        emu_launch(grid, block, [&] {
            sparse_kd(s.data(), idx.data(), vals.data(), nullptr, &count, r2.data(), g2.data(), (u32)n, (u32)c,
                      (u32)k, sc.T, 0.f, 0.f, (float)sc.beta, 1.f, ignore, (u32)sc.div, (u32)sc.tail, (u32)sc.logits,
                      0u, 0u, 0u, 0u);
        });
        for (size_t r = 0; r < n; ++r) {
            bool bad_idx = false;
            vector<bool> seen(c, false);
            for (size_t i = 0; i < k; ++i) {
                const int j = idx[r * k + i];
                if (j < 0 || (size_t)j >= c || seen[(size_t)j]) {
                    bad_idx = true;
                    break;
                }
                seen[(size_t)j] = true;
            }
            if (!bad_idx) continue;
            ++checks;
            bool all_nan = std::isnan(r2[r]);
            for (size_t j = 0; j < c; ++j) all_nan = all_nan && std::isnan(g2[r * c + j]);
            if (!all_nan) {
                printf("FAIL %s garbage: row %zu has a bad index but is not NaN (loss %g)\n", name, r, r2[r]);
                ++failures;
            }
        }
    }
}

static void sparse_cases(int count) {
    const size_t Cs[] = {1, 2, 7, 32, 33, 100, 129, 1000, 1024, 1025, 3000, 5000};
    const double scales[] = {1.0, 10.0, 1e4};
    for (int i = 0; i < count; ++i) {
        SparseCase sc;
        sc.c = Cs[irand(0, 11)];
        sc.n = (size_t)irand(1, 5);
        const size_t kmax = std::min<size_t>(sc.c, 1024);
        const int kr = irand(0, 4);
        sc.k = kr == 0 ? 1 : kr == 1 ? kmax : (size_t)irand(1, (int)kmax);
        sc.div = irand(0, 2);
        const int br = irand(0, 3);
        sc.beta = (float)(br == 0 ? 1e-6 : br == 1 ? 1.0 - 1e-6 : uni(0.05, 0.95));  // as the kernel reads it
        sc.logits = irand(0, 3) == 0;
        sc.tail = sc.logits ? 0 : irand(0, 2);
        if (sc.div == 1 && sc.tail == 0 && sc.k < sc.c) {
            // Reverse KL with the renormalize tail is +inf (rejected): a tail, or the whole row.
            if (sc.logits || sc.c > 1024)
                sc.div = 0;
            else
                sc.tail = irand(1, 2);
        }
        const int tr = irand(0, 7);
        sc.T = tr == 0 ? 1e-3f : tr == 1 ? 0.05f : tr == 2 ? 1e4f : tr == 3 ? 1.f
                                                                          : (float)exp(uni(log(0.05), log(1e4)));
        sc.has_labels = irand(0, 3) != 0;
        sc.alpha = sc.has_labels && irand(0, 1) ? (float)uni(0, 1) : 0.f;
        sc.eps = irand(0, 1) ? 0.f : (float)uni(0, 0.3);
        sc.red = irand(0, 2);
        sc.gsc = irand(0, 1) ? 1.f : 0.37f;
        const int dr = irand(0, 5);
        const u32 dt_s = dr == 0 ? 1u : dr == 1 ? 2u : 0u;
        const u32 dt_v = irand(0, 5) == 0 ? (u32)irand(1, 2) : 0u;
        // f16 holds logits to 65504: smaller scales there.
        double scale = scales[irand(0, 2)];
        if ((dt_s == 2 || dt_v == 2) && scale > 100) scale = 100;
        test_sparse(sc, scale, dt_s, dt_v, irand(0, 3) == 0, irand(0, 5) != 0, irand(0, 5) == 0, irand(0, 1),
                    irand(0, 9) == 0);
    }
    printf("sparse: worst %.3g (%s)\n", sparse_worst, sparse_worst_case.c_str());
}
