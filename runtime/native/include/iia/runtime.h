/* iia runtime: the C ABI of a compiled iia sampler (an artifact directory written by `iia-compile`).
 *
 * The same contract as the Python runtime `iia.runtime`: manifest schema and version, sha256 of every file,
 * tensor names noise [B, *sample_shape] float32 (+ class_labels int64 [B]) (+ guidance float32 [B], artifacts
 * compiled for a guidance range: iia_run_ex) -> images float32
 * [B, *sample_shape] (+ images_uint8 uint8 [B, H, W, C]), and the same validation with the same one-line
 * messages.
 *
 *     iia_sampler* s = NULL;
 *     if (iia_load("digits-iia-edm-nfe9", NULL, &s) != IIA_OK) { fprintf(stderr, "%s\n", iia_last_error()); ... }
 *     int64_t shape[4] = {8, 1, 8, 8};  int64_t labels_shape[1] = {8};
 *     iia_tensor noise = {noise_data, IIA_FLOAT32, 4, shape};
 *     iia_tensor labels = {label_ids, IIA_INT64, 1, labels_shape};
 *     iia_run(s, &noise, &labels, images, 8 * 64, NULL, 0);      // caller-owned output
 *     iia_free(s);
 *
 * Errors: every function that can fail returns an iia_status; on failure iia_last_error() gives ONE line
 * naming the file, field or argument and the cause (the same text as the Python runtime's exception).
 * The message is thread-local: it belongs to the last failing call on the calling thread and stays valid
 * until that thread's next failing call.
 *
 * Threads: iia_run may be called on one sampler from any number of threads at once. ONNX Runtime backends
 * share one session (ONNX Runtime documents concurrent Run on a session as safe); the TensorRT backend has
 * one execution context guarded by a mutex, so its calls serialise (load one sampler per worker for
 * parallel GPU streams). iia_load and iia_free of DIFFERENT samplers may run concurrently; iia_free must not
 * race with calls on the same sampler.
 *
 * Handles: every function taking an iia_sampler* checks a magic number stored in it and fails with
 * IIA_ERROR_INVALID_ARGUMENT, "invalid or freed sampler handle" when it is wrong; iia_free clears it, so a
 * second iia_free of the same handle returns that error instead of freeing twice. The check is best effort:
 * using a freed handle is still undefined behaviour (its memory may be reused, even by another sampler).
 */
#ifndef IIA_RUNTIME_H
#define IIA_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && !defined(IIA_RUNTIME_STATIC)
#  ifdef IIA_RUNTIME_BUILDING
#    define IIA_API __declspec(dllexport)
#  else
#    define IIA_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define IIA_API __attribute__((visibility("default")))
#else
#  define IIA_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define IIA_RUNTIME_VERSION_MAJOR 0
#define IIA_RUNTIME_VERSION_MINOR 1
#define IIA_RUNTIME_VERSION_PATCH 0
#define IIA_MAX_RANK 8 /* most sample dimensions an artifact may have (a noise tensor has one more) */
#define IIA_THREADS_DEFAULT (-1) /* iia_load_options.threads: ONNX Runtime's default (Python: threads=None) */

typedef enum iia_status {
    IIA_OK = 0,
    IIA_ERROR_INVALID_ARGUMENT = 1,  /* a bad input or option: shape, dtype, labels, NaN/Inf, batch, buffer */
    IIA_ERROR_ARTIFACT = 2,          /* the artifact must not be used: missing, foreign, newer, corrupted */
    IIA_ERROR_BACKEND_UNAVAILABLE = 3, /* the backend cannot run here (no GPU, no TensorRT, plan built elsewhere) */
    IIA_ERROR_RUNTIME = 4            /* the backend failed while loading or running (message from it) */
} iia_status;

/* Element types of caller tensors (numpy's names in messages: float32, int64, ...). */
typedef enum iia_dtype {
    IIA_FLOAT32 = 1, IIA_FLOAT64 = 2, IIA_FLOAT16 = 3,
    IIA_INT8 = 4, IIA_INT16 = 5, IIA_INT32 = 6, IIA_INT64 = 7,
    IIA_UINT8 = 8, IIA_UINT16 = 9, IIA_UINT32 = 10, IIA_UINT64 = 11,
    IIA_BOOL = 12
} iia_dtype;

/* A caller-owned, C-contiguous (row-major) tensor; rank 0 is a scalar. Not copied beyond the call. rank is
 * checked (at most IIA_MAX_RANK + 1, and the rank the argument needs) before any of shape[0..rank) is read. */
typedef struct iia_tensor {
    const void* data;
    iia_dtype dtype;
    size_t rank;
    const int64_t* shape;
} iia_tensor;

typedef struct iia_load_options {
    size_t struct_size;   /* sizeof(iia_load_options): set by iia_load_options_init */
    const char* backend;  /* NULL or "auto" (TensorRT > ONNX Runtime CUDA > ONNX Runtime CPU, the first usable
                             here), "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu" */
    int threads;          /* ONNX Runtime intra-op threads in [1, 1024]; IIA_THREADS_DEFAULT (-1, the default):
                             ONNX Runtime's own choice (one per physical core). Others are refused ("threads must
                             lie in [1, 1024], got 0"), as the Python runtime's load(threads=0) */
    int device_id;        /* CUDA device for the GPU backends */
    int verify;           /* nonzero (default): check every file's sha256 against the manifest */
    int spin;             /* nonzero (default): idle ONNX Runtime intra-op threads spin-wait (lowest latency on
                             dedicated cores); 0: they sleep (session.intra_op.allow_spinning 0; Python:
                             load(spin=False)): steadier latency where busy threads outnumber free cores.
                             Added after `verify`: a struct_size that ends at `verify` (a caller built against
                             the earlier header) is accepted with spin on */
} iia_load_options;

