// relational.wgsl: primitives of the relation-based losses (CPU reference src/ops/relational/).
// Bindings: a, b, c (read), out (read_write). One invocation per output element, or one
// workgroup summing in a fixed order (offdiag_*), so results are deterministic.

struct Params {
    n: u32,     // rows (row_normalize) or batch size (pairwise, offdiag)
    dim: u32,   // columns (row_normalize) or feature size (pairwise)
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> c: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const NORM_EPS: f32 = 1e-12;
const DIST_EPS: f32 = 1e-12;

fn index(lid: u32, wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid;
}

// out = a / max(||a_row||, 1e-12), one invocation per row of p.dim columns.
@compute @workgroup_size(256)
fn row_normalize(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = index(lid, wid, nwg);
    if (r >= p.n) {
        return;
    }
    var s = 0.0;
    for (var j = 0u; j < p.dim; j = j + 1u) {
        let v = a[r * p.dim + j];
        s = s + v * v;
    }
    let nrm = max(sqrt(s), NORM_EPS);
    for (var j = 0u; j < p.dim; j = j + 1u) {
        out[r * p.dim + j] = a[r * p.dim + j] / nrm;
    }
}

// From x (a) and dy (b): dx = (dy - y (y . dy)) / ||x||, or dy / 1e-12 where the norm was floored.
@compute @workgroup_size(256)
fn row_normalize_backward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = index(lid, wid, nwg);
    if (r >= p.n) {
        return;
    }
    var s = 0.0;
    for (var j = 0u; j < p.dim; j = j + 1u) {
        let v = a[r * p.dim + j];
        s = s + v * v;
    }
    let nrm = sqrt(s);
    if (nrm > NORM_EPS) {
        var dot = 0.0;
        for (var j = 0u; j < p.dim; j = j + 1u) {
            dot = dot + a[r * p.dim + j] / nrm * b[r * p.dim + j];
        }
        for (var j = 0u; j < p.dim; j = j + 1u) {
            let i = r * p.dim + j;
            out[i] = (b[i] - a[i] / nrm * dot) / nrm;
        }
    } else {
        for (var j = 0u; j < p.dim; j = j + 1u) {
            out[r * p.dim + j] = b[r * p.dim + j] / NORM_EPS;
        }
    }
}

// D[i, j] = sqrt(max(||f_i - f_j||^2, 1e-12)) for i != j, 0 on the diagonal; f (a) is [n, dim].
@compute @workgroup_size(256)
fn pairwise_distance(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = index(lid, wid, nwg);
    if (o >= p.n * p.n) {
        return;
    }
    let i = o / p.n;
    let j = o % p.n;
    var s = 0.0;
    for (var k = 0u; k < p.dim; k = k + 1u) {
        let d = a[i * p.dim + k] - a[j * p.dim + k];
        s = s + d * d;
    }
    out[o] = select(sqrt(max(s, DIST_EPS)), 0.0, i == j);
}

// From f (a), D (b) and dD (c): dF[i, k] = sum_{j != i} (dD_ij + dD_ji) (f_ik - f_jk) / D_ij,
// skipping floored distances. One invocation per element of dF, j in order.
@compute @workgroup_size(256)
fn pairwise_distance_backward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = index(lid, wid, nwg);
    if (o >= p.n * p.dim) {
        return;
    }
    let i = o / p.dim;
    let k = o % p.dim;
    var g = 0.0;
    for (var j = 0u; j < p.n; j = j + 1u) {
        let dij = b[i * p.n + j];
        if (j == i || dij * dij <= DIST_EPS) {
            continue;
        }
        g = g + (c[i * p.n + j] + c[j * p.n + i]) * (a[i * p.dim + k] - a[j * p.dim + k]) / dij;
    }
    out[o] = g;
}

var<workgroup> sh: array<vec2<f32>, 256>;

// Sum of the off-diagonal entries of D (a) and of dy . D (b), by one workgroup in a fixed order.
fn offdiag_sums(lid: u32, with_dot: bool) -> vec2<f32> {
    var acc = vec2<f32>(0.0);
    for (var o = lid; o < p.n * p.n; o = o + 256u) {
        let d = a[o];
        if (o / p.n != o % p.n) {
            acc.x = acc.x + d;
        }
        if (with_dot) {
            acc.y = acc.y + d * b[o];
        }
    }
    sh[lid] = acc;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s / 2u) {
        if (lid < s) {
            sh[lid] = sh[lid] + sh[lid + s];
        }
        workgroupBarrier();
    }
    return sh[0];
}

// out = D / m, m the mean of the off-diagonal entries (n >= 2). One workgroup.
@compute @workgroup_size(256)
fn offdiag_normalize(@builtin(local_invocation_index) lid: u32) {
    let m = offdiag_sums(lid, false).x / f32(p.n * (p.n - 1u));
    for (var o = lid; o < p.n * p.n; o = o + 256u) {
        out[o] = a[o] / m;
    }
}

// From D (a) and dy (b): dD = dy / m - [off-diagonal] (dy . D) / (m^2 n (n - 1)). One workgroup.
@compute @workgroup_size(256)
fn offdiag_normalize_backward(@builtin(local_invocation_index) lid: u32) {
    let cnt = f32(p.n * (p.n - 1u));
    let sums = offdiag_sums(lid, true);
    let m = sums.x / cnt;
    let corr = sums.y / (m * m * cnt);
    for (var o = lid; o < p.n * p.n; o = o + 256u) {
        out[o] = b[o] / m - select(corr, 0.0, o / p.n == o % p.n);
    }
}
