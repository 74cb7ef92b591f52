/* Exercises the C ABI of include/distillation.h on the CPU backend (and the CUDA entry points'
 * argument checks), printing every result for tests/suite/capi.rs to compare with the Rust API.
 *
 * Output: one line per array, `name v0 v1 ...` (%.9g round-trips f32), `version <abi> <string>`,
 * `codes <code>=<name> ...`, `error <case> <code> <name> <message>` per expected error, and
 * `cuda available` when a device is present. Exits non-zero (after `FAIL ...` on stderr) when a status is not the one
 * expected. Inputs are exact in f32: x[i] = ((i * 37 + 11) % 101) / 10 - 5, the formula the Rust
 * test uses. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distillation.h"

#define N 4
#define C 5
#define LEN (N * C)

static int failures = 0;

static void fill(float *x, size_t len, int seed) {
    for (size_t i = 0; i < len; i++) {
        x[i] = (float)((i * 37 + 11 + (size_t)seed) % 101) / 10.0f - 5.0f;
    }
}

static void print_array(const char *name, const float *x, size_t len) {
    printf("%s", name);
    for (size_t i = 0; i < len; i++) printf(" %.9g", x[i]);
    printf("\n");
}

/* Fails unless |got - want| <= 1e-4 * max(1, |want|) elementwise. */
static void expect_close(const char *what, const float *got, const float *want, size_t len) {
    for (size_t i = 0; i < len; i++) {
        float tol = 1e-4f * fmaxf(1.0f, fabsf(want[i]));
        if (!(fabsf(got[i] - want[i]) <= tol)) {
            fprintf(stderr, "FAIL %s[%zu]: %.9g, the reference gives %.9g\n", what, i, got[i],
                    want[i]);
            failures++;
            return;
        }
    }
}

/* f32 -> bfloat16 / IEEE half bits, rounded to nearest even (finite, normal inputs: these tests'). */
static uint16_t to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}
static float from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31u, m = h & 1023u, u;
    if (e == 0) { /* subnormal or zero */
        float v = ldexpf((float)m, -24);
        return sign ? -v : v;
    }
    u = sign | ((e + 112u) << 23) | (m << 13);
    float x;
    memcpy(&x, &u, 4);
    return x;
}
static uint16_t to_f16(float x) { /* |x| in the normal range of f16 */
    uint32_t u;
    memcpy(&u, &x, 4);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    return (uint16_t)(sign | (((a + 0xfffu + ((a >> 13) & 1u)) >> 13) - (112u << 10)));
}

/* Fails unless each half-precision gradient element is one of the two values of its dtype that
 * bracket the f32 gradient of the same (rounded) inputs, within a relative 2^-7 (bf16) or 2^-10
 * (f16) of it, or within 1e-6 absolutely near 0. */
static void expect_half_close(const char *what, const uint16_t *got, int bf16, const float *want, size_t len) {
    float rel = bf16 ? 1.0f / 128.0f : 1.0f / 1024.0f;
    for (size_t i = 0; i < len; i++) {
        float g = bf16 ? from_bf16(got[i]) : from_f16(got[i]);
        if (!(fabsf(g - want[i]) <= rel * fabsf(want[i]) + 1e-6f)) {
            fprintf(stderr, "FAIL %s[%zu]: %.9g, the f32 gradient is %.9g\n", what, i, g, want[i]);
            failures++;
            return;
        }
    }
}

/* The name of a status code. A switch: two codes with the same value do not compile. */
static const char *status_name(int32_t status) {
    switch (status) {
    case DST_OK: return "ok";
    case DST_ERR_NULL_POINTER: return "null_pointer";
    case DST_ERR_INVALID_ARGUMENT: return "invalid_argument";
    case DST_ERR_SHAPE: return "shape";
    case DST_ERR_LABEL: return "label";
    case DST_ERR_ALIAS: return "alias";
    case DST_ERR_UNAVAILABLE: return "unavailable";
    case DST_ERR_DEVICE: return "device";
    case DST_ERR_PANIC: return "panic";
    case DST_ERR_UNSUPPORTED: return "unsupported";
    case DST_ERR_LIMIT: return "limit";
    case DST_ERR_INPUT: return "input";
    case DST_ERR_IO: return "io";
    case DST_ERR_CONFIG: return "config";
    default: return "unknown";
    }
}

static void expect_ok(const char *what, int32_t status) {
    if (status != DST_OK) {
        fprintf(stderr, "FAIL %s: status %d (%s)\n", what, status, dst_last_error());
        failures++;
    } else if (strcmp(dst_last_error(), "") != 0) {
        fprintf(stderr, "FAIL %s: success left a message: %s\n", what, dst_last_error());
        failures++;
    }
}

static void expect_err(const char *what, int32_t status, int32_t expected) {
    const char *msg = dst_last_error();
    if (status != expected) {
        fprintf(stderr, "FAIL %s: status %d, expected %d (%s)\n", what, status, expected, msg);
        failures++;
    } else if (msg == NULL || msg[0] == '\0') {
        fprintf(stderr, "FAIL %s: status %d without a message\n", what, status);
        failures++;
    } else {
        printf("error %s %d %s %s\n", what, status, status_name(status), msg);
    }
}

