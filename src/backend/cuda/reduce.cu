// The valid-row count and the reduction of per-row losses (docs/LOSSES.md sections 2-4).
//
// A row loss op runs as three launches on one stream, with no host read-back in between:
//   count_valid  -> count[0] = N_valid
//   <op>_warp / <op>_block  -> row_loss[r], gradients scaled by grad_scale * reduction_factor(count)
//   reduce_rows  -> loss[0] = sum_r row_loss[r] * (1/N_valid for batchmean, 0 if N_valid = 0; 1 else)
// Both kernels here run as ONE block (the host launches 1024 threads): the sums are in a fixed
// order (each thread a strided slice, then the block reduction), so the result is bit-identical
// run after run; no atomics.

// labels: [n] i32 or null (no labels: every row is valid). count: [1] u32.
extern "C" __global__ void count_valid(const int* labels, u32 n, int ignore_index, u32* count) {
    if (labels == 0) {
        if (threadIdx.x == 0) count[0] = n;
        return;  // the whole block (labels is the same for every thread)
    }
    u32 valid = 0;
    for (u64 i = threadIdx.x; i < n; i += blockDim.x) {
        valid += labels[i] != ignore_index ? 1u : 0u;
    }
    valid = block_allreduce(valid, SumOp<u32>());
    if (threadIdx.x == 0) count[0] = valid;
}

// row_loss: [n]; count: [1] from count_valid; reduction: 0 batchmean, 1 sum, 2 none; loss: [1].
// The sum is taken in f64.
extern "C" __global__ void reduce_rows(const float* row_loss, u32 n, const u32* count, u32 reduction, float* loss) {
    double acc = 0.0;
    for (u64 i = threadIdx.x; i < n; i += blockDim.x) {
        acc += (double)row_loss[i];
    }
    acc = block_allreduce(acc, SumOp<double>());
    if (threadIdx.x == 0) {
        if (reduction == 0u) {
            const u32 valid = count[0];
            // No valid row: the loss is 0 (PyTorch gives NaN; spec section 3).
            loss[0] = valid == 0u ? 0.f : (float)(acc / (double)valid);
        } else {
            loss[0] = (float)acc;
        }
    }
}
