// Primitives of the relation-based losses (docs/LOSSES.md section 7; CPU reference
// src/ops/relational/; the same math as relational.wgsl). Every output element is
// written by one thread and summed in a fixed order (a fixed launch per shape; no atomics), so
// results are bit-identical run after run. Smooth L1 is `mse_partial` in mode 1 (feature.cu).
//
// Launch (src/backend/cuda/):
// - row_normalize, row_normalize_backward: a warp per row, 8 rows per block of 256 threads (each
//   lane sums a strided part of the row, then a butterfly over the warp); grid 2D past 2^31-1.
// - pairwise_distance: a block of 256 threads per 16 x 16 tile of D, ceil(n/16)^2 blocks in
//   row-major tile order (as matmul in dense.cu); each thread sums its entry over k in order.
// - pairwise_distance_backward: one thread per element of dF [n, dim] (consecutive threads take
//   consecutive k: coalesced reads of f), 256 threads per block, summing over j in order.
// - offdiag_normalize, offdiag_normalize_backward: ONE block of 1024 threads (f64 sums, fixed order).
// Sizes: every buffer holds fewer than 2^32 elements (checked on the host), so indices are u32.
// Outputs may alias their inputs (each element is read, then written, by the thread that writes
// it; the one-block kernels read everything they sum before anyone writes).

#define REL_NORM_EPS 1e-12f
#define REL_DIST_EPS 1e-12f
#define PD_TILE 16u

// x, y: [rows, cols]; y = x / max(||x_row||, 1e-12) (a NaN norm gives the floor, as Rust's max).
extern "C" __global__ void row_normalize(const float* x, float* y, u32 rows, u32 cols) {
    const u64 r = warp_row();
    if (r >= rows) return;  // the whole warp: no block-wide barrier here
    const u32 lane = threadIdx.x & 31u;
    const float* xr = x + r * (u64)cols;
    float* yr = y + r * (u64)cols;
    float s = 0.f;
    for (u32 j = lane; j < cols; j += 32u) s = fmaf(xr[j], xr[j], s);
    s = warp_allreduce(s, SumOp<float>());
    const float nrm = fmaxf(sqrtf(s), REL_NORM_EPS);
    for (u32 j = lane; j < cols; j += 32u) yr[j] = xr[j] / nrm;
}

// From x and dy ([rows, cols]): dx = (dy - y (y . dy)) / ||x|| with y = x / ||x||, or dy / 1e-12
// where the norm is not above the floor (a NaN norm included, as in the reference).
extern "C" __global__ void row_normalize_backward(const float* x, const float* dy, float* dx, u32 rows, u32 cols) {
    const u64 r = warp_row();
    if (r >= rows) return;
    const u32 lane = threadIdx.x & 31u;
    const u64 base = r * (u64)cols;
    FArr<2> acc;  // sum x^2, sum x dy
    acc.v[0] = 0.f;
    acc.v[1] = 0.f;
    for (u32 j = lane; j < cols; j += 32u) {
        const float v = x[base + j];
        acc.v[0] = fmaf(v, v, acc.v[0]);
        acc.v[1] = fmaf(v, dy[base + j], acc.v[1]);
    }
    acc = warp_allreduce(acc, SumFArr<2>());
    const float nrm = sqrtf(acc.v[0]);
    if (nrm > REL_NORM_EPS) {
        const float dot = acc.v[1] / nrm;  // y . dy
        for (u32 j = lane; j < cols; j += 32u) {
            const u64 i = base + j;
            dx[i] = (dy[i] - x[i] / nrm * dot) / nrm;
        }
    } else {
        for (u32 j = lane; j < cols; j += 32u) dx[base + j] = dy[base + j] / REL_NORM_EPS;
    }
}

