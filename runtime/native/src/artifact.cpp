#include "artifact.hpp"
#include "file_kind.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
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

bool Manifest::declares(const std::string& tensor) const {
    for (const char* key : {"inputs", "outputs"})
        for (const auto& t : (*doc)[key])
            if (t["name"] == tensor) return true;
    return false;
}

std::vector<int64_t> Manifest::item_shape(const std::string& tensor) const {
    std::vector<int64_t> out;
    for (const char* key : {"inputs", "outputs"})
        for (const auto& t : (*doc)[key])
            if (t["name"] == tensor) {
                for (size_t k = 1; k < t["shape"].size(); ++k) out.push_back(t["shape"][k].get<int64_t>());
                return out;
            }
    return out;
}

bool Manifest::is_image() const {
    return std::find(output_names.begin(), output_names.end(), IMAGES_U8) != output_names.end();
}

std::string plan_absent_reason(const Manifest& m) {
    if (m.engine_built && m.lists(PLAN)) return "";
    return std::string("the artifact has no TensorRT plan (") + PLAN + " was not built at compile time: " +
           m.engine_reason + ")";
}

std::string artifact_root(const std::string& path) {
    if (path.empty()) throw artifact_error("the artifact path is empty");  // as runtime/contract.py: not '.'
    const std::string norm = normalize_path(path);
    if (path_name(norm) == MANIFEST && is_file(norm)) {
        const size_t slash = norm.rfind('/');
        if (slash == std::string::npos) return ".";
        return slash == 0 ? "/" : norm.substr(0, slash);
    }
    return norm;
}

namespace {

std::string errno_text(int err, const std::string& path) {  // Python's str(OSError)
    return "[Errno " + std::to_string(err) + "] " + std::strerror(err) + ": " + py_repr(path);
}

struct NotFound {};

// runtime/contract.py's open_regular + read: a regular file (symlinks followed) of at most `limit` bytes,
// opened non-blocking so a FIFO cannot hang. NotFound if absent; Error(ARTIFACT) otherwise.
class RegularFile {
public:
    RegularFile(const std::string& path, int64_t limit) : path_(path), limit_(limit) {
        fd_ = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd_ < 0) {
            if (errno == ENOENT) throw NotFound{};
            throw artifact_error(errno_text(errno, path));
        }
        struct stat st {};
        if (::fstat(fd_, &st) != 0) { const int e = errno; ::close(fd_); throw artifact_error(errno_text(e, path)); }
        if (!S_ISREG(st.st_mode)) { ::close(fd_); throw artifact_error(path + " is " + file_kind(st.st_mode) + ", not a regular file"); }
        if (st.st_size > limit) {
            ::close(fd_);
            throw artifact_error(path + " is " + std::to_string(st.st_size) + " bytes, more than the " +
                                 std::to_string(limit) + " allowed");
        }
        size_ = st.st_size;
    }
    ~RegularFile() { if (fd_ >= 0) ::close(fd_); }
    RegularFile(const RegularFile&) = delete;
    RegularFile& operator=(const RegularFile&) = delete;
    int64_t size() const { return size_; }
    // up to `n` bytes; 0 at the end
    size_t read(char* buf, size_t n) {
        for (;;) {
            const ssize_t got = ::read(fd_, buf, n);
            if (got >= 0) return static_cast<size_t>(got);
            if (errno != EINTR) throw artifact_error(errno_text(errno, path_));
        }
    }
    std::vector<char> read_all() {
        std::vector<char> data;
        std::vector<char> block(1 << 20);
        for (;;) {
            const size_t got = read(block.data(), block.size());
            if (got == 0) break;
            data.insert(data.end(), block.begin(), block.begin() + static_cast<std::ptrdiff_t>(got));
            if (static_cast<int64_t>(data.size()) > limit_)
                throw artifact_error(path_ + " is more than the " + std::to_string(limit_) + " bytes allowed");
        }
        return data;
    }

private:
    std::string path_;
    int64_t limit_;
    int fd_ = -1;
    int64_t size_ = 0;
};

bool is_int(const json& v) { return v.is_number_integer(); }  // Python int, not bool (nlohmann: bool is separate)

