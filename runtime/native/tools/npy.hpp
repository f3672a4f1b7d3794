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

// A .npy file opened, its header read and checked, its size checked against the header; no data is read until
// asked, so a caller checks the header against what it can use first. The header follows numpy's format rules
// (numpy.lib.format: a Python literal dict with exactly the keys 'descr', 'fortran_order' and 'shape', a shape
// tuple of integers, format versions 1.0/2.0/3.0, at most numpy.load's 10000 header bytes): what numpy.load
// refuses is refused. Refused by name though numpy reads them: a repeated key (numpy silently takes the last:
// 'fortran_order' twice meant transposed data), a bool as a dimension, string escapes, non-ASCII bytes, Fortran
// order, dtypes iia's runtime does not take, a structured dtype, more than 16 GiB of data.
// Every error is std::runtime_error("<path>: <cause>").
class NpyFile {
public:
    explicit NpyFile(const std::string& path);
    ~NpyFile();
    NpyFile(const NpyFile&) = delete;
    NpyFile& operator=(const NpyFile&) = delete;

    const std::string& path() const { return path_; }
    iia_dtype dtype() const { return dtype_; }
    const std::vector<int64_t>& shape() const { return shape_; }
    uint64_t data_bytes() const { return data_bytes_; }

    // The first `rows` rows along axis 0 (all of them when there are fewer; a rank-0 array whole), read now.
    NpyArray read(int64_t rows = INT64_MAX) const;
    // The data as a tensor valid while this object lives: read into memory when it is at most `max_bytes`;
    // otherwise a read-only mapping of the file (address space only: no page is read unless the consumer reads
    // it; the library refuses a tensor larger than its artifact takes by shape, before reading an element).
    iia_tensor tensor(uint64_t max_bytes);

private:
    std::string path_;
    int fd_ = -1;
    uint64_t file_bytes_ = 0, data_at_ = 0, data_bytes_ = 0;
    iia_dtype dtype_ = IIA_FLOAT32;
    std::vector<int64_t> shape_;
    NpyArray loaded_;
    void* mapping_ = nullptr;
};

// Header + raw bytes for dtype "<f4" / "|u1" / ... and shape.
std::vector<unsigned char> npy_bytes(iia_dtype dtype, const std::vector<int64_t>& shape, const void* data, size_t nbytes);

// Write bytes to path through a temp file + rename: never a half-written file. Throws std::runtime_error naming
// the option `flag` that gave path, path and the cause ("--out o.npy: cannot write it (No space left on device);
// o.npy left as it was", as iia.cli.cannot_write says it).
void write_atomic(const std::string& flag, const std::string& path, const std::vector<unsigned char>& bytes);

}  // namespace iia_tools