// f: [n, dim]; d: [n, n], D[i, j] = sqrt(max(||f_i - f_j||^2, 1e-12)) for i != j, 0 on the diagonal.
// Thread (ty, tx) of tile (ti, tj) owns D[16 ti + ty, 16 tj + tx]; the rows of both tiles are staged
// 16 features at a time in shared memory (zeros past the edges, which add nothing).
extern "C" __global__ void pairwise_distance(const float* f, float* d, u32 n, u32 dim) {
    __shared__ float rows_i[PD_TILE][PD_TILE + 1];  // rows_i[r][q] = f[row0 + r, q0 + q]
    __shared__ float rows_j[PD_TILE][PD_TILE + 1];  // rows_j[r][q] = f[col0 + r, q0 + q]
    const u32 tiles = n / PD_TILE + (n % PD_TILE != 0u ? 1u : 0u);
    const u64 tile = block_linear();
    if (tile >= (u64)tiles * (u64)tiles) return;  // the whole block (2D grid padding)
    const u32 row0 = (u32)(tile / tiles) * PD_TILE;
    const u32 col0 = (u32)(tile % tiles) * PD_TILE;
    const u32 tx = threadIdx.x % PD_TILE;
    const u32 ty = threadIdx.x / PD_TILE;
    const u32 rows_left = n - row0;
    const u32 cols_left = n - col0;
    float s = 0.f;
    for (u32 q0 = 0; q0 < dim; q0 += PD_TILE) {
        const u32 q_left = dim - q0;
        // Thread (ty, tx) loads feature q0 + tx of row ty of each tile: consecutive threads read
        // consecutive addresses.
        rows_i[ty][tx] = (ty < rows_left && tx < q_left) ? f[(row0 + ty) * dim + q0 + tx] : 0.f;
        rows_j[ty][tx] = (ty < cols_left && tx < q_left) ? f[(col0 + ty) * dim + q0 + tx] : 0.f;
        __syncthreads();
#pragma unroll
        for (u32 q = 0; q < PD_TILE; ++q) {
            const float diff = rows_i[ty][q] - rows_j[tx][q];
            s = fmaf(diff, diff, s);
        }
        __syncthreads();
        if (q_left <= PD_TILE) break;  // q0 + 16 would pass dim (and could wrap around)
    }
    if (ty < rows_left && tx < cols_left) {
        const u32 i = row0 + ty;
        const u32 j = col0 + tx;
        d[i * n + j] = i == j ? 0.f : sqrtf(fmaxf(s, REL_DIST_EPS));
    }
}

// From f [n, dim], D and dD [n, n]: dF[i, k] = sum_{j != i} (dD_ij + dD_ji) (f_ik - f_jk) / D_ij over
// j in order, skipping floored distances (D_ij^2 <= 1e-12). One thread per element of dF.
extern "C" __global__ void pairwise_distance_backward(const float* f, const float* d, const float* dd, float* df,
                                                      u32 n, u32 dim) {
    const u64 t = block_linear() * blockDim.x + threadIdx.x;
    if (t >= (u64)n * dim) return;
    const u32 o = (u32)t;
    const u32 i = o / dim;
    const u32 k = o - i * dim;
    const float fi = f[o];
    float g = 0.f;
    for (u32 j = 0; j < n; ++j) {
        const float dij = d[i * n + j];
        if (j == i || dij * dij <= REL_DIST_EPS) continue;
        g += (dd[i * n + j] + dd[j * n + i]) * (fi - f[j * dim + k]) / dij;
    }
    df[o] = g;
}

// The off-diagonal sum of D [n, n] and (with_dot) the full dot product dy . D, in f64, over the one
// block in a fixed order.
__device__ __forceinline__ DArr<2> offdiag_sums(const float* d, const float* dy, u32 n) {
    DArr<2> acc;
    acc.v[0] = 0.0;
    acc.v[1] = 0.0;
    const u32 total = n * n;
    for (u32 o = threadIdx.x; o < total; o += blockDim.x) {
        const double v = d[o];
        if (o / n != o % n) acc.v[0] += v;
        if (dy != 0) acc.v[1] += v * (double)dy[o];
    }
    return block_allreduce(acc, SumDArr<2>());
}

// y = D / m, m the mean of the n (n - 1) off-diagonal entries of D [n, n] (n >= 2). ONE block.
extern "C" __global__ void offdiag_normalize(const float* d, float* y, u32 n) {
    const DArr<2> sums = offdiag_sums(d, 0, n);
    const float m = (float)(sums.v[0] / ((double)n * (double)(n - 1u)));
    const u32 total = n * n;
    for (u32 o = threadIdx.x; o < total; o += blockDim.x) y[o] = d[o] / m;
}

// From D and dy [n, n]: dD = dy / m - [off-diagonal] (dy . D) / (m^2 n (n - 1)). ONE block.
extern "C" __global__ void offdiag_normalize_backward(const float* d, const float* dy, float* dd, u32 n) {
    const DArr<2> sums = offdiag_sums(d, dy, n);
    const double cnt = (double)n * (double)(n - 1u);
    const double m = sums.v[0] / cnt;
    const float mf = (float)m;
    const float corr = (float)(sums.v[1] / (m * m * cnt));
    const u32 total = n * n;
    for (u32 o = threadIdx.x; o < total; o += blockDim.x) {
        dd[o] = dy[o] / mf - (o / n != o % n ? corr : 0.f);
    }
}
