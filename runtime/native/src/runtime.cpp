// The C ABI: loading (runtime/loader.py's order of checks and backend choice), running, errors.
#include <chrono>
#include <cstddef>
#include <cstring>
#include <new>

#include "backend.hpp"

#ifndef IIA_COMPILED_BACKENDS
#define IIA_COMPILED_BACKENDS "onnxruntime-cpu,onnxruntime-cuda"
#endif

// A live sampler holds SAMPLER_MAGIC; iia_free clears it before the delete (a best-effort check against stale
// and foreign pointers: see runtime.h, "Handles").
constexpr uint64_t SAMPLER_MAGIC = 0x69696153616d706cULL;  // "iiaSampl"

struct iia_sampler {
    uint64_t magic = SAMPLER_MAGIC;
    iia_native::Manifest manifest;
    std::unique_ptr<iia_native::Backend> backend;
    std::string description;
    iia_info info{};
};

namespace iia_native {
namespace {

thread_local std::string t_error;
thread_local uint64_t t_backend_ns = 0;

iia_status fail(iia_status status, const std::string& message) {
    // one line, always: a backend's multi-line message is folded
    std::string line = message;
    for (char& c : line)
        if (c == '\n' || c == '\r') c = ' ';
    t_error = line;
    return status;
}

template <class F>
iia_status guarded(F&& body) {
    try {
        body();
        return IIA_OK;
    } catch (const Error& err) {
        return fail(err.status, err.what());
    } catch (const std::bad_alloc&) {
        return fail(IIA_ERROR_RUNTIME, "out of memory");
    } catch (const std::exception& err) {
        return fail(IIA_ERROR_RUNTIME, err.what());
    } catch (...) {
        return fail(IIA_ERROR_RUNTIME, "unknown C++ exception");
    }
}

const char* const BACKENDS[] = {TENSORRT, ORT_CUDA, ORT_CPU};  // auto tries them in this order

// runtime/loader.py's _onnx_model: verified bytes, or the path when the tensors live in an external .data file
ModelSource onnx_model(const Manifest& m, bool verify) {
    ModelSource source;
    if (m.lists(SAMPLER_ONNX_DATA)) {
        if (verify) {
            verify_file(m, SAMPLER_ONNX);
        } else {  // unverified, yet never a link ONNX Runtime would follow outside the artifact
            check_listed(m, SAMPLER_ONNX);
            check_listed(m, SAMPLER_ONNX_DATA);
        }
        source.path = path_join(m.root, SAMPLER_ONNX);
    } else {
        source.bytes = read_verified(m, SAMPLER_ONNX, verify);
    }
    return source;
}

std::unique_ptr<Backend> build(const std::string& name, const Manifest& m, int threads, int device_id, bool verify,
                               bool spin) {
    if (name == TENSORRT) {
        std::string reason = plan_absent_reason(m);
        if (reason.empty()) reason = tensorrt_unavailable_reason(m, device_id);
        if (!reason.empty()) throw unavailable(reason);
        const std::vector<char> plan = read_verified(m, PLAN, verify);
        check_interface(m);
        return make_tensorrt(m, plan, device_id);
    }
    if (name == ORT_CUDA) {
        const std::string reason = onnxruntime_cuda_unavailable_reason();
        if (!reason.empty()) throw unavailable(reason);
    }
    const ModelSource model = onnx_model(m, verify);
    check_interface(m);
    return make_onnxruntime(m, model, name == ORT_CUDA, threads, device_id, spin);
}

void load(const char* path, const iia_load_options* options, iia_sampler** out) {
    iia_load_options defaults;
    iia_load_options_init(&defaults);
    if (options == nullptr) options = &defaults;
    // struct_size ending at `verify`: a caller built against the header before `spin` (spin then on)
    const size_t before_spin = offsetof(iia_load_options, spin);
    if (options->struct_size != sizeof(iia_load_options) && options->struct_size != before_spin)
        throw invalid("iia_load_options.struct_size is " + std::to_string(options->struct_size) + ", expected " +
                      std::to_string(sizeof(iia_load_options)) + " (initialise it with iia_load_options_init)");
    const bool spin = options->struct_size == before_spin || options->spin != 0;
    const std::string backend = options->backend ? options->backend : "auto";
    bool known = backend == "auto";
    for (const char* b : BACKENDS) known = known || backend == b;
    if (!known) throw invalid("unknown backend " + py_repr(backend) + ": expected auto, " + join({TENSORRT, ORT_CUDA, ORT_CPU}, ", "));
    // IIA_THREADS_DEFAULT is Python's threads=None; 0 and other values below 1 are refused as Python refuses them
    if ((options->threads < 1 || options->threads > MAX_THREADS) && options->threads != IIA_THREADS_DEFAULT)
        throw invalid("threads must lie in [1, " + std::to_string(MAX_THREADS) + "], got " +
                      std::to_string(options->threads));
    if (path == nullptr) throw invalid("artifact path is NULL");
    const bool verify = options->verify != 0;

    std::unique_ptr<iia_sampler> s(new iia_sampler());
    s->manifest = read_manifest(artifact_root(path));
    const Manifest& m = s->manifest;
    // The model file a backend loads is checked as it is read (what is checked is what is loaded); the other
    // one (the plan, for an ONNX Runtime backend) after the choice, so corruption anywhere is refused.
    std::vector<std::string> model_files;
    for (const char* name : {SAMPLER_ONNX, PLAN})
        if (m.lists(name)) model_files.push_back(name);
    if (verify) verify_all(m, model_files);

    std::vector<std::pair<std::string, std::string>> skipped;
    if (backend != "auto") {
        try {
            s->backend = build(backend, m, options->threads, options->device_id, verify, spin);
        } catch (const Error& err) {
            if (err.status != IIA_ERROR_BACKEND_UNAVAILABLE) throw;
            throw unavailable("backend " + py_repr(backend) + " is unavailable: " + err.what());
        }
    } else {
        for (const char* name : BACKENDS) {
            try {
                s->backend = build(name, m, options->threads, options->device_id, verify, spin);
                break;
            } catch (const Error& err) {
                if (err.status != IIA_ERROR_BACKEND_UNAVAILABLE) throw;
                skipped.emplace_back(name, err.what());
            }
        }
        if (!s->backend) {
            std::vector<std::string> parts;
            for (const auto& [name, why] : skipped) parts.push_back(name + ": " + why);
            throw unavailable("no backend can run this artifact here: " + join(parts, "; "));
        }
    }
    if (verify) {
        const std::string loaded = std::string(s->backend->name()) == TENSORRT ? PLAN : SAMPLER_ONNX;
        for (const auto& name : model_files)
            if (name != loaded) verify_file(m, name);
    }
    s->description = std::string("backend ") + s->backend->name();
    if (!skipped.empty()) {
        std::vector<std::string> parts;
        for (const auto& [name, why] : skipped) parts.push_back(name + " skipped: " + why);
        s->description += " (" + join(parts, "; ") + ")";
    }
    // a TensorRT profile may bound the batch below the manifest's maximum: validation uses the smaller
    s->manifest.max_batch = std::min(m.max_batch, s->backend->max_batch());
    iia_info& info = s->info;
    info.rank = m.sample_shape.size();
    std::copy(m.sample_shape.begin(), m.sample_shape.end(), info.sample_shape);
    info.label_dim = m.label_dim;
    info.max_batch = m.max_batch;
    info.nfe = m.nfe;
    info.is_image = m.is_image() && m.sample_shape.size() == 3;
    info.backend = s->backend->name();
    info.solver = m.solver.c_str();
    info.model = m.model.c_str();
    *out = s.release();
}

std::string count_text(size_t n) { return std::to_string(n); }

void run(iia_sampler* s, const iia_tensor* noise, const iia_tensor* labels, const iia_run_options* options,
         float* images, size_t images_len, uint8_t* images_uint8, size_t images_uint8_len) {
    const Manifest& m = s->manifest;
    if (options != nullptr && options->struct_size != sizeof(iia_run_options))
        throw invalid("iia_run_options.struct_size is " + std::to_string(options->struct_size) + ", expected " +
                      std::to_string(sizeof(iia_run_options)) + " (initialise it with iia_run_options_init)");
    const iia_tensor* guidance = options != nullptr ? options->guidance : nullptr;
    if (images == nullptr && images_uint8 == nullptr)
        throw invalid("no output requested: pass an images (float32) and/or images_uint8 (uint8) buffer");
    if (images_uint8 != nullptr && !s->info.is_image) {
        std::vector<int64_t> shape(m.sample_shape);
        throw invalid("images_uint8 needs an image model ([C, H, W] samples); this one has sample shape " + py_list(shape) +
                      ": request the float32 images only");
    }
    Feeds feeds;
    prepare(m, noise, labels, guidance, &feeds);
    const size_t need = static_cast<size_t>(feeds.batch * sample_size(m));
    if (images != nullptr && images_len < need)
        throw invalid("the images buffer holds " + count_text(images_len) + " floats, but batch " +
                      std::to_string(feeds.batch) + " needs " + count_text(need));
    if (images_uint8 != nullptr && images_uint8_len < need)
        throw invalid("the images_uint8 buffer holds " + count_text(images_uint8_len) + " bytes, but batch " +
                      std::to_string(feeds.batch) + " needs " + count_text(need));
    t_backend_ns = s->backend->run(feeds, images, images_uint8);
}

}  // namespace
}  // namespace iia_native

