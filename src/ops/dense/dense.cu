// The dense-network ops of the autograd tape (CPU reference src/ops/dense/; the same math as
// dense.wgsl). One thread per output element, each summed in a fixed order, no atomics:
// results are bit-identical run after run.
//
// Launch (src/backend/cuda/):
// - matmul: blocks of 256 threads (a 16 x 16 tile of C each), ceil(m/16) * ceil(n/16) blocks in
//   row-major tile order (grid 2D past 2^31-1 blocks; blocks past the end return as a whole).
// - bias_add, relu, relu_backward, axpy: one thread per element, 256 threads per block.
// - sum_rows: one thread per column, 256 threads per block.
// Sizes: matmul operands and bias_add / sum_rows inputs hold fewer than 2^32 elements (checked on
// the host), so their indices are u32; relu, relu_backward and axpy take a u64 length.
// Elementwise outputs may alias their inputs (each element is read, then written, by one thread).

#define MM_TILE 16u

// C[m, n] (+)= op(A)[m, k] op(B)[k, n]: A stored [m, k], or [k, m] when trans_a; B stored [k, n],
// or [n, k] when trans_b. Each thread sums its C entry in f32 over q = 0, 1, ..., k-1, stepping
// over k in tiles of 16 staged in shared memory (out-of-range entries are 0), exactly as the WGSL
// kernel. The tiles are loaded so that consecutive threads read consecutive addresses for every
// layout (a transposed operand is loaded with the thread roles swapped; the +1 column of padding
// keeps those transposed shared-memory stores free of bank conflicts); what each thread then sums
// is the same whichever thread loaded it.
extern "C" __global__ void matmul(const float* a, const float* b, float* c, u32 m, u32 k, u32 n, u32 trans_a,
                                  u32 trans_b, u32 accumulate) {
    __shared__ float tile_a[MM_TILE][MM_TILE + 1];  // tile_a[i][q] = op(A)[row0 + i, q0 + q]
    __shared__ float tile_b[MM_TILE][MM_TILE + 1];  // tile_b[q][j] = op(B)[q0 + q, col0 + j]
    // Tile counts without overflow (m, k, n can be up to 2^32 - 1).
    const u32 tiles_m = m / MM_TILE + (m % MM_TILE != 0u ? 1u : 0u);
    const u32 tiles_n = n / MM_TILE + (n % MM_TILE != 0u ? 1u : 0u);
    const u32 tiles_k = k / MM_TILE + (k % MM_TILE != 0u ? 1u : 0u);
    const u64 tile = block_linear();
    if (tile >= (u64)tiles_m * (u64)tiles_n) return;  // the whole block (2D grid padding)
    const u32 row0 = (u32)(tile / tiles_n) * MM_TILE;  // < m
    const u32 col0 = (u32)(tile % tiles_n) * MM_TILE;  // < n
    const u32 tx = threadIdx.x % MM_TILE;
    const u32 ty = threadIdx.x / MM_TILE;
    // "row0 + i < m" written as "i < m - row0" (no overflow); likewise for columns and q.
    const u32 rows_left = m - row0;
    const u32 cols_left = n - col0;
    float acc = 0.f;
    for (u32 t = 0; t < tiles_k; ++t) {
        const u32 q0 = t * MM_TILE;  // < k
        const u32 q_left = k - q0;
        if (trans_a == 0u) {  // A [m, k]: thread (ty, tx) loads op(A)[row0 + ty, q0 + tx]
            tile_a[ty][tx] = (ty < rows_left && tx < q_left) ? a[(row0 + ty) * k + q0 + tx] : 0.f;
        } else {  // A [k, m]: thread (ty, tx) loads op(A)[row0 + tx, q0 + ty] = A[q0 + ty, row0 + tx]
            tile_a[tx][ty] = (tx < rows_left && ty < q_left) ? a[(q0 + ty) * m + row0 + tx] : 0.f;
        }
        if (trans_b == 0u) {  // B [k, n]: thread (ty, tx) loads op(B)[q0 + ty, col0 + tx]
            tile_b[ty][tx] = (ty < q_left && tx < cols_left) ? b[(q0 + ty) * n + col0 + tx] : 0.f;
        } else {  // B [n, k]: thread (ty, tx) loads op(B)[q0 + tx, col0 + ty] = B[col0 + ty, q0 + tx]
            tile_b[tx][ty] = (tx < q_left && ty < cols_left) ? b[(col0 + ty) * k + q0 + tx] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (u32 q = 0; q < MM_TILE; ++q) {
            acc = fmaf(tile_a[ty][q], tile_b[q][tx], acc);
        }
        __syncthreads();
    }
    if (ty < rows_left && tx < cols_left) {
        const u32 i = (row0 + ty) * n + col0 + tx;
        c[i] = accumulate != 0u ? c[i] + acc : acc;
    }
}

// y[i] = x[i] + bias[i % cols] over len = rows * cols elements.
extern "C" __global__ void bias_add(const float* x, const float* bias, float* y, u32 len, u32 cols) {
    const u64 i = block_linear() * blockDim.x + threadIdx.x;
    if (i >= len) return;
    const u32 e = (u32)i;
    y[e] = x[e] + bias[e % cols];
}

// out[j] (+)= sum_i x[i, j] over `rows` rows of `cols` columns: one thread per column, rows in
// order, f32 (consecutive threads read consecutive addresses of each row).
extern "C" __global__ void sum_rows(const float* x, float* out, u32 rows, u32 cols, u32 accumulate) {
    const u64 j = block_linear() * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float s = 0.f;
    const float* p = x + j;
    for (u32 i = 0; i < rows; ++i, p += cols) {
        s += *p;
    }
    out[j] = accumulate != 0u ? out[j] + s : s;
}

// y = max(x, 0) (NaN gives 0, as the references' `x > 0 ? x : 0`).
extern "C" __global__ void relu(const float* x, float* y, u64 len) {
    const u64 i = block_linear() * blockDim.x + threadIdx.x;
    if (i >= len) return;
    const float v = x[i];
    y[i] = v > 0.f ? v : 0.f;
}

// dx = dy where the forward output y > 0, else 0.
extern "C" __global__ void relu_backward(const float* y, const float* dy, float* dx, u64 len) {
    const u64 i = block_linear() * blockDim.x + threadIdx.x;
    if (i >= len) return;
    dx[i] = y[i] > 0.f ? dy[i] : 0.f;
}

// y += alpha x.
extern "C" __global__ void axpy(const float* x, float* y, u64 len, float alpha) {
    const u64 i = block_linear() * blockDim.x + threadIdx.x;
    if (i >= len) return;
    y[i] = y[i] + alpha * x[i];
}

// The strided block copy of CopySpec (src/ops/dense/mod.rs) between buffers of any dtypes:
// dst[dst_offset + r dst_stride + c] = src[src_offset + r src_stride + c], r < rows, c < cols,
// converted exactly to f32 and rounded once into a 16-bit destination (RowIn / RowOut). One thread
// per copied element (16-bit stores are whole, so threads never share a stored unit).
extern "C" __global__ void copy_rows(const void* src, void* dst, u32 rows, u32 cols, u32 src_offset,
                                     u32 src_stride, u32 dst_offset, u32 dst_stride, u32 src_dtype,
                                     u32 dst_dtype) {
    const u64 i = block_linear() * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * (u64)cols) return;
    const u64 r = i / cols;
    const u64 c = i % cols;
    const RowIn in = row_in(src, src_dtype);
    const RowOut out(dst, dst_dtype);
    out[dst_offset + r * dst_stride + c] = in[src_offset + r * src_stride + c];
}
