// TensorRT backend: `sampler.plan` through TensorRT's C++ API (nvinfer1, TensorRT >= 10 tensor-name API):
// deserialize, one optimisation profile (0), per-call setInputShape, enqueueV3 on a stream.
//
// UNBUILT and UNRUN in the development environment (no TensorRT, no GPU there: only syntax-checked against
// NVIDIA/TensorRT's public 11.1 headers and CUDA 12.9 headers); compiled only when CMake finds TensorRT
// (IIA_WITH_TENSORRT=AUTO|ON). Written against NVIDIA's documented API; see scripts/gpu_check_15.sh.
//
// Thread safety: ONE execution context and its device buffers, guarded by a mutex, so concurrent calls
// serialise (as the Python backend); load one sampler per worker for parallel streams.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <mutex>

#include <NvInferRuntime.h>
#include <NvInferVersion.h>
#include <cuda_runtime_api.h>

#include "backend.hpp"

namespace iia_native {
namespace {

class Logger final : public nvinfer1::ILogger {
public:
    void log(Severity severity, const char* message) noexcept override {
        if (severity <= Severity::kERROR) {
            std::lock_guard<std::mutex> lock(mu_);
            last_ = message;
        }
    }
    std::string last() {
        std::lock_guard<std::mutex> lock(mu_);
        return last_.empty() ? "see TensorRT's log" : last_;
    }

private:
    std::mutex mu_;
    std::string last_;
};

void cuda_check(cudaError_t status, const char* what) {
    if (status != cudaSuccess) throw runtime_error(std::string("CUDA ") + what + " failed: " + cudaGetErrorString(status));
}

std::string this_tensorrt_version() {
    return std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) + "." +
           std::to_string(NV_TENSORRT_PATCH) + "." + std::to_string(NV_TENSORRT_BUILD);
}

std::string py_tuple(const std::vector<int64_t>& v) {  // Python's repr of a tuple of ints
    std::vector<std::string> parts;
    for (int64_t x : v) parts.push_back(std::to_string(x));
    return "(" + join(parts, ", ") + (v.size() == 1 ? ",)" : ")");
}

std::string compute_capability(int device_id) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, device_id) != cudaSuccess) return "None";
    return std::to_string(prop.major) + "." + std::to_string(prop.minor);
}

size_t element_size(nvinfer1::DataType t) {
    switch (t) {
        case nvinfer1::DataType::kFLOAT: case nvinfer1::DataType::kINT32: return 4;
        case nvinfer1::DataType::kHALF: return 2;
        case nvinfer1::DataType::kINT8: case nvinfer1::DataType::kUINT8: case nvinfer1::DataType::kBOOL: return 1;
        case nvinfer1::DataType::kINT64: return 8;
        default: return 0;
    }
}

class TrtBackend final : public Backend {
    struct Binding {
        std::string name;
        bool input = false;
        nvinfer1::DataType type{};
        int64_t item = 1;  // elements per sample
        std::vector<int64_t> item_shape;
        void* device = nullptr;
        size_t bytes = 0;
    };

public:
    TrtBackend(const Manifest& m, const std::vector<char>& plan, int device_id) : manifest_(m), device_id_(device_id) {
        try {
            build(plan);
        } catch (...) {
            release();
            throw;
        }
    }
    ~TrtBackend() override { release(); }

    const char* name() const override { return TENSORRT; }
    int64_t max_batch() const override { return max_batch_; }

