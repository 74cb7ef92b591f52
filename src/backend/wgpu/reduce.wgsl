// reduce.wgsl: the two small one-workgroup kernels around every row loss (CUDA: reduce.cu).
//   count_valid: N_valid = number of labels != ignore_index (N without labels), on the device, so
//                the row kernel can scale its gradient with no readback in between;
//   reduce_rows: loss = factor * sum(rows), summed in a fixed order (strided per invocation with
//                Kahan compensation, then a tree), so the result is bit-identical run to run.

struct Params {
    n: u32,
    has_labels: u32,
    ignore_index: i32,
    cols: u32,
    mode: u32,   // reduce_rows: 0 divide by N_valid (0 if none), 1 multiply by scale
    scale: f32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> labels: array<i32>;
@group(0) @binding(2) var<storage, read_write> counts: array<u32>; // [N_valid, first invalid row or 0xffffffff]
@group(0) @binding(3) var<storage, read> rows: array<f32>;
@group(0) @binding(4) var<storage, read_write> loss: array<f32>;

var<workgroup> sh_count: array<vec2<u32>, 256>;
var<workgroup> sh_total: array<f32, 256>;

@compute @workgroup_size(256)
fn count_valid(@builtin(local_invocation_index) lid: u32) {
    var valid = 0u;
    var first_bad = 0xffffffffu;
    for (var i = lid; i < p.n; i = i + WG) {
        if (p.has_labels == 0u) {
            valid = valid + 1u;
        } else {
            let y = labels[i];
            if (y != p.ignore_index) {
                valid = valid + 1u;
                if (y < 0 || u32(y) >= p.cols) {
                    first_bad = min(first_bad, i);
                }
            }
        }
    }
    sh_count[lid] = vec2<u32>(valid, first_bad);
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            let a = sh_count[lid];
            let b = sh_count[lid + stride];
            sh_count[lid] = vec2<u32>(a.x + b.x, min(a.y, b.y));
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        counts[0] = sh_count[0].x;
        counts[1] = sh_count[0].y;
    }
}

@compute @workgroup_size(256)
fn reduce_rows(@builtin(local_invocation_index) lid: u32) {
    var sum = 0.0;
    var comp = 0.0;
    for (var i = lid; i < p.n; i = i + WG) {
        let yk = rows[i] - comp;
        let t = sum + yk;
        comp = (t - sum) - yk;
        sum = t;
    }
    sh_total[lid] = sum;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            sh_total[lid] = sh_total[lid] + sh_total[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        var factor = p.scale;
        if (p.mode == 0u) {
            let n = counts[0];
            factor = select(1.0 / f32(n), 0.0, n == 0u);
        }
        loss[0] = sh_total[0] * factor;
    }
}