typedef struct iia_sampler iia_sampler;

typedef struct iia_info {
    size_t rank;                          /* number of sample dimensions */
    int64_t sample_shape[IIA_MAX_RANK];   /* e.g. {C, H, W} */
    int64_t label_dim;                    /* 0: unconditional */
    int64_t max_batch;                    /* the largest batch the artifact was built for */
    int64_t nfe;                          /* denoiser evaluations per sample */
    int is_image;                         /* 1 when images_uint8 [B, H, W, C] is available */
    const char* backend;                  /* "onnxruntime-cpu", ...; valid while the sampler lives */
    const char* solver;                   /* the manifest's solver ("" when absent) */
    const char* model;                    /* the manifest's model name ("?" when absent) */
} iia_info;

/* Options of one call (iia_run_ex). struct_size policy as iia_load_options': this header's size is accepted, any
 * other refused naming the size expected (initialise with iia_run_options_init). */
typedef struct iia_run_options {
    size_t struct_size;           /* sizeof(iia_run_options): set by iia_run_options_init */
    const iia_tensor* guidance;   /* artifacts compiled for a guidance range (iia_get_guidance): NULL (the default)
                                     gives every image the manifest's default scale; rank 0: one scale for all
                                     images; [B]: one per image. Real dtypes, converted to float32, then checked:
                                     finite and inside [lo, hi] (inclusive), else IIA_ERROR_INVALID_ARGUMENT naming
                                     guidance (Python's message). Must be NULL for an artifact compiled for one
                                     scale ("this artifact was compiled for one guidance scale: ..."). */
} iia_run_options;

/* What an artifact takes as guidance: guided 1 with the range [lo, hi] and the default scale of an artifact compiled
 * for a guidance range (`iia-compile --guidance LO:HI`), else guided 0 (lo = hi = default_scale = 0). */
typedef struct iia_guidance {
    size_t struct_size;   /* sizeof(iia_guidance): set by the caller */
    int guided;
    double lo, hi, default_scale;
} iia_guidance;

/* Defaults: backend auto, threads IIA_THREADS_DEFAULT (ONNX Runtime's default), device 0, verify on, spin on. */
IIA_API void iia_load_options_init(iia_load_options* options);

/* Load DIR (or DIR/manifest.json). options may be NULL (defaults). On success *out owns a sampler
 * (free it with iia_free); on failure *out is NULL. */
IIA_API iia_status iia_load(const char* path, const iia_load_options* options, iia_sampler** out);

/* Free a sampler: IIA_OK (NULL too), or IIA_ERROR_INVALID_ARGUMENT for a handle that is not a live sampler
 * (a second free of the same handle; best effort, see "Handles" above). */
IIA_API iia_status iia_free(iia_sampler* sampler);

IIA_API iia_status iia_get_info(const iia_sampler* sampler, iia_info* info);

/* The artifact's guidance range (see iia_guidance); guidance->struct_size must be sizeof(iia_guidance). */
IIA_API iia_status iia_get_guidance(const iia_sampler* sampler, iia_guidance* guidance);

/* Defaults: guidance NULL (the manifest's default scale for an artifact compiled for a guidance range). */
IIA_API void iia_run_options_init(iia_run_options* options);

/* One line: the backend and, after auto, the backends skipped and why (valid while the sampler lives);
 * "" for NULL or an invalid handle (then iia_last_error() says why). */
IIA_API const char* iia_describe(const iia_sampler* sampler);

/* Run the sampler once.
 * noise: [B, *sample_shape] standard normal; float32 is used as is, float64/float16 are converted to float32
 *   (the graph computes in float32). Other dtypes, a wrong shape, NaN/Inf, B < 1 or B > max_batch fail.
 * class_labels: NULL for an unconditional model; required for a conditional one: ids [B] (any integer
 *   dtype), one id for the whole batch (rank 0), or one-hot [B, label_dim] (exactly one 1 per row).
 * images: float32 output [B, *sample_shape], capacity images_len elements; may be NULL.
 * images_uint8: uint8 output [B, H, W, C] (image models only), capacity images_uint8_len; may be NULL.
 * At least one output must be requested. Same inputs give bit-identical outputs. */
IIA_API iia_status iia_run(iia_sampler* sampler, const iia_tensor* noise, const iia_tensor* class_labels,
                           float* images, size_t images_len, uint8_t* images_uint8, size_t images_uint8_len);

/* iia_run with per-call options (NULL: iia_run_options_init's defaults, i.e. iia_run): the guidance scales. */
IIA_API iia_status iia_run_ex(iia_sampler* sampler, const iia_tensor* noise, const iia_tensor* class_labels,
                              const iia_run_options* options, float* images, size_t images_len,
                              uint8_t* images_uint8, size_t images_uint8_len);

/* The message of the last failing call on this thread ("" if none). */
IIA_API const char* iia_last_error(void);

/* Nanoseconds the last successful iia_run on this thread spent inside the backend's own run call
 * (ONNX Runtime's Run, TensorRT's enqueue + copies + synchronise): the rest is this library's overhead. */
IIA_API uint64_t iia_last_backend_ns(void);

/* "0.1.0"; and the backends this build of the library was compiled with, comma-separated. */
IIA_API const char* iia_version(void);
IIA_API const char* iia_compiled_backends(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* IIA_RUNTIME_H */
