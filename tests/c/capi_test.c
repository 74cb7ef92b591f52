/* Exercises the C ABI of include/distillation.h on the CPU backend (and the CUDA entry points'
 * argument checks), printing every result for tests/capi.rs to compare with the Rust API.
 *
 * Output: one line per array, `name v0 v1 ...` (%.9g round-trips f32), `version <abi> <string>`,
 * `codes <code>=<name> ...`, `error <case> <code> <name> <message>` per expected error, and
 * `cuda available` when a device is present. Exits non-zero (after `FAIL ...` on stderr) when a status is not the one
 * expected. Inputs are exact in f32: x[i] = ((i * 37 + 11) % 101) / 10 - 5, the formula the Rust
 * test uses. */
#include <math.h>
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

    /* Every status code, distinct (status_name's switch) and named: tests/capi.rs compares them
     * with the Rust constants. DST_ERR_IO and DST_ERR_CONFIG (ABI 4) come from file and
     * configuration errors, which no loss entry point produces. */
    printf("codes");
    for (int32_t code = DST_OK; code <= DST_ERR_CONFIG; code++) {
        printf(" %d=%s", code, status_name(code));
    }
    printf("\n");

    /* Hinton: T = 2, alpha = 0.3, label smoothing 0.1, batchmean, teacher gradient. */
    expect_ok("hinton", dst_cpu_hinton(s, t, labels, N, C, 2.0f, 0.3f, 0.1f, -100, 0, 1.0f, &loss,
                                       rows, g, gt));
    print_array("hinton.loss", &loss, 1);
    print_array("hinton.row_loss", rows, N);
    print_array("hinton.grad_student", g, LEN);
    print_array("hinton.grad_teacher", gt, LEN);

    /* The same with the gradient written over the student logits. */
    memcpy(inplace, s, sizeof s);
    expect_ok("hinton_inplace", dst_cpu_hinton(inplace, t, labels, N, C, 2.0f, 0.3f, 0.1f, -100, 0,
                                               1.0f, &loss, NULL, inplace, NULL));
    print_array("hinton_inplace.loss", &loss, 1);
    print_array("hinton_inplace.grad_student", inplace, LEN);

    /* JSD(beta = 0.4), teacher logits, T = 3, labels masking row 1, sum, grad_scale 0.5. */
    expect_ok("jsd", dst_cpu_divergence(s, t, labels, N, C, 2, 0.4f, 0.0f, 0, 3.0f, -100, 1, 0.5f,
                                        &loss, rows, g, gt));
    print_array("jsd.loss", &loss, 1);
    print_array("jsd.row_loss", rows, N);
    print_array("jsd.grad_student", g, LEN);
    print_array("jsd.grad_teacher", gt, LEN);

    /* Reverse KL against teacher probabilities, no labels, batchmean. */
    {
        float p[LEN];
        const float row[C] = {0.1f, 0.2f, 0.3f, 0.25f, 0.15f};
        for (int i = 0; i < LEN; i++) p[i] = row[i % C];
        expect_ok("rkl_probs", dst_cpu_divergence(s, p, NULL, N, C, 1, 0.0f, 0.0f, 1, 1.5f, -100, 0,
                                                  1.0f, &loss, NULL, g, NULL));
        print_array("rkl_probs.loss", &loss, 1);
        print_array("rkl_probs.grad_student", g, LEN);
    }

    /* Cross-entropy, label smoothing 0.1, ignore_index -1, no reduction. */
    {
        int32_t ce_labels[N] = {2, -1, 0, 3};
        expect_ok("ce", dst_cpu_cross_entropy(s, ce_labels, N, C, 0.1f, -1, 2, 1.0f, &loss, rows, g));
        print_array("ce.loss", &loss, 1);
        print_array("ce.row_loss", rows, N);
        print_array("ce.grad_student", g, LEN);
    }

    /* The fast CPU backend (dst_fast_*, no copies) against the reference, within 1e-4, for 1
     * and 3 threads (and the same bits for both); a negative thread count is an error. */
    {
        float ref_loss, ref_g[LEN], ref_gt[LEN], fast_g[LEN], fast_gt[LEN], fast1_g[LEN];
        expect_ok("ref_hinton", dst_cpu_hinton(s, t, labels, N, C, 2.0f, 0.3f, 0.1f, -100, 0, 1.0f,
                                               &ref_loss, NULL, ref_g, ref_gt));
        for (int threads = 1; threads <= 3; threads += 2) {
            float *dst = threads == 1 ? fast1_g : fast_g;
            expect_ok("fast_hinton", dst_fast_hinton(threads, s, t, labels, N, C, 2.0f, 0.3f, 0.1f,
                                                     -100, 0, 1.0f, &loss, NULL, dst, fast_gt));
            expect_close("fast_hinton.loss", &loss, &ref_loss, 1);
            expect_close("fast_hinton.grad_student", dst, ref_g, LEN);
            expect_close("fast_hinton.grad_teacher", fast_gt, ref_gt, LEN);
        }
        if (memcmp(fast_g, fast1_g, sizeof fast_g) != 0) {
            fprintf(stderr, "FAIL fast_hinton: 1 and 3 threads give different bits\n");
            failures++;
        }
        expect_ok("ref_jsd", dst_cpu_divergence(s, t, labels, N, C, 2, 0.4f, 0.0f, 0, 3.0f, -100, 1,
                                                0.5f, &ref_loss, NULL, ref_g, ref_gt));
        expect_ok("fast_jsd", dst_fast_divergence(0, s, t, labels, N, C, 2, 0.4f, 0.0f, 0, 3.0f,
                                                  -100, 1, 0.5f, &loss, NULL, fast_g, fast_gt));
        expect_close("fast_jsd.loss", &loss, &ref_loss, 1);
        expect_close("fast_jsd.grad_student", fast_g, ref_g, LEN);
        expect_close("fast_jsd.grad_teacher", fast_gt, ref_gt, LEN);
        int32_t ce_labels[N] = {2, -1, 0, 3};
        expect_ok("ref_ce", dst_cpu_cross_entropy(s, ce_labels, N, C, 0.1f, -1, 0, 1.0f, &ref_loss,
                                                  NULL, ref_g));
        memcpy(fast_g, s, sizeof fast_g);
        expect_ok("fast_ce_inplace", dst_fast_cross_entropy(2, fast_g, ce_labels, N, C, 0.1f, -1,
                                                            0, 1.0f, &loss, NULL, fast_g));
        expect_close("fast_ce.loss", &loss, &ref_loss, 1);
        expect_close("fast_ce.grad_student", fast_g, ref_g, LEN);
        expect_ok("ref_mse", dst_cpu_mse(s, t, LEN, 2.0f, &ref_loss, ref_g, ref_gt));
        expect_ok("fast_mse", dst_fast_mse(0, s, t, LEN, 2.0f, &loss, fast_g, fast_gt));
        expect_close("fast_mse.loss", &loss, &ref_loss, 1);
        expect_close("fast_mse.grad_a", fast_g, ref_g, LEN);
        expect_close("fast_mse.grad_b", fast_gt, ref_gt, LEN);
        expect_err("fast_threads", dst_fast_hinton(-1, s, t, labels, N, C, 2.0f, 0.3f, 0.0f, -100, 0,
                                                   1.0f, &loss, NULL, g, NULL),
                   DST_ERR_INVALID_ARGUMENT);
        expect_err("fast_label", dst_fast_cross_entropy(0, s, ce_labels, N, C, 0.0f, -100, 0, 1.0f,
                                                        &loss, NULL, g),
                   DST_ERR_LABEL);
        expect_err("fast_alias", dst_fast_hinton(0, s, t, labels, N, C, 2.0f, 0.3f, 0.0f, -100, 0,
                                                 1.0f, &loss, NULL, g, g),
                   DST_ERR_ALIAS);
    }

    /* DKD: T = 4, ce_weight 1, TCKD 1, NCKD 8 (the paper's), label smoothing 0.1, batchmean,
     * grad_scale 0.5; in place; the fast backend within 1e-4 on 1 and 3 threads (same bits). */
    {
        float ref_g[LEN], fast_g[LEN], fast1_g[LEN], ref_loss;
        expect_ok("dkd", dst_cpu_dkd(s, t, labels, N, C, 4.0f, 1.0f, 1.0f, 8.0f, 0.1f, -100, 0, 0.5f,
                                     &loss, rows, g));
        print_array("dkd.loss", &loss, 1);
        print_array("dkd.row_loss", rows, N);
        print_array("dkd.grad_student", g, LEN);
        memcpy(inplace, s, sizeof s);
        expect_ok("dkd_inplace", dst_cpu_dkd(inplace, t, labels, N, C, 4.0f, 1.0f, 1.0f, 8.0f, 0.1f,
                                             -100, 0, 0.5f, &loss, NULL, inplace));
        print_array("dkd_inplace.grad_student", inplace, LEN);
        ref_loss = loss;
        memcpy(ref_g, inplace, sizeof ref_g);
        for (int threads = 1; threads <= 3; threads += 2) {
            float *dst = threads == 1 ? fast1_g : fast_g;
            expect_ok("fast_dkd", dst_fast_dkd(threads, s, t, labels, N, C, 4.0f, 1.0f, 1.0f, 8.0f,
                                               0.1f, -100, 0, 0.5f, &loss, NULL, dst));
            expect_close("fast_dkd.loss", &loss, &ref_loss, 1);
            expect_close("fast_dkd.grad_student", dst, ref_g, LEN);
        }
        if (memcmp(fast_g, fast1_g, sizeof fast_g) != 0) {
            fprintf(stderr, "FAIL fast_dkd: 1 and 3 threads give different bits\n");
            failures++;
        }
        int32_t bad[N] = {1, 5, 0, 0};
        expect_err("label_dkd", dst_cpu_dkd(s, t, bad, N, C, 4.0f, 1.0f, 1.0f, 8.0f, 0.0f, -100, 0,
                                            1.0f, &loss, NULL, g), DST_ERR_LABEL);
        expect_err("dkd_one_class", dst_cpu_dkd(s, t, labels, N, 1, 4.0f, 1.0f, 1.0f, 8.0f, 0.0f,
                                                -100, 0, 1.0f, &loss, NULL, NULL),
                   DST_ERR_INVALID_ARGUMENT);
        expect_err("dkd_weight", dst_fast_dkd(0, s, t, labels, N, C, 4.0f, 1.0f, -1.0f, 8.0f, 0.0f,
                                              -100, 0, 1.0f, &loss, NULL, g),
                   DST_ERR_INVALID_ARGUMENT);
        expect_err("dkd_alias", dst_cpu_dkd(s, t, labels, N, C, 4.0f, 1.0f, 1.0f, 8.0f, 0.0f, -100, 0,
                                            1.0f, &loss, NULL, t), DST_ERR_ALIAS);
        expect_err("cuda_dkd_null_ctx", dst_cuda_dkd(NULL, s, t, labels, N, C, 4.0f, 1.0f, 1.0f, 8.0f,
                                                     0.0f, -100, 0, 1.0f, &loss, NULL, g),
                   DST_ERR_NULL_POINTER);
    }

    /* MSE between s and t, grad_scale 2. */
    expect_ok("mse", dst_cpu_mse(s, t, LEN, 2.0f, &loss, g, gt));
    print_array("mse.loss", &loss, 1);
    print_array("mse.grad_a", g, LEN);
    print_array("mse.grad_b", gt, LEN);

    /* Bad arguments: status codes with messages. */
    expect_err("null_student", dst_cpu_hinton(NULL, t, labels, N, C, 2.0f, 0.3f, 0.0f, -100, 0, 1.0f,
                                              &loss, NULL, g, NULL), DST_ERR_NULL_POINTER);
    expect_err("null_loss", dst_cpu_cross_entropy(s, labels, N, C, 0.0f, -100, 0, 1.0f, NULL, NULL, g),
               DST_ERR_NULL_POINTER);
    expect_err("n_zero", dst_cpu_hinton(s, t, labels, 0, C, 2.0f, 0.3f, 0.0f, -100, 0, 1.0f, &loss,
                                        NULL, g, NULL), DST_ERR_SHAPE);
    expect_err("t_zero", dst_cpu_hinton(s, t, labels, N, C, 0.0f, 0.3f, 0.0f, -100, 0, 1.0f, &loss,
                                        NULL, g, NULL), DST_ERR_INVALID_ARGUMENT);
    expect_err("t_negative", dst_cpu_divergence(s, t, NULL, N, C, 0, 0.0f, 0.0f, 0, -1.0f, -100, 0,
                                                1.0f, &loss, NULL, g, NULL), DST_ERR_INVALID_ARGUMENT);
    expect_err("alpha", dst_cpu_hinton(s, t, labels, N, C, 2.0f, 1.5f, 0.0f, -100, 0, 1.0f, &loss,
                                       NULL, g, NULL), DST_ERR_INVALID_ARGUMENT);
    expect_err("reduction", dst_cpu_cross_entropy(s, labels, N, C, 0.0f, -100, 7, 1.0f, &loss, NULL, g),
               DST_ERR_INVALID_ARGUMENT);
    {
        int32_t bad[N] = {1, 5, 0, 0}; /* 5 is not a class of C = 5 */
        expect_err("label_hinton", dst_cpu_hinton(s, t, bad, N, C, 2.0f, 0.3f, 0.0f, -100, 0, 1.0f,
                                                  &loss, NULL, g, NULL), DST_ERR_LABEL);
        expect_err("label_ce", dst_cpu_cross_entropy(s, bad, N, C, 0.0f, -100, 0, 1.0f, &loss, NULL, g),
                   DST_ERR_LABEL);
        expect_err("label_divergence", dst_cpu_divergence(s, t, bad, N, C, 0, 0.0f, 0.0f, 0, 1.0f, -100,
                                                          0, 1.0f, &loss, NULL, g, NULL), DST_ERR_LABEL);
    }
    expect_err("alias", dst_cpu_hinton(s, t, labels, N, C, 2.0f, 0.3f, 0.0f, -100, 0, 1.0f, &loss,
                                       NULL, g, t), DST_ERR_ALIAS);
    expect_err("mse_empty", dst_cpu_mse(s, t, 0, 1.0f, &loss, NULL, NULL), DST_ERR_SHAPE);
    /* Partial overlaps are aliases too, not only equal pointers. */
    expect_err("alias_partial", dst_cpu_hinton(s, t, labels, N, C, 2.0f, 0.3f, 0.0f, -100, 0, 1.0f,
                                               &loss, NULL, s + 1, NULL), DST_ERR_ALIAS);
    expect_err("alias_outputs", dst_cpu_mse(s, t, LEN, 1.0f, &loss, g, g + 3), DST_ERR_ALIAS);
    expect_err("alias_loss_in_grad", dst_cpu_mse(s, t, LEN, 1.0f, g + 2, g, NULL), DST_ERR_ALIAS);
    {
        /* Reverse KL where the teacher gives probability 0: infinite, so an input error; with a
         * floor teacher_eps = 1e-8 on the teacher inside the log, finite (tests/capi.rs compares
         * it with the Rust API). */
        float p[LEN];
        for (int i = 0; i < LEN; ++i) p[i] = (i % C == 0) ? 0.0f : 0.25f;
        expect_err("rkl_zero", dst_cpu_divergence(s, p, NULL, N, C, 1, 0.0f, 0.0f, 1, 1.0f, -100, 0,
                                                  1.0f, &loss, NULL, g, NULL), DST_ERR_INPUT);
        expect_ok("rkl_eps", dst_cpu_divergence(s, p, NULL, N, C, 1, 0.0f, 1e-8f, 1, 1.0f, -100, 0,
                                                1.0f, &loss, rows, g, NULL));
        if (!isfinite(loss)) {
            fprintf(stderr, "FAIL rkl_eps: loss %g is not finite\n", loss);
            failures++;
        }
        print_array("rkl_eps.loss", &loss, 1);
        print_array("rkl_eps.row_loss", rows, N);
        print_array("rkl_eps.grad_student", g, LEN);
        /* The floor is reverse KL's, with a given teacher only. */
        expect_err("eps_forward_kl",
                   dst_cpu_divergence(s, p, NULL, N, C, 0, 0.0f, 1e-8f, 1, 1.0f, -100, 0, 1.0f, &loss,
                                      NULL, g, NULL), DST_ERR_UNSUPPORTED);
        expect_err("eps_range",
                   dst_cpu_divergence(s, p, NULL, N, C, 1, 0.0f, 1.5f, 1, 1.0f, -100, 0, 1.0f, &loss,
                                      NULL, g, NULL), DST_ERR_INVALID_ARGUMENT);
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
        expect_err("cuda_null_ctx", dst_cuda_hinton(NULL, s, t, labels, N, C, 2.0f, 0.3f, 0.0f, -100, 0,
                                                    1.0f, &loss, NULL, g, NULL), DST_ERR_NULL_POINTER);
        expect_err("cuda_divergence_null_ctx",
                   dst_cuda_divergence(NULL, s, t, NULL, N, C, 1, 0.0f, 1e-8f, 1, 1.0f, -100, 0,
                                       1.0f, &loss, NULL, g, NULL), DST_ERR_NULL_POINTER);
        expect_err("cuda_sync_null", dst_cuda_synchronize(NULL), DST_ERR_NULL_POINTER);
        expect_ok("cuda_destroy_null", dst_cuda_destroy(NULL));
    }

    if (failures != 0) {
        fprintf(stderr, "%d failure(s)\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