int main(void) {
    float s[LEN], t[LEN], g[LEN], gt[LEN], inplace[LEN], rows[N], loss;
    int32_t labels[N] = {1, -100, 4, 0};
    fill(s, LEN, 0);
    fill(t, LEN, 5);

    printf("version %u %s\n", dst_version(), dst_version_string());
    if (dst_version() != DST_ABI_VERSION) {
        fprintf(stderr, "FAIL dst_version %u != DST_ABI_VERSION %d\n", dst_version(), DST_ABI_VERSION);
        failures++;
    }

    /* Every status code, distinct (status_name's switch) and named: tests/suite/capi.rs compares them
     * with the Rust constants. DST_ERR_IO and DST_ERR_CONFIG (ABI 4) come from file and
     * configuration errors, which no loss entry point produces. */
    printf("codes");
    for (int32_t code = DST_OK; code <= DST_ERR_CONFIG; code++) {
        printf(" %d=%s", code, status_name(code));
    }
    printf("\n");

    /* Hinton: T = 2, alpha = 0.3, label smoothing 0.1, batchmean, teacher gradient. */
    expect_ok("hinton", dst_cpu_hinton(s, DST_F32, t, DST_F32, labels, N, C, 2.0f, 0.3f, 0.1f, -100, 0, 1.0f, &loss,
                                       rows, g, DST_F32, gt, DST_F32));
    print_array("hinton.loss", &loss, 1);
    print_array("hinton.row_loss", rows, N);
    print_array("hinton.grad_student", g, LEN);
    print_array("hinton.grad_teacher", gt, LEN);

    /* The same with the gradient written over the student logits. */
    memcpy(inplace, s, sizeof s);
    expect_ok("hinton_inplace", dst_cpu_hinton(inplace, DST_F32, t, DST_F32, labels, N, C, 2.0f, 0.3f, 0.1f, -100, 0,
                                               1.0f, &loss, NULL, inplace, DST_F32, NULL, DST_F32));
    print_array("hinton_inplace.loss", &loss, 1);
    print_array("hinton_inplace.grad_student", inplace, LEN);

    /* JSD(beta = 0.4), teacher logits, T = 3, labels masking row 1, sum, grad_scale 0.5. */
    expect_ok("jsd", dst_cpu_divergence(s, DST_F32, t, DST_F32, labels, N, C, 2, 0.4f, 0.0f, 0, 3.0f, -100, 1, 0.5f,
                                        &loss, rows, g, DST_F32, gt, DST_F32));
    print_array("jsd.loss", &loss, 1);
    print_array("jsd.row_loss", rows, N);
    print_array("jsd.grad_student", g, LEN);
    print_array("jsd.grad_teacher", gt, LEN);

    /* Reverse KL against teacher probabilities, no labels, batchmean. */
    {
        float p[LEN];
        const float row[C] = {0.1f, 0.2f, 0.3f, 0.25f, 0.15f};
        for (int i = 0; i < LEN; i++) p[i] = row[i % C];
        expect_ok("rkl_probs", dst_cpu_divergence(s, DST_F32, p, DST_F32, NULL, N, C, 1, 0.0f, 0.0f, 1, 1.5f, -100, 0,
                                                  1.0f, &loss, NULL, g, DST_F32, NULL, DST_F32));
        print_array("rkl_probs.loss", &loss, 1);
        print_array("rkl_probs.grad_student", g, LEN);
    }

    /* Cross-entropy, label smoothing 0.1, ignore_index -1, no reduction. */
    {
        int32_t ce_labels[N] = {2, -1, 0, 3};
        expect_ok("ce", dst_cpu_cross_entropy(s, DST_F32, ce_labels, N, C, 0.1f, -1, 2, 1.0f, &loss, rows, g, DST_F32));
        print_array("ce.loss", &loss, 1);
        print_array("ce.row_loss", rows, N);
        print_array("ce.grad_student", g, LEN);
    }

    /* The fast CPU backend (dst_fast_*, no copies) against the reference, within 1e-4, for 1
     * and 3 threads (and the same bits for both); a negative thread count is an error. */
    {
        float ref_loss, ref_g[LEN], ref_gt[LEN], fast_g[LEN], fast_gt[LEN], fast1_g[LEN];
        expect_ok("ref_hinton", dst_cpu_hinton(s, DST_F32, t, DST_F32, labels, N, C, 2.0f, 0.3f, 0.1f, -100, 0, 1.0f,
                                               &ref_loss, NULL, ref_g, DST_F32, ref_gt, DST_F32));
        for (int threads = 1; threads <= 3; threads += 2) {
            float *dst = threads == 1 ? fast1_g : fast_g;
            expect_ok("fast_hinton", dst_fast_hinton(threads, s, DST_F32, t, DST_F32, labels, N, C, 2.0f, 0.3f, 0.1f,
                                                     -100, 0, 1.0f, &loss, NULL, dst, DST_F32, fast_gt, DST_F32));
            expect_close("fast_hinton.loss", &loss, &ref_loss, 1);
            expect_close("fast_hinton.grad_student", dst, ref_g, LEN);
            expect_close("fast_hinton.grad_teacher", fast_gt, ref_gt, LEN);
        }
        if (memcmp(fast_g, fast1_g, sizeof fast_g) != 0) {
            fprintf(stderr, "FAIL fast_hinton: 1 and 3 threads give different bits\n");
            failures++;
        }
        expect_ok("ref_jsd", dst_cpu_divergence(s, DST_F32, t, DST_F32, labels, N, C, 2, 0.4f, 0.0f, 0, 3.0f, -100, 1,
                                                0.5f, &ref_loss, NULL, ref_g, DST_F32, ref_gt, DST_F32));
        expect_ok("fast_jsd", dst_fast_divergence(0, s, DST_F32, t, DST_F32, labels, N, C, 2, 0.4f, 0.0f, 0, 3.0f,
                                                  -100, 1, 0.5f, &loss, NULL, fast_g, DST_F32, fast_gt, DST_F32));
        expect_close("fast_jsd.loss", &loss, &ref_loss, 1);
        expect_close("fast_jsd.grad_student", fast_g, ref_g, LEN);
        expect_close("fast_jsd.grad_teacher", fast_gt, ref_gt, LEN);
        int32_t ce_labels[N] = {2, -1, 0, 3};
        expect_ok("ref_ce", dst_cpu_cross_entropy(s, DST_F32, ce_labels, N, C, 0.1f, -1, 0, 1.0f, &ref_loss,
                                                  NULL, ref_g, DST_F32));
        memcpy(fast_g, s, sizeof fast_g);
        expect_ok("fast_ce_inplace", dst_fast_cross_entropy(2, fast_g, DST_F32, ce_labels, N, C, 0.1f, -1,
                                                            0, 1.0f, &loss, NULL, fast_g, DST_F32));
        expect_close("fast_ce.loss", &loss, &ref_loss, 1);
        expect_close("fast_ce.grad_student", fast_g, ref_g, LEN);
        expect_ok("ref_mse", dst_cpu_mse(s, t, LEN, 2.0f, &ref_loss, ref_g, ref_gt));
        expect_ok("fast_mse", dst_fast_mse(0, s, t, LEN, 2.0f, &loss, fast_g, fast_gt));
        expect_close("fast_mse.loss", &loss, &ref_loss, 1);
        expect_close("fast_mse.grad_a", fast_g, ref_g, LEN);
        expect_close("fast_mse.grad_b", fast_gt, ref_gt, LEN);
        expect_err("fast_threads", dst_fast_hinton(-1, s, DST_F32, t, DST_F32, labels, N, C, 2.0f, 0.3f, 0.0f, -100, 0,
                                                   1.0f, &loss, NULL, g, DST_F32, NULL, DST_F32),
                   DST_ERR_INVALID_ARGUMENT);
        expect_err("fast_label", dst_fast_cross_entropy(0, s, DST_F32, ce_labels, N, C, 0.0f, -100, 0, 1.0f,
                                                        &loss, NULL, g, DST_F32),
                   DST_ERR_LABEL);
        expect_err("fast_alias", dst_fast_hinton(0, s, DST_F32, t, DST_F32, labels, N, C, 2.0f, 0.3f, 0.0f, -100, 0,
                                                 1.0f, &loss, NULL, g, DST_F32, g, DST_F32),
                   DST_ERR_ALIAS);
    }

    /* DKD: T = 4, ce_weight 1, TCKD 1, NCKD 8 (the paper's), label smoothing 0.1, batchmean,
     * grad_scale 0.5; in place; the fast backend within 1e-4 on 1 and 3 threads (same bits). */
    {
        float ref_g[LEN], fast_g[LEN], fast1_g[LEN], ref_loss;
        expect_ok("dkd", dst_cpu_dkd(s, DST_F32, t, DST_F32, labels, N, C, 4.0f, 1.0f, 1.0f, 8.0f, 0.1f, -100, 0, 0.5f,
                                     &loss, rows, g, DST_F32));
        print_array("dkd.loss", &loss, 1);
        print_array("dkd.row_loss", rows, N);
        print_array("dkd.grad_student", g, LEN);
        memcpy(inplace, s, sizeof s);
        expect_ok("dkd_inplace", dst_cpu_dkd(inplace, DST_F32, t, DST_F32, labels, N, C, 4.0f, 1.0f, 1.0f, 8.0f, 0.1f,
                                             -100, 0, 0.5f, &loss, NULL, inplace, DST_F32));
        print_array("dkd_inplace.grad_student", inplace, LEN);
        ref_loss = loss;
        memcpy(ref_g, inplace, sizeof ref_g);
        for (int threads = 1; threads <= 3; threads += 2) {
            float *dst = threads == 1 ? fast1_g : fast_g;
            expect_ok("fast_dkd", dst_fast_dkd(threads, s, DST_F32, t, DST_F32, labels, N, C, 4.0f, 1.0f, 1.0f, 8.0f,
                                               0.1f, -100, 0, 0.5f, &loss, NULL, dst, DST_F32));
            expect_close("fast_dkd.loss", &loss, &ref_loss, 1);
            expect_close("fast_dkd.grad_student", dst, ref_g, LEN);
        }
        if (memcmp(fast_g, fast1_g, sizeof fast_g) != 0) {
            fprintf(stderr, "FAIL fast_dkd: 1 and 3 threads give different bits\n");
            failures++;
        }
        int32_t bad[N] = {1, 5, 0, 0};
        expect_err("label_dkd", dst_cpu_dkd(s, DST_F32, t, DST_F32, bad, N, C, 4.0f, 1.0f, 1.0f, 8.0f, 0.0f, -100, 0,
                                            1.0f, &loss, NULL, g, DST_F32), DST_ERR_LABEL);
        expect_err("dkd_one_class", dst_cpu_dkd(s, DST_F32, t, DST_F32, labels, N, 1, 4.0f, 1.0f, 1.0f, 8.0f, 0.0f,
                                                -100, 0, 1.0f, &loss, NULL, NULL, DST_F32),
                   DST_ERR_INVALID_ARGUMENT);
        expect_err("dkd_weight", dst_fast_dkd(0, s, DST_F32, t, DST_F32, labels, N, C, 4.0f, 1.0f, -1.0f, 8.0f, 0.0f,
                                              -100, 0, 1.0f, &loss, NULL, g, DST_F32),
                   DST_ERR_INVALID_ARGUMENT);
        expect_err("dkd_alias", dst_cpu_dkd(s, DST_F32, t, DST_F32, labels, N, C, 4.0f, 1.0f, 1.0f, 8.0f, 0.0f, -100, 0,
                                            1.0f, &loss, NULL, t, DST_F32), DST_ERR_ALIAS);
        expect_err("cuda_dkd_null_ctx", dst_cuda_dkd(NULL, s, DST_F32, t, DST_F32, labels, N, C, 4.0f, 1.0f, 1.0f, 8.0f,
                                                     0.0f, -100, 0, 1.0f, &loss, NULL, g, DST_F32),
                   DST_ERR_NULL_POINTER);
    }

    /* A sparse top-k teacher: per row the two largest log-probabilities of t (log-softmax,
     * computed here), forward KL against the bucket tail, alpha 0.3 with labels, T = 2,
     * grad_scale 0.5; the fast backend within 1e-4 on 1 and 3 threads (same bits); bf16 values
     * through the fast backend within the bf16 rounding; the errors of bad input. */
    {
        enum { K = 2 };
        int32_t idx[N * K], dup[N * K];
        float lq[N * K], idx_f[N * K], ref_g[LEN], fast_g[LEN], fast1_g[LEN], ref_loss;
        uint16_t lq16[N * K];
        for (int r = 0; r < N; r++) {
            const float *row = t + r * C;
            int a = 0, b = -1;
            double z = 0.0;
            for (int j = 1; j < C; j++) a = row[j] > row[a] ? j : a;
            for (int j = 0; j < C; j++) {
                if (j != a && (b < 0 || row[j] > row[b])) b = j;
                z += exp((double)row[j] - row[a]);
            }
            idx[r * K] = a;
            idx[r * K + 1] = b;
            lq[r * K] = (float)(-log(z));
            lq[r * K + 1] = (float)((double)row[b] - row[a] - log(z));
        }
        for (int i = 0; i < N * K; i++) {
            idx_f[i] = (float)idx[i];
            lq16[i] = to_bf16(lq[i]);
            dup[i] = idx[i];
        }
        print_array("sparse.indices", idx_f, N * K);
        print_array("sparse.values", lq, N * K);
        expect_ok("sparse", dst_cpu_sparse_kd(s, DST_F32, idx, lq, DST_F32, labels, N, C, K, 0, 0.0f, 0, 1, 2.0f,
                                              0.3f, 0.0f, -100, 0, 0.5f, &loss, rows, g, DST_F32));
        print_array("sparse.loss", &loss, 1);
        print_array("sparse.row_loss", rows, N);
        print_array("sparse.grad_student", g, LEN);
        ref_loss = loss;
        memcpy(ref_g, g, sizeof ref_g);
        for (int threads = 1; threads <= 3; threads += 2) {
            float *dst = threads == 1 ? fast1_g : fast_g;
            expect_ok("fast_sparse", dst_fast_sparse_kd(threads, s, DST_F32, idx, lq, DST_F32, labels, N, C, K, 0,
                                                        0.0f, 0, 1, 2.0f, 0.3f, 0.0f, -100, 0, 0.5f, &loss, NULL,
                                                        dst, DST_F32));
            expect_close("fast_sparse.loss", &loss, &ref_loss, 1);
            expect_close("fast_sparse.grad_student", dst, ref_g, LEN);
        }
        if (memcmp(fast_g, fast1_g, sizeof fast_g) != 0) {
            fprintf(stderr, "FAIL fast_sparse: 1 and 3 threads give different bits\n");
            failures++;
        }
        /* bf16 values against f32 ones rounded the same way. */
        for (int i = 0; i < N * K; i++) lq[i] = from_bf16(lq16[i]);
        expect_ok("sparse_bf16_ref", dst_cpu_sparse_kd(s, DST_F32, idx, lq, DST_F32, labels, N, C, K, 0, 0.0f, 0, 1,
                                                       2.0f, 0.3f, 0.0f, -100, 0, 0.5f, &ref_loss, NULL, ref_g,
                                                       DST_F32));
        expect_ok("sparse_bf16", dst_fast_sparse_kd(0, s, DST_F32, idx, lq16, DST_BF16, labels, N, C, K, 0, 0.0f, 0,
                                                    1, 2.0f, 0.3f, 0.0f, -100, 0, 0.5f, &loss, NULL, g, DST_F32));
        expect_close("sparse_bf16.loss", &loss, &ref_loss, 1);
        expect_close("sparse_bf16.grad_student", g, ref_g, LEN);
        dup[1] = dup[0];
        expect_err("sparse_duplicate", dst_cpu_sparse_kd(s, DST_F32, dup, lq, DST_F32, labels, N, C, K, 0, 0.0f, 0,
                                                         1, 2.0f, 0.3f, 0.0f, -100, 0, 0.5f, &loss, NULL, g,
                                                         DST_F32),
                   DST_ERR_INPUT);
        dup[1] = C;
        expect_err("fast_sparse_range", dst_fast_sparse_kd(0, s, DST_F32, dup, lq, DST_F32, labels, N, C, K, 0, 0.0f,
                                                           0, 1, 2.0f, 0.3f, 0.0f, -100, 0, 0.5f, &loss, NULL, g,
                                                           DST_F32),
                   DST_ERR_INPUT);
        expect_err("sparse_k", dst_cpu_sparse_kd(s, DST_F32, idx, lq, DST_F32, labels, N, C, C + 1, 0, 0.0f, 0, 1,
                                                 2.0f, 0.3f, 0.0f, -100, 0, 0.5f, &loss, NULL, g, DST_F32),
                   DST_ERR_INVALID_ARGUMENT);
        expect_err("sparse_tail_code", dst_cpu_sparse_kd(s, DST_F32, idx, lq, DST_F32, labels, N, C, K, 0, 0.0f, 0, 7,
                                                         2.0f, 0.3f, 0.0f, -100, 0, 0.5f, &loss, NULL, g, DST_F32),
                   DST_ERR_INVALID_ARGUMENT);
        expect_err("sparse_no_labels", dst_cpu_sparse_kd(s, DST_F32, idx, lq, DST_F32, NULL, N, C, K, 0, 0.0f, 0, 1,
                                                         2.0f, 0.3f, 0.0f, -100, 0, 0.5f, &loss, NULL, g, DST_F32),
                   DST_ERR_NULL_POINTER);
        expect_err("sparse_alias", dst_cpu_sparse_kd(s, DST_F32, idx, lq, DST_F32, labels, N, C, K, 0, 0.0f, 0, 1,
                                                     2.0f, 0.3f, 0.0f, -100, 0, 0.5f, &loss, NULL, lq, DST_F32),
                   DST_ERR_ALIAS);
        expect_err("cuda_sparse_null_ctx", dst_cuda_sparse_kd(NULL, s, DST_F32, idx, lq, DST_F32, labels, N, C, K, 0,
                                                              0.0f, 0, 1, 2.0f, 0.3f, 0.0f, -100, 0, 0.5f, &loss,
                                                              NULL, g, DST_F32),
                   DST_ERR_NULL_POINTER);
    }

    /* MSE between s and t, grad_scale 2. */
    expect_ok("mse", dst_cpu_mse(s, t, LEN, 2.0f, &loss, g, gt));
    print_array("mse.loss", &loss, 1);
    print_array("mse.grad_a", g, LEN);
    print_array("mse.grad_b", gt, LEN);

    /* Bad arguments: status codes with messages. */
    expect_err("null_student", dst_cpu_hinton(NULL, DST_F32, t, DST_F32, labels, N, C, 2.0f, 0.3f, 0.0f, -100, 0, 1.0f,
                                              &loss, NULL, g, DST_F32, NULL, DST_F32), DST_ERR_NULL_POINTER);
    expect_err("null_loss", dst_cpu_cross_entropy(s, DST_F32, labels, N, C, 0.0f, -100, 0, 1.0f, NULL, NULL, g, DST_F32),
               DST_ERR_NULL_POINTER);
    expect_err("n_zero", dst_cpu_hinton(s, DST_F32, t, DST_F32, labels, 0, C, 2.0f, 0.3f, 0.0f, -100, 0, 1.0f, &loss,
                                        NULL, g, DST_F32, NULL, DST_F32), DST_ERR_SHAPE);
    expect_err("t_zero", dst_cpu_hinton(s, DST_F32, t, DST_F32, labels, N, C, 0.0f, 0.3f, 0.0f, -100, 0, 1.0f, &loss,
                                        NULL, g, DST_F32, NULL, DST_F32), DST_ERR_INVALID_ARGUMENT);
    expect_err("t_negative", dst_cpu_divergence(s, DST_F32, t, DST_F32, NULL, N, C, 0, 0.0f, 0.0f, 0, -1.0f, -100, 0,
                                                1.0f, &loss, NULL, g, DST_F32, NULL, DST_F32), DST_ERR_INVALID_ARGUMENT);
    expect_err("alpha", dst_cpu_hinton(s, DST_F32, t, DST_F32, labels, N, C, 2.0f, 1.5f, 0.0f, -100, 0, 1.0f, &loss,
                                       NULL, g, DST_F32, NULL, DST_F32), DST_ERR_INVALID_ARGUMENT);
    expect_err("reduction", dst_cpu_cross_entropy(s, DST_F32, labels, N, C, 0.0f, -100, 7, 1.0f, &loss, NULL, g, DST_F32),
               DST_ERR_INVALID_ARGUMENT);
    {
        /* A misaligned f32 student or i32 labels: refused, never read as whole elements. */
        static float raw[LEN + 1];
        static int32_t raw_labels[N + 1];
        const float *odd = (const float *)((const char *)raw + 1);
        const int32_t *odd_labels = (const int32_t *)((const char *)raw_labels + 2);
        expect_err("misaligned_student", dst_fast_cross_entropy(0, odd, DST_F32, labels, N, C, 0.0f, -100, 0, 1.0f,
                                                                &loss, NULL, g, DST_F32), DST_ERR_INVALID_ARGUMENT);
        expect_err("misaligned_labels", dst_fast_cross_entropy(0, s, DST_F32, odd_labels, N, C, 0.0f, -100, 0, 1.0f,
                                                               &loss, NULL, g, DST_F32), DST_ERR_INVALID_ARGUMENT);
        /* The teacher's gradient with the teacher as probabilities: refused on every host path. */
        float probs[LEN], gt_buf[LEN];
        for (int i = 0; i < LEN; ++i) probs[i] = 1.0f / C;
        expect_err("fast_grad_teacher_probs",
                   dst_fast_divergence(0, s, DST_F32, probs, DST_F32, NULL, N, C, 0, 0.0f, 0.0f, 1, 2.0f, -100, 0, 1.0f,
                                       &loss, NULL, g, DST_F32, gt_buf, DST_F32), DST_ERR_UNSUPPORTED);
        expect_err("cpu_grad_teacher_probs",
                   dst_cpu_divergence(s, DST_F32, probs, DST_F32, NULL, N, C, 0, 0.0f, 0.0f, 1, 2.0f, -100, 0, 1.0f,
                                      &loss, NULL, g, DST_F32, gt_buf, DST_F32), DST_ERR_UNSUPPORTED);
    }
    {
        int32_t bad[N] = {1, 5, 0, 0}; /* 5 is not a class of C = 5 */
        expect_err("label_hinton", dst_cpu_hinton(s, DST_F32, t, DST_F32, bad, N, C, 2.0f, 0.3f, 0.0f, -100, 0, 1.0f,
                                                  &loss, NULL, g, DST_F32, NULL, DST_F32), DST_ERR_LABEL);
        expect_err("label_ce", dst_cpu_cross_entropy(s, DST_F32, bad, N, C, 0.0f, -100, 0, 1.0f, &loss, NULL, g, DST_F32),
                   DST_ERR_LABEL);
        expect_err("label_divergence", dst_cpu_divergence(s, DST_F32, t, DST_F32, bad, N, C, 0, 0.0f, 0.0f, 0, 1.0f, -100,
                                                          0, 1.0f, &loss, NULL, g, DST_F32, NULL, DST_F32), DST_ERR_LABEL);
    }
    expect_err("alias", dst_cpu_hinton(s, DST_F32, t, DST_F32, labels, N, C, 2.0f, 0.3f, 0.0f, -100, 0, 1.0f, &loss,
                                       NULL, g, DST_F32, t, DST_F32), DST_ERR_ALIAS);
    expect_err("mse_empty", dst_cpu_mse(s, t, 0, 1.0f, &loss, NULL, NULL), DST_ERR_SHAPE);
    /* Partial overlaps are aliases too, not only equal pointers. */
    expect_err("alias_partial", dst_cpu_hinton(s, DST_F32, t, DST_F32, labels, N, C, 2.0f, 0.3f, 0.0f, -100, 0, 1.0f,
                                               &loss, NULL, s + 1, DST_F32, NULL, DST_F32), DST_ERR_ALIAS);
    expect_err("alias_outputs", dst_cpu_mse(s, t, LEN, 1.0f, &loss, g, g + 3), DST_ERR_ALIAS);
    expect_err("alias_loss_in_grad", dst_cpu_mse(s, t, LEN, 1.0f, g + 2, g, NULL), DST_ERR_ALIAS);
    {
        /* Reverse KL where the teacher gives probability 0: infinite, so an input error; with a
         * floor teacher_eps = 1e-8 on the teacher inside the log, finite (tests/suite/capi.rs compares
         * it with the Rust API). */
        float p[LEN];
        for (int i = 0; i < LEN; ++i) p[i] = (i % C == 0) ? 0.0f : 0.25f;
        expect_err("rkl_zero", dst_cpu_divergence(s, DST_F32, p, DST_F32, NULL, N, C, 1, 0.0f, 0.0f, 1, 1.0f, -100, 0,
                                                  1.0f, &loss, NULL, g, DST_F32, NULL, DST_F32), DST_ERR_INPUT);
        expect_ok("rkl_eps", dst_cpu_divergence(s, DST_F32, p, DST_F32, NULL, N, C, 1, 0.0f, 1e-8f, 1, 1.0f, -100, 0,
                                                1.0f, &loss, rows, g, DST_F32, NULL, DST_F32));
        if (!isfinite(loss)) {
            fprintf(stderr, "FAIL rkl_eps: loss %g is not finite\n", loss);
            failures++;
        }
        print_array("rkl_eps.loss", &loss, 1);
        print_array("rkl_eps.row_loss", rows, N);
        print_array("rkl_eps.grad_student", g, LEN);
        /* The floor is reverse KL's, with a given teacher only. */
        expect_err("eps_forward_kl",
                   dst_cpu_divergence(s, DST_F32, p, DST_F32, NULL, N, C, 0, 0.0f, 1e-8f, 1, 1.0f, -100, 0, 1.0f, &loss,
                                      NULL, g, DST_F32, NULL, DST_F32), DST_ERR_UNSUPPORTED);
        expect_err("eps_range",
                   dst_cpu_divergence(s, DST_F32, p, DST_F32, NULL, N, C, 1, 0.0f, 1.5f, 1, 1.0f, -100, 0, 1.0f, &loss,
                                      NULL, g, DST_F32, NULL, DST_F32), DST_ERR_INVALID_ARGUMENT);
    }

    /* CUDA: argument checks never need a device; creation works or says why not. */
    {
        dst_cuda *ctx = (dst_cuda *)&loss; /* must be reset to NULL on failure */
        int32_t status = dst_cuda_create(0, &ctx);
        if (status == DST_OK) {
            printf("cuda available\n");
            expect_ok("cuda_synchronize", dst_cuda_synchronize(ctx));
            expect_ok("cuda_destroy", dst_cuda_destroy(ctx));
        } else {
            expect_err("cuda_create", status, DST_ERR_UNAVAILABLE);
            if (ctx != NULL) {
                fprintf(stderr, "FAIL cuda_create left *out non-NULL on failure\n");
                failures++;
            }
        }
        /* The same on the legacy default stream (stream 0). */
        ctx = (dst_cuda *)&loss;
        status = dst_cuda_create_on_stream(0, NULL, &ctx);
        if (status == DST_OK) {
            expect_ok("cuda_on_stream_destroy", dst_cuda_destroy(ctx));
        } else {
            expect_err("cuda_create_on_stream", status, DST_ERR_UNAVAILABLE);
            if (ctx != NULL) {
                fprintf(stderr, "FAIL cuda_create_on_stream left *out non-NULL on failure\n");
                failures++;
            }
        }
        expect_err("cuda_on_stream_null_out", dst_cuda_create_on_stream(0, NULL, NULL), DST_ERR_NULL_POINTER);
        expect_err("cuda_create_null_out", dst_cuda_create(0, NULL), DST_ERR_NULL_POINTER);
        expect_err("cuda_create_negative", dst_cuda_create(-1, &ctx), DST_ERR_INVALID_ARGUMENT);
        expect_err("cuda_null_ctx", dst_cuda_hinton(NULL, s, DST_F32, t, DST_F32, labels, N, C, 2.0f, 0.3f, 0.0f, -100, 0,
                                                    1.0f, &loss, NULL, g, DST_F32, NULL, DST_F32), DST_ERR_NULL_POINTER);
        expect_err("cuda_divergence_null_ctx",
                   dst_cuda_divergence(NULL, s, DST_F32, t, DST_F32, NULL, N, C, 1, 0.0f, 1e-8f, 1, 1.0f, -100, 0,
                                       1.0f, &loss, NULL, g, DST_F32, NULL, DST_F32), DST_ERR_NULL_POINTER);
        expect_err("cuda_sync_null", dst_cuda_synchronize(NULL), DST_ERR_NULL_POINTER);
        expect_ok("cuda_destroy_null", dst_cuda_destroy(NULL));
    }

    /* Half precision: bf16 and f16 student and teacher with gradients in their dtype, against f32
     * inputs holding the same (rounded) values; a mixed call (bf16 student, f32 teacher and
     * gradients); a bad dtype code; an in-place gradient of another dtype. */
    {
        for (int bf = 1; bf >= 0; bf--) {
            int32_t dt = bf ? DST_BF16 : DST_F16;
            uint16_t hs[LEN], ht[LEN], hg[LEN], hgt[LEN];
            float rs[LEN], rt[LEN], fg[LEN], fgt[LEN], mg[LEN], hloss = NAN, floss = NAN, mloss = NAN;
            for (size_t i = 0; i < LEN; i++) {
                hs[i] = bf ? to_bf16(s[i]) : to_f16(s[i]);
                ht[i] = bf ? to_bf16(t[i]) : to_f16(t[i]);
                rs[i] = bf ? from_bf16(hs[i]) : from_f16(hs[i]);
                rt[i] = bf ? from_bf16(ht[i]) : from_f16(ht[i]);
            }
            expect_ok("half_hinton", dst_fast_hinton(0, hs, dt, ht, dt, labels, N, C, 2.0f, 0.3f, 0.1f, -100, 0,
                                                     1.0f, &hloss, NULL, hg, dt, hgt, dt));
            expect_ok("half_hinton_f32", dst_fast_hinton(0, rs, DST_F32, rt, DST_F32, labels, N, C, 2.0f, 0.3f, 0.1f,
                                                         -100, 0, 1.0f, &floss, NULL, fg, DST_F32, fgt, DST_F32));
            expect_close(bf ? "bf16_hinton.loss" : "f16_hinton.loss", &hloss, &floss, 1);
            expect_half_close(bf ? "bf16_hinton.grad_student" : "f16_hinton.grad_student", hg, bf, fg, LEN);
            expect_half_close(bf ? "bf16_hinton.grad_teacher" : "f16_hinton.grad_teacher", hgt, bf, fgt, LEN);
            /* The reference backend (dst_cpu_*) reads and writes the same dtypes. */
            expect_ok("half_hinton_ref", dst_cpu_hinton(hs, dt, ht, dt, labels, N, C, 2.0f, 0.3f, 0.1f, -100, 0,
                                                        1.0f, &hloss, NULL, hg, dt, NULL, DST_F32));
            expect_close(bf ? "bf16_hinton_ref.loss" : "f16_hinton_ref.loss", &hloss, &floss, 1);
            expect_half_close(bf ? "bf16_hinton_ref.grad_student" : "f16_hinton_ref.grad_student", hg, bf, fg, LEN);
            /* Mixed: a half student, an f32 teacher, an f32 gradient meet the f32 contract. */
            expect_ok("mixed_dkd", dst_fast_dkd(0, hs, dt, rt, DST_F32, labels, N, C, 4.0f, 1.0f, 1.0f, 8.0f, 0.0f,
                                                -100, 0, 1.0f, &mloss, NULL, mg, DST_F32));
            expect_ok("mixed_dkd_f32", dst_fast_dkd(0, rs, DST_F32, rt, DST_F32, labels, N, C, 4.0f, 1.0f, 1.0f,
                                                    8.0f, 0.0f, -100, 0, 1.0f, &floss, NULL, fg, DST_F32));
            expect_close("mixed_dkd.loss", &mloss, &floss, 1);
            expect_close("mixed_dkd.grad_student", mg, fg, LEN);
            /* In place over a half student: the gradient in the student's dtype. */
            memcpy(hg, hs, sizeof hs);
            expect_ok("half_ce_inplace", dst_fast_cross_entropy(0, hg, dt, labels, N, C, 0.0f, -100, 0, 1.0f,
                                                                &hloss, NULL, hg, dt));
            expect_ok("half_ce_f32", dst_fast_cross_entropy(0, rs, DST_F32, labels, N, C, 0.0f, -100, 0, 1.0f,
                                                            &floss, NULL, fg, DST_F32));
            expect_half_close(bf ? "bf16_ce_inplace" : "f16_ce_inplace", hg, bf, fg, LEN);
        }
        uint16_t hs[LEN];
        for (size_t i = 0; i < LEN; i++) hs[i] = to_bf16(s[i]);
        expect_err("dtype_code", dst_fast_hinton(0, s, 7, t, DST_F32, labels, N, C, 2.0f, 0.3f, 0.0f, -100, 0, 1.0f,
                                                 &loss, NULL, g, DST_F32, NULL, DST_F32), DST_ERR_INVALID_ARGUMENT);
        expect_err("dtype_inplace", dst_fast_cross_entropy(0, hs, DST_BF16, labels, N, C, 0.0f, -100, 0, 1.0f,
                                                           &loss, NULL, hs, DST_F32), DST_ERR_INVALID_ARGUMENT);
    }

    /* Vocab-sharded Hinton (ABI 7): the 5 classes split into shards of 2 and 3 columns, stats
     * combined in-process and by the distributed recipe, against the unsharded dst_cpu_hinton. */
    {
        float want_g[LEN], want_loss, st[2][N * DST_SHARDED_STATS], global[N * DST_SHARDED_STATS];
        float gm[N * 2], dist_global[N * DST_SHARDED_STATS];
        expect_ok("sharded_want", dst_cpu_hinton(s, DST_F32, t, DST_F32, labels, N, C, 2.0f, 0.3f, 0.1f, -100, 0,
                                                 1.0f, &want_loss, NULL, want_g, DST_F32, NULL, DST_F32));
        for (int fast = 0; fast < 2; fast++) {
            const size_t off[2] = {0, 2}, wid[2] = {2, 3};
            float ss[2][N * 3], ts[2][N * 3], gs[2][N * 3], part, total = 0.0f, got_g[LEN];
            for (int k = 0; k < 2; k++) {
                DstShardedSpec sp = {N, C, off[k], wid[k], DST_SHARDED_HINTON, 0, 0.5f, 0.3f, 2.0f, 0.1f, -100, 0,
                                     1.0f, 0, 0.0f, 0.0f, 0.0f};
                for (size_t r = 0; r < N; r++) {
                    for (size_t j = 0; j < wid[k]; j++) {
                        ss[k][r * wid[k] + j] = s[r * C + off[k] + j];
                        ts[k][r * wid[k] + j] = t[r * C + off[k] + j];
                    }
                }
                expect_ok("sharded_stats", fast ? dst_fast_sharded_stats(0, &sp, ss[k], ts[k], labels, st[k])
                                                : dst_cpu_sharded_stats(&sp, ss[k], ts[k], labels, st[k]));
            }
            expect_ok("sharded_combine", dst_sharded_combine_stats(N, 2, 2.0f, &st[0][0], global));
            /* The distributed recipe: MAX of the maxima planes, rescale each, SUM of the sums planes. */
            for (size_t i = 0; i < N * 2; i++) gm[i] = fmaxf(st[0][i], st[1][i]);
            /* The maxima plane rescaled in place (global_maxima overlapping stats), a SUM instead of a
               MAX (a global maximum below the shard's) and a negative thread count are errors. */
            expect_err("sharded_rescale_alias", dst_sharded_rescale_stats(N, 2.0f, st[0], st[0]), DST_ERR_ALIAS);
            {
                float low[N * 2];
                for (size_t i = 0; i < N * 2; i++) low[i] = st[0][i] - 1.0f;
                expect_err("sharded_rescale_below", dst_sharded_rescale_stats(N, 2.0f, st[0], low), DST_ERR_INPUT);
                DstShardedSpec sp = {N, C, off[0], wid[0], DST_SHARDED_HINTON, 0, 0.5f, 0.3f, 2.0f, 0.1f, -100, 0,
                                     1.0f, 0, 0.0f, 0.0f, 0.0f};
                expect_err("sharded_negative_threads", dst_fast_sharded_stats(-1, &sp, ss[0], ts[0], labels, dist_global),
                           DST_ERR_INVALID_ARGUMENT);
            }
            for (int k = 0; k < 2; k++) expect_ok("sharded_rescale", dst_sharded_rescale_stats(N, 2.0f, st[k], gm));
            for (size_t i = 0; i < N * DST_SHARDED_STATS; i++) {
                dist_global[i] = i < N * 2 ? gm[i] : st[0][i] + st[1][i];
            }
            expect_close("sharded_distributed_combine", dist_global, global, N * DST_SHARDED_STATS);
            for (int k = 0; k < 2; k++) {
                DstShardedSpec sp = {N, C, off[k], wid[k], DST_SHARDED_HINTON, 0, 0.5f, 0.3f, 2.0f, 0.1f, -100, 0,
                                     1.0f, 0, 0.0f, 0.0f, 0.0f};
                expect_ok("sharded_loss", fast ? dst_fast_sharded_loss_and_grad(0, &sp, ss[k], ts[k], labels, global,
                                                                                NULL, &part, NULL, gs[k], NULL)
                                               : dst_cpu_sharded_loss_and_grad(&sp, ss[k], ts[k], labels, global,
                                                                               NULL, &part, NULL, gs[k], NULL));
                total += part;
                for (size_t r = 0; r < N; r++) {
                    for (size_t j = 0; j < wid[k]; j++) got_g[r * C + off[k] + j] = gs[k][r * wid[k] + j];
                }
            }
            expect_close(fast ? "fast_sharded.loss" : "sharded.loss", &total, &want_loss, 1);
            expect_close(fast ? "fast_sharded.grad_student" : "sharded.grad_student", got_g, want_g, LEN);
        }
        DstShardedSpec bad = {N, C, 4, 3, DST_SHARDED_HINTON, 0, 0.5f, 0.3f, 2.0f, 0.0f, -100, 0, 1.0f, 0, 0.0f, 0.0f, 0.0f};
        expect_err("sharded_offset", dst_cpu_sharded_stats(&bad, s, t, labels, st[0]), DST_ERR_UNSUPPORTED);
        DstShardedSpec jsd = {N, C, 0, 2, DST_SHARDED_DIVERGENCE, 2, 0.5f, 0.0f, 1.0f, 0.0f, -100, 0, 1.0f, 0, 0.0f, 0.0f, 0.0f};
        expect_err("sharded_jsd_terms", dst_fast_sharded_loss_and_grad(0, &jsd, s, t, NULL, global, NULL, &loss,
                                                                         NULL, g, NULL), DST_ERR_UNSUPPORTED);
        expect_err("sharded_null", dst_cpu_sharded_stats(NULL, s, t, labels, st[0]), DST_ERR_NULL_POINTER);

        /* The teacher as probabilities (ABI 9): q = softmax(t / T) given as probabilities and as
         * log-probabilities, one shard of all C columns, equals the teacher given as logits
         * (forward KL); a bad code is an error. */
        float q[LEN], lq[LEN], gl[LEN], gp[LEN], loss_l, loss_p;
        for (size_t r = 0; r < N; r++) {
            float m = -INFINITY, z = 0.0f;
            for (size_t j = 0; j < C; j++) m = fmaxf(m, t[r * C + j] / 2.0f);
            for (size_t j = 0; j < C; j++) z += expf(t[r * C + j] / 2.0f - m);
            for (size_t j = 0; j < C; j++) {
                lq[r * C + j] = t[r * C + j] / 2.0f - m - logf(z);
                q[r * C + j] = expf(lq[r * C + j]);
            }
        }
        DstShardedSpec from_logits = {N, C, 0, C, DST_SHARDED_DIVERGENCE, 0, 0.5f, 0.0f, 2.0f, 0.0f, -100, 0, 1.0f, 0, 0.0f, 0.0f, 0.0f};
        expect_ok("sharded_logits_stats", dst_cpu_sharded_stats(&from_logits, s, t, labels, st[0]));
        expect_ok("sharded_logits_loss", dst_cpu_sharded_loss_and_grad(&from_logits, s, t, labels, st[0], NULL,
                                                                       &loss_l, NULL, gl, NULL));
        for (int code = 1; code <= 2; code++) {
            DstShardedSpec given = from_logits;
            given.teacher_input = code;
            const float *tq = code == 1 ? q : lq;
            expect_ok("sharded_given_stats", dst_cpu_sharded_stats(&given, s, tq, labels, st[1]));
            expect_ok("sharded_given_loss", dst_cpu_sharded_loss_and_grad(&given, s, tq, labels, st[1], NULL,
                                                                          &loss_p, NULL, gp, NULL));
            expect_close(code == 1 ? "sharded_probs.loss" : "sharded_logprobs.loss", &loss_p, &loss_l, 1);
            expect_close(code == 1 ? "sharded_probs.grad" : "sharded_logprobs.grad", gp, gl, LEN);
        }
        DstShardedSpec bad_code = from_logits;
        bad_code.teacher_input = 7;
        expect_err("sharded_bad_teacher_input", dst_cpu_sharded_stats(&bad_code, s, t, labels, st[0]),
                   DST_ERR_INVALID_ARGUMENT);

        /* Sharded DKD (ABI 10): shards of 2 and 3 columns on the fast backend against the
         * unsharded dst_cpu_dkd; its teacher has no gradient and must be logits. */
        {
            const size_t off[2] = {0, 2}, wid[2] = {2, 3};
            float ss[2][N * 3], ts[2][N * 3], gs[2][N * 3], dst[2][N * DST_SHARDED_STATS];
            float dglobal[N * DST_SHARDED_STATS], part, total = 0.0f, got_g[LEN], want_dg[LEN], want_dl;
            expect_ok("sharded_dkd_want", dst_cpu_dkd(s, DST_F32, t, DST_F32, labels, N, C, 2.0f, 0.7f, 1.0f, 2.0f,
                                                      0.1f, -100, 0, 1.0f, &want_dl, NULL, want_dg, DST_F32));
            DstShardedSpec dk[2];
            for (int k = 0; k < 2; k++) {
                DstShardedSpec sp = {N, C, off[k], wid[k], DST_SHARDED_DKD, 0, 0.5f, 0.0f, 2.0f, 0.1f, -100, 0,
                                     1.0f, 0, 0.7f, 1.0f, 2.0f};
                dk[k] = sp;
                for (size_t r = 0; r < N; r++) {
                    for (size_t j = 0; j < wid[k]; j++) {
                        ss[k][r * wid[k] + j] = s[r * C + off[k] + j];
                        ts[k][r * wid[k] + j] = t[r * C + off[k] + j];
                    }
                }
                expect_ok("sharded_dkd_stats", dst_fast_sharded_stats(0, &dk[k], ss[k], ts[k], labels, dst[k]));
            }
            expect_ok("sharded_dkd_combine", dst_sharded_combine_stats(N, 2, 2.0f, &dst[0][0], dglobal));
            for (int k = 0; k < 2; k++) {
                expect_ok("sharded_dkd_loss", dst_fast_sharded_loss_and_grad(0, &dk[k], ss[k], ts[k], labels, dglobal,
                                                                             NULL, &part, NULL, gs[k], NULL));
                total += part;
                for (size_t r = 0; r < N; r++) {
                    for (size_t j = 0; j < wid[k]; j++) got_g[r * C + off[k] + j] = gs[k][r * wid[k] + j];
                }
            }
            expect_close("sharded_dkd.loss", &total, &want_dl, 1);
            expect_close("sharded_dkd.grad_student", got_g, want_dg, LEN);
            expect_err("sharded_dkd_teacher_grad",
                       dst_cpu_sharded_loss_and_grad(&dk[0], ss[0], ts[0], labels, dglobal, NULL, &part, NULL, gs[0],
                                                     gs[1]),
                       DST_ERR_UNSUPPORTED);
            expect_err("cuda_sharded_null_ctx", dst_cuda_sharded_stats(NULL, &dk[0], ss[0], ts[0], labels, dst[0]),
                       DST_ERR_NULL_POINTER);
            DstShardedSpec dk_probs = dk[0];
            dk_probs.teacher_input = 1;
            expect_err("sharded_dkd_given_teacher", dst_cpu_sharded_stats(&dk_probs, ss[0], ts[0], labels, dst[0]),
                       DST_ERR_UNSUPPORTED);
        }
    }

    /* The fused linear layer + loss (ABI 8): hidden size 3, the student's vocabulary C, a teacher
     * layer of hidden size 2 and a padded vocabulary C + 2; Liger's weighting with JSD, chunks of
     * 2 rows; grad_weight and grad_bias added onto their initial values (accumulated). Inputs
     * x / 4 of fill's, exact in f32. Then Hinton's weighting with the teacher as logits, and bad
     * arguments. */
    {
        enum { FH = 3, FTH = 2, FTV = C + 2 };
        float fh[N * FH], fw[C * FH], fb[C], fth[N * FTH], ftw[FTV * FTH], ftb[FTV];
        float fgh[N * FH], fgw[C * FH], fgb[C], floss = NAN;
        float xgh[N * FH], xgw[C * FH], xgb[C], xloss = NAN;
        float *arrays[] = {fh, fw, fb, fth, ftw, ftb, fgw, fgb};
        const size_t lens[] = {N * FH, C * FH, C, N * FTH, FTV * FTH, FTV, C * FH, C};
        for (int k = 0; k < 8; k++) {
            fill(arrays[k], lens[k], 1 + k);
            for (size_t i = 0; i < lens[k]; i++) arrays[k][i] *= 0.25f;
        }
        memcpy(xgw, fgw, sizeof fgw);
        memcpy(xgb, fgb, sizeof fgb);
        DstFusedLinearSpec fs = {N, FH, C, FTH, FTV, 2.0f, 2, 0.4f, DST_WEIGHTING_LIGER, 0.0f, 0.3f, 0.7f,
                                 0.0f, -100, 0, 1.0f, 0, 2};
        expect_ok("fused_linear", dst_cpu_fused_linear_kd(&fs, fh, DST_F32, fw, DST_F32, fb, DST_F32, fth, DST_F32,
                                                          ftw, DST_F32, ftb, DST_F32, NULL, DST_F32, labels, &floss,
                                                          fgh, DST_F32, fgw, DST_F32, fgb, DST_F32));
        print_array("fused.loss", &floss, 1);
        print_array("fused.grad_hidden", fgh, N * FH);
        print_array("fused.grad_weight", fgw, C * FH);
        print_array("fused.grad_bias", fgb, C);
        /* The fast backend: the same within 1e-4. */
        expect_ok("fast_fused_linear", dst_fast_fused_linear_kd(0, &fs, fh, DST_F32, fw, DST_F32, fb, DST_F32, fth,
                                                                DST_F32, ftw, DST_F32, ftb, DST_F32, NULL, DST_F32,
                                                                labels, &xloss, xgh, DST_F32, xgw, DST_F32, xgb,
                                                                DST_F32));
        expect_close("fast_fused.loss", &xloss, &floss, 1);
        expect_close("fast_fused.grad_hidden", xgh, fgh, N * FH);
        expect_close("fast_fused.grad_weight", xgw, fgw, C * FH);
        expect_close("fast_fused.grad_bias", xgb, fgb, C);
        /* Hinton, forward KL, the teacher as logits [N, C], label smoothing; no weight gradient. */
        DstFusedLinearSpec hs = {N, FH, C, 0, 0, 2.0f, 0, 0.5f, DST_WEIGHTING_HINTON, 0.3f, 0.0f, 0.0f,
                                 0.1f, -100, 0, 1.0f, 0, 0};
        expect_ok("fused_logits", dst_cpu_fused_linear_kd(&hs, fh, DST_F32, fw, DST_F32, NULL, DST_F32, NULL, DST_F32,
                                                          NULL, DST_F32, NULL, DST_F32, t, DST_F32, labels, &floss,
                                                          fgh, DST_F32, NULL, DST_F32, NULL, DST_F32));
        print_array("fused_logits.loss", &floss, 1);
        print_array("fused_logits.grad_hidden", fgh, N * FH);
        /* The teacher as a sparse top-k (ABI 10) with k = C, the classes in reverse order and the
         * values the logits t (values_code 1, renormalize): the same loss and gradient as
         * teacher_logits, on both host backends; a repeated index is DST_ERR_INPUT, a bad tail
         * code DST_ERR_INVALID_ARGUMENT. */
        {
            int32_t idx[N * C];
            float tv[N * C], sgh[N * FH], sloss = NAN;
            for (size_t r = 0; r < N; r++) {
                for (size_t j = 0; j < C; j++) {
                    idx[r * C + j] = (int32_t)(C - 1 - j);
                    tv[r * C + j] = t[r * C + (C - 1 - j)];
                }
            }
            for (int fast = 0; fast < 2; fast++) {
                expect_ok("fused_sparse",
                          fast ? dst_fast_fused_linear_sparse_kd(0, &hs, fh, DST_F32, fw, DST_F32, NULL, DST_F32, C,
                                                                 idx, tv, DST_F32, 1, 0, labels, &sloss, sgh, DST_F32,
                                                                 NULL, DST_F32, NULL, DST_F32)
                               : dst_cpu_fused_linear_sparse_kd(&hs, fh, DST_F32, fw, DST_F32, NULL, DST_F32, C, idx,
                                                                tv, DST_F32, 1, 0, labels, &sloss, sgh, DST_F32, NULL,
                                                                DST_F32, NULL, DST_F32));
                expect_close(fast ? "fast_fused_sparse.loss" : "fused_sparse.loss", &sloss, &floss, 1);
                expect_close(fast ? "fast_fused_sparse.grad_hidden" : "fused_sparse.grad_hidden", sgh, fgh,
                             N * FH);
            }
            expect_err("fused_sparse_tail", dst_cpu_fused_linear_sparse_kd(&hs, fh, DST_F32, fw, DST_F32, NULL,
                                                                           DST_F32, C, idx, tv, DST_F32, 1, 7, labels,
                                                                           &sloss, sgh, DST_F32, NULL, DST_F32, NULL,
                                                                           DST_F32), DST_ERR_INVALID_ARGUMENT);
            idx[1] = idx[0];
            expect_err("fused_sparse_repeated", dst_fast_fused_linear_sparse_kd(0, &hs, fh, DST_F32, fw, DST_F32, NULL,
                                                                                DST_F32, C, idx, tv, DST_F32, 1, 0,
                                                                                labels, &sloss, sgh, DST_F32, NULL,
                                                                                DST_F32, NULL, DST_F32),
                       DST_ERR_INPUT);
        }

        DstFusedLinearSpec bad = fs;
        expect_err("fused_null_spec", dst_cpu_fused_linear_kd(NULL, fh, DST_F32, fw, DST_F32, NULL, DST_F32, fth,
                                                              DST_F32, ftw, DST_F32, NULL, DST_F32, NULL, DST_F32,
                                                              labels, &floss, fgh, DST_F32, NULL, DST_F32, NULL,
                                                              DST_F32), DST_ERR_NULL_POINTER);
        bad.weighting = 5;
        expect_err("fused_weighting", dst_cpu_fused_linear_kd(&bad, fh, DST_F32, fw, DST_F32, NULL, DST_F32, fth,
                                                              DST_F32, ftw, DST_F32, NULL, DST_F32, NULL, DST_F32,
                                                              labels, &floss, fgh, DST_F32, NULL, DST_F32, NULL,
                                                              DST_F32), DST_ERR_INVALID_ARGUMENT);
        bad = fs;
        bad.teacher_vocab = C - 1;
        expect_err("fused_teacher_vocab", dst_fast_fused_linear_kd(0, &bad, fh, DST_F32, fw, DST_F32, NULL, DST_F32,
                                                                   fth, DST_F32, ftw, DST_F32, NULL, DST_F32, NULL,
                                                                   DST_F32, labels, &floss, fgh, DST_F32, NULL,
                                                                   DST_F32, NULL, DST_F32), DST_ERR_UNSUPPORTED);
        bad = fs;
        bad.reduction = 2;
        expect_err("fused_reduction_none", dst_cpu_fused_linear_kd(&bad, fh, DST_F32, fw, DST_F32, NULL, DST_F32, fth,
                                                                   DST_F32, ftw, DST_F32, NULL, DST_F32, NULL,
                                                                   DST_F32, labels, &floss, fgh, DST_F32, NULL,
                                                                   DST_F32, NULL, DST_F32), DST_ERR_UNSUPPORTED);
        expect_err("fused_both_teachers", dst_cpu_fused_linear_kd(&fs, fh, DST_F32, fw, DST_F32, NULL, DST_F32, fth,
                                                                  DST_F32, ftw, DST_F32, NULL, DST_F32, t, DST_F32,
                                                                  labels, &floss, fgh, DST_F32, NULL, DST_F32, NULL,
                                                                  DST_F32), DST_ERR_INVALID_ARGUMENT);
        expect_err("fused_no_labels", dst_cpu_fused_linear_kd(&fs, fh, DST_F32, fw, DST_F32, NULL, DST_F32, fth,
                                                              DST_F32, ftw, DST_F32, NULL, DST_F32, NULL, DST_F32,
                                                              NULL, &floss, fgh, DST_F32, NULL, DST_F32, NULL,
                                                              DST_F32), DST_ERR_NULL_POINTER);
        int32_t bad_labels[N] = {1, 0, C, 0};
        expect_err("fused_label", dst_fast_fused_linear_kd(0, &fs, fh, DST_F32, fw, DST_F32, NULL, DST_F32, fth,
                                                           DST_F32, ftw, DST_F32, NULL, DST_F32, NULL, DST_F32,
                                                           bad_labels, &floss, fgh, DST_F32, NULL, DST_F32, NULL,
                                                           DST_F32), DST_ERR_LABEL);
        expect_err("fused_alias", dst_cpu_fused_linear_kd(&fs, fh, DST_F32, fw, DST_F32, NULL, DST_F32, fth, DST_F32,
                                                          ftw, DST_F32, NULL, DST_F32, NULL, DST_F32, labels, &floss,
                                                          fgh, DST_F32, fw, DST_F32, NULL, DST_F32), DST_ERR_ALIAS);
        expect_err("fused_dtype", dst_cpu_fused_linear_kd(&fs, fh, 9, fw, DST_F32, NULL, DST_F32, fth, DST_F32,
                                                          ftw, DST_F32, NULL, DST_F32, NULL, DST_F32, labels, &floss,
                                                          fgh, DST_F32, NULL, DST_F32, NULL, DST_F32),
                   DST_ERR_INVALID_ARGUMENT);
        expect_err("cuda_fused_null_ctx", dst_cuda_fused_linear_kd(NULL, &fs, fh, DST_F32, fw, DST_F32, NULL, DST_F32,
                                                                   fth, DST_F32, ftw, DST_F32, NULL, DST_F32, NULL,
                                                                   DST_F32, labels, &floss, fgh, DST_F32, NULL,
                                                                   DST_F32, NULL, DST_F32), DST_ERR_NULL_POINTER);
    }

    if (failures != 0) {
        fprintf(stderr, "%d failure(s)\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
