#include "npy.hpp"

#include "file_kind.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace iia_tools {
namespace {

struct Descr {
    const char* text;
    iia_dtype dtype;
    size_t size;
};

const Descr DESCRS[] = {
    {"<f4", IIA_FLOAT32, 4}, {"<f8", IIA_FLOAT64, 8}, {"<f2", IIA_FLOAT16, 2}, {"|i1", IIA_INT8, 1},
    {"<i2", IIA_INT16, 2},   {"<i4", IIA_INT32, 4},   {"<i8", IIA_INT64, 8},   {"|u1", IIA_UINT8, 1},
    {"<u2", IIA_UINT16, 2},  {"<u4", IIA_UINT32, 4},  {"<u8", IIA_UINT64, 8},  {"|b1", IIA_BOOL, 1},
};

[[noreturn]] void bad(const std::string& path, const std::string& why) { throw std::runtime_error(path + ": " + why); }

// the value text of 'key': in numpy's header dict
std::string field(const std::string& header, const std::string& key, const std::string& path) {
    const std::string quoted = "'" + key + "':";
    const size_t at = header.find(quoted);
    if (at == std::string::npos) bad(path, "not a .npy file (its header has no '" + key + "')");
    size_t i = at + quoted.size();
    while (i < header.size() && header[i] == ' ') ++i;
    return header.substr(i);
}

// An open regular file (the artifact reader's rule, src/artifact.cpp's RegularFile): opened non-blocking, so a
// FIFO or a device is refused by fstat instead of hanging, and never read past the size it is allowed.
class RegularFile {
public:
    explicit RegularFile(const std::string& path) : path_(path) {
        fd_ = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd_ < 0) bad(path, std::strerror(errno));
        struct stat st {};
        if (::fstat(fd_, &st) != 0) { const int e = errno; ::close(fd_); bad(path, std::strerror(e)); }
        if (!S_ISREG(st.st_mode)) { ::close(fd_); bad(path, std::string("is ") + iia_native::file_kind(st.st_mode) + ", not a regular .npy file"); }
        size_ = static_cast<uint64_t>(st.st_size);
    }
    ~RegularFile() { ::close(fd_); }
    RegularFile(const RegularFile&) = delete;
    RegularFile& operator=(const RegularFile&) = delete;
    uint64_t size() const { return size_; }
    // exactly n bytes (false: the file ended first)
    bool read_exact(unsigned char* buf, size_t n) {
        while (n > 0) {
            const ssize_t got = ::read(fd_, buf, n);
            if (got < 0 && errno == EINTR) continue;
            if (got < 0) bad(path_, std::strerror(errno));
            if (got == 0) return false;
            buf += got;
            n -= static_cast<size_t>(got);
        }
        return true;
    }

private:
    std::string path_;
    int fd_ = -1;
    uint64_t size_ = 0;
};

constexpr uint64_t MAX_HEADER_BYTES = uint64_t(1) << 20;  // numpy writes a few hundred
constexpr uint64_t MAX_DATA_BYTES = uint64_t(1) << 34;    // 16 GiB: far beyond any batch of noise an artifact takes

}  // namespace

