#include "validate.hpp"

#include <cmath>
#include <cstring>
#include <limits>

namespace iia_native {
namespace {

float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1f;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);  // inf / nan
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {  // subnormal half: normalise
        int e = -1;
        do { ++e; mantissa <<= 1; } while ((mantissa & 0x400u) == 0);
        bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mantissa & 0x3ffu) << 13);
    }
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

bool is_float(iia_dtype d) { return d == IIA_FLOAT32 || d == IIA_FLOAT64 || d == IIA_FLOAT16; }
bool is_integer(iia_dtype d) {
    return d == IIA_INT8 || d == IIA_INT16 || d == IIA_INT32 || d == IIA_INT64 || d == IIA_UINT8 || d == IIA_UINT16 ||
           d == IIA_UINT32 || d == IIA_UINT64;
}

std::vector<int64_t> shape_of(const iia_tensor& t) {
    return std::vector<int64_t>(t.shape, t.shape + t.rank);
}

// Checked before anything else reads t.shape: a rank beyond IIA_MAX_RANK + 1 (a batch axis and the most sample
// dimensions an artifact may have) is refused without reading shape[0..rank), whose length only the caller knows.
// `expected` names what the argument must look like.
void check_tensor(const iia_tensor& t, const char* what, const std::string& expected) {
    if (t.rank > IIA_MAX_RANK + 1)
        throw invalid(std::string(what) + " has rank " + std::to_string(t.rank) + ", more than the " +
                      std::to_string(IIA_MAX_RANK + 1) + " dimensions any input may have: expected " + expected);
    if (dtype_size(t.dtype) == 0)
        throw invalid(std::string(what) + " has an unknown dtype code " + std::to_string(static_cast<int>(t.dtype)));
    if (t.rank > 0 && t.shape == nullptr) throw invalid(std::string(what) + " has rank " + std::to_string(t.rank) + " but no shape");
    int64_t count = 1;
    for (size_t i = 0; i < t.rank; ++i) {
        if (t.shape[i] < 0)
            throw invalid(std::string(what) + " has a negative dimension in shape " + py_list(shape_of(t)));
        const int64_t most = std::numeric_limits<int64_t>::max();
        count = t.shape[i] != 0 && count > most / t.shape[i] ? most : count * t.shape[i];  // saturated
    }
    if (count > 0 && t.data == nullptr) throw invalid(std::string(what) + " has no data (NULL pointer)");
}

int64_t element_count(const iia_tensor& t) {
    int64_t n = 1;
    for (size_t i = 0; i < t.rank; ++i) n *= t.shape[i];
    return n;
}

// An element as a (possibly huge) integer value: ok=false for a non-integral float or NaN.
struct Number {
    double real = 0;          // float dtypes
    int64_t integer = 0;      // integer dtypes (uint64 above INT64_MAX: big=true, value in uinteger)
    uint64_t uinteger = 0;
    bool big = false;
};

Number element(const iia_tensor& t, int64_t i) {
    Number n;
    const char* p = static_cast<const char*>(t.data) + i * static_cast<int64_t>(dtype_size(t.dtype));
    switch (t.dtype) {
        case IIA_FLOAT32: { float v; std::memcpy(&v, p, 4); n.real = v; break; }
        case IIA_FLOAT64: { double v; std::memcpy(&v, p, 8); n.real = v; break; }
        case IIA_FLOAT16: { uint16_t v; std::memcpy(&v, p, 2); n.real = half_to_float(v); break; }
        case IIA_INT8: { int8_t v; std::memcpy(&v, p, 1); n.integer = v; break; }
        case IIA_INT16: { int16_t v; std::memcpy(&v, p, 2); n.integer = v; break; }
        case IIA_INT32: { int32_t v; std::memcpy(&v, p, 4); n.integer = v; break; }
        case IIA_INT64: { int64_t v; std::memcpy(&v, p, 8); n.integer = v; break; }
        case IIA_UINT8: { uint8_t v; std::memcpy(&v, p, 1); n.integer = v; break; }
        case IIA_UINT16: { uint16_t v; std::memcpy(&v, p, 2); n.integer = v; break; }
        case IIA_UINT32: { uint32_t v; std::memcpy(&v, p, 4); n.integer = v; break; }
        case IIA_UINT64: {
            uint64_t v; std::memcpy(&v, p, 8);
            if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) { n.big = true; n.uinteger = v; }
            else n.integer = static_cast<int64_t>(v);
            break;
        }
        case IIA_BOOL: { uint8_t v; std::memcpy(&v, p, 1); n.integer = v != 0; break; }
    }
    if (!is_float(t.dtype)) n.real = n.big ? static_cast<double>(n.uinteger) : static_cast<double>(n.integer);
    return n;
}

