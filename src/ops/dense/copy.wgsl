// copy.wgsl: a strided block copy between buffers of any dtypes (CopySpec, src/ops/dense/mod.rs):
// dst[dst_offset + r * dst_stride + c] = src[src_offset + r * src_stride + c] for r < rows,
// c < cols, converted exactly to f32 and rounded once (to nearest, ties to even) into a 16-bit
// destination. One invocation per destination unit: an element of an f32 destination, a 32-bit
// word (two elements) of a 16-bit one, so no two invocations write the same word; a half of a word
// outside the block is written back unchanged.

struct Params {
    rows: u32,
    cols: u32,
    src_offset: u32,
    src_stride: u32,
    dst_offset: u32,
    dst_stride: u32, // >= 1 (the host passes cols for a single row)
    src_dtype: u32,  // 0 f32, 1 bf16, 2 f16
    dst_dtype: u32,
    first_unit: u32, // the first destination element (f32) or word (16-bit) of the block
    units: u32,      // invocations
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

fn load_src(i: u32) -> f32 {
    if (p.src_dtype == 0u) {
        return bitcast<f32>(src[i]);
    }
    return half_to_f32(src[i >> 1u] >> ((i & 1u) * 16u), p.src_dtype);
}

// Whether destination element e is inside the block; its source element in *s.
fn source_of(e: u32, s: ptr<function, u32>) -> bool {
    if (e < p.dst_offset) {
        return false;
    }
    let rel = e - p.dst_offset;
    let r = rel / p.dst_stride;
    let c = rel % p.dst_stride;
    if (r >= p.rows || c >= p.cols) {
        return false;
    }
    *s = p.src_offset + r * p.src_stride + c;
    return true;
}

@compute @workgroup_size(256)
fn copy_rows(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let u = group_index(wid, nwg) * WG + lid;
    if (u >= p.units) {
        return;
    }
    let unit = p.first_unit + u;
    var s = 0u;
    if (p.dst_dtype == 0u) {
        if (source_of(unit, &s)) {
            dst[unit] = bitcast<u32>(load_src(s));
        }
        return;
    }
    var word = dst[unit];
    let e = 2u * unit;
    if (source_of(e, &s)) {
        word = (word & 0xffff0000u) | f32_to_half(load_src(s), p.dst_dtype);
    }
    if (source_of(e + 1u, &s)) {
        word = (word & 0x0000ffffu) | (f32_to_half(load_src(s), p.dst_dtype) << 16u);
    }
    dst[unit] = word;
}
