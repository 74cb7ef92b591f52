// conv.wgsl: im2col and its adjoint col2im, pooling forward and backward, and a batched transpose,
// channels-last [N, H, W, C] (CPU reference src/ops/conv/). One invocation per output element;
// col2im and pooling backward are gathers (each input element sums what reads it, in a fixed
// order), so no atomics are needed and results are deterministic.
// Bindings: a (read), b (read), c (read_write).

struct Params {
    n: u32,
    h: u32,
    w: u32,
    c: u32,
    k: u32,
    stride: u32,
    pad: u32,
    oh: u32,
    ow: u32,
    max_pool: u32,
    len: u32,    // elements written by this dispatch
    rows: u32,   // transpose: [batch = n, rows, cols]
    cols: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

fn index(lid: u32, wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid;
}

// cols[(n, oy, ox), (ky, kx, ch)] = x[n, oy*s - pad + ky, ox*s - pad + kx, ch], 0 in the padding.
@compute @workgroup_size(256)
fn im2col(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(lid, wid, nwg);
    if (i >= p.len) {
        return;
    }
    let width = p.k * p.k * p.c;
    let row = i / width;
    let col = i % width;
    let ch = col % p.c;
    let kx = (col / p.c) % p.k;
    let ky = col / (p.c * p.k);
    let ox = row % p.ow;
    let oy = (row / p.ow) % p.oh;
    let n = row / (p.ow * p.oh);
    let y = i32(oy * p.stride + ky) - i32(p.pad);
    let x = i32(ox * p.stride + kx) - i32(p.pad);
    var v = 0.0;
    if (y >= 0 && x >= 0 && u32(y) < p.h && u32(x) < p.w) {
        v = a[((n * p.h + u32(y)) * p.w + u32(x)) * p.c + ch];
    }
    c[i] = v;
}

// dx[n, y, x, ch] = sum over (ky, kx) of dcols at the output position that read (y, x) through
// that kernel offset: oy = (y + pad - ky) / stride when divisible and in range.
@compute @workgroup_size(256)
fn col2im(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(lid, wid, nwg);
    if (i >= p.len) {
        return;
    }
    let ch = i % p.c;
    let x = (i / p.c) % p.w;
    let y = (i / (p.c * p.w)) % p.h;
    let n = i / (p.c * p.w * p.h);
    let width = p.k * p.k * p.c;
    var s = 0.0;
    for (var ky = 0u; ky < p.k; ky = ky + 1u) {
        let ty = i32(y + p.pad) - i32(ky);
        if (ty < 0 || u32(ty) % p.stride != 0u || u32(ty) / p.stride >= p.oh) {
            continue;
        }
        let oy = u32(ty) / p.stride;
        for (var kx = 0u; kx < p.k; kx = kx + 1u) {
            let tx = i32(x + p.pad) - i32(kx);
            if (tx < 0 || u32(tx) % p.stride != 0u || u32(tx) / p.stride >= p.ow) {
                continue;
            }
            let ox = u32(tx) / p.stride;
            let row = (n * p.oh + oy) * p.ow + ox;
            s = s + a[row * width + (ky * p.k + kx) * p.c + ch];
        }
    }
    c[i] = s;
}

fn pool_at(n: u32, oy: u32, ox: u32, t: u32, ch: u32) -> u32 {
    return ((n * p.h + oy * p.k + t / p.k) * p.w + ox * p.k + t % p.k) * p.c + ch;
}

// y[n, oy, ox, ch] = max or mean of the k x k window.
@compute @workgroup_size(256)
fn pool(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(lid, wid, nwg);
    if (i >= p.len) {
        return;
    }
    let ch = i % p.c;
    let ox = (i / p.c) % p.ow;
    let oy = (i / (p.c * p.ow)) % p.oh;
    let n = i / (p.c * p.ow * p.oh);
    var best = a[pool_at(n, oy, ox, 0u, ch)];
    var sum = best;
    for (var t = 1u; t < p.k * p.k; t = t + 1u) {
        let v = a[pool_at(n, oy, ox, t, ch)];
        best = max(best, v);
        sum = sum + v;
    }
    c[i] = select(sum / f32(p.k * p.k), best, p.max_pool != 0u);
}

// dx from x (binding a) and dy (binding b): the first maximum of each window (row-major) takes
// the window's gradient; average pooling spreads it evenly. Elements outside every window get 0.
@compute @workgroup_size(256)
fn pool_backward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(lid, wid, nwg);
    if (i >= p.len) {
        return;
    }
    let ch = i % p.c;
    let x = (i / p.c) % p.w;
    let y = (i / (p.c * p.w)) % p.h;
    let n = i / (p.c * p.w * p.h);
    let oy = y / p.k;
    let ox = x / p.k;
    var g = 0.0;
    if (oy < p.oh && ox < p.ow) {
        let dy = b[((n * p.oh + oy) * p.ow + ox) * p.c + ch];
        if (p.max_pool == 0u) {
            g = dy / f32(p.k * p.k);
        } else {
            var first = 0u;
            for (var t = 1u; t < p.k * p.k; t = t + 1u) {
                if (a[pool_at(n, oy, ox, t, ch)] > a[pool_at(n, oy, ox, first, ch)]) {
                    first = t;
                }
            }
            let mine = (y - oy * p.k) * p.k + (x - ox * p.k);
            g = select(0.0, dy, mine == first);
        }
    }
    c[i] = g;
}

// y[bt, j, i] = x[bt, i, j] for p.n matrices [p.rows, p.cols].
@compute @workgroup_size(256)
fn transpose(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = index(lid, wid, nwg);
    if (o >= p.len) {
        return;
    }
    let i = o % p.rows;
    let j = (o / p.rows) % p.cols;
    let bt = o / (p.rows * p.cols);
    c[o] = a[(bt * p.rows + i) * p.cols + j];
}
