// mse.wgsl: pointwise regression losses, mean over M elements: feature-map MSE (FitNets hint,
// docs/LOSSES.md section 5; CPU reference src/ops/feature/) and smooth L1 (Huber, delta 1; the
// RKD comparison, section 7; src/ops/relational/). CUDA feature.cu.
// Each workgroup owns ELEMS = 256 * 16 consecutive elements: it writes their gradients
// dL/da = g 2 (a - b) / M, or g clamp(a - b, -1, 1) / M for smooth L1 (and dL/db = -dL/da) and one partial sum of (a - b)^2, reduced in a
// fixed order; reduce.wgsl's reduce_rows then sums the partials and divides by M.

const PER_LANE: u32 = 16u;

struct Params {
    len: u32,       // elements in this window
    grad_mode: u32, // bit 0: write grad_a, bit 1: write grad_b
    grad_k: f32,    // MSE: g * 2 / M; smooth L1: g / M
    mode: u32,      // 0 squared error, 1 smooth L1
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> partial: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad_a: array<f32>;
@group(0) @binding(5) var<storage, read_write> grad_b: array<f32>;

var<workgroup> sh_part: array<f32, 256>;

@compute @workgroup_size(256)
fn mse(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let group = group_index(wid, nwg);
    let start = group * WG * PER_LANE;
    var acc = 0.0;
    // Coalesced: consecutive lanes read consecutive elements in each of the PER_LANE steps.
    for (var k = 0u; k < PER_LANE; k = k + 1u) {
        let i = start + k * WG + lid;
        if (i < p.len) {
            let d = a[i] - b[i];
            var g = p.grad_k * d;
            if (p.mode == 0u) {
                acc = acc + d * d;
            } else {
                let ad = abs(d);
                acc = acc + select(ad - 0.5, 0.5 * d * d, ad < 1.0);
                g = p.grad_k * clamp(d, -1.0, 1.0);
            }
            if ((p.grad_mode & 1u) != 0u) {
                grad_a[i] = g;
            }
            if ((p.grad_mode & 2u) != 0u) {
                grad_b[i] = -g;
            }
        }
    }
    sh_part[lid] = acc;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            sh_part[lid] = sh_part[lid] + sh_part[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u && start < p.len) {
        partial[group] = sh_part[0];
    }
}
