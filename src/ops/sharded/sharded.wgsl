// sharded.wgsl: the vocab-sharded row losses (docs/LOSSES.md section 9; f64 reference
// src/ops/sharded/reference.rs, the stats layout src/ops/sharded/mod.rs). One workgroup per row:
// each lane strides over the shard's columns, the lanes' partial maxima and sums meet in a fixed
// tree (the same bits for any run).
//   sharded_stats:         phase 1, the row's maxima and sums relative to them (masked rows 0)
//   sharded_jsd_terms:     the JSD round, [sum q (log q - log M), sum p (log p - log M)]
//   sharded_loss_and_grad: phase 2, the row's loss part and the shard's gradient columns
// A teacher given as probabilities or log-probabilities (teacher_form 1, 2) has m_t = 0 and
// v_j = T log q_j in the stats (Zt = sum q, Af = sum q (T log q - u), Ar = sum e^{u/T} (u - T log q),
// +inf where q = 0), and phase 2 reads log q from the input with log Zt = 0 (not renormalised).
// DKD (div 3; beta carries its TCKD weight, w_div its NCKD weight): the stats are the rest of the
// row's (the label's column left out of the maxima and of every sum but S; Ar 0), phase 2 takes
// TCKD from the log-odds of the rest D = log Z_rest - x_y (dkd_row, as dkd.wgsl) at the label's
// column and NCKD's forward-KL terms over the rest; CE's normaliser is logaddexp(log Zs1, s_y - m_s).

const MAXIMA: u32 = 2u;
const SUMS: u32 = 9u;

struct Params {
    rows: u32,
    width: u32,
    classes: u32,
    offset: u32,
    inv_t: f32,
    temperature: f32,
    has_teacher: u32,
    has_labels: u32,
    ignore_index: i32,
    w_ce: f32,   // weight of the cross-entropy term
    w_div: f32,  // weight of the T^2 divergence term
    div: u32,    // 0 forward KL, 1 reverse KL, 2 JSD, 3 DKD
    beta: f32,   // JSD's beta; DKD's TCKD weight
    eps: f32,    // label smoothing
    k: f32,      // grad_scale times the reduction's factor
    grad_teacher: u32,
    teacher_form: u32, // 0 logits, 1 probabilities, 2 log-probabilities
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> student: array<f32>;
@group(0) @binding(2) var<storage, read> teacher: array<f32>;
@group(0) @binding(3) var<storage, read> labels: array<i32>;
// [rows * 11] stats, then (JSD round and JSD's phase 2) the [rows * 2] JSD terms
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;
@group(0) @binding(5) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(6) var<storage, read_write> grad_s: array<f32>;
@group(0) @binding(7) var<storage, read_write> grad_t: array<f32>;

// Element k of row r's JSD terms.
fn jsd_at(r: u32, k: u32) -> u32 {
    return p.rows * (MAXIMA + SUMS) + r * 2u + k;
}

var<workgroup> sh_red: array<f32, 256>;

// The sum over the workgroup's lanes of v, in a fixed tree; every lane gets it.
fn wg_sum(lid: u32, v: f32) -> f32 {
    sh_red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            sh_red[lid] = sh_red[lid] + sh_red[lid + s];
        }
        workgroupBarrier();
    }
    let total = sh_red[0];
    workgroupBarrier();
    return total;
}

// The maximum over the workgroup's lanes of v; every lane gets it.
fn wg_max(lid: u32, v: f32) -> f32 {
    sh_red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            sh_red[lid] = max(sh_red[lid], sh_red[lid + s]);
        }
        workgroupBarrier();
    }
    let total = sh_red[0];
    workgroupBarrier();
    return total;
}

// The row's label as a local column, or -1 (not in the shard, or no labels).
fn local_label(r: u32) -> i32 {
    if (p.has_labels == 0u) {
        return -1;
    }
    let y = labels[r];
    if (y < i32(p.offset) || y >= i32(p.offset + p.width)) {
        return -1;
    }
    return y - i32(p.offset);
}

fn is_masked(r: u32) -> bool {
    return p.has_labels != 0u && labels[r] == p.ignore_index;
}

fn pos_inf() -> f32 {
    return bitcast<f32>(0x7f800000u);
}

// A given teacher's (log q, q) from its value t; log q = -inf where q = 0.
fn given_lq(t: f32) -> vec2<f32> {
    if (p.teacher_form == 1u) {
        return vec2<f32>(select(log(t), -pos_inf(), t <= 0.0), t);
    }
    return vec2<f32>(t, exp(t));
}

