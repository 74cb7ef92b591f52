// dkd.wgsl: decoupled knowledge distillation, w_ce CE(s, y) + T^2 (w_tc TCKD + w_nc NCKD)
// (docs/LOSSES.md section 8; CPU reference src/ops/dkd/; CUDA dkd.cu).
//
// Per row with label g, p = softmax(s/T), q = softmax(t/T): TCKD = KL([q_g, 1 - q_g] || [p_g,
// 1 - p_g]), NCKD = KL(q^ || p^) over the non-target classes renormalised, CE at T = 1.
//
// One segment of TPR lanes per row:
//   pass 1: one read of s and t: the online statistics of the NON-TARGET classes only (common.wgsl's
//           RowStats: their max of s, sum exp((s-ms)/T), sum exp(s-ms) at T = 1, sum s; max of t,
//           sum exp((t-mt)/T), dz, with dz's exponent gaps x^s - x^t from common.wgsl's logit_gap), and
//           s_g, t_g read by every lane (before any write: the gradient may go in place). CE's
//           statistics over all classes follow from the rest's and s_g.
//   row:    the binary distributions from the log-odds D = log Z_rest - x_g: q_g = sigmoid(-D_t),
//           1 - q_g = sigmoid(D_t), the student's likewise from D_s, and e = D_s - D_t =
//           log(Zs_rest / Zt_rest) - (x^s_g - x^t_g) (the log ratio from dz, the logit differences
//           taken before dividing by T). So the non-target mass is never 1 - p_g (a confident
//           student keeps it), and u = log p - log q of both bins keeps its digits at high T:
//           u_g = -log1p((1 - q_g) expm1(e)), u_r = -log1p(q_g expm1(-e)) where |e| < 1/2 (softplus
//           differences beyond); TCKD = q_g phi(u_g) + (1 - q_g) phi(u_r) (kl_term), p_g - q_g from
//           the bin with the smaller teacher probability (gap_pq).
//   pass 2: NCKD = sum_{j != g} q^_j phi(u_j) (forward KL's terms over the rest, as hinton.wgsl),
//           and every gradient (none needs the row's loss):
//             j != g: k [w_ce (p1_j - eps/C) + T (w_nc (p^_j - q^_j) - w_tc (p_g - q_g) p^_j)]
//             j == g: k [w_ce (p1_g - 1 + eps - eps/C) + T w_tc (p_g - q_g)],
//           p1_g - 1 = -Z1_rest / Z1 from the rest's own T = 1 sum.
// The teacher is detached (no teacher gradient). Masked rows: loss 0, gradient 0; an invalid label
// or a NaN / infinity in the row: NaN loss and gradient.