int64_t as_i64(const json& v) { return v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX) ? INT64_MAX : v.get<int64_t>(); }

// runtime/contract.py's _short: repr (a list of at most 8 scalars too), "a dict", "a list of N items" for
// other containers, cut to 40 characters
std::string short_repr(const json& v) {
    std::string text;
    if (v.is_object()) {
        text = "a dict";
    } else if (v.is_array()) {
        bool scalars = v.size() <= 8;
        for (const auto& item : v) scalars = scalars && !item.is_array() && !item.is_object();
        if (scalars) text = py_repr(v);
        if (!scalars || text.size() > 40)
            text = "a list of " + std::to_string(v.size()) + (v.size() == 1 ? " item" : " items");
    } else {
        text = py_repr(v);
    }
    return text.size() <= 40 ? text : text.substr(0, 37) + "...";
}

std::string short_name(const std::string& name) {
    const std::string text = py_repr(name);
    return text.size() <= 40 ? text : text.substr(0, 37) + "...";
}

void int_field(const json& d, const char* key, int64_t lo, int64_t hi, const std::string& where, int64_t* out) {
    const json& v = d[key];
    if (!is_int(v) || as_i64(v) < lo || as_i64(v) > hi)
        throw artifact_error(where + ": field '" + key + "' must be an integer in [" + std::to_string(lo) + ", " +
                             std::to_string(hi) + "], got " + short_repr(v));
    *out = as_i64(v);
}

// nesting depth of JSON text (outside strings): Python's parser refuses what its recursion limit cannot hold
size_t nesting(const std::string& text) {
    size_t depth = 0, deepest = 0;
    bool in_string = false, escaped = false;
    for (char c : text) {
        if (in_string) {
            if (escaped) escaped = false;
            else if (c == '\\') escaped = true;
            else if (c == '"') in_string = false;
        } else if (c == '"') in_string = true;
        else if (c == '[' || c == '{') deepest = std::max(deepest, ++depth);
        else if ((c == ']' || c == '}') && depth > 0) --depth;
    }
    return deepest;
}

const char* const DTYPES[] = {"float32", "float16", "bfloat16", "int64", "int32", "uint8"};

void check_files(const json& files, const std::string& where) {
    if (!files.is_object() || files.empty() || static_cast<int64_t>(files.size()) > MAX_FILES)
        throw artifact_error(where + ": field 'files' must map 1.." + std::to_string(MAX_FILES) +
                             " file names to their sha256, got " + short_repr(files));
    for (const auto& item : files.items()) {
        const std::string& name = item.key();
        if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
            name.find('\\') != std::string::npos || name.find('\0') != std::string::npos)
            throw artifact_error(where + ": field 'files' lists a file outside the artifact directory: " + short_name(name));
        const json& entry = item.value();
        bool hex = entry.is_object() && entry.contains("sha256") && entry["sha256"].is_string();
        if (hex) {
            const std::string sha = entry["sha256"].get<std::string>();
            hex = sha.size() == 64 && std::all_of(sha.begin(), sha.end(), [](char c) {
                      return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
                  });
        }
        if (!hex) throw artifact_error(where + ": field 'files." + name + ".sha256' must be 64 lowercase hex digits");
        if (entry.contains("bytes") && !entry["bytes"].is_null()) {
            const json& size = entry["bytes"];
            if (!is_int(size) || as_i64(size) < 0 || as_i64(size) > MAX_LISTED_BYTES)
                throw artifact_error(where + ": field 'files." + name + ".bytes' must be an integer in [0, " +
                                     std::to_string(MAX_LISTED_BYTES) + "], got " + short_repr(size));
        }
    }
}

