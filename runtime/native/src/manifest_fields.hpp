// GENERATED from runtime/manifest.py (FIELDS) and runtime/contract.py (bounds) by
//   python -c "from iia.runtime.manifest import native_header as h; print(h(), end='')" > runtime/native/src/manifest_fields.hpp
// Do not edit: tests/test_native.py regenerates it and fails on any difference.
#pragma once

#include <cstdint>

namespace iia_native {

inline constexpr int64_t MAX_MANIFEST_BYTES = 4194304;
inline constexpr int64_t MAX_COEFFICIENTS_BYTES = 67108864;
inline constexpr int64_t MAX_LISTED_BYTES = 1099511627776;
inline constexpr int64_t MAX_FILES = 64;
inline constexpr int64_t MAX_RANK = 4;
inline constexpr int64_t MAX_DIM = 65536;
inline constexpr int64_t MAX_ELEMENTS = 268435456;
inline constexpr int64_t MAX_LABEL_DIM = 1048576;
inline constexpr int64_t MAX_BATCH = 65536;
inline constexpr int64_t MAX_NFE = 10000;
inline constexpr int64_t MAX_THREADS = 1024;
inline constexpr int64_t MAX_JSON_DEPTH = 64;
inline constexpr int64_t MAX_STATIC_BATCHES = 64;
inline constexpr int64_t MAX_TENSORS = 8;

enum class FieldKind { Schema, Version, Int, Str, Dict, Ints, Numbers, Files, Tensors, Any };
struct FieldSpec {
    const char* name;
    FieldKind kind;
    bool required;
    bool nullable;
    int64_t lo;
    int64_t hi;
    const char* hi_field;  // "": hi; else that field's value
    int64_t count_lo;
    int64_t count_hi;
    int64_t product;  // 0: unbounded
};

inline constexpr FieldSpec MANIFEST_FIELDS[] = {
    {"schema", FieldKind::Schema, true, false, 0, 0, "", 0, 0, 0},
    {"schema_version", FieldKind::Version, true, false, 1, 1, "", 0, 0, 0},
    {"model", FieldKind::Dict, false, true, 0, 0, "", 0, 0, 0},
    {"solver", FieldKind::Str, false, true, 0, 0, "", 0, 0, 0},
    {"nfe", FieldKind::Int, true, false, 1, 10000, "", 0, 0, 0},
    {"r", FieldKind::Int, false, false, 0, 64, "", 0, 0, 0},
    {"sigmas", FieldKind::Numbers, false, true, 0, 0, "", 0, 10001, 0},
    {"sample_shape", FieldKind::Ints, true, false, 1, 65536, "", 1, 4, 268435456},
    {"graph", FieldKind::Any, false, false, 0, 0, "", 0, 0, 0},
    {"label_dim", FieldKind::Int, true, false, 0, 1048576, "", 0, 0, 0},
    {"max_batch", FieldKind::Int, true, false, 1, 65536, "", 0, 0, 0},
    {"static_batches", FieldKind::Ints, false, false, 1, 0, "max_batch", 0, 64, 0},
    {"static_parity", FieldKind::Any, false, false, 0, 0, "", 0, 0, 0},
    {"guidance", FieldKind::Any, false, false, 0, 0, "", 0, 0, 0},
    {"decode", FieldKind::Any, false, false, 0, 0, "", 0, 0, 0},
    {"inputs", FieldKind::Tensors, true, false, 0, 0, "", 1, 8, 0},
    {"outputs", FieldKind::Tensors, true, false, 0, 0, "", 1, 8, 0},
    {"files", FieldKind::Files, true, false, 0, 1099511627776, "", 1, 64, 0},
    {"coefficients_sha256", FieldKind::Any, false, false, 0, 0, "", 0, 0, 0},
    {"coefficients_source", FieldKind::Any, false, false, 0, 0, "", 0, 0, 0},
    {"guard", FieldKind::Any, false, false, 0, 0, "", 0, 0, 0},
    {"search", FieldKind::Any, false, false, 0, 0, "", 0, 0, 0},
    {"parity", FieldKind::Any, false, false, 0, 0, "", 0, 0, 0},
    {"weights", FieldKind::Any, false, false, 0, 0, "", 0, 0, 0},
    {"engine", FieldKind::Dict, false, true, 0, 0, "", 0, 0, 0},
    {"timings_s", FieldKind::Any, false, false, 0, 0, "", 0, 0, 0},
    {"versions", FieldKind::Any, false, false, 0, 0, "", 0, 0, 0},
    {"golden", FieldKind::Any, false, false, 0, 0, "", 0, 0, 0},
};
inline constexpr const char* DTYPES[] = {"float32", "float16", "bfloat16", "int64", "int32", "uint8"};

}  // namespace iia_native
