/* The fused Hinton loss from C through the C ABI (include/distillation.h), on the CPU backend and,
 * when a CUDA device is present, a CUDA context.
 *
 *   cargo build --release
 *   cc examples/c_abi.c -I include -L target/release -ldistillation \
 *      -Wl,-rpath,$PWD/target/release -o c_abi && ./c_abi
 */
#include <stdio.h>

#include "distillation.h"

int main(void) {
    enum { N = 2, C = 3 };
    const float student[N * C] = {1.0f, 2.0f, 0.5f, -1.0f, 0.0f, 3.0f};
    const float teacher[N * C] = {2.0f, 1.0f, 0.0f, 0.0f, 0.5f, 2.5f};
    const int32_t labels[N] = {1, 2};
    float loss, grad[N * C];

    printf("distillation %s, ABI %u\n", dst_version_string(), dst_version());

    /* T = 4, alpha = 0.2, no label smoothing, ignore_index -100, batchmean, grad_scale 1. */
    if (dst_cpu_hinton(student, DST_F32, teacher, DST_F32, labels, N, C, 4.0f, 0.2f, 0.0f, -100, 0, 1.0f, &loss, NULL,
                       grad, DST_F32, NULL, DST_F32) != DST_OK) {
        fprintf(stderr, "error: %s\n", dst_last_error());
        return 1;
    }
    printf("loss %f, dL/ds[0] %f\n", loss, grad[0]);

    /* On a GPU the same call takes device pointers (e.g. from cudaMalloc or a framework's tensor):
     *   dst_cuda *ctx; dst_cuda_create(0, &ctx);
     *   dst_cuda_hinton(ctx, d_student, DST_F32, d_teacher, DST_F32, d_labels, N, C, 4.0f, 0.2f, 0.0f, -100, 0, 1.0f,
     *                   d_loss, NULL, d_grad, DST_F32, NULL, DST_F32);
     *   dst_cuda_synchronize(ctx); dst_cuda_destroy(ctx); */
    dst_cuda *ctx = NULL;
    if (dst_cuda_create(0, &ctx) != DST_OK) {
        printf("no CUDA context: %s\n", dst_last_error());
    } else {
        printf("CUDA context created\n");
        dst_cuda_destroy(ctx);
    }
    return 0;
}
