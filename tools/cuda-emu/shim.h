// A CPU stand-in for the bits of CUDA the kernels use, so that src/ops/*/*.cu run unchanged (on the
// host, one std::thread per CUDA thread) on a machine without a GPU. Blocks run one at a time;
// __syncthreads is a barrier of the block's threads, warp shuffles are barriers of the warp's 32
// threads. A shuffle with a lane that already returned aborts: that is a bug on a GPU too.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}

struct BlockCtx {
    unsigned threads;
    std::barrier<> block_bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    std::vector<int> slots, flags;
    std::vector<std::atomic<int>> exited;  // per warp
    explicit BlockCtx(unsigned n)
        : threads(n), block_bar(n), slots(n), flags(n), exited(n / 32) {
        for (unsigned w = 0; w < n / 32; ++w) warp_bars.emplace_back(new std::barrier<>(32));
        for (auto& e : exited) e = 0;
    }
};
inline BlockCtx* g_block = nullptr;

inline void check_warp_complete(unsigned w) {
    if (g_block->exited[w].load() != 0) {
        fprintf(stderr, "BUG: warp %u shuffles with lanes that have returned\n", w);
        abort();
    }
}

inline int __shfl_xor_sync(unsigned mask, int v, int o) {
    if (mask != 0xffffffffu) abort();
    const unsigned t = threadIdx.x, w = t / 32, lane = t % 32;
    check_warp_complete(w);
    g_block->slots[t] = v;
    g_block->warp_bars[w]->arrive_and_wait();
    const int r = g_block->slots[w * 32 + (lane ^ (unsigned)o)];
    g_block->warp_bars[w]->arrive_and_wait();
    return r;
}

inline int __any_sync(unsigned mask, int p) {
    if (mask != 0xffffffffu) abort();
    const unsigned t = threadIdx.x, w = t / 32;
    check_warp_complete(w);
    g_block->flags[t] = p != 0;
    g_block->warp_bars[w]->arrive_and_wait();
    int any = 0;
    for (unsigned l = 0; l < 32; ++l) any |= g_block->flags[w * 32 + l];
    g_block->warp_bars[w]->arrive_and_wait();
    return any;
}

inline void __syncthreads() { g_block->block_bar.arrive_and_wait(); }

inline int __syncthreads_or(int p) {
    const unsigned t = threadIdx.x;
    g_block->flags[t] = p != 0;
    g_block->block_bar.arrive_and_wait();
    int any = 0;
    for (unsigned i = 0; i < g_block->threads; ++i) any |= g_block->flags[i];
    g_block->block_bar.arrive_and_wait();
    return any;
}

template <class F>
void emu_launch(dim3 grid, dim3 block, F kernel) {
    if (block.x % 32 != 0 || block.x > 1024 || block.y != 1) {
        fprintf(stderr, "bad block %u\n", block.x);
        abort();
    }
    gridDim = grid;
    blockDim = block;
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            BlockCtx ctx(block.x);
            g_block = &ctx;
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < block.x; ++t) {
                ts.emplace_back([&, t] {
                    threadIdx = dim3{t, 0, 0};
                    blockIdx = dim3{bx, by, 0};
                    kernel();
                    // A returned thread no longer takes part in barriers (as on sm_70+).
                    ctx.flags[t] = 0;
                    ctx.exited[t / 32]++;
                    ctx.warp_bars[t / 32]->arrive_and_drop();
                    ctx.block_bar.arrive_and_drop();
                });
            }
            for (auto& th : ts) th.join();
            g_block = nullptr;
        }
    }
}