const json& check_tensors(const json& d, const char* key, const std::string& where) {
    const json& tensors = d[key];
    if (!tensors.is_array() || tensors.empty() || tensors.size() > 8)
        throw artifact_error(where + ": field '" + key + "' must be a list of 1..8 tensor descriptions, got " +
                             short_repr(tensors));
    for (size_t i = 0; i < tensors.size(); ++i) {
        const json& t = tensors[i];
        const std::string at = std::string(key) + "[" + std::to_string(i) + "]";
        bool ok = t.is_object() && t.contains("name") && t["name"].is_string() && t.contains("dtype");
        if (ok) ok = std::any_of(std::begin(DTYPES), std::end(DTYPES), [&](const char* n) { return t["dtype"] == n; });
        if (!ok)
            throw artifact_error(where + ": field '" + at + "' must be {name: str, dtype: one of float32, float16, "
                                 "bfloat16, int64, int32, uint8, shape: [...]}, got " + short_repr(t));
        const json shape = t.contains("shape") ? t["shape"] : json();
        bool good = shape.is_array() && !shape.empty() && static_cast<int64_t>(shape.size()) <= MAX_RANK + 1 &&
                    shape[0] == "batch";
        for (size_t k = 1; good && k < shape.size(); ++k)
            good = is_int(shape[k]) && as_i64(shape[k]) >= 1 && as_i64(shape[k]) <= MAX_DIM;
        if (!good) throw artifact_error(where + ": field '" + at + ".shape' must be ['batch', dimensions...], got " + short_repr(shape));
    }
    return tensors;
}

