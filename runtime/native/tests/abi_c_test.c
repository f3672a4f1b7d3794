/* The C ABI from C (the header compiles as C99): status codes and messages of good and bad calls.
 * usage: abi_c_test COND_DIR UNCOND_DIR  (a class-conditional image artifact and an unconditional one)
 * The messages themselves are compared with the Python runtime's in tests/test_native.py. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iia/runtime.h"

static int failures = 0;

static void expect(int ok, const char* what) {
    if (!ok) {
        fprintf(stderr, "FAIL: %s (last error: %s)\n", what, iia_last_error());
        ++failures;
    }
}

static void expect_error(iia_status got, iia_status want, const char* fragment, const char* what) {
    const char* message = iia_last_error();
    if (got != want || strstr(message, fragment) == NULL || strchr(message, '\n') != NULL) {
        fprintf(stderr, "FAIL: %s: status %d (want %d), message '%s' (want '%s')\n", what, (int)got, (int)want,
                message, fragment);
        ++failures;
    }
}

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: abi_c_test COND_DIR UNCOND_DIR\n");
        return 2;
    }
    iia_sampler* s = NULL;
    iia_load_options options;
    iia_load_options_init(&options);

    /* loading */
    expect_error(iia_load("/nonexistent/artifact", NULL, &s), IIA_ERROR_ARTIFACT, "not found", "missing dir");
    expect(s == NULL, "out is NULL after a failed load");
    options.backend = "bogus";
    expect_error(iia_load(argv[1], &options, &s), IIA_ERROR_INVALID_ARGUMENT, "unknown backend 'bogus'", "backend name");
    options.backend = "tensorrt";
    expect_error(iia_load(argv[1], &options, &s), IIA_ERROR_BACKEND_UNAVAILABLE,
                 "backend 'tensorrt' is unavailable: the artifact has no TensorRT plan", "tensorrt without a plan");
    options.backend = "onnxruntime-cpu";
    expect(options.threads == IIA_THREADS_DEFAULT, "threads default to IIA_THREADS_DEFAULT");
    options.threads = 0;  /* refused as Python's load(threads=0); IIA_THREADS_DEFAULT is ONNX Runtime's default */
    expect_error(iia_load(argv[1], &options, &s), IIA_ERROR_INVALID_ARGUMENT, "threads must lie in [1, 1024], got 0", "threads 0");
    options.threads = -2;
    expect_error(iia_load(argv[1], &options, &s), IIA_ERROR_INVALID_ARGUMENT, "threads must lie in [1, 1024], got -2", "threads -2");
    options.threads = 100000;  /* would start 100000 ONNX Runtime threads */
    expect_error(iia_load(argv[1], &options, &s), IIA_ERROR_INVALID_ARGUMENT, "threads must lie in [1, 1024], got 100000",
                 "threads 100000");
    options.threads = 1;
    options.struct_size = 3;
    expect_error(iia_load(argv[1], &options, &s), IIA_ERROR_INVALID_ARGUMENT, "struct_size", "struct_size");
    options.struct_size = sizeof options;
    expect_error(iia_load(argv[1], &options, NULL), IIA_ERROR_INVALID_ARGUMENT, "out is NULL", "out NULL");
    expect(iia_load(argv[1], &options, &s) == IIA_OK && s != NULL, "load the conditional artifact");
    if (s == NULL) return 1;

    iia_info info;
    expect(iia_get_info(s, &info) == IIA_OK, "info");
    expect(info.label_dim > 0 && info.is_image && info.rank == 3 && info.max_batch >= 3, "conditional image artifact");
    expect(strcmp(info.backend, "onnxruntime-cpu") == 0, "backend name");
    const int64_t item = info.sample_shape[0] * info.sample_shape[1] * info.sample_shape[2];
    const int64_t batch = 3;
    float* noise = malloc(sizeof(float) * (size_t)(batch * item));
    double* noise64 = malloc(sizeof(double) * (size_t)(batch * item));
    float* out = malloc(sizeof(float) * (size_t)(batch * item));
    float* out2 = malloc(sizeof(float) * (size_t)(batch * item));
    uint8_t* u8 = malloc((size_t)(batch * item));
    unsigned seed = 1;
    for (int64_t i = 0; i < batch * item; ++i) { /* a fixed sequence: Irwin-Hall approximation of N(0, 1) */
        float acc = 0;
        for (int k = 0; k < 12; ++k) {
            seed = seed * 1103515245u + 12345u;
            acc += (float)((seed >> 8) & 0xffff) / 65536.0f;
        }
        noise[i] = acc - 6.0f;
        noise64[i] = noise[i];
    }
    int64_t shape[4] = {batch, info.sample_shape[0], info.sample_shape[1], info.sample_shape[2]};
    int64_t ids[3] = {0, 1, (int64_t)info.label_dim - 1};
    int64_t lshape[1] = {batch};
    iia_tensor n = {noise, IIA_FLOAT32, 4, shape};
    iia_tensor l = {ids, IIA_INT64, 1, lshape};
    const size_t count = (size_t)(batch * item);

    expect(iia_run(s, &n, &l, out, count, u8, count) == IIA_OK, "run");
    expect(iia_last_backend_ns() > 0, "backend time recorded");
    int finite = 1;
    for (size_t i = 0; i < count; ++i) finite = finite && isfinite(out[i]);
    expect(finite, "finite outputs");
    expect(iia_run(s, &n, &l, out2, count, NULL, 0) == IIA_OK && memcmp(out, out2, count * sizeof(float)) == 0,
           "same inputs, bit-identical outputs");
    iia_tensor n64 = {noise64, IIA_FLOAT64, 4, shape};
    expect(iia_run(s, &n64, &l, out2, count, NULL, 0) == IIA_OK && memcmp(out, out2, count * sizeof(float)) == 0,
           "float64 noise is converted to the same float32");
    /* one-hot labels equal ids */
    float* onehot = calloc((size_t)(batch * info.label_dim), sizeof(float));
    for (int64_t r = 0; r < batch; ++r) onehot[r * info.label_dim + ids[r]] = 1.0f;
    int64_t oshape[2] = {batch, info.label_dim};
    iia_tensor oh = {onehot, IIA_FLOAT32, 2, oshape};
    expect(iia_run(s, &n, &oh, out2, count, NULL, 0) == IIA_OK && memcmp(out, out2, count * sizeof(float)) == 0,
           "one-hot labels equal ids");

    /* bad inputs: status + one-line message */
    iia_tensor bad = n;
    bad.dtype = IIA_INT32;
    expect_error(iia_run(s, &bad, &l, out, count, NULL, 0), IIA_ERROR_INVALID_ARGUMENT,
                 "noise must be a float array (float32 expected), got dtype int32", "int noise");
    bad = n;
    bad.rank = 3;
    bad.shape = shape + 1;
    expect_error(iia_run(s, &bad, &l, out, count, NULL, 0), IIA_ERROR_INVALID_ARGUMENT, "(add a batch axis: noise[None])",
                 "missing batch axis");
    int64_t big[4] = {info.max_batch + 1, shape[1], shape[2], shape[3]};
    float* many = calloc((size_t)((info.max_batch + 1) * item), sizeof(float));
    bad = n;
    bad.data = many;
    bad.shape = big;
    expect_error(iia_run(s, &bad, &l, out, count, NULL, 0), IIA_ERROR_INVALID_ARGUMENT,
                 "exceeds the artifact's maximum batch", "batch over max");
    noise[5] = NAN;
    expect_error(iia_run(s, &n, &l, out, count, NULL, 0), IIA_ERROR_INVALID_ARGUMENT, "noise contains 1 NaN/Inf value(s)",
                 "NaN noise");
    noise[5] = 0.0f;
    expect_error(iia_run(s, &n, NULL, out, count, NULL, 0), IIA_ERROR_INVALID_ARGUMENT, "this model is class-conditional",
                 "labels missing");
    ids[1] = info.label_dim;
    expect_error(iia_run(s, &n, &l, out, count, NULL, 0), IIA_ERROR_INVALID_ARGUMENT, "out of range", "label range");
    ids[1] = 1;
    iia_tensor fl = {onehot, IIA_FLOAT32, 1, lshape};
    expect_error(iia_run(s, &n, &fl, out, count, NULL, 0), IIA_ERROR_INVALID_ARGUMENT,
                 "class label ids must be integers, got dtype float32", "float ids");
    expect_error(iia_run(s, &n, &l, NULL, 0, NULL, 0), IIA_ERROR_INVALID_ARGUMENT, "no output requested", "no output");
    expect_error(iia_run(s, &n, &l, out, count - 1, NULL, 0), IIA_ERROR_INVALID_ARGUMENT, "buffer holds", "small buffer");
    expect_error(iia_run(NULL, &n, &l, out, count, NULL, 0), IIA_ERROR_INVALID_ARGUMENT, "sampler is NULL", "NULL sampler");
    {   /* a rank beyond IIA_MAX_RANK + 1 is refused before shape[0..rank) is read (shape holds 4 dims here) */
        iia_tensor huge = {noise, IIA_FLOAT32, (size_t)1 << 40, shape};
        expect_error(iia_run(s, &huge, &l, out, count, NULL, 0), IIA_ERROR_INVALID_ARGUMENT,
                     "noise has rank 1099511627776, more than the 9 dimensions", "huge noise rank");
        iia_tensor huge_labels = {ids, IIA_INT64, 1000, lshape};
        expect_error(iia_run(s, &n, &huge_labels, out, count, NULL, 0), IIA_ERROR_INVALID_ARGUMENT,
                     "class_labels has rank 1000, more than the 9 dimensions", "huge label rank");
    }
    {   /* a handle that is not a live sampler (zeroed memory) is refused by every entry */
        uint64_t fake[64] = {0};
        iia_sampler* bogus = (iia_sampler*)fake;
        expect_error(iia_run(bogus, &n, &l, out, count, NULL, 0), IIA_ERROR_INVALID_ARGUMENT,
                     "invalid or freed sampler handle", "bogus handle run");
        expect_error(iia_get_info(bogus, &info), IIA_ERROR_INVALID_ARGUMENT, "invalid or freed sampler handle",
                     "bogus handle info");
        expect(strcmp(iia_describe(bogus), "") == 0, "bogus handle describe");
        expect_error(iia_free(bogus), IIA_ERROR_INVALID_ARGUMENT, "invalid or freed sampler handle", "bogus handle free");
    }
    expect(iia_free(s) == IIA_OK, "free");
    /* a double free is refused (best effort: using a freed handle is undefined behaviour, see runtime.h) */
    expect_error(iia_free(s), IIA_ERROR_INVALID_ARGUMENT, "invalid or freed sampler handle", "double free");
    expect(iia_free(NULL) == IIA_OK, "free NULL");

    /* unconditional model: labels refused */
    s = NULL;
    expect(iia_load(argv[2], &options, &s) == IIA_OK, "load the unconditional artifact");
    if (s) {
        iia_info u;
        iia_get_info(s, &u);
        int64_t ushape[4] = {1, u.sample_shape[0], u.rank > 1 ? u.sample_shape[1] : 0, u.rank > 2 ? u.sample_shape[2] : 0};
        const size_t ucount = (size_t)(u.sample_shape[0] * (u.rank > 1 ? u.sample_shape[1] : 1) * (u.rank > 2 ? u.sample_shape[2] : 1));
        float* un = calloc(ucount, sizeof(float));
        float* uo = calloc(ucount, sizeof(float));
        iia_tensor t = {un, IIA_FLOAT32, u.rank + 1, ushape};
        int64_t one = 1;
        iia_tensor lab = {ids, IIA_INT64, 1, &one};
        expect_error(iia_run(s, &t, &lab, uo, ucount, NULL, 0), IIA_ERROR_INVALID_ARGUMENT,
                     "this model is unconditional (label_dim 0): class_labels must be None", "labels on unconditional");
        expect(iia_run(s, &t, NULL, uo, ucount, NULL, 0) == IIA_OK, "unconditional run");
        free(un);
        free(uo);
        iia_free(s);
    }
    free(noise); free(noise64); free(out); free(out2); free(u8); free(onehot); free(many);
    if (failures) {
        fprintf(stderr, "%d failure(s)\n", failures);
        return 1;
    }
    printf("abi_c_test: all checks passed (%s, backends compiled: %s)\n", iia_version(), iia_compiled_backends());
    return 0;
}
