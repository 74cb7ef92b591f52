// sparse.wgsl: a sparse top-k teacher's loss alpha CE + (1 - alpha) T^2 D(Q || P) and the dense
// student gradient (docs/LOSSES.md section 10; CPU reference src/ops/sparse/reference.rs).
//
// One workgroup per row (the host dispatches with TPR = WG). Entry i of the row's k teacher entries
// (k <= 1024) belongs to lane i % WG, which keeps its index, value and gathered student logit in
// registers (at most 4 per lane) from the start: an in-place gradient overwrites the student.
//   teacher: the indices sorted in workgroup memory (bitonic), so that an index out of 0..C or a
//            duplicate makes the row NaN (never an out-of-bounds access), and membership of a
//            class j in the support S is a binary search; max v, sum e^((v - max) / T) and, for a
//            tail, m = -expm1(max v) - sum_{i != argmax} e^(v_i) in float-float (exp_df): the tail
//            mass 1 - sum e^v cancels where the top-k holds almost all the mass, and its log
//            decides reverse KL and JSD. (m below f32's normal range is 0 here.)
//   pass 1:  one read of s: the online max and sum of e^((s - max) / T), at T = 1 and sum s for
//            the hard-label term, and the off-support classes' own max and sum (their mass, the
//            bucket's P, is never 1 - sum_S p, which cancels where the student agrees).
//   pass 2:  (reverse KL or JSD with off-support classes of their own) sum G over them: Abar.
//   pass 3:  the off-support classes' divergence terms and every off-support gradient; then each
//            lane writes its support entries' gradients (classes pass 3 skipped).
// Events e (section 10): each support class; each other class with Q = m / (C - k) (uniform) or
// 0 (renormalize); or one tail event Q = m, P = sum_{j not in S} p_j (bucket). With G_e = P_e dD/dP_e
// and Abar = sum_e G_e, dD/ds_j = ((p_j / P_e(j)) G_e(j) - p_j Abar) / T.
// Masked rows: loss 0, gradient 0; a NaN / infinite logit, a bad teacher value (NaN, +inf, all
// -inf log-probabilities, a non-finite logit), a bad index or an invalid label: NaN loss and
// gradient. (Log-probabilities summing above 1 are taken as m = 0, as the reference does.)

struct Params {
    rows: u32,
    cols: u32,
    k: u32,
    k2: u32,        // k rounded up to a power of two (the sort's width)
    inv_t: f32,
    temperature: f32,
    divergence: u32, // 0 forward KL, 1 reverse KL, 2 JSD
    beta: f32,
    tail: u32,      // 0 none (renormalize, logits, or k = C), 1 bucket, 2 uniform
    logits: u32,    // the values: 0 log-probabilities, 1 logits
    alpha: f32,
    eps: f32,
    grad_scale: f32,
    ignore_index: i32,
    reduction: u32,
    grad_mode: u32,
    has_labels: u32,
    dtype_s: u32,
    dtype_t: u32,
    one: f32,       // 1.0, opaque to the compiler: keeps the float-float error terms (below)
}

@group(0) @binding(0) var<uniform> p: Params;
// [N, k] teacher classes (the values are row_io's `teacher`, [N, k]).
@group(0) @binding(8) var<storage, read> top_idx: array<i32>;

const PER_LANE: u32 = 4u; // 1024 / WG
const NO_INDEX: u32 = 0xffffffffu;

var<workgroup> sh_idx: array<u32, 1024>;
var<workgroup> sh_v4: array<vec4<f32>, 256>;

// ---- float-float arithmetic (hi, lo): sums by two-sum, products split by masking the low 12
// significand bits (no multiply-add that a compiler could contract changes a result). The sum
// is multiplied by p.one (exact): a compiler that rewrites (a + b) - a as b (Mesa's inexact
// algebraic rules do) would otherwise drop every error term. ----

fn two_sum(a: f32, b: f32) -> vec2<f32> {
    let s = (a + b) * p.one;
    let bp = s - a;
    return vec2<f32>(s, (a - (s - bp)) + (b - bp));
}

fn df_add(x: vec2<f32>, y: vec2<f32>) -> vec2<f32> {
    let s = two_sum(x.x, y.x);
    return two_sum(s.x, s.y + (x.y + y.y));
}

fn two_prod(a: f32, b: f32) -> vec2<f32> {
    let pr = (a * b) * p.one;
    let ah = bitcast<f32>(bitcast<u32>(a) & 0xfffff000u);
    let bh = bitcast<f32>(bitcast<u32>(b) & 0xfffff000u);
    let al = a - ah;
    let bl = b - bh;
    return vec2<f32>(pr, (((ah * bh - pr) + ah * bl) + al * bh) + al * bl);
}