// runtime/contract.py's check_manifest: every field a runtime reads, for type and bounds
void check_manifest(Manifest& m) {
    const json& d = *m.doc;
    const std::string& where = m.path;
    if (!d.is_object() || !d.contains("schema") || d["schema"] != SCHEMA) {
        const std::string schema = d.is_object() && d.contains("schema") ? short_repr(d["schema"]) : "None";
        throw artifact_error(where + " is not an iia artifact manifest (schema " + schema + ", expected " +
                             py_repr(std::string(SCHEMA)) + ")");
    }
    const json version = d.contains("schema_version") ? d["schema_version"] : json();
    if (!is_int(version) || as_i64(version) < 1)
        throw artifact_error(where + " has an invalid schema_version: " + short_repr(version) + " (this runtime reads " +
                             std::to_string(SCHEMA_VERSION) + ")");
    if (as_i64(version) > SCHEMA_VERSION)
        throw artifact_error(where + " was written by a newer iia: schema version " + py_repr(version) +
                             ", this runtime reads " + std::to_string(SCHEMA_VERSION) +
                             " (upgrade iia, or recompile the model with this version)");
    std::vector<std::string> missing;
    for (const char* key : {"inputs", "outputs", "files", "sample_shape", "label_dim", "max_batch", "nfe"})
        if (!d.contains(key)) missing.push_back(key);
    if (!missing.empty()) throw artifact_error(where + " lacks required field(s) " + join(missing, ", "));
    const json& shape = d["sample_shape"];
    bool ok = shape.is_array() && !shape.empty() && static_cast<int64_t>(shape.size()) <= MAX_RANK;
    for (size_t k = 0; ok && k < shape.size(); ++k) ok = is_int(shape[k]) && as_i64(shape[k]) >= 1 && as_i64(shape[k]) <= MAX_DIM;
    if (!ok)
        throw artifact_error(where + ": field 'sample_shape' must be a list of 1.." + std::to_string(MAX_RANK) +
                             " integers in [1, " + std::to_string(MAX_DIM) + "], got " + short_repr(shape));
    int64_t elements = 1;
    for (const auto& v : shape) {
        m.sample_shape.push_back(as_i64(v));
        elements *= as_i64(v);
    }
    if (elements > MAX_ELEMENTS)
        throw artifact_error(where + ": field 'sample_shape' " + py_list(m.sample_shape) + " has more than " +
                             std::to_string(MAX_ELEMENTS) + " elements");
    int_field(d, "label_dim", 0, MAX_LABEL_DIM, where, &m.label_dim);
    int_field(d, "max_batch", 1, MAX_BATCH, where, &m.max_batch);
    int_field(d, "nfe", 1, MAX_NFE, where, &m.nfe);
    check_files(d["files"], where);
    const json& inputs = check_tensors(d, "inputs", where);
    const json& outputs = check_tensors(d, "outputs", where);
    for (const auto& t : inputs) m.input_names.push_back(t["name"].get<std::string>());
    for (const auto& t : outputs) m.output_names.push_back(t["name"].get<std::string>());
    std::vector<std::string> want{NOISE};
    if (m.label_dim > 0) want.push_back(LABELS);
    if (m.input_names != want)
        throw artifact_error(where + ": field 'inputs' names " + py_list(m.input_names) + ", expected " + py_list(want) +
                             " for label_dim " + std::to_string(m.label_dim));
    json batch_shape = json::array({"batch"});
    for (const auto& v : shape) batch_shape.push_back(v);
    if (inputs[0]["dtype"] != "float32" || inputs[0]["shape"] != batch_shape)
        throw artifact_error(where + ": field 'inputs' gives noise " + py_str(inputs[0]["dtype"]) + " " +
                             py_repr(inputs[0]["shape"]) + ", expected float32 " + py_repr(batch_shape) + " (sample_shape)");
    if (m.label_dim > 0) {
        const json& labels = inputs[1];
        const json range_want = json::array({0, m.label_dim - 1});
        const json range = labels.contains("range") ? labels["range"] : range_want;
        if (labels["dtype"] != "int64" || labels["shape"] != json::array({"batch"}) || range != range_want)
            throw artifact_error(where + ": field 'inputs' gives class_labels " + py_str(labels["dtype"]) + " " +
                                 py_repr(labels["shape"]) + " range " +
                                 (labels.contains("range") ? short_repr(labels["range"]) : std::string("None")) +
                                 ", expected int64 ['batch'] range [0, " + std::to_string(m.label_dim - 1) + "] (label_dim)");
    }
    std::vector<std::string> names = m.output_names;
    std::sort(names.begin(), names.end());
    const bool unique = std::adjacent_find(names.begin(), names.end()) == names.end();
    const auto n_images = std::count(names.begin(), names.end(), std::string(IMAGES));
    const auto n_latents = std::count(names.begin(), names.end(), std::string(LATENTS));
    const bool has_u8 = std::find(names.begin(), names.end(), IMAGES_U8) != names.end();
    if (n_images + n_latents != 1 || !unique || (n_latents == 1 && !has_u8))
        throw artifact_error(where + ": field 'outputs' names " + py_list(m.output_names) + ": expected '" + IMAGES +
                             "' once (and '" + IMAGES_U8 + "'), or '" + LATENTS + "' and '" + IMAGES_U8 +
                             "' (a latent model's samples and their decoded images)");
    for (const auto& [key, want_str] : {std::pair<const char*, bool>{"solver", true}, {"model", false}, {"engine", false}}) {
        if (!d.contains(key) || d[key].is_null()) continue;
        if (want_str ? !d[key].is_string() : !d[key].is_object())
            throw artifact_error(where + ": field '" + key + "' must be a " + (want_str ? "str" : "dict") + ", got " +
                                 short_repr(d[key]));
    }
    if (d.contains("r")) {
        int64_t r = 0;
        int_field(d, "r", 0, 64, where, &r);
    }
    if (d.contains("sigmas") && !d["sigmas"].is_null()) {
        const json& sigmas = d["sigmas"];
        bool fine = sigmas.is_array() && static_cast<int64_t>(sigmas.size()) <= MAX_NFE + 1;
        for (size_t k = 0; fine && k < sigmas.size(); ++k)
            fine = sigmas[k].is_number() && std::isfinite(sigmas[k].get<double>());
        if (!fine) throw artifact_error(where + ": field 'sigmas' must be a list of finite numbers, got " + short_repr(sigmas));
    }
    // optional batch specialisations of the ONNX Runtime session (runtime/contract.py STATIC_BATCHES)
    const json static_batches = d.contains("static_batches") ? d["static_batches"] : json::array();
    bool listed = static_batches.is_array() && static_batches.size() <= 64;
    for (size_t k = 0; listed && k < static_batches.size(); ++k)
        listed = is_int(static_batches[k]) && as_i64(static_batches[k]) >= 1 && as_i64(static_batches[k]) <= m.max_batch;
    if (!listed)
        throw artifact_error(where + ": field 'static_batches' must be a list of batch sizes in 1..max_batch " +
                             std::to_string(m.max_batch) + ", got " + short_repr(static_batches));
    for (const auto& b : static_batches) m.static_batches.push_back(as_i64(b));
    std::sort(m.static_batches.begin(), m.static_batches.end());
    m.static_batches.erase(std::unique(m.static_batches.begin(), m.static_batches.end()), m.static_batches.end());
}

}  // namespace

