/*
 * The digits classifier of examples/mlp-digits, in C over guest/c/tensor_wasm.h:
 * the same weights (its safetensors asset), the same ops, the same answers.
 *
 * Input `x`: f32 [n, 64] (or one sample [64]), intensities 0..16. Outputs
 * `probs` (f32 [n, 10]) and `labels` (i64 [n]). Assets: w1 [64, hidden],
 * b1 [hidden], w2 [hidden, 10], b2 [10].
 *
 * An instance keeps its tensors between calls until they are freed: every
 * handle an op makes is noted in `made` and freed before `handle` returns
 * (outputs keep their data alive).
 */
#include <stdint.h>

#include "tensor_wasm.h"

#define FEATURES 64
#define MAX_INTENSITY 16.0f
#define MAX_MADE 16

static int32_t made[MAX_MADE];
static int32_t n_made;

/* Notes a new handle to free at the end; negative codes pass through. */
static int32_t note(int32_t h) {
    if (h > 0 && n_made < MAX_MADE) {
        made[n_made++] = h;
    }
    return h;
}

static int32_t finish(int32_t code) {
    while (n_made > 0) {
        tw_free(made[--n_made]);
    }
    return code;
}

/* Ends the call with `msg` as the function's error. */
static int32_t fail(const char *msg) {
    tw_set_error(msg, tw_strlen(msg));
    return finish(1);
}

/* Ends the call with the host's message of the last failed import. */
static int32_t failed_import(void) {
    static char msg[512];
    int32_t n = tw_last_error(msg, (int32_t)sizeof msg);
    tw_set_error(msg, n < (int32_t)sizeof msg ? n : (int32_t)sizeof msg);
    return finish(1);
}

#define NAMED(s) (s), tw_strlen(s)
#define CHECK(h)                    \
    do {                            \
        if ((h) < 0) {              \
            return failed_import(); \
        }                           \
    } while (0)

__attribute__((export_name("handle"))) int32_t handle(void) {
    /* Inputs and assets are the host's to free. */
    int32_t x = tw_input(NAMED("x"));
    CHECK(x);
    if (tw_dtype(x) != TW_F32) {
        return fail("x must be f32");
    }
    uint32_t shape[2];
    int32_t ndim = tw_shape(x, shape, 2);
    CHECK(ndim);
    if (ndim == 1 && shape[0] == FEATURES) {
        uint32_t row[2] = {1, FEATURES};
        x = note(tw_reshape(x, row, 2));
        CHECK(x);
    } else if (!(ndim == 2 && shape[1] == FEATURES)) {
        return fail("x must be [n, 64] (or [64])");
    }
    int32_t w1 = tw_asset(NAMED("w1"));
    int32_t b1 = tw_asset(NAMED("b1"));
    int32_t w2 = tw_asset(NAMED("w2"));
    int32_t b2 = tw_asset(NAMED("b2"));
    CHECK(w1);
    CHECK(b1);
    CHECK(w2);
    CHECK(b2);

    int32_t h = note(tw_scalar(TW_DIV, x, MAX_INTENSITY));
    CHECK(h);
    h = note(tw_matmul(h, w1));
    CHECK(h);
    h = note(tw_binary(TW_ADD, h, b1));
    CHECK(h);
    h = note(tw_unary(TW_RELU, h));
    CHECK(h);
    int32_t logits = note(tw_matmul(h, w2));
    CHECK(logits);
    logits = note(tw_binary(TW_ADD, logits, b2));
    CHECK(logits);
    int32_t probs = note(tw_softmax(logits, -1));
    CHECK(probs);
    int32_t labels = note(tw_reduce(TW_ARGMAX, probs, -1, 0));
    CHECK(labels);
    CHECK(tw_output(NAMED("labels"), labels));
    CHECK(tw_output(NAMED("probs"), probs));
    return finish(0);
}
