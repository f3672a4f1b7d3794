#include "artifact.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>

#include <nlohmann/json.hpp>
#include <openssl/evp.h>

namespace iia_native {
namespace {

bool is_dir(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_file(const std::string& path, int64_t* size = nullptr) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
    if (size) *size = static_cast<int64_t>(st.st_size);
    return true;
}

// Python's int(value) >= lo for the manifest's integer fields: JSON integers only (bools count as 0/1 as in
// Python); anything else is malformed.
bool as_int(const json& value, int64_t* out) {
    if (value.is_boolean()) { *out = value.get<bool>() ? 1 : 0; return true; }
    if (value.is_number_integer()) { *out = value.get<int64_t>(); return true; }
    return false;
}

struct DigestDeleter {
    void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};

std::string hex(const unsigned char* bytes, unsigned int n) {
    static const char* digits = "0123456789abcdef";
    std::string out(2 * n, '0');
    for (unsigned int i = 0; i < n; ++i) {
        out[2 * i] = digits[bytes[i] >> 4];
        out[2 * i + 1] = digits[bytes[i] & 15];
    }
    return out;
}

const json& expected(const Manifest& m, const std::string& name) {
    const json& files = (*m.doc)["files"];
    auto it = files.find(name);
    if (it == files.end() || !it->is_object() || !it->contains("sha256") || !(*it)["sha256"].is_string())
        throw artifact_error("manifest.json lists no sha256 for " + name);
    return *it;
}

std::string first16(const std::string& s) { return s.substr(0, std::min<size_t>(16, s.size())); }

void check_digest(const Manifest& m, const std::string& name, const std::string& digest, int64_t size) {
    const json& entry = expected(m, name);
    const std::string path = path_join(m.root, name);
    if (entry.contains("bytes") && !entry["bytes"].is_null()) {
        const json& bytes = entry["bytes"];
        int64_t listed = 0;
        const bool equal = (bytes.is_number_integer() || bytes.is_boolean()) && as_int(bytes, &listed) && listed == size;
        const bool equal_float = bytes.is_number_float() && bytes.get<double>() == static_cast<double>(size);
        if (!equal && !equal_float)
            throw artifact_error(path + " is corrupted or was modified: " + std::to_string(size) +
                                 " bytes, the manifest says " + py_str(bytes) + " (recompile or re-copy the artifact)");
    }
    const std::string want = entry["sha256"].get<std::string>();
    if (digest != want)
        throw artifact_error(path + " is corrupted or was modified: sha256 " + first16(digest) +
                             "..., the manifest says " + first16(want) + "... (recompile or re-copy the artifact)");
}

}  // namespace

std::string py_repr(const json& value) {
    switch (value.type()) {
        case json::value_t::null: return "None";
        case json::value_t::boolean: return value.get<bool>() ? "True" : "False";
        case json::value_t::string: return py_repr(value.get<std::string>());
        case json::value_t::number_integer: return std::to_string(value.get<int64_t>());
        case json::value_t::number_unsigned: return std::to_string(value.get<uint64_t>());
        case json::value_t::number_float: return py_float_repr(value.get<double>());
        case json::value_t::array: {
            std::vector<std::string> parts;
            for (const auto& item : value) parts.push_back(py_repr(item));
            return "[" + join(parts, ", ") + "]";
        }
        case json::value_t::object: {
            std::vector<std::string> parts;
            for (const auto& item : value.items()) parts.push_back(py_repr(item.key()) + ": " + py_repr(item.value()));
            return "{" + join(parts, ", ") + "}";
        }
        default: return "?";
    }
}

std::string py_str(const json& value) {
    return value.is_string() ? value.get<std::string>() : py_repr(value);
}

bool Manifest::lists(const std::string& name) const { return (*doc)["files"].contains(name); }

bool Manifest::is_image() const {
    return std::find(output_names.begin(), output_names.end(), IMAGES_U8) != output_names.end();
}

std::string plan_absent_reason(const Manifest& m) {
    if (m.engine_built && m.lists(PLAN)) return "";
    return std::string("the artifact has no TensorRT plan (") + PLAN + " was not built at compile time: " +
           m.engine_reason + ")";
}

std::string artifact_root(const std::string& path) {
    const std::string norm = normalize_path(path);
    if (path_name(norm) == MANIFEST && is_file(norm)) {
        const size_t slash = norm.rfind('/');
        if (slash == std::string::npos) return ".";
        return slash == 0 ? "/" : norm.substr(0, slash);
    }
    return norm;
}

Manifest read_manifest(const std::string& root) {
    Manifest m;
    m.root = root;
    m.path = path_join(root, MANIFEST);
    if (!is_dir(root)) throw artifact_error("artifact directory " + root + " not found (make one with iia-compile)");
    if (is_dir(m.path))
        throw artifact_error(m.path + " is not readable JSON ([Errno 21] Is a directory: " + py_repr(m.path) + ")");
    std::ifstream in(m.path, std::ios::binary);
    if (!in) {
        if (errno == ENOENT)
            throw artifact_error(root + " is not an iia artifact: it has no manifest.json (make one with iia-compile)");
        throw artifact_error(m.path + " is not readable JSON ([Errno " + std::to_string(errno) + "] " +
                             std::strerror(errno) + ": " + py_repr(m.path) + ")");
    }
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad()) throw artifact_error(m.path + " is not readable JSON (" + std::strerror(errno) + ")");
    try {
        m.doc = std::make_shared<json>(json::parse(text));
    } catch (const json::exception& err) {
        throw artifact_error(m.path + " is not readable JSON (" + err.what() + ")");
    }
    const json& d = *m.doc;
    if (!d.is_object() || !d.contains("schema") || d["schema"] != SCHEMA) {
        const std::string schema = d.is_object() && d.contains("schema") ? py_repr(d["schema"]) : "None";
        throw artifact_error(m.path + " is not an iia artifact manifest (schema " + schema + ", expected " +
                             py_repr(std::string(SCHEMA)) + ")");
    }
    const json version = d.contains("schema_version") ? d["schema_version"] : json();
    if (!version.is_number_integer() || version.get<int64_t>() < 1)
        throw artifact_error(m.path + " has an invalid schema_version " + py_repr(version) + " (this runtime reads " +
                             std::to_string(SCHEMA_VERSION) + ")");
    if (version.get<int64_t>() > SCHEMA_VERSION)
        throw artifact_error(m.path + " was written by a newer iia: schema version " + py_repr(version) +
                             ", this runtime reads " + std::to_string(SCHEMA_VERSION) +
                             " (upgrade iia, or recompile the model with this version)");
    std::vector<std::string> missing;
    for (const char* key : {"inputs", "outputs", "files", "sample_shape", "label_dim", "max_batch", "nfe"})
        if (!d.contains(key)) missing.push_back(key);
    if (!missing.empty()) throw artifact_error(m.path + " lacks required field(s) " + join(missing, ", "));
    bool ok = d["sample_shape"].is_array() && !d["sample_shape"].empty() &&
              d["sample_shape"].size() <= IIA_MAX_RANK;
    if (ok) {
        for (const auto& s : d["sample_shape"]) {
            int64_t v = 0;
            ok = ok && as_int(s, &v) && v > 0;
            m.sample_shape.push_back(v);
        }
    }
    ok = ok && as_int(d["label_dim"], &m.label_dim) && m.label_dim >= 0 && as_int(d["max_batch"], &m.max_batch) &&
         m.max_batch >= 1 && as_int(d["nfe"], &m.nfe) && m.nfe >= 1 && d["files"].is_object();
    if (!ok)
        throw artifact_error(m.path + " is inconsistent: sample_shape, label_dim, max_batch, nfe or files malformed");
    auto names = [](const json& list, std::vector<std::string>* out) {
        if (!list.is_array()) return;
        for (const auto& item : list)
            out->push_back(item.is_object() && item.contains("name") ? py_str(item["name"]) : std::string("?"));
    };
    names(d["inputs"], &m.input_names);
    names(d["outputs"], &m.output_names);
    // the TensorRT plan's provenance (runtime/trt_backend.py: plan_unavailable_reason, plan_mismatch)
    const json engine = d.contains("engine") && d["engine"].is_object() ? d["engine"] : json::object();
    m.engine_built = engine.contains("built") && engine["built"].is_boolean() && engine["built"].get<bool>();
    const bool has_reason = engine.contains("reason") && !engine["reason"].is_null() && engine["reason"] != "" &&
                            engine["reason"] != false;
    m.engine_reason = has_reason ? py_str(engine["reason"]) : "not built";
    m.engine_tensorrt = engine.contains("tensorrt") ? py_str(engine["tensorrt"]) : "None";
    m.engine_compute_capability = engine.contains("compute_capability") ? py_str(engine["compute_capability"]) : "None";
    m.solver = d.contains("solver") && d["solver"].is_string() ? d["solver"].get<std::string>() : "";
    m.model = "?";
    if (d.contains("model") && d["model"].is_object() && d["model"].contains("name")) m.model = py_str(d["model"]["name"]);
    return m;
}