fn df_mul(x: vec2<f32>, y: vec2<f32>) -> vec2<f32> {
    let pr = two_prod(x.x, y.x);
    return two_sum(pr.x, pr.y + (x.x * y.y + x.y * y.x));
}

// e^v for v <= 0 as float-float (relative error ~1e-11 for v >= -20; plain exp below, where the
// term is under 2e-9): e^v = (e^x)^(2^s), x = v / 2^s in [-1/128, 0], e^x by Taylor.
fn exp_df(v: f32) -> vec2<f32> {
    if (v < -20.0) {
        return vec2<f32>(exp(v), 0.0);
    }
    var x = v;
    var s = 0u;
    while (x < -0.0078125) {
        x = x * 0.5;
        s = s + 1u;
    }
    let x2 = two_prod(x, x);
    let r = x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0 + x / 5040.0))));
    var e = df_add(vec2<f32>(x, 0.0), vec2<f32>(0.5 * x2.x, 0.5 * x2.y + x2.x * r));
    e = df_add(vec2<f32>(1.0, 0.0), e);
    for (var i = 0u; i < s; i = i + 1u) {
        e = df_mul(e, e);
    }
    return e;
}

// ---- workgroup reductions (fixed order; every invocation must call them) ----

// mode 0: sum of all four; 1: (x, y) float-float sum, z sum, w max; 2: max of all four.
fn reduce4(lid: u32, v: vec4<f32>, mode: u32) -> vec4<f32> {
    sh_v4[lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            let a = sh_v4[lid];
            let b = sh_v4[lid + stride];
            var r = a + b;
            if (mode == 1u) {
                let d = df_add(a.xy, b.xy);
                r = vec4<f32>(d.x, d.y, a.z + b.z, max(a.w, b.w));
            } else if (mode == 2u) {
                r = max(a, b);
            }
            sh_v4[lid] = r;
        }
        workgroupBarrier();
    }
    let r = sh_v4[0];
    workgroupBarrier();
    return r;
}

// Online softmax statistics of the row: all classes (ms, z at T; z1 at 1; sum s) and the
// off-support classes (mo, zo at T), bad = 1 after a non-finite logit.
struct Stats {
    ms: f32,
    z: f32,
    z1: f32,
    sum_s: f32,
    mo: f32,
    zo: f32,
    bad: f32,
}

var<workgroup> sh_st: array<Stats, 256>;

fn st_push(a: Stats, s: f32, off: bool) -> Stats {
    var r = a;
    if (!is_finite_f32(s)) {
        r.bad = 1.0;
        return r;
    }
    let ms = max(a.ms, s);
    r.z = a.z * exp((a.ms - ms) * p.inv_t) + exp((s - ms) * p.inv_t);
    r.z1 = a.z1 * exp(a.ms - ms) + exp(s - ms);
    r.ms = ms;
    r.sum_s = a.sum_s + s;
    if (off) {
        let mo = max(a.mo, s);
        r.zo = a.zo * exp((a.mo - mo) * p.inv_t) + exp((s - mo) * p.inv_t);
        r.mo = mo;
    }
    return r;
}

fn st_combine(a: Stats, b: Stats) -> Stats {
    var r: Stats;
    r.ms = max(a.ms, b.ms);
    r.z = a.z * exp((a.ms - r.ms) * p.inv_t) + b.z * exp((b.ms - r.ms) * p.inv_t);
    r.z1 = a.z1 * exp(a.ms - r.ms) + b.z1 * exp(b.ms - r.ms);
    r.sum_s = a.sum_s + b.sum_s;
    r.mo = max(a.mo, b.mo);
    r.zo = a.zo * exp((a.mo - r.mo) * p.inv_t) + b.zo * exp((b.mo - r.mo) * p.inv_t);
    r.bad = max(a.bad, b.bad);
    return r;
}

fn reduce_stats_row(lid: u32, st: Stats) -> Stats {
    sh_st[lid] = st;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            sh_st[lid] = st_combine(sh_st[lid], sh_st[lid + stride]);
        }
        workgroupBarrier();
    }
    let r = sh_st[0];
    workgroupBarrier();
    return r;
}

// Whether class j is one of the row's (sorted) indices.
fn in_support(j: u32) -> bool {
    var pos = 0u;
    for (var step = p.k2 / 2u; step > 0u; step = step / 2u) {
        if (sh_idx[pos + step - 1u] < j) {
            pos = pos + step;
        }
    }
    return sh_idx[pos] == j;
}

