// Backends run validated feeds into caller-owned outputs. They are created by runtime.cpp's loader.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "validate.hpp"

namespace iia_native {

class Backend {
public:
    virtual ~Backend() = default;
    virtual const char* name() const = 0;
    virtual int64_t max_batch() const = 0;  // the largest batch this backend accepts
    // Writes the requested outputs (nullptr: not requested); returns nanoseconds spent in the backend's run.
    // Safe to call from several threads at once.
    virtual uint64_t run(const Feeds& feeds, float* images, uint8_t* images_uint8) = 0;
};

// The model a backend loads: its verified bytes, or its path when its tensors live in an external .data file.
struct ModelSource {
    std::vector<char> bytes;
    std::string path;
};

// ONNX Runtime (CPU, or CUDA when `cuda`); threads IIA_THREADS_DEFAULT (-1) = ONNX Runtime's default; `spin`
// false: idle intra-op threads sleep (session.intra_op.allow_spinning 0).
std::unique_ptr<Backend> make_onnxruntime(const Manifest& manifest, const ModelSource& model, bool cuda, int threads,
                                          int device_id, bool spin);
std::string onnxruntime_cuda_unavailable_reason();  // "" when the CUDA provider can be used

// TensorRT (only with IIA_WITH_TENSORRT): why an artifact's plan (present: plan_absent_reason is "") cannot
// run here ("" when it can), and the backend.
std::string tensorrt_unavailable_reason(const Manifest& manifest, int device_id);
std::unique_ptr<Backend> make_tensorrt(const Manifest& manifest, const std::vector<char>& plan, int device_id);
bool tensorrt_compiled();

// CUDA driver probe without linking CUDA: dlopen libcuda, cuInit, cuDeviceGetCount (0 when absent).
int cuda_device_count();

}  // namespace iia_native
