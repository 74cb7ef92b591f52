// divergence.wgsl: forward KL, reverse KL and JSD(beta) between softmax(s/T) and the teacher's
// soft targets, with the loss and the gradients in one dispatch (docs/LOSSES.md section 2; CPU
// reference src/ops/divergence/; CUDA divergence.cu).
//
// Per row (one segment of TPR lanes):
//   pass 1: online softmax statistics of s (and of t when the teacher is logits), one read of each;
//   pass 2: the divergence sum with the final statistics; the student gradient T(p - q) of forward
//           KL does not depend on the row's loss, so it is written here (2 passes in all);
//   pass 3: only when a gradient needs the row's divergence D_r (reverse KL, JSD, teacher gradient).
// Row loss = T^2 D_r (0 for masked rows, NaN when an input is not finite or the label invalid).
//
// Precision at high T (docs/ARCHITECTURE.md, numerics). There p ~ q and KL is second order in
// log p - log q, so summing q (log q - log p) in f32 would cancel to the rounding of its terms.
// Instead, with u = log p - log q, KL = sum q phi(u) where phi(u) = e^u - 1 - u >= 0 (because
// sum q e^u = sum p = 1): positive terms, no cancellation, and an error of the row's log ratio
// enters only to second order. Reverse KL likewise sums p phi(-u). A given teacher need not sum
// to 1 exactly; then KL = sum q phi(u) + (Q - 1) and RKL = sum p phi(-u) - (Q - 1), with
// Q = sum q summed with compensation (q phi(u) is p where q = 0). For teacher logits,
// log(Zs / Zt) comes from dz (common.wgsl), so u and the gradients p - q keep their digits too.

struct Params {
    rows: u32,
    cols: u32,
    inv_t: f32,
    temperature: f32,
    divergence: u32,   // 0 forward KL, 1 reverse KL, 2 JSD
    teacher_form: u32, // 0 logits, 1 probs, 2 log-probs
    beta: f32,
    grad_scale: f32,
    has_labels: u32,
    ignore_index: i32,
    reduction: u32,
    grad_mode: u32,    // GRAD_NONE / GRAD_INTO / GRAD_IN_PLACE
    want_grad_t: u32,
    teacher_eps: f32,  // reverse KL, given teacher: log q floored at log(eps); 0 = no floor
    dtype_s: u32,      // 0 f32, 1 bf16, 2 f16
    dtype_t: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Per element: ds = (s_j - ms)/T, so log p_j = ds - log Zs. For the teacher as logits,
// dt = (t_j - mt)/T and log q_j = dt - log Zt. The divergences need log q_j - log p_j, which at high
// T is a small difference of two numbers near -log C: it is formed as (dt - ds) + log(Zs / Zt), with
// the per-row ratio taken before the log, so no f32 rounding of log Zs or log Zt enters.
struct Elem {
    lp: f32,   // log p_j
    lq: f32,   // log q_j
    p: f32,
    q: f32,
    diff: f32, // log q_j - log p_j
}

fn element(s: f32, t: f32, st: RowStats, lzs: f32, lzt: f32, dlz: f32) -> Elem {
    var e: Elem;
    let ds = (s - st.ms) * p.inv_t;
    e.lp = ds - lzs;
    if (p.teacher_form == 0u) {
        let dt = (t - st.mt) * p.inv_t;
        e.lq = dt - lzt;
        e.diff = (dt - ds) + dlz;
    } else {
        e.lq = select(t, log(t), p.teacher_form == 1u);
        if (p.teacher_eps > 0.0) {
            e.lq = max(e.lq, log(p.teacher_eps));
        }
        e.diff = (e.lq - ds) + lzs;
    }
    e.p = exp(e.lp);
    e.q = select(exp(e.lq), t, p.teacher_form == 1u);
    if (p.teacher_form == 1u && p.teacher_eps > 0.0) {
        e.q = max(t, p.teacher_eps); // the floored teacher q~, consistent with log q~
    }
    return e;
}

// JSD's log q - log M = -log(beta + (1 - beta) p/q) = -log1p((1 - beta) expm1(-diff)) and
// log p - log M = -log(1 - beta + beta q/p) = -log1p(beta expm1(diff)), both from
// diff = log q - log p. The log1p / expm1 forms keep their precision where p and q are close and
// where beta or 1 - beta is tiny (beta = 1e-6: the sum 1 - beta + beta q/p would round away the
// part that matters). Past |diff| = 80, exp overflows f32 and the asymptotic forms are exact
// to f32 precision.
// q phi(u), u = log p - log q: forward KL's term (common.wgsl's kl_term).
fn fkl_term(e: Elem) -> f32 {
    return kl_term(e.q, e.p, -e.diff);
}

// p phi(-u): reverse KL's term, +inf where q = 0 exactly: p is a softmax of finite logits, so it
// is > 0 even where its f32 value underflows to 0 (the reference's log p is finite there).
fn rkl_term(e: Elem) -> f32 {
    let d = e.diff;
    if (d == -inf_f32()) {
        return inf_f32();
    }
    if (abs(d) < 0.5) {
        return e.p * phi_f32(d);
    }
    return (e.q - e.p) - e.p * d;
}

// p - q, from q expm1(u) where they are close (common.wgsl's gap_pq).
fn p_minus_q(e: Elem) -> f32 {
    return gap_pq(e.q, e.p, -e.diff);
}

// Compensated (two-sum) accumulation of (hi, lo) in the z, w lanes of an accumulator.
fn comp_add(acc: vec4<f32>, v: f32) -> vec4<f32> {
    var r = acc;
    let s = r.z + v;
    let bp = s - r.z;
    r.w = r.w + ((r.z - (s - bp)) + (v - bp));
    r.z = s;
    return r;
}

// Tree-reduces sh_sum within each segment: x and y plainly, (z, w) as a compensated pair.
fn reduce_sum_comp(lid: u32) -> vec4<f32> {
    let lane = lid % TPR;
    workgroupBarrier();
    for (var stride = TPR / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            let a = sh_sum[lid];
            let b = sh_sum[lid + stride];
            var r = comp_add(a, b.z);
            r.x = a.x + b.x;
            r.y = a.y + b.y;
            r.w = r.w + b.w;
            sh_sum[lid] = r;
        }
        workgroupBarrier();
    }
    let r = sh_sum[lid - lane];
    workgroupBarrier();
    return r;
}

