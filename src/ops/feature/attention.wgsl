// attention.wgsl: attention transfer (Zagoruyko and Komodakis 2017), docs/LOSSES.md section 6;
// CPU reference src/ops/feature/; CUDA feature.cu.
//
// One workgroup per sample n; feature maps are [N, C, HW] row-major, so A[n, c, i] is at
// (n * C + c) * HW + i. With Q_i = mean_c A[c, i]^2, r = max(||Q||, 1e-12), u = Q / r:
//   step 1: ||Q_s||, ||Q_t||;
//   step 2: sum (u_s - u_t)^2 (the sample's loss), and the dots u . dL/du for both sides, where
//           dL/du_s = k (u_s - u_t), k = 2 g / (N HW), and dL/du_t = -dL/du_s;
//   step 3: dL/dA[c, i] = dL/dQ_i 2 A[c, i] / C with dL/dQ = (dL/du - u (u . dL/du)) / r
//           (dL/du / 1e-12 when the norm was clamped).
// Q is recomputed in each step instead of stored: no scratch buffer, the maps are small.
//
// Scaling (step 0): u is invariant to scaling A, but A^2 and Q^2 overflow f32 from |A| ~ 1e10
// (Q^2 ~ A^4). So each side is first scaled by its sample's largest magnitude m: A' = A / m,
// Q' = Q / m^2, and the clamp ||Q|| > 1e-12 becomes ||Q'|| > 1e-12 / m^2; the gradient through
// A' carries 1 / m (dL/dA = dL/dQ' 2 A' / (C m)).

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

// Q'_i of the student with its scale factor 1/m (0 for an all-zero sample).
fn q_student(n: u32, i: u32, inv_m: f32) -> f32 {
    var q = 0.0;
    for (var c = 0u; c < p.cs; c = c + 1u) {
        let v = fs[(n * p.cs + c) * p.hw + i] * inv_m;
        q = q + v * v;
    }
    return q / f32(p.cs);
}

fn q_teacher(n: u32, i: u32, inv_m: f32) -> f32 {
    var q = 0.0;
    for (var c = 0u; c < p.ct; c = c + 1u) {
        let v = ft[(n * p.ct + c) * p.hw + i] * inv_m;
        q = q + v * v;
    }
    return q / f32(p.ct);
}

// Tree-reduces the max of sh_sum over the workgroup (x: student, y: teacher).
fn reduce_max(lid: u32) -> vec4<f32> {
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            sh_sum[lid] = max(sh_sum[lid], sh_sum[lid + stride]);
        }
        workgroupBarrier();
    }
    let r = sh_sum[0];
    workgroupBarrier();
    return r;
}

// 1 / m, or 0 when m is 0 (an all-zero map, whose Q is 0 in any scale); NaN propagates.
fn inv_scale(m: f32) -> f32 {
    return select(1.0 / m, 0.0, m == 0.0);
}

// The clamp 1e-12 on ||Q|| in units of Q' = Q / m^2.
fn clamp_scaled(m: f32) -> f32 {
    return select(AT_EPS / (m * m), AT_EPS, m == 0.0);
}

@compute @workgroup_size(256)
fn attention(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let n = group_index(wid, nwg);
    let in_range = n < p.n;
    // Step 0: the largest magnitudes (a NaN input makes the result NaN, as it should).
    var mx = vec4<f32>(0.0);
    if (in_range) {
        for (var j = lid; j < p.cs * p.hw; j = j + WG) {
            let v = abs(fs[n * p.cs * p.hw + j]);
            mx.x = select(max(mx.x, v), v, v != v);
        }
        for (var j = lid; j < p.ct * p.hw; j = j + WG) {
            let v = abs(ft[n * p.ct * p.hw + j]);
            mx.y = select(max(mx.y, v), v, v != v);
        }
    }
    sh_sum[lid] = mx;
    let ms = reduce_max(lid);
    let ims = inv_scale(ms.x);
    let imt = inv_scale(ms.y);
    let eps_s = clamp_scaled(ms.x);
    let eps_t = clamp_scaled(ms.y);

    var acc = vec4<f32>(0.0);
    if (in_range) {
        for (var i = lid; i < p.hw; i = i + WG) {
            let qs = q_student(n, i, ims);
            let qt = q_teacher(n, i, imt);
            acc = acc + vec4<f32>(qs * qs, qt * qt, 0.0, 0.0);
        }
    }
    sh_sum[lid] = acc;
    let norms = reduce_sum(lid);
    let rs = max(sqrt(norms.x), eps_s);
    let rt = max(sqrt(norms.y), eps_t);

    acc = vec4<f32>(0.0);
    if (in_range) {
        for (var i = lid; i < p.hw; i = i + WG) {
            let us = q_student(n, i, ims) / rs;
            let ut = q_teacher(n, i, imt) / rt;
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
        let us = q_student(n, i, ims) / rs;
        let ut = q_teacher(n, i, imt) / rt;
        let du = p.k * (us - ut);
        var dqs = du / rs;
        if (rs > eps_s) {
            dqs = (du - us * tot.y) / rs;
        }
        var dqt = -du / rt;
        if (rt > eps_t) {
            dqt = (-du - ut * tot.z) / rt;
        }
        if ((p.grad_mode & 1u) != 0u) {
            for (var c = 0u; c < p.cs; c = c + 1u) {
                let idx = (n * p.cs + c) * p.hw + i;
                grad_s[idx] = dqs * 2.0 * (fs[idx] * ims) * ims / f32(p.cs);
            }
        }
        if ((p.grad_mode & 2u) != 0u) {
            for (var c = 0u; c < p.ct; c = c + 1u) {
                let idx = (n * p.ct + c) * p.hw + i;
                grad_t[idx] = dqt * 2.0 * (ft[idx] * imt) * imt / f32(p.ct);
            }
        }
    }
}
