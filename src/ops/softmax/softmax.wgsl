// softmax.wgsl: y = softmax(x / T) or log_softmax(x / T) over rows, and their backward passes
// (docs/LOSSES.md section 1; CPU reference src/ops/softmax/; CUDA softmax.cu).
// One segment of TPR lanes per row (see common.wgsl).

struct Params {
    rows: u32,
    cols: u32,
    inv_t: f32,
    log_mode: u32, // 1: log_softmax
    dtype_x: u32,  // 0 f32, 1 bf16, 2 f16 (the output is f32: a half one is packed afterwards)
    dtype_dy: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;   // forward: x; backward: y
@group(0) @binding(2) var<storage, read> dy: array<u32>;  // backward only
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn load_x(i: u32) -> f32 {
    if (p.dtype_x == 0u) {
        return bitcast<f32>(x[i]);
    }
    return half_to_f32(x[i >> 1u] >> ((i & 1u) * 16u), p.dtype_x);
}

fn load_dy(i: u32) -> f32 {
    if (p.dtype_dy == 0u) {
        return bitcast<f32>(dy[i]);
    }
    return half_to_f32(dy[i >> 1u] >> ((i & 1u) * 16u), p.dtype_dy);
}

// Forward: pass 1 online max and sum, pass 2 writes y.
@compute @workgroup_size(256)
fn forward(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let lane = lid % TPR;
    let row = group_index(wid, nwg) * (WG / TPR) + lid / TPR;
    let in_range = row < p.rows;
    let base = row * p.cols;
    var st = stats_empty();
    if (in_range) {
        for (var j = lane; j < p.cols; j = j + TPR) {
            st = stats_push(st, load_x(base + j), 0.0, false, p.inv_t);
        }
    }
    sh_stats[lid] = st;
    let rs = reduce_stats(lid, p.inv_t);
    if (!in_range) {
        return;
    }
    let lz = log(rs.zs);
    for (var j = lane; j < p.cols; j = j + TPR) {
        let l = (load_x(base + j) - rs.ms) * p.inv_t - lz;
        var v = select(exp(l), l, p.log_mode == 1u);
        if (rs.bad > 0.0) {
            v = nan_f32();
        }
        out[base + j] = v;
    }
}

// Backward from the forward output y (binding 1) and dy:
//   softmax:     dx = (1/T) y (dy - sum(dy y));   log_softmax: dx = (1/T) (dy - exp(y) sum(dy)).
@compute @workgroup_size(256)
fn backward(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let lane = lid % TPR;
    let row = group_index(wid, nwg) * (WG / TPR) + lid / TPR;
    let in_range = row < p.rows;
    let base = row * p.cols;
    var acc = vec4<f32>(0.0);
    if (in_range) {
        for (var j = lane; j < p.cols; j = j + TPR) {
            let d = load_dy(base + j);
            acc.x = acc.x + select(d * load_x(base + j), d, p.log_mode == 1u);
        }
    }
    sh_sum[lid] = acc;
    let tot = reduce_sum(lid).x;
    if (!in_range) {
        return;
    }
    for (var j = lane; j < p.cols; j = j + TPR) {
        let yj = load_x(base + j);
        let d = load_dy(base + j);
        var v = yj * (d - tot);
        if (p.log_mode == 1u) {
            v = d - exp(yj) * tot;
        }
        out[base + j] = v * p.inv_t;
    }
}
