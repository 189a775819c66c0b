/*
 * tensor_wasm.h: the TensorWasm guest ABI (v2) for functions written in C.
 *
 * Every import of the module "tensor" (docs/GUEST-ABI.md), its error codes,
 * dtype codes and op codes. Build a function for wasm32-wasi with clang:
 *
 *     clang --target=wasm32-wasi -O2 -I guest/c -mexec-model=reactor \
 *         -Wl,--export=handle -o fn.wasm fn.c
 *
 * and export `handle` (int32_t handle(void): 0 on success, anything else a
 * function_error) and, optionally, `init`. Imports return a value >= 0 on
 * success or a negative TW_ERR_* code; tw_last_error() tells why.
 * Pointers are into the module's own memory; lengths are in bytes.
 */
#ifndef TENSOR_WASM_H
#define TENSOR_WASM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TW_IMPORT(name) __attribute__((import_module("tensor"), import_name(name)))

/* Error codes (docs/GUEST-ABI.md, "Error codes"). */
enum tw_error {
    TW_ERR_BAD_HANDLE = -1,
    TW_ERR_SHAPE = -2,
    TW_ERR_DTYPE = -3,
    TW_ERR_OUT_OF_BOUNDS = -4,
    TW_ERR_QUOTA = -5,
    TW_ERR_NOT_FOUND = -6,
    TW_ERR_INVALID = -7,
    TW_ERR_DEVICE = -8,
    TW_ERR_CANCELLED = -9, /* v2: the client is gone */
};

/* Element types. */
enum tw_dtype {
    TW_F32 = 0,
    TW_F16 = 1,
    TW_BF16 = 2,
    TW_I32 = 3,
    TW_I64 = 4,
    TW_U8 = 5,
};

/* tw_binary and tw_scalar. */
enum tw_binary_op {
    TW_ADD = 0,
    TW_SUB = 1,
    TW_MUL = 2,
    TW_DIV = 3,
    TW_MAX = 4,
    TW_MIN = 5,
    TW_POW = 6,
};

/* tw_unary. */
enum tw_unary_op {
    TW_NEG = 0,
    TW_EXP = 1,
    TW_LOG = 2,
    TW_SQRT = 3,
    TW_TANH = 4,
    TW_SIGMOID = 5,
    TW_RELU = 6,
    TW_GELU = 7,
    TW_SILU = 8,
    TW_ABS = 9,
};

/* tw_reduce. */
enum tw_reduce_op {
    TW_SUM = 0,
    TW_MEAN = 1,
    TW_REDUCE_MAX = 2,
    TW_REDUCE_MIN = 3,
    TW_ARGMAX = 4, /* gives i64 */
};

/* Tensors: handles > 0. Shapes and permutations are arrays of uint32_t. */
TW_IMPORT("new") int32_t tw_new(int32_t dtype, const uint32_t *shape, int32_t ndim,
                                const void *data, int32_t data_len);
TW_IMPORT("zeros") int32_t tw_zeros(int32_t dtype, const uint32_t *shape, int32_t ndim);
TW_IMPORT("read") int32_t tw_read(int32_t h, void *dst, int32_t dst_len);
TW_IMPORT("dtype") int32_t tw_dtype(int32_t h);
TW_IMPORT("ndim") int32_t tw_ndim(int32_t h);
TW_IMPORT("shape") int32_t tw_shape(int32_t h, uint32_t *dst, int32_t cap);
TW_IMPORT("free") int32_t tw_free(int32_t h);

/* The request and the answer. */
TW_IMPORT("input") int32_t tw_input(const char *name, int32_t name_len);
TW_IMPORT("output") int32_t tw_output(const char *name, int32_t name_len, int32_t h);
TW_IMPORT("asset") int32_t tw_asset(const char *name, int32_t name_len);
TW_IMPORT("input_len") int32_t tw_input_len(void);
TW_IMPORT("input_read") int32_t tw_input_read(int32_t offset, void *dst, int32_t len);
TW_IMPORT("output_write") int32_t tw_output_write(const void *src, int32_t len);
TW_IMPORT("set_error") int32_t tw_set_error(const char *msg, int32_t len);
TW_IMPORT("last_error") int32_t tw_last_error(char *dst, int32_t cap);

/* v2: cancellation and streaming (docs/GUEST-ABI.md). */
TW_IMPORT("cancelled") int32_t tw_cancelled(void);
TW_IMPORT("stream_write") int32_t tw_stream_write(const void *src, int32_t len);
TW_IMPORT("stream_tensor") int32_t tw_stream_tensor(const char *name, int32_t name_len,
                                                    int32_t h);

/* Ops: each returns a new handle. */
TW_IMPORT("matmul") int32_t tw_matmul(int32_t a, int32_t b);
TW_IMPORT("binary") int32_t tw_binary(int32_t op, int32_t a, int32_t b);
TW_IMPORT("scalar") int32_t tw_scalar(int32_t op, int32_t a, float value);
TW_IMPORT("unary") int32_t tw_unary(int32_t op, int32_t a);
TW_IMPORT("reduce") int32_t tw_reduce(int32_t op, int32_t a, int32_t axis, int32_t keepdim);
TW_IMPORT("softmax") int32_t tw_softmax(int32_t a, int32_t axis);
TW_IMPORT("layer_norm") int32_t tw_layer_norm(int32_t x, int32_t gamma, int32_t beta, float eps);
TW_IMPORT("rms_norm") int32_t tw_rms_norm(int32_t x, int32_t gamma, float eps);
TW_IMPORT("reshape") int32_t tw_reshape(int32_t a, const uint32_t *shape, int32_t ndim);
TW_IMPORT("transpose") int32_t tw_transpose(int32_t a, const uint32_t *perm, int32_t ndim);
TW_IMPORT("cast") int32_t tw_cast(int32_t a, int32_t dtype);
TW_IMPORT("gather") int32_t tw_gather(int32_t table, int32_t indices);
TW_IMPORT("concat") int32_t tw_concat(int32_t a, int32_t b, int32_t axis);
TW_IMPORT("attention") int32_t tw_attention(int32_t q, int32_t k, int32_t v, int32_t causal);

/* In tw_reshape, this dim is inferred (-1). */
#define TW_INFER UINT32_MAX

/* Length of a NUL-terminated name, for the *_len arguments. */
static inline int32_t tw_strlen(const char *s) {
    int32_t n = 0;
    while (s[n] != '\0') {
        n++;
    }
    return n;
}

#ifdef __cplusplus
}
#endif

#endif /* TENSOR_WASM_H */