struct Params {
    rows: u32,
    cols: u32,
    inv_t: f32,
    temperature: f32,
    ce_weight: f32,
    tckd_weight: f32,
    nckd_weight: f32,
    eps: f32,
    grad_scale: f32,
    ignore_index: i32,
    reduction: u32,
    grad_mode: u32,
    dtype_s: u32, // 0 f32, 1 bf16, 2 f16
    dtype_t: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// common.wgsl's stats_push and stats_combine with dz's exponent gaps from logit_gap.
fn dkd_push(st: RowStats, s: f32, t: f32, inv_t: f32) -> RowStats {
    var r = st;
    if (!is_finite_f32(s) || !is_finite_f32(t)) {
        r.bad = 1.0;
        return r;
    }
    let ms = max(r.ms, s);
    let mt = max(r.mt, t);
    let das = (r.ms - ms) * inv_t;
    let dat = (r.mt - mt) * inv_t;
    let ras = exp(das);
    let rat = exp(dat);
    let xs = (s - ms) * inv_t;
    let xt = (t - mt) * inv_t;
    let es = exp(xs);
    let et = exp(xt);
    var rescale = 0.0;
    if (r.zs != 0.0) {
        rescale = exp_gap_d(logit_gap(r.ms, ms, r.mt, mt) * inv_t, ras, rat) * r.zs;
    }
    r.dz = rat * r.dz + rescale + exp_gap_d(logit_gap(s, ms, t, mt) * inv_t, es, et);
    r.zs = r.zs * ras + es;
    r.zs1 = r.zs1 * exp(r.ms - ms) + exp(s - ms);
    r.zt = r.zt * rat + et;
    r.ms = ms;
    r.mt = mt;
    r.sum_s = r.sum_s + s;
    return r;
}

// e^a - e^b from d = a - b and the values: e^b expm1(d) where close.
fn exp_gap_d(d: f32, ea: f32, eb: f32) -> f32 {
    if (abs(d) < 0.5) {
        return eb * expm1_f32(d);
    }
    return ea - eb;
}

fn dkd_combine(a: RowStats, b: RowStats, inv_t: f32) -> RowStats {
    var r: RowStats;
    r.ms = max(a.ms, b.ms);
    r.mt = max(a.mt, b.mt);
    let ras = exp((a.ms - r.ms) * inv_t);
    let rbs = exp((b.ms - r.ms) * inv_t);
    let rat = exp((a.mt - r.mt) * inv_t);
    let rbt = exp((b.mt - r.mt) * inv_t);
    r.zs = a.zs * ras + b.zs * rbs;
    r.zs1 = a.zs1 * exp(a.ms - r.ms) + b.zs1 * exp(b.ms - r.ms);
    r.zt = a.zt * rat + b.zt * rbt;
    var ga = 0.0;
    if (a.zs != 0.0) {
        ga = exp_gap_d(logit_gap(a.ms, r.ms, a.mt, r.mt) * inv_t, ras, rat) * a.zs;
    }
    var gb = 0.0;
    if (b.zs != 0.0) {
        gb = exp_gap_d(logit_gap(b.ms, r.ms, b.mt, r.mt) * inv_t, rbs, rbt) * b.zs;
    }
    r.dz = (rat * a.dz + ga) + (rbt * b.dz + gb);
    r.sum_s = a.sum_s + b.sum_s;
    r.bad = max(a.bad, b.bad);
    return r;
}

// common.wgsl's reduce_stats with dkd_combine.
fn dkd_reduce(lid: u32, inv_t: f32) -> RowStats {
    let lane = lid % TPR;
    workgroupBarrier();
    for (var stride = TPR / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            sh_stats[lid] = dkd_combine(sh_stats[lid], sh_stats[lid + stride], inv_t);
        }
        workgroupBarrier();
    }
    let r = sh_stats[lid - lane];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn dkd(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let lane = lid % TPR;
    let row = group_index(wid, nwg) * (WG / TPR) + lid / TPR;
    let in_range = row < p.rows;
    let c = p.cols;
    let base = row * c;
    var lstate = 0u;
    if (in_range) {
        lstate = label_state(true, row, c, p.ignore_index);
    }
    let live = in_range && lstate != 1u;
    let labelled = in_range && lstate == 0u;

    var st = stats_empty();
    var y = 0u;
    var sy = 0.0;
    var ty = 0.0;
    if (labelled) {
        y = u32(labels[row]);
        // Every lane reads s_g and t_g before the barrier: an in-place gradient overwrites s_g.
        sy = load_s(base + y);
        ty = load_t(base + y);
    }
    if (live) {
        for (var j = lane; j < c; j = j + TPR) {
            if (labelled && j == y) {
                continue;
            }
            st = dkd_push(st, load_s(base + j), load_t(base + j), p.inv_t);
        }
    }
    sh_stats[lid] = st;
    let rs = dkd_reduce(lid, p.inv_t);
    let bad = rs.bad > 0.0 || lstate == 2u || !is_finite_f32(sy) || !is_finite_f32(ty);

    let temp = p.temperature;
    let eps = p.eps;
    let cf = f32(c);
    let k = gradient_scale(p.grad_scale, p.reduction);
    let want_gs = p.grad_mode != GRAD_NONE;

    // CE at T = 1 over every class, from the rest's statistics and s_g.
    let m1 = max(rs.ms, sy);
    let z1_rest = rs.zs1 * exp(rs.ms - m1);
    let z1 = z1_rest + exp(sy - m1);
    var lz1 = log(z1);
    if (sy >= rs.ms) {
        lz1 = log1p_f32(z1_rest); // s_g is the max: Z1 = 1 + Z1_rest
    }
    // The binary distributions (see the header).
    let lzs = log(rs.zs);
    let lzt = log(rs.zt);
    let dlz = log_ratio(rs); // log(Zs_rest / Zt_rest)
    let d_t = lzt - (ty - rs.mt) * p.inv_t;
    let e = dlz - logit_gap(sy, rs.ms, ty, rs.mt) * p.inv_t;
    let d_s = lzs - (sy - rs.ms) * p.inv_t; // directly: d_t + e would cancel where both are large
    let bins = dkd_bins(d_s, d_t, e);
    let tckd = bins.x;
    let gap = bins.y; // p_g - q_g
    let ktc = k * temp * p.tckd_weight * gap;
    let knc = k * temp * p.nckd_weight;
    let kce = k * p.ce_weight;

    // Pass 2: NCKD and every gradient.
    var acc = vec4<f32>(0.0);
    if (in_range) {
        for (var j = lane; j < c; j = j + TPR) {
            let i = base + j;
            if (live && !bad) {
                if (j == y) {
                    if (want_gs) {
                        let at = -z1_rest / z1 + eps * (1.0 - 1.0 / cf);
                        write_grad_student(p.grad_mode, i, kce * at + ktc);
                    }
                    continue;
                }
                let sv = load_s(i);
                let tv = load_t(i);
                let ph = exp((sv - rs.ms) * p.inv_t - lzs);
                let qh = exp((tv - rs.mt) * p.inv_t - lzt);
                let u = logit_gap(sv, rs.ms, tv, rs.mt) * p.inv_t - dlz; // log p^ - log q^
                acc.x = acc.x + kl_term(qh, ph, u);
                if (want_gs) {
                    let p1 = exp(sv - m1 - lz1);
                    let g = kce * (p1 - eps / cf) + (knc * gap_pq(qh, ph, u) - ktc * ph);
                    write_grad_student(p.grad_mode, i, g);
                }
            } else if (want_gs) {
                write_grad_student(p.grad_mode, i, select(0.0, nan_f32(), live));
            }
        }
    }
    sh_sum[lid] = acc;
    let nckd = reduce_sum(lid).x;
    if (!in_range) {
        return; // no barrier follows
    }
    if (lane == 0u) {
        var loss = 0.0;
        if (bad && live) {
            loss = nan_f32();
        } else if (live) {
            let ce = (1.0 - eps) * (lz1 + (m1 - sy)) + eps * (lz1 + (m1 - (rs.sum_s + sy) / cf));
            loss = p.ce_weight * ce + temp * temp * (p.tckd_weight * tckd + p.nckd_weight * nckd);
        }
        row_loss[row] = loss;
    }
}
