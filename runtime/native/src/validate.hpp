// Input validation of a run, once for every backend: runtime/sampler.py's check_noise / check_labels.
#pragma once

#include <vector>

#include "artifact.hpp"

namespace iia_native {

// Validated feeds: float32 C-contiguous noise [batch, *sample_shape] and int64 ids [batch] (conditional
// models). They point at the caller's memory when no conversion was needed, else at the owned copies.
struct Feeds {
    int64_t batch = 0;
    const float* noise = nullptr;
    const int64_t* labels = nullptr;
    const float* guidance = nullptr;  // float32 scales [batch] (artifacts compiled for a guidance range), owned
    std::vector<float> noise_owned;
    std::vector<int64_t> labels_owned;
    std::vector<float> guidance_owned;
};

// Throws Error(IIA_ERROR_INVALID_ARGUMENT) with the Python runtime's message. guidance: NULL (the manifest's
// default for every image), rank 0 (one scale for all) or [batch] real numbers (runtime/sampler.py check_guidance).
void prepare(const Manifest& manifest, const iia_tensor* noise, const iia_tensor* class_labels,
             const iia_tensor* guidance, Feeds* feeds);

int64_t sample_size(const Manifest& manifest);  // prod(sample_shape)

}  // namespace iia_native
