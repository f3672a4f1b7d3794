// Reading an artifact directory: the manifest (schema, version, required fields) and the files' sha256.
// Mirrors runtime/contract.py message for message.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "contract.hpp"

namespace iia_native {

struct Manifest {
    std::string root;  // the artifact directory, as pathlib prints it
    std::string path;  // root/manifest.json
    std::shared_ptr<const json> doc;  // the parsed manifest (complete type only in artifact.cpp)
    std::vector<int64_t> sample_shape;
    int64_t label_dim = 0, max_batch = 0, nfe = 0;
    std::vector<std::string> input_names, output_names;
    std::string solver, model;
    bool guided = false;  // the `guidance` input: compiled for a guidance range [guidance_lo, guidance_hi]
    double guidance_lo = 0, guidance_hi = 0, guidance_default = 0;
    std::vector<int64_t> static_batches;  // batches with their own specialised ONNX Runtime session
    bool engine_built = false;  // manifest "engine": the TensorRT plan's provenance, as Python prints it
    std::string engine_reason, engine_tensorrt, engine_compute_capability;

    bool conditional() const { return label_dim > 0; }
    bool is_image() const;
    bool lists(const std::string& name) const;  // the manifest's "files" has this entry
    bool declares(const std::string& tensor) const;  // an input or output of that name
    std::vector<int64_t> item_shape(const std::string& tensor) const;  // its shape without the batch axis
};

std::string artifact_root(const std::string& path);           // DIR for DIR or DIR/manifest.json
Manifest read_manifest(const std::string& root);               // schema, version, required fields, types
std::string plan_absent_reason(const Manifest& manifest);  // "" when a built plan is listed
void check_interface(const Manifest& manifest);  // noise[, class_labels][, guidance] -> images[, images_uint8]
std::string sha256_hex(const void* data, size_t size);
void verify_file(const Manifest& manifest, const std::string& name);
void check_listed(const Manifest& manifest, const std::string& name);  // contained, regular, in bounds; unread
std::vector<char> read_verified(const Manifest& manifest, const std::string& name, bool verify);
void verify_all(const Manifest& manifest, const std::vector<std::string>& skip);

}  // namespace iia_native
