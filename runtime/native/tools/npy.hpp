// A small .npy (NumPy format 1.0-3.0) reader and writer for iia-run: little-endian, C order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "iia/runtime.h"

namespace iia_tools {

struct NpyArray {
    iia_dtype dtype = IIA_FLOAT32;
    std::vector<int64_t> shape;
    std::vector<unsigned char> data;  // raw little-endian elements, C order

    iia_tensor tensor() const { return iia_tensor{data.data(), dtype, shape.size(), shape.data()}; }
};

// Throws std::runtime_error("<path>: <cause>") for anything it cannot read exactly.
NpyArray read_npy(const std::string& path);

// Header + raw bytes for dtype "<f4" / "|u1" / ... and shape.
std::vector<unsigned char> npy_bytes(iia_dtype dtype, const std::vector<int64_t>& shape, const void* data, size_t nbytes);

// Write bytes to path through a temp file + rename: never a half-written file. Throws std::runtime_error.
void write_atomic(const std::string& path, const std::vector<unsigned char>& bytes);

}  // namespace iia_tools