NpyArray read_npy(const std::string& path) {
    // What is read is bounded by the header's declared shape, which must equal the file's size: a growing or
    // endless file, a FIFO, a device or a directory is refused with one line, never read to exhaustion.
    RegularFile file(path);
    unsigned char magic[12] = {};
    if (file.size() < 10 || !file.read_exact(magic, 10) || std::memcmp(magic, "\x93NUMPY", 6) != 0)
        bad(path, "not a .npy file (save arrays with numpy.save)");
    const int major = magic[6];
    uint64_t header_len = 0, offset = 0;
    if (major == 1) {
        header_len = magic[8] | (magic[9] << 8);
        offset = 10;
    } else if (major == 2 || major == 3) {
        if (!file.read_exact(magic + 10, 2)) bad(path, "truncated .npy header");
        header_len = magic[8] | (magic[9] << 8) | (magic[10] << 16) | (static_cast<uint64_t>(magic[11]) << 24);
        offset = 12;
    } else {
        bad(path, ".npy format version " + std::to_string(major) + " is not supported");
    }
    if (header_len > MAX_HEADER_BYTES)
        bad(path, "its .npy header is " + std::to_string(header_len) + " bytes, more than the " +
                      std::to_string(MAX_HEADER_BYTES) + " allowed");
    if (offset + header_len > file.size()) bad(path, "truncated .npy header");
    std::string header(static_cast<size_t>(header_len), '\0');
    if (!file.read_exact(reinterpret_cast<unsigned char*>(&header[0]), header.size())) bad(path, "truncated .npy header");
    NpyArray array;
    // descr
    std::string descr = field(header, "descr", path);
    if (descr.empty() || descr[0] != '\'') bad(path, "structured dtypes are not supported");
    descr = descr.substr(1, descr.find('\'', 1) - 1);
    std::string normal = descr;
    if (normal.size() == 3 && normal[0] == '=') normal[0] = '<';
    if (normal == "<i1" || normal == "<u1" || normal == "<b1") normal[0] = '|';
    size_t item = 0;
    bool found = false;
    for (const Descr& d : DESCRS)
        if (normal == d.text) { array.dtype = d.dtype; item = d.size; found = true; }
    if (!found) {
        if (!descr.empty() && descr[0] == '>') bad(path, "big-endian arrays are not supported (dtype '" + descr + "')");
        bad(path, "dtype '" + descr + "' is not supported (float16/32/64, int8..64, uint8..64 or bool)");
    }
    // fortran_order
    if (field(header, "fortran_order", path).rfind("False", 0) != 0)
        bad(path, "Fortran-ordered arrays are not supported (save a C-contiguous array)");
    // shape
    const std::string shape = field(header, "shape", path);
    if (shape.empty() || shape[0] != '(') bad(path, "malformed shape in the .npy header");
    const size_t close = shape.find(')');
    if (close == std::string::npos) bad(path, "malformed shape in the .npy header");
    uint64_t count = 1;  // elements, checked against the cap as it grows (no overflow)
    const std::string dims = shape.substr(1, close - 1);
    size_t pos = 0;
    while (pos < dims.size()) {
        while (pos < dims.size() && (dims[pos] == ' ' || dims[pos] == ',')) ++pos;
        if (pos >= dims.size()) break;
        char* end = nullptr;
        const long long v = std::strtoll(dims.c_str() + pos, &end, 10);
        if (end == dims.c_str() + pos || v < 0) bad(path, "malformed shape in the .npy header");
        array.shape.push_back(v);
        if (v != 0 && count > MAX_DATA_BYTES / item / static_cast<uint64_t>(v))
            bad(path, "its header declares shape (" + dims + "), more than the " + std::to_string(MAX_DATA_BYTES) +
                          " data bytes allowed");
        count *= static_cast<uint64_t>(v);
        pos = static_cast<size_t>(end - dims.c_str());
    }
    const uint64_t data_at = offset + header_len, want = count * item;
    if (file.size() - data_at != want)
        bad(path, "holds " + std::to_string(file.size() - data_at) + " data bytes, its header says " +
                      std::to_string(want) + " (truncated or corrupted)");
    array.data.resize(static_cast<size_t>(want));
    if (!file.read_exact(array.data.data(), array.data.size()))
        bad(path, "ended before the " + std::to_string(want) + " data bytes its header declares (truncated while read)");
    return array;
}

std::vector<unsigned char> npy_bytes(iia_dtype dtype, const std::vector<int64_t>& shape, const void* data, size_t nbytes) {
    const char* descr = nullptr;
    for (const Descr& d : DESCRS)
        if (d.dtype == dtype) descr = d.text;
    std::string dims;
    for (size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
    if (shape.size() == 1) dims += ",";
    std::string header = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
    while ((10 + header.size() + 1) % 64 != 0) header += ' ';
    header += '\n';
    const unsigned char magic[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0,
                                     static_cast<unsigned char>(header.size() & 0xff),
                                     static_cast<unsigned char>(header.size() >> 8)};
    std::vector<unsigned char> out(sizeof magic + header.size() + nbytes);
    std::memcpy(out.data(), magic, sizeof magic);
    std::memcpy(out.data() + sizeof magic, header.data(), header.size());
    if (nbytes) std::memcpy(out.data() + sizeof magic + header.size(), data, nbytes);
    return out;
}

void write_atomic(const std::string& path, const std::vector<unsigned char>& bytes) {
    const size_t slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash == 0 ? 1 : slash);
    const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
    std::string tmp = dir + "/." + name + ".XXXXXX";
    std::vector<char> buf(tmp.begin(), tmp.end());
    buf.push_back('\0');
    const int fd = ::mkstemp(buf.data());
    if (fd < 0) throw std::runtime_error("cannot write " + path + ": " + std::strerror(errno));
    tmp = buf.data();
    size_t done = 0;
    while (done < bytes.size()) {
        const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
        if (n < 0) {
            const int e = errno;
            ::close(fd);
            ::unlink(tmp.c_str());
            throw std::runtime_error("cannot write " + path + ": " + std::strerror(e));
        }
        done += static_cast<size_t>(n);
    }
    const mode_t mask = ::umask(0);
    ::umask(mask);
    ::fchmod(fd, 0666 & ~mask);  // mkstemp makes 0600; give the mode a plain open would
    if (::close(fd) != 0 || std::rename(tmp.c_str(), path.c_str()) != 0) {
        const int e = errno;
        ::unlink(tmp.c_str());
        throw std::runtime_error("cannot write " + path + ": " + std::strerror(e));
    }
}

}  // namespace iia_tools