void check_batch(const Manifest& m, int64_t batch, const std::string& what) {
    if (batch < 1) throw invalid(what + " must be >= 1, got " + std::to_string(batch));
    if (batch > m.max_batch)
        throw invalid(what + " " + std::to_string(batch) + " exceeds the artifact's maximum batch " +
                      std::to_string(m.max_batch) + " (split the request, or recompile with --max-batch)");
}

void check_noise(const Manifest& m, const iia_tensor* noise, Feeds* f) {
    if (noise == nullptr) throw invalid("noise must be given (a float32 tensor [B, " + [&] {
        std::vector<std::string> s;
        for (auto v : m.sample_shape) s.push_back(std::to_string(v));
        return join(s, ", ");
    }() + "])");
    std::vector<std::string> dims;
    for (auto v : m.sample_shape) dims.push_back(std::to_string(v));
    check_tensor(*noise, "noise", "shape [B, " + join(dims, ", ") + "]");
    if (!is_float(noise->dtype))
        throw invalid(std::string("noise must be a float array (float32 expected), got dtype ") + dtype_name(noise->dtype));
    const std::vector<int64_t> shape = shape_of(*noise);
    if (shape.size() != m.sample_shape.size() + 1 ||
        !std::equal(m.sample_shape.begin(), m.sample_shape.end(), shape.begin() + 1)) {
        const std::string hint = shape == m.sample_shape ? " (add a batch axis: noise[None])" : "";
        throw invalid("noise must have shape [B, " + join(dims, ", ") + "], got " + py_list(shape) + hint);
    }
    check_batch(m, shape[0], "noise batch");
    f->batch = shape[0];
    const int64_t n = element_count(*noise);
    if (noise->dtype == IIA_FLOAT32) {
        f->noise = static_cast<const float*>(noise->data);
    } else {  // float64 / float16 -> float32, explicitly (round to nearest, as numpy's astype)
        f->noise_owned.resize(static_cast<size_t>(n));
        if (noise->dtype == IIA_FLOAT64) {
            const double* src = static_cast<const double*>(noise->data);
            for (int64_t i = 0; i < n; ++i) f->noise_owned[i] = static_cast<float>(src[i]);
        } else {
            const uint16_t* src = static_cast<const uint16_t*>(noise->data);
            for (int64_t i = 0; i < n; ++i) f->noise_owned[i] = half_to_float(src[i]);
        }
        f->noise = f->noise_owned.data();
    }
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad += !std::isfinite(f->noise[i]);
    if (bad)
        throw invalid("noise contains " + std::to_string(bad) +
                      " NaN/Inf value(s) (after conversion to float32); expected finite standard-normal values");
}

std::string scalar_repr(const iia_tensor& t) {
    const Number n = element(t, 0);
    if (t.dtype == IIA_BOOL) return n.integer ? "True" : "False";
    if (is_float(t.dtype)) return py_float_repr(n.real);
    return n.big ? std::to_string(n.uinteger) : std::to_string(n.integer);
}

void check_labels(const Manifest& m, const iia_tensor* labels, Feeds* f) {
    const int64_t batch = f->batch;
    if (!m.conditional()) {
        if (labels != nullptr) throw invalid("this model is unconditional (label_dim 0): class_labels must be None");
        return;
    }
    const int64_t hi = m.label_dim - 1;
    if (labels == nullptr)
        throw invalid("this model is class-conditional (label_dim " + std::to_string(m.label_dim) +
                      "): pass class_labels, ids in [0, " + std::to_string(hi) + "] or one-hot [B, " +
                      std::to_string(m.label_dim) + "]");
    check_tensor(*labels, "class_labels", "ids [B] or one-hot [B, " + std::to_string(m.label_dim) + "]");
    const std::vector<int64_t> shape = shape_of(*labels);
    f->labels_owned.resize(static_cast<size_t>(batch));
    if (labels->rank == 0) {  // one id for the whole batch
        if (!is_integer(labels->dtype)) throw invalid("class label ids must be integers, got " + scalar_repr(*labels));
        const Number n = element(*labels, 0);
        if (n.big) throw invalid("class label " + std::to_string(n.uinteger) + " out of range: this model has label_dim " +
                                 std::to_string(m.label_dim) + ", expected ids in [0, " + std::to_string(hi) + "]");
        std::fill(f->labels_owned.begin(), f->labels_owned.end(), n.integer);
    } else if (labels->rank == 2) {  // one-hot
        if (shape[0] != batch || shape[1] != m.label_dim)
            throw invalid("one-hot class_labels must have shape [" + std::to_string(batch) + ", " +
                          std::to_string(m.label_dim) + "], got " + py_list(shape));
        for (int64_t r = 0; r < batch; ++r) {
            int64_t ones = 0, where = 0;
            bool other = false;  // a value that is neither 0 nor 1 (NaN included)
            for (int64_t c = 0; c < m.label_dim; ++c) {
                const double v = element(*labels, r * m.label_dim + c).real;
                if (v == 1) { ++ones; where = c; }
                else if (v != 0) other = true;
            }
            if (ones != 1 || other) throw invalid("one-hot class_labels must hold exactly one 1 (and zeros elsewhere) per row");
            f->labels_owned[r] = where;
        }
        f->labels = f->labels_owned.data();
        return;
    } else if (labels->rank != 1) {
        throw invalid("class_labels must be ids [B] or one-hot [B, " + std::to_string(m.label_dim) + "], got shape " +
                      py_list(shape));
    } else {
        if (!is_integer(labels->dtype))
            throw invalid(std::string("class label ids must be integers, got dtype ") + dtype_name(labels->dtype));
        if (shape[0] != batch)
            throw invalid("expected " + std::to_string(batch) + " class labels (one per sample), got " +
                          std::to_string(shape[0]));
        for (int64_t i = 0; i < batch; ++i) {
            const Number n = element(*labels, i);
            f->labels_owned[i] = n.integer;
            if (n.big || n.integer < 0 || n.integer > hi)
                throw invalid("class label " + (n.big ? std::to_string(n.uinteger) : std::to_string(n.integer)) +
                              " out of range: this model has label_dim " + std::to_string(m.label_dim) +
                              ", expected ids in [0, " + std::to_string(hi) + "]");
        }
        if (labels->dtype == IIA_INT64) {  // use the caller's memory as is
            f->labels = static_cast<const int64_t*>(labels->data);
            f->labels_owned.clear();
            return;
        }
    }
    if (labels->rank == 0) {
        const int64_t v = f->labels_owned.empty() ? 0 : f->labels_owned[0];
        if (v < 0 || v > hi)
            throw invalid("class label " + std::to_string(v) + " out of range: this model has label_dim " +
                          std::to_string(m.label_dim) + ", expected ids in [0, " + std::to_string(hi) + "]");
    }
    f->labels = f->labels_owned.data();
}

