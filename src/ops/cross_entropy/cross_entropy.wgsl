// cross_entropy.wgsl: cross-entropy with hard labels, label smoothing eps and ignore_index
// (docs/LOSSES.md section 3; CPU reference src/ops/cross_entropy/; CUDA cross_entropy.cu).
//
// Per row: pass 1 gathers max, sum exp and sum of s (one read); then
//   CE_r = (1 - eps) (lse - s_y) + eps (lse - mean(s)),   lse = ms + log(zs1),
// written with the differences taken first so large logits keep their precision; pass 2 writes
//   dL/ds_j = k (p_j - (1 - eps) [j == y] - eps / C),   k = g / N_valid (batchmean) or g.

struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    grad_scale: f32,
    ignore_index: i32,
    reduction: u32,
    grad_mode: u32,
    dtype_s: u32, // the student's dtype: 0 f32, 1 bf16, 2 f16
    dtype_t: u32, // unused (row_io.wgsl's load_t)
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(256)
fn cross_entropy(
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
    let live = in_range && lstate == 0u;

    var st = stats_empty();
    var y = 0u;
    var sy = 0.0;
    if (live) {
        for (var j = lane; j < c; j = j + TPR) {
            st = stats_push(st, load_s(base + j), 0.0, false, 1.0);
        }
        // Read s_y before the barrier: an in-place gradient overwrites it after.
        y = u32(labels[row]);
        sy = load_s(base + y);
    }
    sh_stats[lid] = st;
    let rs = reduce_stats(lid, 1.0);
    if (!in_range) {
        return; // no barrier follows
    }
    let bad = lstate == 2u || rs.bad > 0.0;
    let lz = log(rs.zs1);
    let eps = p.eps;
    let cf = f32(c);

    if (p.grad_mode != GRAD_NONE) {
        let k = gradient_scale(p.grad_scale, p.reduction);
        for (var j = lane; j < c; j = j + TPR) {
            let i = base + j;
            var g = 0.0;
            if (bad) {
                g = nan_f32();
            } else if (live) {
                let pj = exp(load_s(i) - rs.ms - lz);
                let tgt = select(0.0, 1.0 - eps, j == y) + eps / cf;
                g = k * (pj - tgt);
            }
            write_grad_student(p.grad_mode, i, g);
        }
    }
    if (lane == 0u) {
        var loss = 0.0;
        if (bad) {
            loss = nan_f32();
        } else if (live) {
            loss = (1.0 - eps) * (lz + (rs.ms - sy)) + eps * (lz + (rs.ms - rs.sum_s / cf));
        }
        row_loss[row] = loss;
    }
}