// log(e^a + e^b) for finite a, b.
fn lse2(a: f32, b: f32) -> f32 {
    return max(a, b) + log1p_f32(exp(-abs(a - b)));
}

// One event's (f, G) (reference.rs' event_terms): f its divergence term (sum_e f = D), G = P dD/dP,
// from Q = q (log lq, used only when q > 0) and P = pv (log lp, finite).
fn event(q: f32, lq: f32, pv: f32, lp: f32) -> vec2<f32> {
    let b = p.beta;
    if (p.divergence == 0u) {
        return vec2<f32>(kl_term(q, pv, lp - lq), -q);
    }
    if (p.divergence == 1u) {
        if (lq <= NEG_BIG) {
            let e = select(0.0, inf_f32(), pv > 0.0); // Q = 0: +inf, as the reference
            return vec2<f32>(e, e);
        }
        let u = lp - lq;
        return vec2<f32>(kl_term(pv, q, -u), pv * (u + 1.0));
    }
    // JSD(beta), M = beta Q + (1 - beta) P.
    let m = b * q + (1.0 - b) * pv;
    if (q == 0.0) {
        let l1b = log(1.0 - b);
        return vec2<f32>(b * m + (1.0 - b) * pv * phi_f32(l1b), -(1.0 - b) * l1b * pv);
    }
    let u = lp - lq;
    // log M - log Q and log M - log P, first order in expm1(u) where P ~ Q.
    var d_mq = lse2(log(b), log(1.0 - b) + u);
    var d_mp = lse2(log(b) - u, log(1.0 - b));
    if (abs(u) < 0.5) {
        d_mq = log1p_f32((1.0 - b) * expm1_f32(u));
        d_mp = log1p_f32(b * expm1_f32(-u));
    }
    let f = b * kl_term(q, m, d_mq) + (1.0 - b) * kl_term(pv, m, d_mp);
    return vec2<f32>(f, -(1.0 - b) * d_mp * pv);
}

