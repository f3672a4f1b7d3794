// ONNX Runtime backend through its C++ API: the session options of runtime/onnx_backend.py (all graph
// optimisations, sequential execution, errors-only log, intra-op threads with one inter-op thread), so that
// the same ONNX Runtime build gives bit-identical outputs from C++ and Python.
//
// Thread safety: ONE session; ONNX Runtime documents concurrent Session::Run calls as safe, so no lock.
// Inputs and outputs are wrapped, not copied: the outputs are written straight into the caller's buffers.
#include <algorithm>
#include <array>
#include <chrono>

#include <onnxruntime_cxx_api.h>

#include "backend.hpp"

namespace iia_native {
namespace {

Ort::Env& env() {
    static Ort::Env instance(ORT_LOGGING_LEVEL_ERROR, "iia");
    return instance;
}

std::string joined(const std::vector<std::string>& v) { return py_list(v); }

class OrtBackend final : public Backend {
public:
    OrtBackend(const Manifest& m, const ModelSource& model, bool cuda, int threads, int device_id)
        : manifest_(m), memory_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)), cuda_(cuda) {
        Ort::SessionOptions options;
        options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
        options.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);
        options.SetLogSeverityLevel(3);
        if (threads > 0) {
            options.SetIntraOpNumThreads(threads);
            options.SetInterOpNumThreads(1);
        }
        if (cuda) {  // provider options V2 with only device_id set, as Python's ("CUDAExecutionProvider", {...})
            const OrtApi& api = Ort::GetApi();
            OrtCUDAProviderOptionsV2* cuda_options = nullptr;
            Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda_options));
            std::unique_ptr<OrtCUDAProviderOptionsV2, void (*)(OrtCUDAProviderOptionsV2*)> owner(
                cuda_options, api.ReleaseCUDAProviderOptions);
            const std::string device = std::to_string(device_id);
            const char* keys[] = {"device_id"};
            const char* values[] = {device.c_str()};
            Ort::ThrowOnError(api.UpdateCUDAProviderOptions(cuda_options, keys, values, 1));
            try {
                options.AppendExecutionProvider_CUDA_V2(*cuda_options);
            } catch (const Ort::Exception& err) {
                throw unavailable(std::string("onnxruntime could not start its CUDA provider (") + err.what() +
                                  "); check the CUDA/cuDNN libraries onnxruntime-gpu needs");
            }
        }
        session_ = model.path.empty() ? Ort::Session(env(), model.bytes.data(), model.bytes.size(), options)
                                      : Ort::Session(env(), model.path.c_str(), options);
        Ort::AllocatorWithDefaultOptions allocator;
        std::vector<std::string> inputs, outputs;
        for (size_t i = 0; i < session_.GetInputCount(); ++i)
            inputs.push_back(session_.GetInputNameAllocated(i, allocator).get());
        for (size_t i = 0; i < session_.GetOutputCount(); ++i)
            outputs.push_back(session_.GetOutputNameAllocated(i, allocator).get());
        bool subset = true;
        for (const auto& name : m.output_names)
            subset = subset && std::find(outputs.begin(), outputs.end(), name) != outputs.end();
        if (inputs != m.input_names || !subset)
            throw invalid(path_join(m.root, SAMPLER_ONNX) + " takes " + joined(inputs) + " and gives " + joined(outputs) +
                          ", but the manifest says " + joined(m.input_names) + " -> " + joined(m.output_names));
        // the element types the caller's buffers are declared with
        auto check_type = [&](bool input, size_t index, const std::string& name, ONNXTensorElementDataType want,
                              const char* want_name) {
            Ort::TypeInfo info = input ? session_.GetInputTypeInfo(index) : session_.GetOutputTypeInfo(index);
            if (info.GetONNXType() != ONNX_TYPE_TENSOR || info.GetTensorTypeAndShapeInfo().GetElementType() != want)
                throw invalid(path_join(m.root, SAMPLER_ONNX) + ": tensor " + name + " is not " + want_name +
                              " as the manifest says");
        };
        check_type(true, 0, NOISE, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32");
        if (m.conditional()) check_type(true, 1, LABELS, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, "int64");
        for (size_t i = 0; i < outputs.size(); ++i) {
            if (outputs[i] == IMAGES) check_type(false, i, IMAGES, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32");
            if (outputs[i] == IMAGES_U8) check_type(false, i, IMAGES_U8, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "uint8");
        }
        rank_ = m.sample_shape.size();
        item_ = sample_size(m);
    }

    const char* name() const override { return cuda_ ? ORT_CUDA : ORT_CPU; }
    int64_t max_batch() const override { return manifest_.max_batch; }

    uint64_t run(const Feeds& f, float* images, uint8_t* images_uint8) override {
        std::array<int64_t, IIA_MAX_RANK + 1> shape{};
        shape[0] = f.batch;
        std::copy(manifest_.sample_shape.begin(), manifest_.sample_shape.end(), shape.begin() + 1);
        const size_t count = static_cast<size_t>(f.batch * item_);
        std::array<Ort::Value, 2> inputs{Ort::Value(nullptr), Ort::Value(nullptr)};
        // ONNX Runtime does not write to inputs: wrapping the caller's const memory is safe
        inputs[0] = Ort::Value::CreateTensor<float>(memory_, const_cast<float*>(f.noise), count, shape.data(), rank_ + 1);
        size_t n_inputs = 1;
        int64_t batch = f.batch;
        if (manifest_.conditional()) {
            inputs[1] = Ort::Value::CreateTensor<int64_t>(memory_, const_cast<int64_t*>(f.labels),
                                                          static_cast<size_t>(f.batch), &batch, 1);
            n_inputs = 2;
        }
        std::array<Ort::Value, 2> outputs{Ort::Value(nullptr), Ort::Value(nullptr)};
        std::array<const char*, 2> output_names{};
        size_t n_outputs = 0;
        if (images) {
            outputs[n_outputs] = Ort::Value::CreateTensor<float>(memory_, images, count, shape.data(), rank_ + 1);
            output_names[n_outputs++] = IMAGES;
        }
        if (images_uint8) {  // [B, H, W, C] from [C, H, W]
            const std::array<int64_t, 4> hwc{f.batch, shape[2], shape[3], shape[1]};
            outputs[n_outputs] = Ort::Value::CreateTensor<uint8_t>(memory_, images_uint8, count, hwc.data(), 4);
            output_names[n_outputs++] = IMAGES_U8;
        }
        static const char* const input_names[2] = {NOISE, LABELS};
        const auto start = std::chrono::steady_clock::now();
        session_.Run(Ort::RunOptions{nullptr}, input_names, inputs.data(), n_inputs, output_names.data(),
                     outputs.data(), n_outputs);
        const auto stop = std::chrono::steady_clock::now();
        return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(stop - start).count());
    }

private:
    const Manifest& manifest_;
    Ort::MemoryInfo memory_;
    Ort::Session session_{nullptr};
    bool cuda_;
    size_t rank_ = 0;
    int64_t item_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_onnxruntime(const Manifest& m, const ModelSource& model, bool cuda, int threads,
                                          int device_id) {
    try {
        return std::make_unique<OrtBackend>(m, model, cuda, threads, device_id);
    } catch (const Ort::Exception& err) {
        throw runtime_error(path_join(m.root, SAMPLER_ONNX) + ": ONNX Runtime could not load it (" + err.what() + ")");
    }
}

std::string onnxruntime_cuda_unavailable_reason() {
    if (cuda_device_count() == 0) return NO_CUDA;
    const std::vector<std::string> providers = Ort::GetAvailableProviders();
    if (std::find(providers.begin(), providers.end(), "CUDAExecutionProvider") == providers.end())
        return std::string("this onnxruntime (") + Ort::GetVersionString() +
               ") has no CUDAExecutionProvider (install onnxruntime-gpu); available: " + join(providers, ", ");
    return "";
}

}  // namespace iia_native