// e^a - e^b for a, b <= 0: around the larger, without cancellation or overflow.
fn exp_diff(a: f32, b: f32) -> f32 {
    let mag = exp(max(a, b)) * -expm1_f32(-abs(a - b));
    return select(-mag, mag, a >= b);
}

@compute @workgroup_size(256)
fn sharded_stats(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = group_index(wid, nwg);
    if (r >= p.rows) {
        return;
    }
    let base = r * p.width;
    let with_t = p.has_teacher != 0u;
    let given = p.teacher_form != 0u;
    let dkd = p.div == 3u;
    // DKD: the label's column, left out of the rest's stats (-1: none in this shard)
    var skip = -1;
    if (dkd) {
        skip = local_label(r);
    }
    var ms = NEG_BIG;
    var mt = NEG_BIG;
    for (var j = lid; j < p.width; j = j + WG) {
        if (i32(j) == skip) {
            continue;
        }
        ms = max(ms, student[base + j]);
        if (with_t) {
            mt = max(mt, teacher[base + j]);
        }
    }
    ms = wg_max(lid, ms);
    // (a given teacher: m_t = 0)
    mt = select(0.0, wg_max(lid, mt), with_t && !given);
    var zs = 0.0;
    var zs1 = 0.0;
    var zt = 0.0;
    var af = 0.0;
    var ar = 0.0;
    var ss = 0.0;
    var dz = 0.0;
    for (var j = lid; j < p.width; j = j + WG) {
        let s = student[base + j];
        if (i32(j) == skip) {
            ss = ss + s;
            continue;
        }
        let u = s - ms;
        let us = u * p.inv_t;
        let eu = exp(us);
        zs = zs + eu;
        zs1 = zs1 + exp(u);
        ss = ss + s;
        if (with_t && given) {
            let lq = given_lq(teacher[base + j]);
            let q = lq.y;
            zt = zt + q;
            af = af + select(0.0, q * (p.temperature * lq.x - u), q > 0.0);
            ar = ar + select(eu * (u - p.temperature * lq.x), pos_inf(), lq.x < NEG_BIG);
            dz = dz + (eu - q);
        } else if (with_t) {
            let v = teacher[base + j] - mt;
            let vs = v * p.inv_t;
            let ev = exp(vs);
            zt = zt + ev;
            af = af + ev * (v - u);
            ar = ar + select(eu * (u - v), 0.0, dkd);
            dz = dz + exp_diff(us, vs);
        }
    }
    zs = wg_sum(lid, zs);
    zs1 = wg_sum(lid, zs1);
    zt = wg_sum(lid, zt);
    af = wg_sum(lid, af);
    ar = wg_sum(lid, ar);
    ss = wg_sum(lid, ss);
    dz = wg_sum(lid, dz);
    if (lid == 0u) {
        let keep = !is_masked(r);
        let m0 = r * MAXIMA;
        stats[m0] = select(0.0, ms, keep);
        stats[m0 + 1u] = select(0.0, mt, keep);
        let z0 = p.rows * MAXIMA + r * SUMS;
        stats[z0] = select(0.0, zs, keep);
        stats[z0 + 1u] = select(0.0, zs1, keep);
        stats[z0 + 2u] = select(0.0, zt, keep);
        stats[z0 + 3u] = select(0.0, af, keep);
        stats[z0 + 4u] = select(0.0, ar, keep);
        stats[z0 + 5u] = select(0.0, ss, keep);
        let y = local_label(r);
        var sy = 0.0;
        var ty = 0.0;
        if (keep && y >= 0) {
            sy = student[base + u32(y)];
            if (with_t) {
                ty = teacher[base + u32(y)];
            }
        }
        stats[z0 + 6u] = sy;
        stats[z0 + 7u] = ty;
        stats[z0 + 8u] = select(0.0, dz, keep);
    }
}

// An element's (log p, log q - log p, p, q) from its student and teacher values.
fn elem(g: Globals, s: f32, t: f32) -> vec4<f32> {
    let u = s - g.ms;
    let lp = u * p.inv_t - g.log_zs;
    if (p.teacher_form != 0u) {
        let lq = given_lq(t);
        return vec4<f32>(lp, lq.x - lp, exp(lp), lq.y);
    }
    let v = t - g.mt;
    let dq = (v - u) * p.inv_t + g.ratio;
    return vec4<f32>(lp, dq, exp(lp), exp(v * p.inv_t - g.log_zt));
}

