#include "artifact.hpp"
#include "file_kind.hpp"
#include "manifest_fields.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>

#include <nlohmann/json.hpp>
#include <openssl/evp.h>

namespace iia_native {
namespace {

bool is_file(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// the strict profile's integer: a JSON integer, never a bool (runtime/manifest.py _is_int)
bool is_int(const json& v) { return v.is_number_integer(); }

int64_t as_i64(const json& v) { return v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX) ? INT64_MAX : v.get<int64_t>(); }

// a value for a one-line message: its compact JSON, cut to 40 characters (runtime/manifest.py _short)
std::string short_json(const json& v) {
    const std::string text = v.dump(-1, ' ', false, json::error_handler_t::replace);
    return text.size() <= 40 ? text : text.substr(0, 37) + "...";
}

// a JSON value as Python's str() shows a string (itself) or None; other values as JSON
std::string text_of(const json& v) { return v.is_string() ? v.get<std::string>() : v.is_null() ? "None" : short_json(v); }

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

// whole digests (a manifest's over-long value cut): two that differ only past a prefix would read as equal
std::string digest_text(const std::string& s) { return s.size() <= 64 ? s : s.substr(0, 61) + "..."; }

void check_digest(const Manifest& m, const std::string& name, const std::string& digest, int64_t size) {
    const json& entry = expected(m, name);
    const std::string path = path_join(m.root, name);
    const json bytes = entry.contains("bytes") ? entry["bytes"] : json();
    if (!is_int(bytes) || as_i64(bytes) != size)
        throw artifact_error(path + " is corrupted or was modified: " + std::to_string(size) +
                             " bytes, the manifest says " + text_of(bytes) + " (recompile or re-copy the artifact)");
    const std::string want = entry["sha256"].get<std::string>();
    if (digest != want)
        throw artifact_error(path + " is corrupted or was modified: sha256 " + digest_text(digest) +
                             ", the manifest says " + digest_text(want) + " (recompile or re-copy the artifact)");
}

}  // namespace

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
    if (path.empty()) throw artifact_error("the artifact path is empty");  // as runtime/manifest.py: not '.'
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

// runtime/files.py's open_regular + read: a regular file (symlinks followed) of at most `limit` bytes,
// opened non-blocking so a FIFO cannot hang. NotFound if absent; Error(ARTIFACT) otherwise.
class RegularFile {
public:
    // follow false: a link at the last component is refused (O_NOFOLLOW), for a path contained() resolved;
    // messages name `shown` (the listed path) when given
    RegularFile(const std::string& path, int64_t limit, bool follow = true, const std::string& shown = "")
        : path_(shown.empty() ? path : shown), limit_(limit) {
        fd_ = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | (follow ? 0 : O_NOFOLLOW));
        if (fd_ < 0) {
            if (errno == ENOENT) throw NotFound{};
            throw artifact_error(errno_text(errno, path_));
        }
        struct stat st {};
        if (::fstat(fd_, &st) != 0) { const int e = errno; ::close(fd_); throw artifact_error(errno_text(e, path_)); }
        if (!S_ISREG(st.st_mode)) { ::close(fd_); throw artifact_error(path_ + " is " + file_kind(st.st_mode) + ", not a regular file"); }
        if (st.st_size > limit) {
            ::close(fd_);
            throw artifact_error(path_ + " is " + std::to_string(st.st_size) + " bytes, more than the " +
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


// runtime/files.py's contained: the real path of root/name if it resolves (links followed) to an existing entry
// inside the real root, checked BEFORE anything opens it. A link that leads outside or to nothing (dangling, a
// loop, no permission) gets ONE message naming the listed path only: nothing of what lies outside shows (its
// content, size, digest or existence). NotFound when there is no entry root/name at all.
std::string contained(const std::string& root, const std::string& name) {
    const std::string path = path_join(root, name);
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) {
        if (errno == ENOENT) throw NotFound{};
        throw artifact_error(errno_text(errno, path));
    }
    const Error outside = artifact_error(path + " leads outside the artifact directory or to no file (a link is "
                                         "followed only to a file inside it)");
    std::unique_ptr<char, decltype(&std::free)> real(::realpath(path.c_str(), nullptr), &std::free);
    if (!real) {
        if (S_ISLNK(st.st_mode)) throw outside;  // what is (not) at the far end of a link is not reported
        throw artifact_error(errno_text(errno, path));
    }
    std::unique_ptr<char, decltype(&std::free)> real_root(::realpath(root.c_str(), nullptr), &std::free);
    if (!real_root) throw artifact_error(errno_text(errno, root));
    const std::string base = real_root.get(), resolved = real.get();
    const std::string prefix = base == "/" ? base : base + "/";
    if (resolved.size() <= prefix.size() || resolved.compare(0, prefix.size(), prefix) != 0) throw outside;
    return resolved;
}

// ---- the strict JSON profile (runtime/manifest.py parse_json) -----------------------------------------
// A SAX pass before the document is built: duplicate keys and nesting beyond MAX_JSON_DEPTH are refused (the
// parser itself refuses bad syntax, invalid UTF-8, lone surrogate escapes and NaN).
class StrictProfile : public nlohmann::json_sax<json> {
public:
    std::string error, duplicate;
    bool too_deep = false;

    bool null() override { return true; }
    bool boolean(bool) override { return true; }
    bool number_integer(number_integer_t) override { return true; }
    bool number_unsigned(number_unsigned_t) override { return true; }
    bool number_float(number_float_t, const string_t&) override { return true; }
    bool string(string_t&) override { return true; }
    bool binary(binary_t&) override { return true; }
    bool start_object(std::size_t) override { keys_.emplace_back(); return enter(); }
    bool key(string_t& k) override {
        if (keys_.back().insert(k).second) return true;
        duplicate = k;
        return false;
    }
    bool end_object() override { keys_.pop_back(); --depth_; return true; }
    bool start_array(std::size_t) override { keys_.emplace_back(); return enter(); }
    bool end_array() override { keys_.pop_back(); --depth_; return true; }
    bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& err) override {
        for (const unsigned char c : std::string(err.what())) {  // it quotes the bytes read: keep the line printable
            if (c >= 0x20 && c < 0x7f) {
                error += static_cast<char>(c);
            } else {
                static const char* digits = "0123456789abcdef";
                error += std::string("\\x") + digits[c >> 4] + digits[c & 15];
            }
        }
        return false;
    }

private:
    bool enter() {
        if (++depth_ <= MAX_JSON_DEPTH) return true;
        too_deep = true;
        return false;
    }
    std::vector<std::set<std::string>> keys_;
    int64_t depth_ = 0;
};

json parse_strict(const std::string& text, const std::string& path) {
    if (text.rfind(UTF8_BOM, 0) == 0)  // nlohmann would skip it; Python's json refuses it: one verdict
        throw artifact_error(path + " is not readable JSON (" + BOM_REFUSED + ")");
    const size_t nul = text.find('\0');
    if (nul != std::string::npos)  // nlohmann would stop reading there
        throw artifact_error(path + " is not readable JSON (it holds a NUL byte at offset " + std::to_string(nul) + ")");
    StrictProfile profile;
    const bool ok = json::sax_parse(text, &profile);
    if (profile.too_deep)
        throw artifact_error(path + " is not usable JSON (nested too deeply: more than " + std::to_string(MAX_JSON_DEPTH) +
                             " levels)");
    if (!profile.duplicate.empty()) throw artifact_error(path + " is not readable JSON (duplicate key " + json(profile.duplicate).dump() + ")");
    if (!ok) throw artifact_error(path + " is not readable JSON (" + profile.error + ")");
    return json::parse(text);
}

// ---- the manifest against MANIFEST_FIELDS (manifest_fields.hpp, generated from runtime/manifest.py FIELDS) ----
Error bad(const std::string& where, const std::string& field, const std::string& must, const json& value) {
    return artifact_error(where + ": field '" + field + "' must be " + must + ", got " + short_json(value));
}

std::string range(int64_t lo, int64_t hi) { return "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]"; }

void check_files(const FieldSpec& f, const json& files, const std::string& where) {
    if (!files.is_object() || static_cast<int64_t>(files.size()) < f.count_lo || static_cast<int64_t>(files.size()) > f.count_hi)
        throw bad(where, f.name, "an object of " + std::to_string(f.count_lo) + ".." + std::to_string(f.count_hi) +
                  " file names -> {sha256, bytes}", files);
    for (const auto& item : files.items()) {
        const std::string& name = item.key();
        if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
            name.find('\\') != std::string::npos || name.find('\0') != std::string::npos)
            throw artifact_error(where + ": field '" + f.name + "' lists a file outside the artifact directory: " +
                                 short_json(json(name)));
        const json& entry = item.value();
        bool hex = entry.is_object() && entry.contains("sha256") && entry["sha256"].is_string();
        if (hex) {
            const std::string sha = entry["sha256"].get<std::string>();
            hex = sha.size() == 64 && std::all_of(sha.begin(), sha.end(), [](char c) {
                      return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
                  });
        }
        if (!hex) throw artifact_error(where + ": field '" + f.name + "." + name + ".sha256' must be 64 lowercase hex digits");
        const json size = entry.contains("bytes") ? entry["bytes"] : json();  // required: it bounds every read
        if (!is_int(size) || as_i64(size) < f.lo || as_i64(size) > f.hi)
            throw bad(where, std::string(f.name) + "." + name + ".bytes", "an integer in " + range(f.lo, f.hi), size);
    }
}

void check_tensors(const FieldSpec& f, const json& tensors, const std::string& where) {
    if (!tensors.is_array() || static_cast<int64_t>(tensors.size()) < f.count_lo || static_cast<int64_t>(tensors.size()) > f.count_hi)
        throw bad(where, f.name, "a list of " + std::to_string(f.count_lo) + ".." + std::to_string(f.count_hi) +
                  " tensor descriptions", tensors);
    std::string dtypes;
    for (const char* d : DTYPES) dtypes += (dtypes.empty() ? "" : ", ") + std::string(d);
    for (size_t i = 0; i < tensors.size(); ++i) {
        const json& t = tensors[i];
        const std::string at = std::string(f.name) + "[" + std::to_string(i) + "]";
        bool ok = t.is_object() && t.contains("name") && t["name"].is_string() && t.contains("dtype");
        if (ok) ok = std::any_of(std::begin(DTYPES), std::end(DTYPES), [&](const char* n) { return t["dtype"] == n; });
        if (!ok) throw bad(where, at, "{name: str, dtype: one of " + dtypes + ", shape: [...]}", t);
        const json shape = t.contains("shape") ? t["shape"] : json();
        bool good = shape.is_array() && !shape.empty() && static_cast<int64_t>(shape.size()) <= MAX_RANK + 1 &&
                    shape[0] == "batch";
        for (size_t k = 1; good && k < shape.size(); ++k)
            good = is_int(shape[k]) && as_i64(shape[k]) >= 1 && as_i64(shape[k]) <= MAX_DIM;
        if (!good) throw bad(where, at + ".shape", "['batch', dimensions...]", shape);
    }
}

void check_field(const FieldSpec& f, const json& d, const std::string& where) {
    const json& v = d[f.name];
    if ((v.is_null() && f.nullable) || f.kind == FieldKind::Any) return;
    switch (f.kind) {
        case FieldKind::Int:
            if (!is_int(v) || as_i64(v) < f.lo || as_i64(v) > f.hi) throw bad(where, f.name, "an integer in " + range(f.lo, f.hi), v);
            return;
        case FieldKind::Str:
            if (!v.is_string()) throw bad(where, f.name, "a string", v);
            return;
        case FieldKind::Dict:
            if (!v.is_object()) throw bad(where, f.name, "an object", v);
            return;
        case FieldKind::Ints: {
            const int64_t hi = *f.hi_field ? as_i64(d[f.hi_field]) : f.hi;
            bool ok = v.is_array() && static_cast<int64_t>(v.size()) >= f.count_lo && static_cast<int64_t>(v.size()) <= f.count_hi;
            for (size_t k = 0; ok && k < v.size(); ++k) ok = is_int(v[k]) && as_i64(v[k]) >= f.lo && as_i64(v[k]) <= hi;
            if (!ok)
                throw bad(where, f.name, "a list of " + std::to_string(f.count_lo) + ".." + std::to_string(f.count_hi) +
                          " integers in " + range(f.lo, hi), v);
            int64_t product = 1;
            for (size_t k = 0; f.product && k < v.size() && product <= f.product; ++k) product *= as_i64(v[k]);
            if (f.product && product > f.product)
                throw bad(where, f.name, "a list of integers whose product is at most " + std::to_string(f.product), v);
            return;
        }
        case FieldKind::Numbers: {
            bool ok = v.is_array() && static_cast<int64_t>(v.size()) <= f.count_hi;
            for (size_t k = 0; ok && k < v.size(); ++k) ok = v[k].is_number() && std::isfinite(v[k].get<double>());
            if (!ok) throw bad(where, f.name, "a list of at most " + std::to_string(f.count_hi) + " finite numbers", v);
            return;
        }
        case FieldKind::Files: check_files(f, v, where); return;
        case FieldKind::Tensors: check_tensors(f, v, where); return;
        default: return;
    }
}

std::vector<std::string> names_of(const json& tensors) {
    std::vector<std::string> out;
    for (const auto& t : tensors) out.push_back(t["name"].get<std::string>());
    return out;
}

bool is_number(const json& v) { return v.is_number() && std::isfinite(v.get<double>()); }  // never a bool

// runtime/manifest.py _check_guidance_input: float32 ['batch'], range [lo, hi] of finite numbers with lo < hi,
// default a finite number in [lo, hi]
void check_guidance_input(Manifest& m, const json& entry) {
    const json found = entry.contains("range") ? entry["range"] : json();
    const json fallback = entry.contains("default") ? entry["default"] : json();
    bool ok = entry["dtype"] == "float32" && entry["shape"] == json::array({"batch"}) && found.is_array() &&
              found.size() == 2 && is_number(found[0]) && is_number(found[1]) && is_number(fallback);
    if (ok) {
        m.guidance_lo = found[0].get<double>();
        m.guidance_hi = found[1].get<double>();
        m.guidance_default = fallback.get<double>();
        ok = m.guidance_lo < m.guidance_hi && m.guidance_lo <= m.guidance_default &&
             m.guidance_default <= m.guidance_hi;
    }
    if (!ok)
        throw artifact_error(m.path + ": field 'inputs' gives " + GUIDANCE + " " + text_of(entry["dtype"]) + " " +
                             short_json(entry["shape"]) + " range " + short_json(found) + " default " +
                             short_json(fallback) + ", expected float32 ['batch'] range [lo, hi] (finite numbers, "
                             "lo < hi) and a default in it");
    m.guided = true;
}

// the tensor descriptions against sample_shape and label_dim (runtime/manifest.py _check_interface)
void check_interface_fields(Manifest& m) {
    const json& d = *m.doc;
    const std::string& where = m.path;
    const json& inputs = d["inputs"];
    m.input_names = names_of(inputs);
    m.output_names = names_of(d["outputs"]);
    std::vector<std::string> want{NOISE};
    if (m.label_dim > 0) want.push_back(LABELS);
    std::vector<std::string> guided = want;
    guided.push_back(GUIDANCE);
    if (m.input_names != want && m.input_names != guided)
        throw artifact_error(where + ": field 'inputs' names " + py_list(m.input_names) + ", expected " + py_list(want) +
                             " for label_dim " + std::to_string(m.label_dim) + " (then '" + GUIDANCE +
                             "' for an artifact compiled for a guidance range)");
    if (m.input_names == guided) check_guidance_input(m, inputs.back());
    json batch_shape = json::array({"batch"});
    for (int64_t v : m.sample_shape) batch_shape.push_back(v);
    if (inputs[0]["dtype"] != "float32" || inputs[0]["shape"] != batch_shape)
        throw artifact_error(where + ": field 'inputs' gives noise " + text_of(inputs[0]["dtype"]) + " " +
                             short_json(inputs[0]["shape"]) + ", expected float32 " + short_json(batch_shape) + " (sample_shape)");
    if (m.label_dim > 0) {
        const json& labels = inputs[1];
        const json range_want = json::array({0, m.label_dim - 1});
        const json found = labels.contains("range") ? labels["range"] : range_want;
        bool exact = found.is_array() && found.size() == 2 && found == range_want;
        for (const auto& v : found) exact = exact && is_int(v);  // no bools
        if (labels["dtype"] != "int64" || labels["shape"] != json::array({"batch"}) || !exact)
            throw artifact_error(where + ": field 'inputs' gives class_labels " + text_of(labels["dtype"]) + " " +
                                 short_json(labels["shape"]) + " range " + short_json(labels.contains("range") ? labels["range"] : json()) +
                                 ", expected int64 ['batch'] range " + short_json(range_want) + " (label_dim)");
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
}

// runtime/manifest.py's check_manifest: schema and version, then every field of MANIFEST_FIELDS in table order,
// then the fields against each other
void check_manifest(Manifest& m) {
    const json& d = *m.doc;
    const std::string& where = m.path;
    if (!d.is_object() || !d.contains("schema") || d["schema"] != SCHEMA) {
        const json schema = d.is_object() && d.contains("schema") ? d["schema"] : json();
        throw artifact_error(where + " is not an iia artifact manifest (field 'schema' " + short_json(schema) +
                             ", expected " + json(SCHEMA).dump() + ")");
    }
    const json version = d.contains("schema_version") ? d["schema_version"] : json();
    if (!is_int(version) || as_i64(version) < 1)
        throw artifact_error(where + " has an invalid schema_version: " + short_json(version) + " (this runtime reads " +
                             std::to_string(SCHEMA_VERSION) + ")");
    if (as_i64(version) > SCHEMA_VERSION)
        throw artifact_error(where + " was written by a newer iia: schema version " + std::to_string(as_i64(version)) +
                             ", this runtime reads " + std::to_string(SCHEMA_VERSION) +
                             " (upgrade iia, or recompile the model with this version)");
    std::vector<std::string> missing;
    for (const FieldSpec& f : MANIFEST_FIELDS)
        if (f.required && !d.contains(f.name)) missing.push_back(f.name);
    if (!missing.empty()) throw artifact_error(where + " lacks required field(s) " + join(missing, ", "));
    for (const FieldSpec& f : MANIFEST_FIELDS)
        if (d.contains(f.name) && f.kind != FieldKind::Schema && f.kind != FieldKind::Version) check_field(f, d, where);
    for (const auto& v : d["sample_shape"]) m.sample_shape.push_back(as_i64(v));
    m.label_dim = as_i64(d["label_dim"]);
    m.max_batch = as_i64(d["max_batch"]);
    m.nfe = as_i64(d["nfe"]);
    check_interface_fields(m);
    if (d.contains("static_batches"))
        for (const auto& b : d["static_batches"]) m.static_batches.push_back(as_i64(b));
    std::sort(m.static_batches.begin(), m.static_batches.end());
    m.static_batches.erase(std::unique(m.static_batches.begin(), m.static_batches.end()), m.static_batches.end());
}

}  // namespace

Manifest read_manifest(const std::string& root) {
    Manifest m;
    m.root = root;
    m.path = path_join(root, MANIFEST);
    struct stat st {};
    if (::stat(root.c_str(), &st) != 0)
        throw artifact_error("artifact directory " + root + " not found (make one with iia-compile)");
    if (!S_ISDIR(st.st_mode))
        throw artifact_error(root + " is " + (S_ISREG(st.st_mode) ? "a file" : file_kind(st.st_mode)) +
                             ", not an artifact directory (give the directory iia-compile made)");
    std::vector<char> bytes;
    try {  // held to the listed files' rule: a manifest.json linked outside the artifact is not read
        RegularFile file(contained(root, MANIFEST), MAX_MANIFEST_BYTES, false, m.path);
        bytes = file.read_all();
    } catch (const NotFound&) {
        throw artifact_error(root + " is not an iia artifact: it has no manifest.json (make one with iia-compile)");
    }
    m.doc = std::make_shared<json>(parse_strict(std::string(bytes.begin(), bytes.end()), m.path));
    check_manifest(m);
    const json& d = *m.doc;
    // the TensorRT plan's provenance (runtime/trt_backend.py: plan_unavailable_reason, plan_mismatch)
    const json engine = d.contains("engine") && d["engine"].is_object() ? d["engine"] : json::object();
    m.engine_built = engine.contains("built") && engine["built"].is_boolean() && engine["built"].get<bool>();
    const bool has_reason = engine.contains("reason") && !engine["reason"].is_null() && engine["reason"] != "" &&
                            engine["reason"] != false;
    m.engine_reason = has_reason ? text_of(engine["reason"]) : "not built";
    m.engine_tensorrt = engine.contains("tensorrt") ? text_of(engine["tensorrt"]) : "None";
    m.engine_compute_capability = engine.contains("compute_capability") ? text_of(engine["compute_capability"]) : "None";
    m.solver = d.contains("solver") && d["solver"].is_string() ? d["solver"].get<std::string>() : "";
    m.model = "?";
    if (d.contains("model") && d["model"].is_object() && d["model"].contains("name")) m.model = text_of(d["model"]["name"]);
    return m;
}

void check_interface(const Manifest& m) {
    std::vector<std::string> want{NOISE};
    if (m.conditional()) want.push_back(LABELS);
    if (m.guided) want.push_back(GUIDANCE);
    const bool has_images = std::find(m.output_names.begin(), m.output_names.end(), IMAGES) != m.output_names.end();
    if (std::find(m.output_names.begin(), m.output_names.end(), LATENTS) != m.output_names.end())
        throw invalid("this is a latent model's artifact (outputs " + py_list(m.output_names) + "): the native runtime "
                      "does not run latent artifacts yet (their decoded images have another shape); use iia.runtime");
    if (m.input_names != want || !has_images)
        throw invalid("manifest inputs " + py_list(m.input_names) + " / outputs " + py_list(m.output_names) +
                      " do not match this runtime's interface (noise[, class_labels][, guidance] -> images[, "
                      "images_uint8])");
}

std::string sha256_hex(const void* data, size_t size) {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (EVP_Digest(data, size, digest, &n, EVP_sha256(), nullptr) != 1)
        throw runtime_error("OpenSSL could not compute a sha256");
    return hex(digest, n);
}

namespace {

int64_t limit_for(const Manifest& m, const std::string& name) {  // runtime/manifest.py's _limit
    const json& files = (*m.doc)["files"];
    auto it = files.find(name);
    if (it == files.end())
        throw artifact_error(m.path + ": field 'files' does not list " + name + " (every file a runtime reads is "
                             "listed with its sha256 and bytes)");
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
        RegularFile file(contained(m.root, name), limit, false, path);  // inside the artifact, before it is opened
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

// runtime/manifest.py's check_listed: a file another library opens itself (ONNX Runtime: sampler.onnx.data)
void check_listed(const Manifest& m, const std::string& name) {
    const int64_t limit = limit_for(m, name);
    try {
        RegularFile file(contained(m.root, name), limit, false, path_join(m.root, name));
    } catch (const NotFound&) {
        throw missing_error(m, name);
    } catch (const Error& err) {
        throw with_limit(err, limit);
    }
}

std::vector<char> read_verified(const Manifest& m, const std::string& name, bool verify) {
    const std::string path = path_join(m.root, name);
    const int64_t limit = limit_for(m, name);
    std::vector<char> data;
    try {
        RegularFile file(contained(m.root, name), limit, false, path);  // inside the artifact, before it is opened
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
