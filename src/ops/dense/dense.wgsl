// dense.wgsl: the dense-network ops of the autograd tape (CPU reference src/ops/dense/).
// Bindings: a (read), b (read), c (read_write); each entry point says what they hold.

struct Params {
    m: u32,
    k: u32,
    n: u32,
    trans_a: u32,
    trans_b: u32,
    accumulate: u32,
    len: u32,    // elementwise entries: number of elements; bias: columns in k
    alpha: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

const TILE: u32 = 16u;
var<workgroup> tile_a: array<array<f32, 16>, 16>;
var<workgroup> tile_b: array<array<f32, 16>, 16>;

// op(A)[i, q]: A stored [m, k], or [k, m] when transposed. Out-of-range reads give 0.
fn load_a(i: u32, q: u32) -> f32 {
    if (i >= p.m || q >= p.k) {
        return 0.0;
    }
    return select(a[i * p.k + q], a[q * p.m + i], p.trans_a != 0u);
}

// op(B)[q, j]: B stored [k, n], or [n, k] when transposed.
fn load_b(q: u32, j: u32) -> f32 {
    if (q >= p.k || j >= p.n) {
        return 0.0;
    }
    return select(b[q * p.n + j], b[j * p.k + q], p.trans_b != 0u);
}

// C[m, n] (+)= op(A) op(B). A 16 x 16 workgroup computes a 16 x 16 tile of C, stepping over k in
// tiles staged in workgroup memory; each output is summed by one invocation in a fixed order.
// Dispatch: (ceil(n / 16), ceil(m / 16)).
@compute @workgroup_size(16, 16)
fn matmul(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.y * TILE + lid.y;
    let col = wid.x * TILE + lid.x;
    var acc = 0.0;
    for (var q0 = 0u; q0 < p.k; q0 = q0 + TILE) {
        tile_a[lid.y][lid.x] = load_a(row, q0 + lid.x);
        tile_b[lid.y][lid.x] = load_b(q0 + lid.y, col);
        workgroupBarrier();
        for (var q = 0u; q < TILE; q = q + 1u) {
            acc = acc + tile_a[lid.y][q] * tile_b[q][lid.x];
        }
        workgroupBarrier();
    }
    if (row < p.m && col < p.n) {
        let i = row * p.n + col;
        c[i] = select(acc, c[i] + acc, p.accumulate != 0u);
    }
}

fn element_index(lid: u32, wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid;
}

// c = a + b[i % cols] (bias over rows; cols in p.k).
@compute @workgroup_size(256)
fn bias_add(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = element_index(lid, wid, nwg);
    if (i < p.len) {
        c[i] = a[i] + b[i % p.k];
    }
}

// c[j] (+)= sum_i a[i, j] over p.m rows of p.n columns, one invocation per column, rows in order.
@compute @workgroup_size(256)
fn sum_rows(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = element_index(lid, wid, nwg);
    if (j < p.n) {
        var s = 0.0;
        for (var i = 0u; i < p.m; i = i + 1u) {
            s = s + a[i * p.n + j];
        }
        c[j] = select(s, c[j] + s, p.accumulate != 0u);
    }
}

// c = max(a, 0).
@compute @workgroup_size(256)
fn relu(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = element_index(lid, wid, nwg);
    if (i < p.len) {
        c[i] = max(a[i], 0.0);
    }
}

// c = b where the forward output a > 0, else 0.
@compute @workgroup_size(256)
fn relu_backward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = element_index(lid, wid, nwg);
    if (i < p.len) {
        c[i] = select(0.0, b[i], a[i] > 0.0);
    }
}

// c += alpha a.
@compute @workgroup_size(256)
fn axpy(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = element_index(lid, wid, nwg);
    if (i < p.len) {
        c[i] = c[i] + p.alpha * a[i];
    }
}