// A row's constants from the combined stats.
struct Globals {
    ms: f32,
    mt: f32,
    log_zs: f32,
    log_zt: f32,
    log_zs1: f32,
    ratio: f32,   // log Zs - log Zt
    forward: f32, // KL(q || p)
    reverse: f32, // KL(p || q)
}

fn globals(r: u32) -> Globals {
    let m0 = r * MAXIMA;
    let z0 = p.rows * MAXIMA + r * SUMS;
    let zs = stats[z0];
    let zt = stats[z0 + 2u];
    let dz = stats[z0 + 8u];
    if (p.teacher_form != 0u) {
        // a given teacher: log Zt = 0, not renormalised
        let log_zs = log(zs);
        return Globals(
            stats[m0],
            0.0,
            log_zs,
            0.0,
            log(stats[z0 + 1u]),
            log_zs,
            stats[z0 + 3u] / p.temperature + zt * log_zs,
            stats[z0 + 4u] / (p.temperature * zs) - log_zs,
        );
    }
    var ratio = 0.0;
    if (abs(dz) < 0.5 * zt) {
        ratio = log1p_f32(dz / zt);
    } else {
        ratio = log(zs / zt);
    }
    return Globals(
        stats[m0],
        stats[m0 + 1u],
        log(zs),
        log(zt),
        log(stats[z0 + 1u]),
        ratio,
        stats[z0 + 3u] / (p.temperature * zt) + ratio,
        stats[z0 + 4u] / (p.temperature * zs) - ratio,
    );
}

// JSD's per-element (log q - log M, log p - log M, c) from dq = log q - log p (as divergence.cu's
// jsd_logs): -log1p((1-beta) expm1(dl)), -log1p(beta expm1(-dl)) with dl = -dq (softplus forms
// where the argument is below -1/2), and the divergence's term c = beta q lq_m + (1-beta) p lp_m,
// from its series q f(dl) where |dl| < 0.1 (first-order halves that cancel where p ~ q).
fn jsd_parts(dq: f32, pv: f32, q: f32) -> vec3<f32> {
    let b = p.beta;
    let b1 = 1.0 - b;
    let dl = -dq;
    let log_b = log(b);
    let log_b1 = log(b1);
    let log_rho = log_b - log_b1;
    let arg_q = b1 * expm1_f32(dl);
    let arg_p = b * expm1_f32(-dl);
    var lq_m = -softplus_f32(dl - log_rho) - log_b;
    if (arg_q >= -0.5 && arg_q <= 3.0e38) {
        lq_m = -log1p_f32(arg_q);
    }
    var lp_m = -softplus_f32(log_rho - dl) - log_b1;
    if (arg_p >= -0.5 && arg_p <= 3.0e38) {
        lp_m = -log1p_f32(arg_p);
    }
    // (a given probability of 0: its half is 0 log 0 = 0)
    var c = select(0.0, b * q * lq_m, q > 0.0) + b1 * pv * lp_m;
    if (abs(dl) < 0.1) {
        let c2 = 0.5 * b * b1;
        let c3 = (1.0 + b) / 6.0;
        let c4 = (2.0 * b * b + 1.0) / 24.0;
        let c5 = (3.0 * b + 1.0) * (2.0 * b * b - 2.0 * b + 1.0) / 120.0;
        let c6 = (((24.0 * b - 30.0) * b + 10.0) * b * b + 1.0) / 720.0;
        c = q * (c2 * dl * dl * (1.0 + 2.0 * dl * (c3 + dl * (c4 + dl * (c5 + dl * c6)))));
    }
    return vec3<f32>(lq_m, lp_m, c);
}

// DKD's row constants from its rest-of-row globals: (TCKD, p_y - q_y, CE's log Zs1 of the whole
// row relative to the rest's m_s). The binary distributions from the log-odds of the rest
// D = log Z_rest - x_y: q_y = sigmoid(-D_t), and e = D_s - D_t = log(Zs/Zt) - (x^s_y - x^t_y)
// without their cancellation; u of both bins as in dkd.wgsl.
fn dkd_row(r: u32, g: Globals) -> vec3<f32> {
    let z0 = p.rows * MAXIMA + r * SUMS;
    let sy = stats[z0 + 6u];
    let ty = stats[z0 + 7u];
    let a = log(stats[z0 + 1u]);
    let b = sy - g.ms;
    let log_zs1 = max(a, b) + log1p_f32(exp(-abs(a - b)));
    let d_s = g.log_zs + (g.ms - sy) * p.inv_t;
    let d_t = g.log_zt + (g.mt - ty) * p.inv_t;
    let e = g.ratio - logit_gap(sy, g.ms, ty, g.mt) * p.inv_t;
    let bins = dkd_bins(d_s, d_t, e);
    return vec3<f32>(bins.x, bins.y, log_zs1);
}