// w phi(x) with x = log m - log w for a weight w and m = w e^x given directly (its limit m where
// w = 0): the terms of KL(w || m) = sum w phi(log m - log w) when both sum to 1.
fn phi_term(w: f32, x: f32, m: f32) -> f32 {
    if (w == 0.0) {
        return m;
    }
    if (abs(x) < 0.5) {
        return w * phi_f32(x);
    }
    return (m - w) - w * x;
}

fn jsd_q_minus_m(diff: f32, beta: f32) -> f32 {
    if (diff < -80.0) {
        return diff - log(1.0 - beta);
    }
    return -log1p_f32((1.0 - beta) * expm1_f32(-diff));
}

fn jsd_p_minus_m(diff: f32, beta: f32) -> f32 {
    if (diff > 80.0) {
        return -(log(beta) + diff);
    }
    return -log1p_f32(beta * expm1_f32(diff));
}

@compute @workgroup_size(256)
fn divergence(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let lane = lid % TPR;
    let row = group_index(wid, nwg) * (WG / TPR) + lid / TPR;
    let in_range = row < p.rows;
    let c = p.cols;
    let base = row * c;
    let logits = p.teacher_form == 0u;
    var lstate = 0u;
    if (in_range) {
        lstate = label_state(p.has_labels != 0u, row, c, p.ignore_index);
    }
    let live = in_range && lstate != 1u;

    // Pass 1: statistics.
    var st = stats_empty();
    if (live) {
        for (var j = lane; j < c; j = j + TPR) {
            let tv = load_t(base + j);
            st = stats_push(st, load_s(base + j), tv, logits, p.inv_t);
            if (!logits && !teacher_ok(p.teacher_form, tv)) {
                st.bad = 1.0;
            }
        }
    }
    sh_stats[lid] = st;
    let rs = reduce_stats(lid, p.inv_t);
    let lzs = log(rs.zs);
    let lzt = log(rs.zt);
    let dlz = log_ratio(rs);
    let bad = rs.bad > 0.0 || lstate == 2u;
    let k = gradient_scale(p.grad_scale, p.reduction) * p.temperature;
    let beta = p.beta;
    let want_gs = p.grad_mode != GRAD_NONE;
    // Forward KL's student gradient needs no D_r: write it in pass 2 unless pass 3 runs anyway.
    let early = p.divergence == 0u && p.want_grad_t == 0u;

    // Pass 2: the divergence sums (x: KL(q||.) or RKL, y: KL(p||M) for JSD, (z, w): Q = sum q,
    // compensated, for a given teacher).
    var acc = vec4<f32>(0.0);
    if (live && !bad) {
        for (var j = lane; j < c; j = j + TPR) {
            let i = base + j;
            let e = element(load_s(i), load_t(i), rs, lzs, lzt, dlz);
            if (p.divergence == 0u) {
                acc.x = acc.x + fkl_term(e);
                if (!logits) {
                    acc = comp_add(acc, e.q);
                }
                if (early && want_gs) {
                    write_grad_student(p.grad_mode, i, k * p_minus_q(e));
                }
            } else if (p.divergence == 1u) {
                acc.x = acc.x + rkl_term(e);
                if (!logits) {
                    // With a floor, e.q is the floored q~.
                    acc = comp_add(acc, e.q);
                }
            } else {
                // KL(q||M) = sum q phi(log M - log q), KL(p||M) = sum p phi(log M - log p).
                let m = beta * e.q + (1.0 - beta) * e.p;
                acc.x = acc.x + phi_term(e.q, -jsd_q_minus_m(e.diff, beta), m);
                acc.y = acc.y + phi_term(e.p, -jsd_p_minus_m(e.diff, beta), m);
                if (!logits) {
                    acc = comp_add(acc, e.q);
                }
            }
        }
    }
    sh_sum[lid] = acc;
    let tot = reduce_sum_comp(lid);
    // Q - 1 of a given teacher (hi - 1 is exact near 1).
    let q_minus_1 = (tot.z - 1.0) + tot.w;
    var d = tot.x;
    if (p.divergence == 0u && !logits) {
        d = tot.x + q_minus_1;
    } else if (p.divergence == 1u && !logits) {
        d = tot.x - q_minus_1;
    }
    // JSD's two parts; a given teacher's Q - 1 moves them in opposite directions and cancels in D.
    var kl_qm = tot.x;
    var kl_pm = tot.y;
    if (p.divergence == 2u) {
        if (!logits) {
            kl_qm = tot.x + (1.0 - beta) * q_minus_1;
            kl_pm = tot.y - beta * q_minus_1;
        }
        d = beta * tot.x + (1.0 - beta) * tot.y;
    }

    // Pass 3: gradients that need D_r (and every gradient of masked or bad rows).
    if (in_range) {
        let want_gt = p.want_grad_t != 0u;
        let need_pass3 = (want_gs && (!early || !live || bad)) || want_gt;
        if (need_pass3) {
            for (var j = lane; j < c; j = j + TPR) {
                let i = base + j;
                var gs = 0.0;
                var gt = 0.0;
                if (bad && live) {
                    gs = nan_f32();
                    gt = nan_f32();
                } else if (live) {
                    let e = element(load_s(i), load_t(i), rs, lzs, lzt, dlz);
                    if (p.divergence == 0u) {
                        gs = k * p_minus_q(e);
                        gt = select(k * e.q * (e.diff - d), 0.0, e.q == 0.0);
                    } else if (p.divergence == 1u) {
                        // An infinite divergence (a teacher probability of 0) has no gradient: NaN.
                        gs = select(k * e.p * (-e.diff - d), 0.0, e.p == 0.0);
                        if (d == inf_f32()) {
                            gs = nan_f32();
                        }
                        gt = -k * p_minus_q(e);
                    } else {
                        let pm = jsd_p_minus_m(e.diff, beta);
                        let qm = jsd_q_minus_m(e.diff, beta);
                        gs = select(k * (1.0 - beta) * e.p * (pm - kl_pm), 0.0, e.p == 0.0);
                        gt = select(k * beta * e.q * (qm - kl_qm), 0.0, e.q == 0.0);
                    }
                }
                if (want_gs) {
                    write_grad_student(p.grad_mode, i, gs);
                }
                if (want_gt) {
                    grad_teacher[i] = gt;
                }
            }
        }
        if (lane == 0u) {
            var loss = p.temperature * p.temperature * d;
            if (!live) {
                loss = 0.0;
            } else if (bad) {
                loss = nan_f32();
            }
            row_loss[row] = loss;
        }
    }
}