@compute @workgroup_size(256)
fn sparse_kd(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = group_index(wid, nwg);
    if (row >= p.rows) {
        return; // uniform: the whole workgroup
    }
    let c = p.cols;
    let k = p.k;
    let base = row * c;
    let lstate = label_state(p.has_labels != 0u, row, c, p.ignore_index);
    let live = lstate != 1u;
    let with_ce = p.alpha > 0.0 && p.has_labels != 0u && lstate == 0u;
    var y = 0u;
    var sy = 0.0;
    if (with_ce) {
        y = u32(labels[row]);
        sy = load_s(base + y); // before any write (in-place gradient)
    }

    // The entries: index, value, gathered logit; the sort keys (out of range: NO_INDEX - 1, which
    // no class reaches, flagged bad).
    var e_j: array<u32, 4>;
    var e_v: array<f32, 4>;
    var e_s: array<f32, 4>;
    var tbad = 0.0;
    var vmax = NEG_BIG;
    var any_finite = 0.0;
    for (var t = 0u; t < PER_LANE; t = t + 1u) {
        let i = lid + t * WG;
        var key = NO_INDEX;
        e_j[t] = NO_INDEX;
        e_v[t] = 0.0;
        e_s[t] = 0.0;
        if (i < k) {
            let ix = top_idx[row * k + i];
            let v = load_t(row * k + i);
            key = NO_INDEX - 1u;
            if (ix >= 0 && u32(ix) < c) {
                key = u32(ix);
                e_j[t] = key;
                if (live) {
                    e_s[t] = load_s(base + key);
                }
            } else {
                tbad = 1.0;
            }
            // Logits finite; log-probabilities not NaN nor +inf (-inf is a probability of 0).
            let neg_inf = bitcast<u32>(v) == 0xff800000u;
            if (!is_finite_f32(v) && !(p.logits == 0u && neg_inf)) {
                tbad = 1.0;
            }
            // Reverse KL is +inf at a class of the support the teacher rules out.
            if (neg_inf && p.divergence == 1u) {
                tbad = 1.0;
            }
            e_v[t] = select(v, NEG_BIG, neg_inf);
            if (!neg_inf) {
                any_finite = 1.0;
                vmax = max(vmax, v);
            }
        }
        if (i < p.k2) {
            sh_idx[i] = key;
        }
    }
    // Bitonic sort of the keys (ascending) over k2 slots.
    workgroupBarrier();
    for (var size = 2u; size <= p.k2; size = size * 2u) {
        for (var stride = size / 2u; stride > 0u; stride = stride / 2u) {
            for (var i = lid; i < p.k2; i = i + WG) {
                let o = i ^ stride;
                if (o > i) {
                    let a = sh_idx[i];
                    let b = sh_idx[o];
                    if ((a > b) == ((i & size) == 0u)) {
                        sh_idx[i] = b;
                        sh_idx[o] = a;
                    }
                }
            }
            workgroupBarrier();
        }
    }
    for (var i = lid; i + 1u < k; i = i + WG) {
        if (sh_idx[i] == sh_idx[i + 1u]) {
            tbad = 1.0; // a duplicate (or two out-of-range indices, already bad)
        }
    }
    let r1 = reduce4(lid, vec4<f32>(vmax, tbad, any_finite, 0.0), 2u);
    let mx = r1.x;
    var bad = r1.y > 0.0 || r1.z == 0.0 || lstate == 2u;

    // The entry holding the max (the first of equal ones).
    var first = -1e9;
    for (var t = 0u; t < PER_LANE; t = t + 1u) {
        let i = lid + t * WG;
        if (i < k && e_v[t] == mx) {
            first = max(first, -f32(i));
        }
    }
    let imax = u32(-reduce4(lid, vec4<f32>(first, 0.0, 0.0, 0.0), 2u).x);

    // The teacher on its support: lq_i = (v_i - mx) / T - lse_T + log(1 - m). The tail mass as
    // m = -expm1(mx) - sum_{i != imax} e^(v_i), both parts in float-float (a top-k holding all
    // but 1e-15 has m = 1e-8 - (1e-8 - 1e-15): each part needs its own digits).
    var acc = vec4<f32>(0.0);
    var acc1 = 0.0;
    for (var t = 0u; t < PER_LANE; t = t + 1u) {
        let i = lid + t * WG;
        if (i < k && e_v[t] > NEG_BIG) {
            acc.z = acc.z + exp((e_v[t] - mx) * p.inv_t);
            acc1 = acc1 + exp(e_v[t] - mx);
            if (p.tail != 0u && i != imax) {
                let d = df_add(acc.xy, exp_df(min(e_v[t], 0.0)));
                acc.x = d.x;
                acc.y = d.y;
            }
        }
    }
    let r2 = reduce4(lid, acc, 1u);
    let s1 = reduce4(lid, vec4<f32>(acc1, 0.0, 0.0, 0.0), 0u).x;
    let lse_t = log(r2.z);
    let x = min(mx, 0.0);
    var em = df_add(vec2<f32>(1.0, 0.0), -exp_df(x)); // -expm1(mx)
    if (x > -0.0078125) {
        em = df_add(vec2<f32>(-x, 0.0), vec2<f32>(-(x * x) * (0.5 + x * (1.0 / 6.0 + x / 24.0)), 0.0));
    }
    let md = df_add(em, -r2.xy);
    // The tail mass (0 without a tail; S1 > 1 is rounding).
    let m = select(0.0, max(md.x + md.y, 0.0), p.tail != 0u);
    var l1m = 0.0;
    if (m >= 0.25) {
        l1m = mx + log(s1); // log sum e^v, however small
    } else if (m > 0.0) {
        l1m = log1p_f32(-m);
    }

    // Pass 1: the student's statistics.
    var st = Stats(NEG_BIG, 0.0, 0.0, 0.0, NEG_BIG, 0.0, 0.0);
    if (live) {
        for (var j = lid; j < c; j = j + WG) {
            st = st_push(st, load_s(base + j), p.tail == 1u && !in_support(j));
        }
    }
    let rs = reduce_stats_row(lid, st);
    bad = bad || rs.bad > 0.0;
    let lnz = log(rs.z);
    let lnz1 = log(rs.z1);
    let off = c - k;
    let cf = f32(c);

    // The support's events, and the tail event (bucket) or the fill (uniform).
    // sup_h: p - q for forward KL (without its cancellation), else G; sup_p: p.
    var sup_h = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    var sup_p = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    acc = vec4<f32>(0.0);
    for (var t = 0u; t < PER_LANE; t = t + 1u) {
        let i = lid + t * WG;
        if (i < k && live && !bad) {
            let lp = (e_s[t] - rs.ms) * p.inv_t - lnz;
            var lq = NEG_BIG;
            var q = 0.0;
            if (e_v[t] > NEG_BIG) {
                lq = (e_v[t] - mx) * p.inv_t - lse_t + l1m;
                q = exp(lq);
            }
            let pv = exp(lp);
            let fg = event(q, lq, pv, lp);
            sup_p[t] = pv;
            sup_h[t] = select(fg.y, gap_pq(q, pv, lp - lq), p.divergence == 0u);
            acc.x = acc.x + fg.x;
            acc.y = acc.y + fg.y;
        }
    }
    let r3 = reduce4(lid, acc, 0u);
    var d_sum = r3.x;
    var g_sum = r3.y;
    // The bucket: log P_tail and G_tail.
    var lp_tail = 0.0;
    var g_tail = 0.0;
    if (p.tail == 1u) {
        lp_tail = (rs.mo - rs.ms) * p.inv_t + log(rs.zo) - lnz;
        var lm = NEG_BIG;
        if (m > 0.0) {
            lm = log(m);
        }
        let fg = event(m, lm, exp(lp_tail), lp_tail);
        d_sum = d_sum + fg.x;
        g_sum = g_sum + fg.y;
        g_tail = fg.y;
    }
    // The off-support classes of their own: Q = u (log lu).
    var u = 0.0;
    var lu = NEG_BIG;
    if (p.tail == 2u && m > 0.0) {
        u = m / f32(off);
        lu = log(m) - log(f32(off));
    }
    let own_off = p.tail != 1u && off > 0u;
    // Pass 2: their sum of G (forward KL's Abar is -1: sum Q = 1).
    acc = vec4<f32>(0.0);
    if (own_off && p.divergence != 0u && live && !bad) {
        for (var j = lid; j < c; j = j + WG) {
            if (!in_support(j)) {
                let lp = (load_s(base + j) - rs.ms) * p.inv_t - lnz;
                acc.x = acc.x + event(u, lu, exp(lp), lp).y;
            }
        }
    }
    g_sum = g_sum + reduce4(lid, acc, 0u).x;
    let abar = select(g_sum, -1.0, p.divergence == 0u);

    // Pass 3: the off-support terms and gradients.
    let ks = gradient_scale(p.grad_scale, p.reduction);
    let kd = ks * (1.0 - p.alpha) * p.temperature;
    let kc = ks * p.alpha;
    let want_g = p.grad_mode != GRAD_NONE;
    acc = vec4<f32>(0.0);
    for (var j = lid; j < c; j = j + WG) {
        let i = base + j;
        if (!live || bad) {
            if (want_g) {
                write_grad_student(p.grad_mode, i, select(0.0, nan_f32(), live));
            }
            continue;
        }
        if (in_support(j)) {
            continue;
        }
        let sv = load_s(i);
        let lp = (sv - rs.ms) * p.inv_t - lnz;
        let pv = exp(lp);
        var h = 0.0; // G_e(j) p_j / P_e(j) - p_j Abar
        if (p.tail == 1u) {
            h = exp((sv - rs.mo) * p.inv_t - log(rs.zo)) * g_tail - pv * abar;
        } else {
            let fg = event(u, lu, pv, lp);
            acc.x = acc.x + fg.x;
            h = select(fg.y - pv * abar, pv - u, p.divergence == 0u);
        }
        if (want_g) {
            var g = kd * h;
            if (with_ce) {
                let p1 = exp(sv - rs.ms - lnz1);
                g = g + kc * (p1 - p.eps / cf - select(0.0, 1.0 - p.eps, j == y));
            }
            write_grad_student(p.grad_mode, i, g);
        }
    }
    d_sum = d_sum + reduce4(lid, acc, 0u).x;
    // The support's gradients (their classes were skipped above; bad rows were written NaN),
    // after every lane's reads of the student (pass 1 read the support's classes too).
    storageBarrier();
    if (want_g && live && !bad) {
        for (var t = 0u; t < PER_LANE; t = t + 1u) {
            let i = lid + t * WG;
            if (i < k) {
                let j = e_j[t];
                var h = sup_h[t];
                if (p.divergence != 0u) {
                    h = h - sup_p[t] * abar;
                }
                var g = kd * h;
                if (with_ce) {
                    let p1 = exp(e_s[t] - rs.ms - lnz1);
                    g = g + kc * (p1 - p.eps / cf - select(0.0, 1.0 - p.eps, j == y));
                }
                write_grad_student(p.grad_mode, base + j, g);
            }
        }
    }
    if (lid == 0u) {
        var loss = 0.0;
        if (live && bad) {
            loss = nan_f32();
        } else if (live) {
            loss = (1.0 - p.alpha) * p.temperature * p.temperature * d_sum;
            if (with_ce) {
                let lse1 = rs.ms + lnz1;
                loss = loss + p.alpha * ((1.0 - p.eps) * (lse1 - sy) + p.eps * (lse1 - rs.sum_s / cf));
            }
        }
        row_loss[row] = loss;
    }
}
