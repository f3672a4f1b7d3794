// ONNX Runtime backend through its C++ API: the session options of runtime/onnx_backend.py (all graph
// optimisations, sequential execution, errors-only log, intra-op threads with one inter-op thread), so that
// the same ONNX Runtime build gives bit-identical outputs from C++ and Python.
//
// Thread safety: ONE session (plus one per manifest static_batches entry, made once under a lock on first use);
// ONNX Runtime documents concurrent Session::Run calls as safe, so runs take no lock.
// Inputs and outputs are wrapped, not copied: the outputs are written straight into the caller's buffers.
#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <map>
#include <mutex>

#include <nlohmann/json.hpp>
#include <onnxruntime_cxx_api.h>

#include "backend.hpp"

namespace iia_native {
namespace {

Ort::Env& env() {
    static Ort::Env instance(ORT_LOGGING_LEVEL_ERROR, "iia");
    return instance;
}

std::string ort_type_name(ONNXTensorElementDataType t) {
    switch (t) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "tensor(float)";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "tensor(uint8)";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "tensor(int8)";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "tensor(uint16)";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "tensor(int16)";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "tensor(int32)";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "tensor(int64)";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING: return "tensor(string)";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "tensor(bool)";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "tensor(float16)";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "tensor(double)";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return "tensor(uint32)";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return "tensor(uint64)";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "tensor(bfloat16)";
        default: return "tensor(?)";
    }
}

// the manifest's tensors as (name, ONNX Runtime type, shape) triples (runtime/onnx_backend.py's declared)
json declared(const Manifest& m, bool inputs) {
    static const std::pair<const char*, const char*> TYPES[] = {
        {"float32", "tensor(float)"}, {"float16", "tensor(float16)"}, {"bfloat16", "tensor(bfloat16)"},
        {"int64", "tensor(int64)"}, {"int32", "tensor(int32)"}, {"uint8", "tensor(uint8)"}};
    json out = json::array();
    for (const auto& t : (*m.doc)[inputs ? "inputs" : "outputs"]) {
        std::string type = "?";
        for (const auto& [dtype, ort] : TYPES)
            if (t["dtype"] == dtype) type = ort;
        out.push_back(json::array({t["name"], type, t["shape"]}));
    }
    return out;
}

std::string tuples(const json& list) {  // Python's repr of a list of (name, type, shape) tuples
    std::vector<std::string> parts;
    for (const auto& t : list) {
        std::vector<std::string> dims;  // "batch" or an int (the manifest's shapes are checked)
        for (const auto& d : t[2]) dims.push_back(d.is_string() ? py_repr(d.get<std::string>()) : std::to_string(d.get<int64_t>()));
        parts.push_back("(" + py_repr(t[0].get<std::string>()) + ", " + py_repr(t[1].get<std::string>()) + ", [" +
                        join(dims, ", ") + "])");
    }
    return "[" + join(parts, ", ") + "]";
}

std::vector<std::pair<std::string, std::string>> graph_metadata(const Manifest& m) {
    std::vector<std::string> dims;
    for (int64_t d : m.sample_shape) dims.push_back(std::to_string(d));
    return {{"iia.nfe", std::to_string(m.nfe)}, {"iia.label_dim", std::to_string(m.label_dim)},
            {"iia.sample_shape", join(dims, ",")}};
}

const char* ort_error_name(OrtErrorCode code) {  // the Python exception class onnxruntime raises for it
    switch (code) {
        case ORT_FAIL: return "Fail";
        case ORT_INVALID_ARGUMENT: return "InvalidArgument";
        case ORT_NO_SUCHFILE: return "NoSuchFile";
        case ORT_NO_MODEL: return "NoModel";
        case ORT_ENGINE_ERROR: return "EngineError";
        case ORT_RUNTIME_EXCEPTION: return "RuntimeException";
        case ORT_INVALID_PROTOBUF: return "InvalidProtobuf";
        case ORT_MODEL_LOADED: return "ModelLoaded";
        case ORT_NOT_IMPLEMENTED: return "NotImplemented";
        case ORT_INVALID_GRAPH: return "InvalidGraph";
        case ORT_EP_FAIL: return "EPFail";
        default: return "Fail";
    }
}

const char* ort_code_text(OrtErrorCode code) {
    switch (code) {
        case ORT_FAIL: return "FAIL";
        case ORT_INVALID_ARGUMENT: return "INVALID_ARGUMENT";
        case ORT_NO_SUCHFILE: return "NO_SUCHFILE";
        case ORT_NO_MODEL: return "NO_MODEL";
        case ORT_ENGINE_ERROR: return "ENGINE_ERROR";
        case ORT_RUNTIME_EXCEPTION: return "RUNTIME_EXCEPTION";
        case ORT_INVALID_PROTOBUF: return "INVALID_PROTOBUF";
        case ORT_MODEL_LOADED: return "MODEL_LOADED";
        case ORT_NOT_IMPLEMENTED: return "NOT_IMPLEMENTED";
        case ORT_INVALID_GRAPH: return "INVALID_GRAPH";
        case ORT_EP_FAIL: return "EP_FAIL";
        default: return "FAIL";
    }
}

class OrtBackend final : public Backend {
public:
    OrtBackend(const Manifest& m, const ModelSource& model, bool cuda, int threads, int device_id, bool spin)
        : manifest_(m), memory_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)), cuda_(cuda),
          spin_(spin), threads_(threads), device_id_(device_id) {
        if (!m.static_batches.empty()) model_ = model;  // kept only while specialised sessions may still be made
        session_ = make_session(model, 0);
        check_graph(m);
        rank_ = m.sample_shape.size();
        item_ = sample_size(m);
    }

    // A session of sampler.onnx; static_batch > 0 fixes the free dimension BATCH_AXIS (runtime/onnx_backend.py's
    // session_options), so ONNX Runtime folds every shape computation for that batch.
    Ort::Session make_session(const ModelSource& model, int64_t static_batch) {
        const bool cuda = cuda_;
        const int threads = threads_, device_id = device_id_;
        Ort::SessionOptions options;
        if (static_batch > 0)  // (the C API call: the C++ wrapper of these headers has none)
            Ort::ThrowOnError(Ort::GetApi().AddFreeDimensionOverrideByName(options, BATCH_AXIS, static_batch));
        options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
        options.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);
        options.SetLogSeverityLevel(3);
        if (threads > 0) {
            options.SetIntraOpNumThreads(threads);
            options.SetInterOpNumThreads(1);
        }
        if (!spin_) options.AddConfigEntry("session.intra_op.allow_spinning", "0");
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
        return model.path.empty() ? Ort::Session(env(), model.bytes.data(), model.bytes.size(), options)
                                  : Ort::Session(env(), model.path.c_str(), options);
    }

    // The session for a call of `batch` samples: its specialisation when listed (made once, on first use), else
    // the dynamic one. Runs themselves take no lock.
    Ort::Session& session_for(int64_t batch) {
        if (!std::binary_search(manifest_.static_batches.begin(), manifest_.static_batches.end(), batch)) return session_;
        std::lock_guard<std::mutex> lock(static_mu_);
        auto it = static_.find(batch);
        if (it == static_.end())
            it = static_.emplace(batch, std::make_unique<Ort::Session>(make_session(model_, batch))).first;
        return *it->second;
    }

    // runtime/onnx_backend.py's check_graph_interface: names, dtypes and static dimensions as the manifest
    // describes them, then the graph's stamped metadata (runtime/contract.py's check_graph_metadata)
    void check_graph(const Manifest& m) {
        const std::string where = path_join(m.root, SAMPLER_ONNX);
        Ort::AllocatorWithDefaultOptions allocator;
        auto describe = [&](bool input, size_t i) {
            const std::string name = input ? session_.GetInputNameAllocated(i, allocator).get()
                                           : session_.GetOutputNameAllocated(i, allocator).get();
            Ort::TypeInfo info = input ? session_.GetInputTypeInfo(i) : session_.GetOutputTypeInfo(i);
            std::string type = "?";
            json dims = json::array();
            if (info.GetONNXType() == ONNX_TYPE_TENSOR) {
                auto tensor = info.GetTensorTypeAndShapeInfo();
                type = ort_type_name(tensor.GetElementType());
                for (int64_t d : tensor.GetShape()) dims.push_back(d < 0 ? json("batch") : json(d));
            }
            return json::array({name, type, dims});
        };
        json graph_in = json::array(), graph_out = json::array();
        for (size_t i = 0; i < session_.GetInputCount(); ++i) graph_in.push_back(describe(true, i));
        for (size_t i = 0; i < session_.GetOutputCount(); ++i) graph_out.push_back(describe(false, i));
        const json want_in = declared(m, true), want_out = declared(m, false);
        bool ok = graph_in == want_in;
        for (const auto& t : want_out) {
            bool found = false;
            for (const auto& g : graph_out) found = found || g == t;
            ok = ok && found;
        }
        if (!ok)
            throw artifact_error(where + " takes " + tuples(graph_in) + " and gives " + tuples(graph_out) +
                                 ", but manifest.json describes " + tuples(want_in) + " -> " + tuples(want_out));
        Ort::ModelMetadata meta = session_.GetModelMetadata();
        std::vector<std::pair<std::string, std::string>> want = graph_metadata(m);
        std::vector<std::string> found(want.size());
        std::vector<bool> has(want.size(), false);
        std::vector<std::string> keys;
        for (auto& key : meta.GetCustomMetadataMapKeysAllocated(allocator)) keys.emplace_back(key.get());
        for (size_t i = 0; i < want.size(); ++i)
            if (std::find(keys.begin(), keys.end(), want[i].first) != keys.end()) {
                has[i] = true;
                found[i] = meta.LookupCustomMetadataMapAllocated(want[i].first.c_str(), allocator).get();
            }
        if (std::none_of(has.begin(), has.end(), [](bool h) { return h; }))
            throw artifact_error(where + " records no iia graph metadata (iia.nfe, iia.label_dim, iia.sample_shape): it "
                                 "was compiled by an older iia or by another tool; recompile it with iia-compile");
        for (size_t i = 0; i < want.size(); ++i)
            if (!has[i] || found[i] != want[i].second)
                throw artifact_error(where + " was compiled with " + want[i].first.substr(4) + " " +
                                     (has[i] ? found[i] : std::string("(not recorded)")) + ", but manifest.json says " +
                                     want[i].second + " (the manifest was edited, or belongs to another graph)");
    }

    const char* name() const override { return cuda_ ? ORT_CUDA : ORT_CPU; }
    int64_t max_batch() const override { return manifest_.max_batch; }

    uint64_t run(const Feeds& f, float* images, uint8_t* images_uint8) override {
        std::array<int64_t, IIA_MAX_RANK + 1> shape{};
        shape[0] = f.batch;
        std::copy(manifest_.sample_shape.begin(), manifest_.sample_shape.end(), shape.begin() + 1);
        const size_t count = static_cast<size_t>(f.batch * item_);
        std::array<Ort::Value, 3> inputs{Ort::Value(nullptr), Ort::Value(nullptr), Ort::Value(nullptr)};
        std::array<const char*, 3> input_names{NOISE, LABELS, GUIDANCE};
        // ONNX Runtime does not write to inputs: wrapping the caller's const memory is safe
        inputs[0] = Ort::Value::CreateTensor<float>(memory_, const_cast<float*>(f.noise), count, shape.data(), rank_ + 1);
        size_t n_inputs = 1;
        int64_t batch = f.batch;
        if (manifest_.conditional()) {
            inputs[1] = Ort::Value::CreateTensor<int64_t>(memory_, const_cast<int64_t*>(f.labels),
                                                          static_cast<size_t>(f.batch), &batch, 1);
            n_inputs = 2;
        }
        if (manifest_.guided) {  // after class_labels (or noise): the manifest's order
            inputs[n_inputs] = Ort::Value::CreateTensor<float>(memory_, const_cast<float*>(f.guidance),
                                                               static_cast<size_t>(f.batch), &batch, 1);
            input_names[n_inputs++] = GUIDANCE;
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
        Ort::Session& session = session_for(f.batch);
        const auto start = std::chrono::steady_clock::now();
        session.Run(Ort::RunOptions{nullptr}, input_names.data(), inputs.data(), n_inputs, output_names.data(),
                     outputs.data(), n_outputs);
        const auto stop = std::chrono::steady_clock::now();
        return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(stop - start).count());
    }

