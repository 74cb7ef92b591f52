// hinton.wgsl: the fused Hinton loss alpha*CE(s, y) + (1 - alpha)*T^2*KL(q^T || p^T)
// (docs/LOSSES.md section 4; CPU reference src/ops/hinton/; CUDA hinton.cu).
//
// One segment of TPR lanes per row:
//   pass 1: one read of s and t: running max of s (serving both T and 1), sum exp((s-ms)/T),
//           sum exp(s-ms), sum s; running max of t and sum exp((t-mt)/T);
//   pass 2: KL_r = sum_j q_j (log q_j - log p_j), and the student gradient
//           k [alpha (p1_j - target_j) + (1 - alpha) T (pT_j - qT_j)]   (k = g / N_valid or g),
//           which needs no KL_r;
//   pass 3: only with the teacher's gradient (1 - alpha) k T q_j (log q_j - log p_j - KL_r);
//           then the student's gradient moves here too (in place it would be overwritten).

struct Params {
    rows: u32,
    cols: u32,
    inv_t: f32,
    temperature: f32,
    alpha: f32,
    eps: f32,
    grad_scale: f32,
    ignore_index: i32,
    reduction: u32,
    grad_mode: u32,
    want_grad_t: u32,
    dtype_s: u32, // 0 f32, 1 bf16, 2 f16
    dtype_t: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(256)
fn hinton(
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

    var st = stats_empty();
    var y = 0u;
    var sy = 0.0;
    if (live) {
        for (var j = lane; j < c; j = j + TPR) {
            st = stats_push(st, load_s(base + j), load_t(base + j), true, p.inv_t);
        }
        if (lstate == 0u) {
            // Read s_y before the barrier: an in-place gradient overwrites it in pass 2.
            y = u32(labels[row]);
            sy = load_s(base + y);
        }
    }
    sh_stats[lid] = st;
    let rs = reduce_stats(lid, p.inv_t);
    let bad = rs.bad > 0.0 || lstate == 2u;
    let lzs = log(rs.zs);
    let lzs1 = log(rs.zs1);
    let lzt = log(rs.zt);
    // log q_j - log p_j = (dt - ds) + log(Zs / Zt), the ratio from dz (common.wgsl); KL sums
    // q phi(log p - log q) and the gradient takes p - q = q expm1(log p - log q): see
    // divergence.wgsl for why (high T).
    let dlz = log_ratio(rs);
    let temp = p.temperature;
    let alpha = p.alpha;
    let eps = p.eps;
    let cf = f32(c);
    let k = gradient_scale(p.grad_scale, p.reduction);
    let want_gs = p.grad_mode != GRAD_NONE;
    let want_gt = p.want_grad_t != 0u;

    // Pass 2: KL sum, and the student gradient when no teacher gradient is asked for.
    var acc = vec4<f32>(0.0);
    if (live && !bad) {
        for (var j = lane; j < c; j = j + TPR) {
            let i = base + j;
            let sv = load_s(i);
            let ds = (sv - rs.ms) * p.inv_t;
            let dt = (load_t(i) - rs.mt) * p.inv_t;
            let lp = ds - lzs;
            let qj = exp(dt - lzt);
            let pj = exp(lp);
            let u = (ds - dt) - dlz; // log p - log q
            acc.x = acc.x + kl_term(qj, pj, u);
            if (want_gs && !want_gt) {
                let p1 = exp(sv - rs.ms - lzs1);
                let tgt = select(0.0, 1.0 - eps, j == y) + eps / cf;
                let g = k * (alpha * (p1 - tgt) + (1.0 - alpha) * temp * gap_pq(qj, pj, u));
                write_grad_student(p.grad_mode, i, g);
            }
        }
    }
    sh_sum[lid] = acc;
    let kl = reduce_sum(lid).x;
    if (!in_range) {
        return; // no barrier follows
    }

    // Pass 3: gradients of masked and bad rows, and everything when the teacher's is wanted.
    let pass3 = (want_gs && (want_gt || !live || bad)) || want_gt;
    if (pass3) {
        for (var j = lane; j < c; j = j + TPR) {
            let i = base + j;
            var gs = 0.0;
            var gt = 0.0;
            if (bad) {
                gs = nan_f32();
                gt = nan_f32();
            } else if (live) {
                let sv = load_s(i);
                let ds = (sv - rs.ms) * p.inv_t;
                let dt = (load_t(i) - rs.mt) * p.inv_t;
                let lp = ds - lzs;
                let qj = exp(dt - lzt);
                let pj = exp(lp);
                let u = (ds - dt) - dlz;
                let p1 = exp(sv - rs.ms - lzs1);
                let tgt = select(0.0, 1.0 - eps, j == y) + eps / cf;
                gs = k * (alpha * (p1 - tgt) + (1.0 - alpha) * temp * gap_pq(qj, pj, u));
                gt = select(k * (1.0 - alpha) * temp * qj * ((dt - ds) + dlz - kl), 0.0, qj == 0.0);
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
        var loss = 0.0;
        if (bad) {
            loss = nan_f32();
        } else if (live) {
            let ce = (1.0 - eps) * (lzs1 + (rs.ms - sy)) + eps * (lzs1 + (rs.ms - rs.sum_s / cf));
            loss = alpha * ce + (1.0 - alpha) * temp * temp * kl;
        }
        row_loss[row] = loss;
    }
}
