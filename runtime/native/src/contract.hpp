// The artifact contract of runtime/contract.py (and runtime/sampler.py's validation), restated for C++:
// tensor names, manifest schema, error kinds, and the Python-style formatting of the input messages.
// tests/test_native.py checks these literals against iia.runtime.contract; the bounds and the manifest's field
// table are generated (manifest_fields.hpp).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "iia/runtime.h"
#include "manifest_fields.hpp"

namespace iia_native {

using json = nlohmann::ordered_json;  // keeps the manifest's key order: files are checked in listed order

inline constexpr const char* NOISE = "noise";
inline constexpr const char* LABELS = "class_labels";
inline constexpr const char* GUIDANCE = "guidance";  // float32 [B], artifacts compiled for a guidance range
inline constexpr const char* IMAGES = "images";
inline constexpr const char* IMAGES_U8 = "images_uint8";
inline constexpr const char* LATENTS = "latents";  // a latent model's samples (with images_uint8 decoded)
inline constexpr const char* SCHEMA = "iia.artifact";
inline constexpr int SCHEMA_VERSION = 1;
inline constexpr const char* MANIFEST = "manifest.json";
inline constexpr const char* SAMPLER_ONNX = "sampler.onnx";
inline constexpr const char* SAMPLER_ONNX_DATA = "sampler.onnx.data";  // its tensors, over protobuf's 2 GB
inline constexpr const char* PLAN = "sampler.plan";
inline constexpr const char* BATCH_AXIS = "batch";  // the graph's symbolic batch dimension
inline constexpr const char* TENSORRT = "tensorrt";
inline constexpr const char* ORT_CUDA = "onnxruntime-cuda";
inline constexpr const char* ORT_CPU = "onnxruntime-cpu";
// the bounds every reader applies and the manifest's field table: generated from runtime/manifest.py
inline constexpr const char* UTF8_BOM = "\xEF\xBB\xBF";
inline constexpr const char* BOM_REFUSED = "it starts with a UTF-8 byte order mark; JSON files of an artifact are plain UTF-8";
inline constexpr const char* NO_CUDA = "no CUDA device found (libcuda missing or no GPU)";

// A failure with its C ABI status; what() is the one-line message.
class Error : public std::runtime_error {
public:
    Error(iia_status status, const std::string& message) : std::runtime_error(message), status(status) {}
    iia_status status;
};

inline Error invalid(const std::string& m) { return Error(IIA_ERROR_INVALID_ARGUMENT, m); }
inline Error artifact_error(const std::string& m) { return Error(IIA_ERROR_ARTIFACT, m); }
inline Error unavailable(const std::string& m) { return Error(IIA_ERROR_BACKEND_UNAVAILABLE, m); }
inline Error runtime_error(const std::string& m) { return Error(IIA_ERROR_RUNTIME, m); }

// Python's repr of a string and of a list (the input messages iia.runtime's Sampler gives, tests/test_native.py)
std::string py_repr(const std::string& text);
std::string py_float_repr(double value);
// Python's repr of a list of ints / strings: [1, 8, 8], ['noise', 'class_labels'].
std::string py_list(const std::vector<int64_t>& values);
std::string py_list(const std::vector<std::string>& names);
std::string join(const std::vector<std::string>& parts, const std::string& sep);

// pathlib's str(Path(p)) for a POSIX path (empty and '.' components dropped, trailing '/' removed) and
// str(Path(a) / b).
std::string normalize_path(const std::string& path);
std::string path_join(const std::string& root, const std::string& name);
std::string path_name(const std::string& path);  // Path(p).name

// numpy's dtype name ("float32", "int64", "bool") and element size.
const char* dtype_name(iia_dtype dtype);
size_t dtype_size(iia_dtype dtype);  // 0 for an unknown code

}  // namespace iia_native