@compute @workgroup_size(256)
fn sharded_jsd_terms(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = group_index(wid, nwg);
    if (r >= p.rows) {
        return;
    }
    let base = r * p.width;
    let g = globals(r);
    var kq = 0.0;
    var kp = 0.0;
    for (var j = lid; j < p.width; j = j + WG) {
        let e = elem(g, student[base + j], teacher[base + j]);
        let pv = e.z;
        let q = e.w;
        let d = jsd_parts(e.y, pv, q);
        kq = kq + select(0.0, q * d.x, q > 0.0);
        kp = kp + pv * d.y;
    }
    kq = wg_sum(lid, kq);
    kp = wg_sum(lid, kp);
    if (lid == 0u) {
        let keep = !is_masked(r);
        stats[jsd_at(r, 0u)] = select(0.0, kq, keep);
        stats[jsd_at(r, 1u)] = select(0.0, kp, keep);
    }
}

@compute @workgroup_size(256)
fn sharded_loss_and_grad(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = group_index(wid, nwg);
    if (r >= p.rows) {
        return;
    }
    let base = r * p.width;
    let keep = !is_masked(r);
    var g = globals(r);
    let y = local_label(r);
    let dkd = p.div == 3u;
    var dk = vec3<f32>(0.0);
    if (dkd && keep) {
        dk = dkd_row(r, g);
        g.log_zs1 = dk.z;
    }
    let with_t = p.has_teacher != 0u && p.w_div != 0.0 && !dkd;
    var kl_q = 0.0;
    var kl_p = 0.0;
    if (p.div == 2u && with_t) {
        kl_q = stats[jsd_at(r, 0u)];
        kl_p = stats[jsd_at(r, 1u)];
    }
    let uniform_part = p.eps / f32(p.classes);
    let k_ce = p.k * p.w_ce;
    let k_div = p.k * p.w_div * p.temperature;
    let w_div_t2 = p.w_div * p.temperature * p.temperature;
    var part = 0.0;
    for (var j = lid; j < p.width; j = j + WG) {
        let s = student[base + j];
        var gs = 0.0;
        var gt = 0.0;
        if (p.w_ce != 0.0) {
            let lp1 = s - g.ms - g.log_zs1;
            let tgt = select(0.0, 1.0 - p.eps, i32(j) == y) + uniform_part;
            part = part - p.w_ce * tgt * lp1;
            gs = gs + k_ce * (exp(lp1) - tgt);
        }
        if (dkd) {
            // TCKD at the label's column; NCKD's forward-KL terms over the rest.
            if (i32(j) == y) {
                part = part + p.temperature * p.temperature * p.beta * dk.x;
                gs = gs + p.k * p.temperature * p.beta * dk.y;
            } else {
                let e = elem(g, s, teacher[base + j]);
                let pv = e.z;
                let q = e.w;
                part = part + w_div_t2 * kl_term(q, pv, -e.y);
                gs = gs + k_div * (pv - q) - p.k * p.temperature * p.beta * dk.y * pv;
            }
        } else if (with_t) {
            let e = elem(g, s, teacher[base + j]);
            let dq = e.y;
            let pv = e.z;
            let q = e.w;
            var d = 0.0;
            var ds = 0.0;
            var dt = 0.0;
            if (p.div == 0u) {
                d = select(0.0, q * dq, q > 0.0);
                ds = pv - q;
                dt = q * (dq - g.forward);
            } else if (p.div == 1u) {
                d = -pv * dq;
                ds = pv * (-dq - g.reverse);
                dt = q - pv;
            } else {
                let m = jsd_parts(dq, pv, q);
                d = m.z;
                ds = (1.0 - p.beta) * pv * (m.y - kl_p);
                dt = p.beta * q * (m.x - kl_q);
            }
            part = part + w_div_t2 * d;
            gs = gs + k_div * ds;
            gt = k_div * dt;
        }
        grad_s[base + j] = select(0.0, gs, keep);
        if (p.grad_teacher != 0u) {
            grad_t[base + j] = select(0.0, gt, keep);
        }
    }
    part = wg_sum(lid, part);
    if (lid == 0u) {
        row_loss[r] = select(0.0, part, keep);
    }
}