    uint64_t run(const Feeds& f, float* images, uint8_t* images_uint8) override {
        std::lock_guard<std::mutex> lock(mu_);
        const auto start = std::chrono::steady_clock::now();
        cuda_check(cudaSetDevice(device_id_), "cudaSetDevice");
        std::vector<int32_t> labels32;
        for (Binding& b : bindings_) {
            if (!b.input) continue;
            const void* host = nullptr;
            nvinfer1::Dims dims{};
            dims.d[0] = f.batch;
            if (b.name == NOISE) {
                host = f.noise;
                dims.nbDims = static_cast<int32_t>(manifest_.sample_shape.size() + 1);
                for (size_t i = 0; i < manifest_.sample_shape.size(); ++i) dims.d[i + 1] = manifest_.sample_shape[i];
            } else if (b.name == GUIDANCE) {  // float32 scales [B]
                dims.nbDims = 1;
                host = f.guidance;
            } else {  // class_labels: int64 ids, int32 where the engine declares int32 (TensorRT 8)
                dims.nbDims = 1;
                host = f.labels;
                if (b.type == nvinfer1::DataType::kINT32) {
                    labels32.assign(f.labels, f.labels + f.batch);
                    host = labels32.data();
                }
            }
            if (!context_->setInputShape(b.name.c_str(), dims))
                throw invalid("TensorRT refused input shape " + std::to_string(f.batch) + " for " + b.name);
            cuda_check(cudaMemcpyAsync(b.device, host, f.batch * b.item * element_size(b.type), cudaMemcpyHostToDevice,
                                       stream_), "copy to device");
        }
        if (!context_->enqueueV3(stream_)) throw runtime_error("TensorRT execution failed (" + logger_.last() + ")");
        for (Binding& b : bindings_) {
            void* host = b.name == IMAGES ? static_cast<void*>(images)
                       : b.name == IMAGES_U8 ? static_cast<void*>(images_uint8) : nullptr;
            if (b.input || host == nullptr) continue;
            cuda_check(cudaMemcpyAsync(host, b.device, f.batch * b.item * element_size(b.type), cudaMemcpyDeviceToHost,
                                       stream_), "copy to host");
        }
        cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        const auto stop = std::chrono::steady_clock::now();
        return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(stop - start).count());
    }