void check_interface(const Manifest& m) {
    std::vector<std::string> want{NOISE};
    if (m.conditional()) want.push_back(LABELS);
    const bool has_images = std::find(m.output_names.begin(), m.output_names.end(), IMAGES) != m.output_names.end();
    if (m.input_names != want || !has_images)
        throw invalid("manifest inputs " + py_list(m.input_names) + " / outputs " + py_list(m.output_names) +
                      " do not match this runtime's interface (noise[, class_labels] -> images[, images_uint8])");
}

std::string sha256_hex(const void* data, size_t size) {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (EVP_Digest(data, size, digest, &n, EVP_sha256(), nullptr) != 1)
        throw runtime_error("OpenSSL could not compute a sha256");
    return hex(digest, n);
}

std::string sha256_file(const std::string& path) {
    std::unique_ptr<EVP_MD_CTX, DigestDeleter> ctx(EVP_MD_CTX_new());
    if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1)
        throw runtime_error("OpenSSL could not start a sha256");
    std::ifstream in(path, std::ios::binary);
    if (!in) throw artifact_error(path + " is not readable (" + std::strerror(errno) + ")");
    std::vector<char> block(1 << 20);
    while (in) {
        in.read(block.data(), static_cast<std::streamsize>(block.size()));
        if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), block.data(), static_cast<size_t>(in.gcount()));
    }
    if (in.bad()) throw artifact_error(path + " is not readable (" + std::strerror(errno) + ")");
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_DigestFinal_ex(ctx.get(), digest, &n);
    return hex(digest, n);
}

