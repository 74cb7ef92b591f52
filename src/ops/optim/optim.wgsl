// optim.wgsl: one optimizer step per dispatch, one invocation per parameter (CPU reference
// src/ops/optim/). Bindings: grad (read), w, m / velocity, v (read_write).

struct Params {
    len: u32,
    lr: f32,       // SGD: lr; Adam: lr / (1 - beta1^t)
    inv_c2: f32,   // Adam: 1 / (1 - beta2^t)
    beta1: f32,    // SGD: momentum
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

fn param_index(lid: u32, wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid;
}

@compute @workgroup_size(256)
fn adam(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = param_index(lid, wid, nwg);
    if (i >= p.len) {
        return;
    }
    let g = grad[i] + p.weight_decay * w[i];
    let mi = p.beta1 * m[i] + (1.0 - p.beta1) * g;
    let vi = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    w[i] = w[i] - p.lr * mi / (sqrt(vi * p.inv_c2) + p.eps);
}

@compute @workgroup_size(256)
fn sgd(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = param_index(lid, wid, nwg);
    if (i >= p.len) {
        return;
    }
    let g = grad[i] + p.weight_decay * w[i];
    let vel = p.beta1 * m[i] + g;
    m[i] = vel;
    w[i] = w[i] - p.lr * vel;
}
