// pack.wgsl: f32 values rounded to bf16 or f16 and packed two to a 32-bit word (the element of
// even index in the low half), one invocation per word, so no two invocations write the same
// word. The row losses write a half-precision gradient this way: into an f32 scratch buffer, then
// packed (src/backend/wgpu/dispatch.rs).

struct Params {
    words: u32, // words in this window
    len: u32,   // elements in this window (an odd count leaves the last high half 0)
    dtype: u32, // 1 bf16, 2 f16
    pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

@compute @workgroup_size(256)
fn pack_half(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let w = group_index(wid, nwg) * WG + lid;
    if (w >= p.words) {
        return;
    }
    let e = 2u * w;
    let lo = f32_to_half(src[e], p.dtype);
    var hi = 0u;
    if (e + 1u < p.len) {
        hi = f32_to_half(src[e + 1u], p.dtype);
    }
    dst[w] = lo | (hi << 16u);
}