void verify_file(const Manifest& m, const std::string& name) {
    const std::string path = path_join(m.root, name);
    int64_t size = 0;
    if (!is_file(path, &size)) throw artifact_error(path + " is missing (listed in manifest.json)");
    check_digest(m, name, sha256_file(path), size);
}

std::vector<char> read_verified(const Manifest& m, const std::string& name, bool verify) {
    const std::string path = path_join(m.root, name);
    if (!is_file(path))
        throw artifact_error(m.lists(name) ? path + " is missing (listed in manifest.json)" : path + " is missing");
    std::ifstream in(path, std::ios::binary);
    if (!in) throw artifact_error(path + " is not readable (" + std::strerror(errno) + ")");
    std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad()) throw artifact_error(path + " is not readable (" + std::strerror(errno) + ")");
    if (verify) check_digest(m, name, sha256_hex(data.data(), data.size()), static_cast<int64_t>(data.size()));
    return data;
}

void verify_all(const Manifest& m, const std::vector<std::string>& skip) {
    for (const auto& item : (*m.doc)["files"].items()) {
        const std::string& name = item.key();
        if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
            name.find('\0') != std::string::npos)
            throw artifact_error("manifest.json lists a file outside the artifact directory: " + py_repr(name));
        if (std::find(skip.begin(), skip.end(), name) == skip.end()) verify_file(m, name);
    }
}

}  // namespace iia_native
