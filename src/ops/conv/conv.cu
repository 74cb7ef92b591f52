// im2col and its adjoint col2im, pooling forward and backward, and a batched transpose, channels-last
// [N, H, W, C] (CPU reference src/ops/conv/; the same math as conv.wgsl). One thread per
// output element; col2im and pooling backward are gathers (each input element sums what reads it, in
// a fixed order), so no atomics are needed and results are bit-identical run after run.
//
// Launch (src/backend/cuda/): 256 threads per block, ceil(len / 256) blocks (2D past 2^31-1),
// len = the number of elements written. The host checks that every buffer holds fewer than 2^32
// elements and that h + 2 pad and w + 2 pad are below 2^31, so indices are u32 and the padded
// coordinates fit an int.

__device__ __forceinline__ bool out_of_range(u32* e, u32 len) {
    const u64 i = block_linear() * blockDim.x + threadIdx.x;
    *e = (u32)i;
    return i >= len;
}

// cols[(n, oy, ox), (ky, kx, ch)] = x[n, oy*stride - pad + ky, ox*stride - pad + kx, ch], 0 in the
// padding. cols: [n*oh*ow, k*k*c].
extern "C" __global__ void im2col(const float* x, float* cols, u32 h, u32 w, u32 c, u32 k, u32 stride, u32 pad,
                                  u32 oh, u32 ow, u32 len) {
    u32 i;
    if (out_of_range(&i, len)) return;
    const u32 width = k * k * c;
    const u32 row = i / width;
    const u32 col = i - row * width;
    const u32 ch = col % c;
    const u32 kx = (col / c) % k;
    const u32 ky = col / (c * k);
    const u32 ox = row % ow;
    const u32 oy = (row / ow) % oh;
    const u32 n = row / (ow * oh);
    const int y = (int)(oy * stride + ky) - (int)pad;
    const int xx = (int)(ox * stride + kx) - (int)pad;
    float v = 0.f;
    if (y >= 0 && xx >= 0 && (u32)y < h && (u32)xx < w) {
        v = x[((n * h + (u32)y) * w + (u32)xx) * c + ch];
    }
    cols[i] = v;
}

// dx[n, y, x, ch] = sum over (ky, kx), ky then kx ascending, of dcols at the output position that
// read (y, x) through that kernel offset: oy = (y + pad - ky) / stride when divisible and in range.
// Only the ky with (y + pad - ky) divisible by stride are visited (from (y + pad) % stride in steps
// of stride): the same terms in the same order as the WGSL loop over every ky.
extern "C" __global__ void col2im(const float* dcols, float* dx, u32 h, u32 w, u32 c, u32 k, u32 stride, u32 pad,
                                  u32 oh, u32 ow, u32 len) {
    u32 i;
    if (out_of_range(&i, len)) return;
    const u32 ch = i % c;
    const u32 x = (i / c) % w;
    const u32 y = (i / (c * w)) % h;
    const u32 n = i / (c * w * h);
    const u32 width = k * k * c;
    const int ypad = (int)(y + pad);
    const int xpad = (int)(x + pad);
    const int ik = (int)k;
    const int is = (int)stride;
    float s = 0.f;
    for (int ky = ypad % is; ky < ik && ky <= ypad; ky += is) {
        const u32 oy = (u32)((ypad - ky) / is);
        if (oy >= oh) continue;
        for (int kx = xpad % is; kx < ik && kx <= xpad; kx += is) {
            const u32 ox = (u32)((xpad - kx) / is);
            if (ox >= ow) continue;
            const u32 row = (n * oh + oy) * ow + ox;
            s += dcols[row * width + ((u32)ky * k + (u32)kx) * c + ch];
        }
    }
    dx[i] = s;
}

// y[n, oy, ox, ch] = max or mean of the k x k window at (oy k, ox k), stride k (a partial last
// window is dropped). The window is read in row-major order; the max starts from its first element.
extern "C" __global__ void pool(const float* x, float* y, u32 h, u32 w, u32 c, u32 k, u32 oh, u32 ow, u32 max_pool,
                                u32 len) {
    u32 i;
    if (out_of_range(&i, len)) return;
    const u32 ch = i % c;
    const u32 ox = (i / c) % ow;
    const u32 oy = (i / (c * ow)) % oh;
    const u32 n = i / (c * ow * oh);
    const float* win = x + ((n * h + oy * k) * w + ox * k) * c + ch;
    const float first = win[0];
    float best = first;
    float sum = first;
    for (u32 ty = 0; ty < k; ++ty) {
        for (u32 tx = (ty == 0u ? 1u : 0u); tx < k; ++tx) {
            const float v = win[(ty * w + tx) * c];
            best = fmaxf(best, v);
            sum += v;
        }
    }
    y[i] = max_pool != 0u ? best : sum / (float)(k * k);
}

// dx from the forward input x and the output gradient dy: the first maximum of each window
// (row-major) takes the window's gradient; average pooling spreads it evenly (dy / k^2). Elements
// outside every window (the dropped partial windows) get 0.
extern "C" __global__ void pool_backward(const float* x, const float* dy, float* dx, u32 h, u32 w, u32 c, u32 k,
                                         u32 oh, u32 ow, u32 max_pool, u32 len) {
    u32 i;
    if (out_of_range(&i, len)) return;
    const u32 ch = i % c;
    const u32 px = (i / c) % w;
    const u32 py = (i / (c * w)) % h;
    const u32 n = i / (c * w * h);
    const u32 oy = py / k;
    const u32 ox = px / k;
    float g = 0.f;
    if (oy < oh && ox < ow) {
        const float d = dy[((n * oh + oy) * ow + ox) * c + ch];
        if (max_pool == 0u) {
            g = d / (float)(k * k);
        } else {
            const float* win = x + ((n * h + oy * k) * w + ox * k) * c + ch;
            // The first t (row-major) whose value exceeds every earlier one: a strict > keeps the
            // first of equal maxima (and a NaN never takes over, nor loses its place at t = 0).
            u32 first = 0u, t = 0u;
            float best = win[0];
            for (u32 ty = 0; ty < k; ++ty) {
                for (u32 tx = 0; tx < k; ++tx, ++t) {
                    const float v = win[(ty * w + tx) * c];
                    if (v > best) {
                        best = v;
                        first = t;
                    }
                }
            }
            const u32 mine = (py - oy * k) * k + (px - ox * k);
            g = mine == first ? d : 0.f;
        }
    }
    dx[i] = g;
}

// y[bt, j, i] = x[bt, i, j] for a batch of [rows, cols] matrices; one thread per element of y.
extern "C" __global__ void transpose(const float* x, float* y, u32 rows, u32 cols, u32 len) {
    u32 o;
    if (out_of_range(&o, len)) return;
    const u32 i = o % rows;
    const u32 j = (o / rows) % cols;
    const u32 bt = o / (rows * cols);
    y[o] = x[(bt * rows + i) * cols + j];
}