using namespace iia_native;

namespace {

// every entry that takes a handle: NULL and a handle without the magic number are refused (best effort)
iia_status check_handle(const iia_sampler* sampler) {
    if (sampler == nullptr) return fail(IIA_ERROR_INVALID_ARGUMENT, "sampler is NULL");
    if (sampler->magic != SAMPLER_MAGIC) return fail(IIA_ERROR_INVALID_ARGUMENT, "invalid or freed sampler handle");
    return IIA_OK;
}

}  // namespace

extern "C" {

void iia_load_options_init(iia_load_options* options) {
    if (options == nullptr) return;
    std::memset(options, 0, sizeof *options);
    options->struct_size = sizeof *options;
    options->backend = "auto";
    options->threads = IIA_THREADS_DEFAULT;
    options->device_id = 0;
    options->verify = 1;
    options->spin = 1;
}

iia_status iia_load(const char* path, const iia_load_options* options, iia_sampler** out) {
    if (out == nullptr) return fail(IIA_ERROR_INVALID_ARGUMENT, "iia_load needs an output pointer (out is NULL)");
    *out = nullptr;
    return guarded([&] { load(path, options, out); });
}

iia_status iia_free(iia_sampler* sampler) {
    if (sampler == nullptr) return IIA_OK;
    if (const iia_status status = check_handle(sampler)) return status;
    sampler->magic = 0;  // a second iia_free (or a call) on this handle now fails instead of using freed memory
    delete sampler;
    return IIA_OK;
}

iia_status iia_get_info(const iia_sampler* sampler, iia_info* info) {
    if (const iia_status status = check_handle(sampler)) return status;
    if (info == nullptr) return fail(IIA_ERROR_INVALID_ARGUMENT, "info is NULL");
    *info = sampler->info;
    return IIA_OK;
}

iia_status iia_get_guidance(const iia_sampler* sampler, iia_guidance* guidance) {
    if (const iia_status status = check_handle(sampler)) return status;
    if (guidance == nullptr) return fail(IIA_ERROR_INVALID_ARGUMENT, "guidance is NULL");
    if (guidance->struct_size != sizeof(iia_guidance))
        return fail(IIA_ERROR_INVALID_ARGUMENT, "iia_guidance.struct_size is " + std::to_string(guidance->struct_size) +
                                                    ", expected " + std::to_string(sizeof(iia_guidance)));
    const Manifest& m = sampler->manifest;
    guidance->guided = m.guided ? 1 : 0;
    guidance->lo = m.guided ? m.guidance_lo : 0;
    guidance->hi = m.guided ? m.guidance_hi : 0;
    guidance->default_scale = m.guided ? m.guidance_default : 0;
    return IIA_OK;
}

void iia_run_options_init(iia_run_options* options) {
    if (options == nullptr) return;
    std::memset(options, 0, sizeof *options);
    options->struct_size = sizeof *options;
    options->guidance = nullptr;
}

const char* iia_describe(const iia_sampler* sampler) {
    if (check_handle(sampler) != IIA_OK) return "";
    return sampler->description.c_str();
}

iia_status iia_run(iia_sampler* sampler, const iia_tensor* noise, const iia_tensor* class_labels, float* images,
                   size_t images_len, uint8_t* images_uint8, size_t images_uint8_len) {
    if (const iia_status status = check_handle(sampler)) return status;
    return guarded([&] {
        run(sampler, noise, class_labels, nullptr, images, images_len, images_uint8, images_uint8_len);
    });
}

iia_status iia_run_ex(iia_sampler* sampler, const iia_tensor* noise, const iia_tensor* class_labels,
                      const iia_run_options* options, float* images, size_t images_len, uint8_t* images_uint8,
                      size_t images_uint8_len) {
    if (const iia_status status = check_handle(sampler)) return status;
    return guarded([&] {
        run(sampler, noise, class_labels, options, images, images_len, images_uint8, images_uint8_len);
    });
}

const char* iia_last_error(void) { return t_error.c_str(); }

uint64_t iia_last_backend_ns(void) { return t_backend_ns; }

const char* iia_version(void) { return "0.1.0"; }

const char* iia_compiled_backends(void) {
    return tensorrt_compiled() ? "tensorrt,onnxruntime-cuda,onnxruntime-cpu" : "onnxruntime-cuda,onnxruntime-cpu";
}

}  // extern "C"