private:
    const Manifest& manifest_;
    Ort::MemoryInfo memory_;
    Ort::Session session_{nullptr};
    bool cuda_, spin_;
    int threads_, device_id_;
    ModelSource model_;
    std::mutex static_mu_;
    std::map<int64_t, std::unique_ptr<Ort::Session>> static_;
    size_t rank_ = 0;
    int64_t item_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_onnxruntime(const Manifest& m, const ModelSource& model, bool cuda, int threads,
                                          int device_id, bool spin) {
    try {
        return std::make_unique<OrtBackend>(m, model, cuda, threads, device_id, spin);
    } catch (const Ort::Exception& err) {  // the file is unusable: as the Python runtime says it
        const OrtErrorCode code = err.GetOrtErrorCode();
        std::string text = std::string("[ONNXRuntimeError] : ") + std::to_string(static_cast<int>(code)) + " : " +
                           ort_code_text(code) + " : " + err.what();
        std::string reason;  // whitespace collapsed, at most 300 characters
        for (size_t i = 0; i < text.size(); ++i) {
            const bool space = std::isspace(static_cast<unsigned char>(text[i])) != 0;
            if (space) {
                if (!reason.empty() && reason.back() != ' ') reason += ' ';
            } else reason += text[i];
        }
        while (!reason.empty() && reason.back() == ' ') reason.pop_back();
        if (reason.size() > 300) reason.resize(300);
        throw artifact_error(path_join(m.root, SAMPLER_ONNX) + " cannot be loaded by ONNX Runtime (" +
                             ort_error_name(code) + ": " + reason + ")");
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