private:
    void build(const std::vector<char>& plan) {
        cuda_check(cudaSetDevice(device_id_), "cudaSetDevice");
        runtime_.reset(nvinfer1::createInferRuntime(logger_));
        if (!runtime_) throw unavailable("TensorRT could not create a runtime (" + logger_.last() + ")");
        engine_.reset(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
        if (!engine_) throw unavailable("TensorRT could not deserialize the plan (" + logger_.last() + ")");
        context_.reset(engine_->createExecutionContext());
        if (!context_) throw unavailable("TensorRT could not create an execution context (out of GPU memory?)");
        cuda_check(cudaStreamCreate(&stream_), "cudaStreamCreate");
        max_batch_ = manifest_.max_batch;
        const int n = engine_->getNbIOTensors();
        for (int i = 0; i < n; ++i) {
            Binding b;
            b.name = engine_->getIOTensorName(i);
            b.input = engine_->getTensorIOMode(b.name.c_str()) == nvinfer1::TensorIOMode::kINPUT;
            b.type = engine_->getTensorDataType(b.name.c_str());
            const nvinfer1::Dims dims = engine_->getTensorShape(b.name.c_str());
            for (int d = 1; d < dims.nbDims; ++d) {
                b.item *= dims.d[d];
                b.item_shape.push_back(dims.d[d]);
            }
            if (b.input) {  // the profile's maximum bounds the batch
                const nvinfer1::Dims hi = engine_->getProfileShape(b.name.c_str(), 0, nvinfer1::OptProfileSelector::kMAX);
                if (hi.nbDims > 0) max_batch_ = std::min<int64_t>(max_batch_, hi.d[0]);
            }
            bindings_.push_back(b);
        }
        // runtime/trt_backend.py: the plan must have every declared tensor, with the declared per-sample shape
        std::vector<std::string> names, missing;
        for (const Binding& b : bindings_) names.push_back(b.name);
        for (const auto& want : manifest_.input_names)
            if (std::find(names.begin(), names.end(), want) == names.end()) missing.push_back(want);
        for (const auto& want : manifest_.output_names)
            if (std::find(names.begin(), names.end(), want) == names.end()) missing.push_back(want);
        std::vector<std::string> wrong, said;
        for (const Binding& b : bindings_) {
            const std::vector<int64_t> declared = manifest_.item_shape(b.name);
            if (declared.empty() && !manifest_.declares(b.name)) continue;
            if (b.item_shape != declared) {
                wrong.push_back(py_repr(b.name) + ": " + py_tuple(b.item_shape));
                said.push_back(py_repr(b.name) + ": " + py_tuple(declared));
            }
        }
        if (!missing.empty() || !wrong.empty())
            throw artifact_error(path_join(manifest_.root, PLAN) + " does not match manifest.json: " +
                                 (!missing.empty() ? "lacks tensor(s) " + py_list(missing)
                                                   : "per-sample shapes {" + join(wrong, ", ") + "}, the manifest says {" +
                                                         join(said, ", ") + "}"));
        for (Binding& b : bindings_) {
            const bool ok = (b.name == NOISE && b.type == nvinfer1::DataType::kFLOAT) ||
                            (b.name == LABELS && (b.type == nvinfer1::DataType::kINT64 || b.type == nvinfer1::DataType::kINT32)) ||
                            (b.name == GUIDANCE && b.type == nvinfer1::DataType::kFLOAT) ||
                            (b.name == IMAGES && b.type == nvinfer1::DataType::kFLOAT) ||
                            (b.name == IMAGES_U8 && b.type == nvinfer1::DataType::kUINT8) ||
                            (!b.input && b.name != IMAGES && b.name != IMAGES_U8);
            if (!ok) throw invalid(path_join(manifest_.root, PLAN) + ": tensor " + b.name + " has an unexpected data type");
            b.bytes = std::max<size_t>(1, static_cast<size_t>(max_batch_ * b.item) * std::max<size_t>(1, element_size(b.type)));
            cuda_check(cudaMalloc(&b.device, b.bytes), "cudaMalloc");
            if (!context_->setTensorAddress(b.name.c_str(), b.device))
                throw unavailable("TensorRT refused the buffer for tensor " + b.name);
        }
    }

    void release() noexcept {
        for (Binding& b : bindings_)
            if (b.device) cudaFree(b.device);
        bindings_.clear();
        if (stream_) cudaStreamDestroy(stream_);
        stream_ = nullptr;
        context_.reset();
        engine_.reset();
        runtime_.reset();
    }

    const Manifest& manifest_;
    int device_id_;
    Logger logger_;
    std::unique_ptr<nvinfer1::IRuntime> runtime_;
    std::unique_ptr<nvinfer1::ICudaEngine> engine_;
    std::unique_ptr<nvinfer1::IExecutionContext> context_;
    cudaStream_t stream_ = nullptr;
    std::vector<Binding> bindings_;
    int64_t max_batch_ = 0;
    std::mutex mu_;
};

}  // namespace

bool tensorrt_compiled() { return true; }

std::string tensorrt_unavailable_reason(const Manifest& m, int device_id) {
    if (cuda_device_count() == 0) return NO_CUDA;
    const std::string& built_v = m.engine_tensorrt;
    const std::string& built_cc = m.engine_compute_capability;
    const std::string here_v = this_tensorrt_version(), here_cc = compute_capability(device_id);
    // Python records tensorrt.__version__ ("10.3.0" or "10.3.0.26"): either form of this build matches
    const std::string here_short = here_v.substr(0, here_v.rfind('.'));
    const int linked = getInferLibVersion();  // the library actually loaded must be the one compiled against
    const int compiled = NV_TENSORRT_MAJOR * (NV_TENSORRT_MAJOR >= 10 ? 10000 : 1000) + NV_TENSORRT_MINOR * 100 + NV_TENSORRT_PATCH;
    if ((built_v == here_v || built_v == here_short) && built_cc == here_cc && linked == compiled) return "";
    return std::string(PLAN) + " was built with TensorRT " + built_v + " for GPU compute capability " + built_cc +
           ", but this machine has TensorRT " + here_v + " and compute capability " + here_cc +
           "; a TensorRT plan only runs where it was built (recompile the artifact here, or use an onnxruntime backend)";
}

std::unique_ptr<Backend> make_tensorrt(const Manifest& m, const std::vector<char>& plan, int device_id) {
    return std::make_unique<TrtBackend>(m, plan, device_id);
}

}  // namespace iia_native
