// attention.wgsl: attention transfer (Zagoruyko and Komodakis 2017), spec/LOSSES.md section 6;
// CPU reference src/ops/feature.rs; CUDA kernels/feature.cu.
//
// One workgroup per sample n; feature maps are [N, C, HW] row-major, so A[n, c, i] is at
// (n * C + c) * HW + i. With Q_i = mean_c A[c, i]^2, r = max(||Q||, 1e-12), u = Q / r:
//   step 1: ||Q_s||, ||Q_t||;
//   step 2: sum (u_s - u_t)^2 (the sample's loss), and the dots u . dL/du for both sides, where
//           dL/du_s = k (u_s - u_t), k = 2 g / (N HW), and dL/du_t = -dL/du_s;
//   step 3: dL/dA[c, i] = dL/dQ_i 2 A[c, i] / C with dL/dQ = (dL/du - u (u . dL/du)) / r
//           (dL/du / 1e-12 when the norm was clamped).
// Q is recomputed in each step instead of stored: no scratch buffer, the maps are small.

const AT_EPS: f32 = 1e-12;

struct Params {
    n: u32,
    cs: u32,
    ct: u32,
    hw: u32,
    k: f32,         // 2 g / (N HW)
    grad_mode: u32, // bit 0: student gradient, bit 1: teacher gradient
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> fs: array<f32>;
@group(0) @binding(2) var<storage, read> ft: array<f32>;
@group(0) @binding(3) var<storage, read_write> sample_loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad_s: array<f32>;
@group(0) @binding(5) var<storage, read_write> grad_t: array<f32>;

fn q_student(n: u32, i: u32) -> f32 {
    var q = 0.0;
    for (var c = 0u; c < p.cs; c = c + 1u) {
        let v = fs[(n * p.cs + c) * p.hw + i];
        q = q + v * v;
    }
    return q / f32(p.cs);
}

fn q_teacher(n: u32, i: u32) -> f32 {
    var q = 0.0;
    for (var c = 0u; c < p.ct; c = c + 1u) {
        let v = ft[(n * p.ct + c) * p.hw + i];
        q = q + v * v;
    }
    return q / f32(p.ct);
}

@compute @workgroup_size(256)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let n = group_index(wid, nwg);
    let in_range = n < p.n;
    var acc = vec4<f32>(0.0);
    if (in_range) {
        for (var i = lid; i < p.hw; i = i + WG) {
            let qs = q_student(n, i);
            let qt = q_teacher(n, i);
            acc = acc + vec4<f32>(qs * qs, qt * qt, 0.0, 0.0);
        }
    }
    sh_sum[lid] = acc;
    let norms = reduce_sum(lid);
    let rs = max(sqrt(norms.x), AT_EPS);
    let rt = max(sqrt(norms.y), AT_EPS);

    acc = vec4<f32>(0.0);
    if (in_range) {
        for (var i = lid; i < p.hw; i = i + WG) {
            let us = q_student(n, i) / rs;
            let ut = q_teacher(n, i) / rt;
            let d = us - ut;
            let du = p.k * d;
            acc = acc + vec4<f32>(d * d, us * du, -ut * du, 0.0);
        }
    }
    sh_sum[lid] = acc;
    let tot = reduce_sum(lid);
    if (!in_range) {
        return;
    }
    if (lid == 0u) {
        sample_loss[n] = tot.x;
    }
    if (p.grad_mode == 0u) {
        return;
    }
    for (var i = lid; i < p.hw; i = i + WG) {
        let us = q_student(n, i) / rs;
        let ut = q_teacher(n, i) / rt;
        let du = p.k * (us - ut);
        var dqs = du / rs;
        if (rs > AT_EPS) {
            dqs = (du - us * tot.y) / rs;
        }
        var dqt = -du / rt;
        if (rt > AT_EPS) {
            dqt = (-du - ut * tot.z) / rt;
        }
        if ((p.grad_mode & 1u) != 0u) {
            for (var c = 0u; c < p.cs; c = c + 1u) {
                let idx = (n * p.cs + c) * p.hw + i;
                grad_s[idx] = dqs * 2.0 * fs[idx] / f32(p.cs);
            }
        }
        if ((p.grad_mode & 2u) != 0u) {
            for (var c = 0u; c < p.ct; c = c + 1u) {
                let idx = (n * p.ct + c) * p.hw + i;
                grad_t[idx] = dqt * 2.0 * ft[idx] / f32(p.ct);
            }
        }
    }
}
