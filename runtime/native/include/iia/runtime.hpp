// Thin C++17 RAII wrapper over the C ABI in iia/runtime.h (header-only: no C++ ABI crosses the library).
//
//     iia::Sampler sampler("digits-iia-edm-nfe9");                 // throws iia::Error with the one-line message
//     std::vector<float> images = sampler.run(noise, batch, labels); // float32 [B, *sample_shape]
//     images = sampler.run(noise, batch, labels, {1.0f, 2.5f, ...});  // one guidance scale per image (or one for
//                                                                    // all); artifacts compiled for a range only
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "iia/runtime.h"

namespace iia {

class Error : public std::runtime_error {
public:
    Error(iia_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    iia_status status() const noexcept { return status_; }

private:
    iia_status status_;
};

inline void check(iia_status status) {
    if (status != IIA_OK) throw Error(status, iia_last_error());
}

struct LoadOptions {
    std::string backend = "auto";  // auto, tensorrt, onnxruntime-cuda, onnxruntime-cpu
    int threads = IIA_THREADS_DEFAULT;  // ONNX Runtime intra-op threads (>= 1); IIA_THREADS_DEFAULT: its default
    int device_id = 0;
    bool verify = true;            // check every file's sha256 against the manifest
    bool spin = true;              // false: idle ONNX Runtime threads sleep (iia_load_options.spin)
};

class Sampler {
public:
    explicit Sampler(const std::string& path, const LoadOptions& options = {}) {
        iia_load_options o;
        iia_load_options_init(&o);
        o.backend = options.backend.c_str();
        o.threads = options.threads;
        o.device_id = options.device_id;
        o.verify = options.verify ? 1 : 0;
        o.spin = options.spin ? 1 : 0;
        check(iia_load(path.c_str(), &o, &handle_));
        check(iia_get_info(handle_, &info_));
        guidance_.struct_size = sizeof guidance_;
        check(iia_get_guidance(handle_, &guidance_));
    }
    Sampler(const Sampler&) = delete;
    Sampler& operator=(const Sampler&) = delete;
    Sampler(Sampler&& other) noexcept
        : handle_(std::exchange(other.handle_, nullptr)), info_(other.info_), guidance_(other.guidance_) {}
    Sampler& operator=(Sampler&& other) noexcept {
        if (this != &other) {
            iia_free(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
            info_ = other.info_;
            guidance_ = other.guidance_;
        }
        return *this;
    }
    ~Sampler() { iia_free(handle_); }  // (a live handle: cannot fail)

    const iia_info& info() const noexcept { return info_; }
    // guided 1 with [lo, hi] and the default scale for an artifact compiled for a guidance range
    const iia_guidance& guidance() const noexcept { return guidance_; }
    std::string describe() const { return iia_describe(handle_); }
    iia_sampler* get() const noexcept { return handle_; }
    std::vector<int64_t> sample_shape() const { return {info_.sample_shape, info_.sample_shape + info_.rank}; }
    int64_t sample_size() const noexcept {
        int64_t n = 1;
        for (size_t i = 0; i < info_.rank; ++i) n *= info_.sample_shape[i];
        return n;
    }

    // The general call: caller tensors in, caller buffers out (either output may be null). Thread-safe.
    // guidance: nullptr (the manifest's default), rank 0 (one scale for all) or [B] (iia_run_options.guidance).
    void run(const iia_tensor& noise, const iia_tensor* class_labels, float* images, size_t images_len,
             uint8_t* images_uint8 = nullptr, size_t images_uint8_len = 0, const iia_tensor* guidance = nullptr) const {
        iia_run_options o;
        iia_run_options_init(&o);
        o.guidance = guidance;
        check(iia_run_ex(handle_, &noise, class_labels, &o, images, images_len, images_uint8, images_uint8_len));
    }

    // float32 samples [batch, *sample_shape] from float32 noise [batch, *sample_shape] and label ids
    // (empty for an unconditional model; one id is used for the whole batch) and guidance scales (empty: the
    // manifest's default; one: for the whole batch; else one per image). The batch is checked first
    // (1..max_batch, the library's messages), then the noise's length.
    std::vector<float> run(const std::vector<float>& noise, int64_t batch, const std::vector<int64_t>& labels = {},
                           const std::vector<float>& guidance = {}) const {
        check_batch(batch);
        std::vector<float> out(static_cast<size_t>(batch * sample_size()));
        call(noise, batch, labels, guidance, out.data(), out.size(), nullptr, 0);
        return out;
    }

    // uint8 images [batch, H, W, C] (image models only).
    std::vector<uint8_t> images_uint8(const std::vector<float>& noise, int64_t batch,
                                      const std::vector<int64_t>& labels = {},
                                      const std::vector<float>& guidance = {}) const {
        check_batch(batch);
        std::vector<uint8_t> out(static_cast<size_t>(batch * sample_size()));
        call(noise, batch, labels, guidance, nullptr, 0, out.data(), out.size());
        return out;
    }

private:
    // the library's (and iia.runtime's) messages for a batch out of range, before any buffer is sized from it
    void check_batch(int64_t batch) const {
        if (batch < 1) throw Error(IIA_ERROR_INVALID_ARGUMENT, "noise batch must be >= 1, got " + std::to_string(batch));
        if (batch > info_.max_batch)
            throw Error(IIA_ERROR_INVALID_ARGUMENT, "noise batch " + std::to_string(batch) +
                                                        " exceeds the artifact's maximum batch " +
                                                        std::to_string(info_.max_batch) +
                                                        " (split the request, or recompile with --max-batch)");
    }

    void call(const std::vector<float>& noise, int64_t batch, const std::vector<int64_t>& labels,
              const std::vector<float>& guidance, float* images, size_t images_len, uint8_t* u8, size_t u8_len) const {
        std::vector<int64_t> shape{batch};
        shape.insert(shape.end(), info_.sample_shape, info_.sample_shape + info_.rank);
        if (noise.size() != static_cast<size_t>(batch * sample_size()))
            throw Error(IIA_ERROR_INVALID_ARGUMENT, "noise holds " + std::to_string(noise.size()) + " floats, but batch " +
                                                        std::to_string(batch) + " needs " +
                                                        std::to_string(batch * sample_size()));
        const iia_tensor n{noise.data(), IIA_FLOAT32, shape.size(), shape.data()};
        const int64_t count = static_cast<int64_t>(labels.size());
        const iia_tensor l{labels.data(), IIA_INT64, labels.size() == 1 ? size_t(0) : size_t(1), &count};
        const int64_t scales = static_cast<int64_t>(guidance.size());
        const iia_tensor g{guidance.data(), IIA_FLOAT32, guidance.size() == 1 ? size_t(0) : size_t(1), &scales};
        iia_run_options o;
        iia_run_options_init(&o);
        o.guidance = guidance.empty() ? nullptr : &g;
        check(iia_run_ex(handle_, &n, labels.empty() ? nullptr : &l, &o, images, images_len, u8, u8_len));
    }

    iia_sampler* handle_ = nullptr;
    iia_info info_{};
    iia_guidance guidance_{};
};

}  // namespace iia