Manifest read_manifest(const std::string& root) {
    Manifest m;
    m.root = root;
    m.path = path_join(root, MANIFEST);
    if (!is_dir(root)) throw artifact_error("artifact directory " + root + " not found (make one with iia-compile)");
    std::vector<char> bytes;
    try {
        RegularFile file(m.path, MAX_MANIFEST_BYTES);
        bytes = file.read_all();
    } catch (const NotFound&) {
        throw artifact_error(root + " is not an iia artifact: it has no manifest.json (make one with iia-compile)");
    }
    const std::string text(bytes.begin(), bytes.end());
    if (text.rfind(UTF8_BOM, 0) == 0)  // nlohmann would skip it; Python's json refuses it: one verdict
        throw artifact_error(m.path + " is not readable JSON (" + BOM_REFUSED + ")");
    if (nesting(text) > 500) throw artifact_error(m.path + " is not usable JSON (nested too deeply)");
    try {
        m.doc = std::make_shared<json>(json::parse(text));
    } catch (const json::exception& err) {
        throw artifact_error(m.path + " is not readable JSON (" + err.what() + ")");
    }
    check_manifest(m);
    const json& d = *m.doc;
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
    if (std::find(m.output_names.begin(), m.output_names.end(), LATENTS) != m.output_names.end())
        throw invalid("this is a latent model's artifact (outputs " + py_list(m.output_names) + "): the native runtime "
                      "does not run latent artifacts yet (their decoded images have another shape); use iia.runtime");
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

namespace {

int64_t limit_for(const Manifest& m, const std::string& name) {  // runtime/contract.py's _limit
    const json& files = (*m.doc)["files"];
    auto it = files.find(name);
    if (it != files.end() && it->is_object() && it->contains("bytes") && is_int((*it)["bytes"]) && as_i64((*it)["bytes"]) >= 0)
        return as_i64((*it)["bytes"]);
    return MAX_LISTED_BYTES;
}

Error missing_error(const Manifest& m, const std::string& name) {
    const std::string path = path_join(m.root, name);
    return artifact_error(m.lists(name) ? path + " is missing (listed in manifest.json)" : path + " is missing");
}

Error with_limit(const Error& err, int64_t limit) {
    return artifact_error(std::string(err.what()) + " (listed in manifest.json with " + std::to_string(limit) + " bytes)");
}

}  // namespace

void verify_file(const Manifest& m, const std::string& name) {
    const std::string path = path_join(m.root, name);
    const int64_t limit = limit_for(m, name);
    std::string digest;
    int64_t size = 0;
    try {
        RegularFile file(path, limit);
        std::unique_ptr<EVP_MD_CTX, DigestDeleter> ctx(EVP_MD_CTX_new());
        if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1)
            throw runtime_error("OpenSSL could not start a sha256");
        std::vector<char> block(1 << 20);
        for (;;) {
            const size_t got = file.read(block.data(), block.size());
            if (got == 0) break;
            EVP_DigestUpdate(ctx.get(), block.data(), got);
            size += static_cast<int64_t>(got);
        }
        unsigned char out[EVP_MAX_MD_SIZE];
        unsigned int n = 0;
        EVP_DigestFinal_ex(ctx.get(), out, &n);
        digest = hex(out, n);
    } catch (const NotFound&) {
        throw missing_error(m, name);
    } catch (const Error& err) {
        if (err.status != IIA_ERROR_ARTIFACT) throw;
        throw with_limit(err, limit);
    }
    check_digest(m, name, digest, size);
}

std::vector<char> read_verified(const Manifest& m, const std::string& name, bool verify) {
    const std::string path = path_join(m.root, name);
    const int64_t limit = limit_for(m, name);
    std::vector<char> data;
    try {
        RegularFile file(path, limit);
        data = file.read_all();
    } catch (const NotFound&) {
        throw missing_error(m, name);
    } catch (const Error& err) {
        throw with_limit(err, limit);
    }
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