// runtime/sampler.py's check_guidance: converted to float32 first, then finite and inside the range's float32 bounds
void check_guidance(const Manifest& m, const iia_tensor* guidance, Feeds* f) {
    const int64_t batch = f->batch;
    if (!m.guided) {
        if (guidance != nullptr)
            throw invalid("this artifact was compiled for one guidance scale: guidance must be None (recompile with "
                          "iia-compile --guidance LO:HI or --cfg LO:HI for a scale per request)");
        return;
    }
    f->guidance_owned.assign(static_cast<size_t>(batch), static_cast<float>(m.guidance_default));
    f->guidance = f->guidance_owned.data();
    if (guidance == nullptr) return;
    const std::string one_each = "guidance must be one scale per image (shape [" + std::to_string(batch) +
                                 "]) or one for all (a scalar), got shape ";
    check_tensor(*guidance, "guidance", "shape [" + std::to_string(batch) + "] or a scalar");
    if (!is_float(guidance->dtype) && !is_integer(guidance->dtype))
        throw invalid(std::string("guidance must be real numbers (float32 expected), got dtype ") +
                      dtype_name(guidance->dtype));
    if (guidance->rank > 1 || (guidance->rank == 1 && guidance->shape[0] != batch))
        throw invalid(one_each + py_list(shape_of(*guidance)));
    for (int64_t i = 0; i < batch; ++i) {
        const int64_t at = guidance->rank == 0 ? 0 : i;
        const Number n = element(*guidance, at);
        // as numpy's astype(float32): float32 as is, float16 widens exactly, integers and doubles round to nearest
        float v;
        if (guidance->dtype == IIA_FLOAT32) std::memcpy(&v, static_cast<const char*>(guidance->data) + 4 * at, 4);
        else if (is_float(guidance->dtype)) v = static_cast<float>(n.real);
        else v = n.big ? static_cast<float>(n.uinteger) : static_cast<float>(n.integer);
        f->guidance_owned[static_cast<size_t>(i)] = v;
    }
    for (float v : f->guidance_owned)
        if (!std::isfinite(v)) throw invalid("guidance must be finite, got " + py_float_repr(v));
    const float lo = static_cast<float>(m.guidance_lo), hi = static_cast<float>(m.guidance_hi);
    for (float v : f->guidance_owned)
        if (v < lo || v > hi)
            throw invalid("guidance " + py_float_repr(v) + " out of range: this artifact was compiled for guidance " +
                          "in [" + py_float_repr(m.guidance_lo) + ", " + py_float_repr(m.guidance_hi) + "]");
}

}  // namespace

int64_t sample_size(const Manifest& m) {
    int64_t n = 1;
    for (auto v : m.sample_shape) n *= v;
    return n;
}

void prepare(const Manifest& m, const iia_tensor* noise, const iia_tensor* class_labels, const iia_tensor* guidance,
             Feeds* f) {
    check_noise(m, noise, f);
    check_labels(m, class_labels, f);
    check_guidance(m, guidance, f);
}

}  // namespace iia_native
