#include "npy.hpp"

#include "file_kind.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
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

constexpr uint64_t MAX_HEADER_BYTES = 10000;            // numpy.load's own limit (max_header_size)
constexpr uint64_t MAX_DATA_BYTES = uint64_t(1) << 34;  // 16 GiB: far beyond any batch of noise an artifact takes
constexpr int MAX_NESTING = 32;                         // a header nests one tuple; this only bounds the recursion

// A value of the header's Python literal (what ast.literal_eval, numpy's parser, reads), with its source text.
struct Literal {
    enum Kind { STRING, BYTES, BOOL, INT, TUPLE, LIST, DICT, NONE } kind = NONE;
    std::string text;        // STRING: its characters; other kinds: the source text, for messages
    int64_t value = 0;       // INT, BOOL (0/1)
    bool huge = false;       // INT outside int64
    std::vector<Literal> items;                         // TUPLE, LIST
    std::vector<std::pair<Literal, Literal>> entries;   // DICT, in order, repeats kept

    std::string shown() const { return kind == STRING ? "'" + text + "'" : text; }
};

// The subset of Python literal syntax a .npy header is written in, read as ast.literal_eval reads it: strings in
// '' or "" (prefixes u/r; b: bytes; adjacent ones concatenated), True/False/None, integers (a sign, 0x/0o/0b,
// '_' separators; Python 2's 'L' suffix in format 1.0/2.0, as numpy's _filter_header), tuples (a trailing
// comma; '(x)' is x), lists, dicts, whitespace and comments. Anything else is refused naming the place.
class HeaderParser {
public:
    HeaderParser(const std::string& text, const std::string& path, bool python2)
        : s_(text), path_(path), python2_(python2) {}

    Literal parse() {
        for (const char c : s_)
            if (static_cast<unsigned char>(c) >= 0x7f || (c < 0x20 && c != '\t' && c != '\n' && c != '\r' && c != '\f'))
                fail_at(s_.find(c), "a non-ASCII or control byte");
        Literal top = value();
        space();
        if (at_ < s_.size()) fail("unexpected text after the dictionary");
        return top;
    }

private:
    const std::string& s_;
    const std::string& path_;
    bool python2_;
    size_t at_ = 0;
    int depth_ = 0;

    [[noreturn]] void fail_at(size_t where, const std::string& what) const {
        if (where >= s_.size()) bad(path_, "malformed .npy header: " + what + " at its end");
        std::string near = s_.substr(where, 20);
        near.erase(near.find_last_not_of(" \n") + 1);  // the header's padding
        for (char& c : near)
            if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) c = '?';
        bad(path_, "malformed .npy header: " + what + " at '" + near + "'");
    }
    [[noreturn]] void fail(const std::string& what) const { fail_at(at_, what); }

    bool at(char c) const { return at_ < s_.size() && s_[at_] == c; }
    bool name_char(size_t i) const {
        return i < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[i])) || s_[i] == '_');
    }

    void space() {
        while (at_ < s_.size()) {
            const char c = s_[at_];
            if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f') ++at_;
            else if (c == '#') while (at_ < s_.size() && s_[at_] != '\n' && s_[at_] != '\r') ++at_;
            else break;
        }
    }

    Literal value() {
        space();
        if (at_ >= s_.size()) fail("a value is missing");
        if (++depth_ > MAX_NESTING) fail("values nested too deeply");
        const size_t start = at_;
        const char c = s_[at_];
        Literal v;
        if (c == '\'' || c == '"') v = string();
        else if (c == '(' || c == '[') v = sequence(c);
        else if (c == '{') v = dict();
        else if (c == '+' || c == '-' || std::isdigit(static_cast<unsigned char>(c))) v = number();
        else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') v = name();
        else fail(std::string("unexpected '") + c + "'");
        if (v.kind != Literal::STRING) {  // as written (BYTES too: b'..'), for messages
            v.text = s_.substr(start, at_ - start);
            v.text.erase(v.text.find_last_not_of(" \t\n\r\f") + 1);
        }
        --depth_;
        return v;
    }

    Literal string() {
        Literal v;
        v.kind = Literal::STRING;
        do {  // 'a' 'b' is 'ab', as in Python
            const char quote = s_[at_++];
            for (;;) {
                if (at_ >= s_.size() || s_[at_] == '\n' || s_[at_] == '\r') fail("a string that is not closed");
                if (s_[at_] == '\\') fail("a string escape (not supported)");
                const char c = s_[at_++];
                if (c == quote) break;
                v.text += c;
            }
            space();
        } while (at('\'') || at('"'));
        return v;
    }

    Literal sequence(char open) {
        const char close = open == '(' ? ')' : ']';
        Literal v;
        v.kind = open == '(' ? Literal::TUPLE : Literal::LIST;
        bool comma = false;
        ++at_;
        for (;;) {
            space();
            if (at(close)) break;
            v.items.push_back(value());
            space();
            if (at(',')) { ++at_; comma = true; continue; }
            if (!at(close)) fail(std::string("expected ',' or '") + close + "'");
            break;
        }
        ++at_;
        if (open == '(' && v.items.size() == 1 && !comma) return v.items[0];  // parentheses around one value
        return v;
    }

    Literal dict() {
        Literal v;
        v.kind = Literal::DICT;
        ++at_;
        for (;;) {
            space();
            if (at('}')) break;
            Literal key = value();
            space();
            if (!at(':')) fail("expected ':'");
            ++at_;
            Literal item = value();
            v.entries.emplace_back(std::move(key), std::move(item));
            space();
            if (at(',')) { ++at_; continue; }
            if (!at('}')) fail("expected ',' or '}'");
            break;
        }
        ++at_;
        return v;
    }

    static int digit(char c) {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return 99;
    }

    Literal number() {  // Python's integer literal, with one optional sign
        const size_t start = at_;
        bool negative = false;
        if (at('+') || at('-')) {
            negative = s_[at_++] == '-';
            space();
        }
        if (at_ >= s_.size() || !std::isdigit(static_cast<unsigned char>(s_[at_]))) fail("expected a number");
        const size_t first = at_;
        int base = 10;
        if (s_[at_] == '0' && at_ + 1 < s_.size() && s_[at_ + 1] != '\0' && std::strchr("xXoObB", s_[at_ + 1])) {
            base = std::strchr("xX", s_[at_ + 1]) ? 16 : std::strchr("oO", s_[at_ + 1]) ? 8 : 2;
            at_ += 2;
            if (at('_')) ++at_;
        }
        Literal v;
        v.kind = Literal::INT;
        uint64_t magnitude = 0;
        bool need_digit = true;  // after a prefix or a '_'
        for (; at_ < s_.size(); ++at_) {
            const int d = digit(s_[at_]);
            if (d < base) {
                if (magnitude > (UINT64_MAX - static_cast<uint64_t>(d)) / static_cast<uint64_t>(base)) v.huge = true;
                else magnitude = magnitude * static_cast<uint64_t>(base) + static_cast<uint64_t>(d);
                need_digit = false;
            } else if (s_[at_] == '_' && !need_digit) {
                need_digit = true;
            } else {
                break;
            }
        }
        if (need_digit) fail_at(start, "a malformed number");
        if (base == 10 && s_[first] == '0' && (magnitude != 0 || v.huge))
            fail_at(start, "a number with a leading zero");
        if (python2_) {  // _filter_header drops a name 'L' after a number token, spaces between or not
            const size_t after = at_;
            space();
            if (at('L') && !name_char(at_ + 1)) ++at_;
            else at_ = after;
        }
        if (name_char(at_) || at('.')) fail_at(start, "a number that is not an integer");
        const uint64_t limit = negative ? uint64_t(INT64_MAX) + 1 : uint64_t(INT64_MAX);
        if (magnitude > limit) v.huge = true;
        if (!v.huge) v.value = negative ? static_cast<int64_t>(0 - magnitude) : static_cast<int64_t>(magnitude);
        return v;
    }

    Literal name() {
        const size_t start = at_;
        while (name_char(at_)) ++at_;
        const std::string word = s_.substr(start, at_ - start);
        Literal v;
        std::string prefix = word;
        for (char& c : prefix) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        const bool prefixed = prefix == "u" || prefix == "r" || prefix == "b" || prefix == "rb" || prefix == "br";
        if (prefixed && (at('\'') || at('"'))) {
            v = string();  // escapes are refused anyway, so a raw string reads as a plain one
            if (prefix.find('b') != std::string::npos) v.kind = Literal::BYTES;
        } else if (word == "True" || word == "False") {
            v.kind = Literal::BOOL;
            v.value = word == "True";
        } else if (word == "None") {
            v.kind = Literal::NONE;
        } else {
            fail_at(start, "unexpected '" + word + "'");
        }
        return v;
    }
};

// The three values of a header dict: exactly numpy's keys, each once.
struct HeaderFields {
    const Literal* descr = nullptr;
    const Literal* fortran_order = nullptr;
    const Literal* shape = nullptr;
};

HeaderFields header_fields(const Literal& top, const std::string& path) {
    if (top.kind != Literal::DICT) bad(path, "its .npy header is not a dictionary: " + top.shown().substr(0, 40));
    HeaderFields f;
    for (const auto& [key, item] : top.entries) {
        const Literal** slot = key.kind != Literal::STRING   ? nullptr
                               : key.text == "descr"         ? &f.descr
                               : key.text == "fortran_order" ? &f.fortran_order
                               : key.text == "shape"         ? &f.shape
                                                             : nullptr;
        if (slot == nullptr)
            bad(path, "its .npy header has the unknown key " + key.shown() +
                          " (the format has exactly 'descr', 'fortran_order' and 'shape')");
        if (*slot != nullptr)
            bad(path, "its .npy header gives " + key.shown() + " twice (numpy would silently take the last)");
        *slot = &item;
    }
    const std::pair<const Literal*, const char*> required[] = {
        {f.descr, "descr"}, {f.fortran_order, "fortran_order"}, {f.shape, "shape"}};
    for (const auto& [item, key] : required)
        if (item == nullptr) bad(path, std::string("not a .npy file (its header has no '") + key + "')");
    return f;
}

// A regular file opened non-blocking (the artifact reader's rule, src/artifact.cpp's RegularFile), so a FIFO or a
// device is refused by fstat instead of hanging: returns the descriptor and the size.
int open_regular(const std::string& path, uint64_t* size) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) bad(path, std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) { const int e = errno; ::close(fd); bad(path, std::strerror(e)); }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        bad(path, std::string("is ") + iia_native::file_kind(st.st_mode) + ", not a regular .npy file");
    }
    *size = static_cast<uint64_t>(st.st_size);
    return fd;
}

// exactly n bytes at offset (false: the file ended first)
bool pread_exact(int fd, const std::string& path, unsigned char* buf, size_t n, uint64_t offset) {
    while (n > 0) {
        const ssize_t got = ::pread(fd, buf, n, static_cast<off_t>(offset));
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) bad(path, std::strerror(errno));
        if (got == 0) return false;
        buf += got;
        n -= static_cast<size_t>(got);
        offset += static_cast<uint64_t>(got);
    }
    return true;
}

}  // namespace

NpyFile::NpyFile(const std::string& path) : path_(path) {
    // What is read is bounded by the header's declared shape, which must equal the file's size: a growing or
    // endless file, a FIFO, a device or a directory is refused with one line, never read to exhaustion.
    fd_ = open_regular(path, &file_bytes_);
    try {
        unsigned char magic[12] = {};
        if (file_bytes_ < 10 || !pread_exact(fd_, path, magic, 10, 0) || std::memcmp(magic, "\x93NUMPY", 6) != 0)
            bad(path, "not a .npy file (save arrays with numpy.save)");
        const int major = magic[6], minor = magic[7];
        if ((major != 1 && major != 2 && major != 3) || minor != 0)
            bad(path, ".npy format version " + std::to_string(major) + "." + std::to_string(minor) +
                          " is not supported (1.0, 2.0 or 3.0, as numpy)");
        uint64_t header_len = magic[8] | (magic[9] << 8);
        data_at_ = 10;
        if (major > 1) {
            if (!pread_exact(fd_, path, magic + 10, 2, 10)) bad(path, "truncated .npy header");
            header_len |= (static_cast<uint64_t>(magic[10]) << 16) | (static_cast<uint64_t>(magic[11]) << 24);
            data_at_ = 12;
        }
        if (header_len > MAX_HEADER_BYTES)
            bad(path, "its .npy header is " + std::to_string(header_len) + " bytes, more than the " +
                          std::to_string(MAX_HEADER_BYTES) + " numpy.load allows");
        if (data_at_ + header_len > file_bytes_) bad(path, "truncated .npy header");
        std::string header(static_cast<size_t>(header_len), '\0');
        if (!pread_exact(fd_, path, reinterpret_cast<unsigned char*>(&header[0]), header.size(), data_at_))
            bad(path, "truncated .npy header");
        data_at_ += header_len;
        const Literal top = HeaderParser(header, path, major < 3).parse();
        const HeaderFields f = header_fields(top, path);
        // descr
        if (f.descr->kind == Literal::LIST || f.descr->kind == Literal::TUPLE)
            bad(path, "structured dtypes are not supported");
        if (f.descr->kind != Literal::STRING)
            bad(path, "its .npy header's 'descr' " + f.descr->shown() + " is not a dtype");
        // a typestr as numpy.save writes it ('<f4'); '=', '|' or no byte order means this little-endian host's
        const std::string& descr = f.descr->text;
        const bool big = !descr.empty() && descr[0] == '>';
        const std::string typestr = !descr.empty() && std::strchr("<>|=", descr[0]) ? descr.substr(1) : descr;
        size_t item = 0;
        for (const Descr& d : DESCRS)
            if (typestr == d.text + 1 && !(big && d.size > 1)) { dtype_ = d.dtype; item = d.size; }
        if (item == 0) {
            if (big) bad(path, "big-endian arrays are not supported (dtype '" + descr + "')");
            bad(path, "dtype '" + descr + "' is not supported (iia-run reads numpy.save's typestrs of float16/32/64, "
                                          "int8..64, uint8..64 and bool: '<f4', '|u1', ...)");
        }
        // fortran_order
        if (f.fortran_order->kind != Literal::BOOL)
            bad(path, "its .npy header's 'fortran_order' " + f.fortran_order->shown() + " is not True or False");
        if (f.fortran_order->value) bad(path, "Fortran-ordered arrays are not supported (save a C-contiguous array)");
        // shape: a tuple of non-negative integers (a bool is refused, though Python counts it as one)
        const Literal& shape = *f.shape;
        bool integers = shape.kind == Literal::TUPLE;
        for (const Literal& d : shape.items) integers = integers && d.kind == Literal::INT;
        if (!integers) bad(path, "its .npy header's 'shape' " + shape.text + " is not a tuple of integers");
        std::string dims;
        for (const Literal& d : shape.items) dims += (dims.empty() ? "" : ", ") + d.text;
        uint64_t count = 1;  // elements, checked against the cap as it grows (no overflow)
        for (const Literal& d : shape.items) {
            if (!d.huge && d.value < 0) bad(path, "its .npy header's 'shape' (" + dims + ") has a negative dimension");
            if (d.huge || (d.value != 0 && count > MAX_DATA_BYTES / item / static_cast<uint64_t>(d.value)))
                bad(path, "its header declares shape (" + dims + "), more than the " + std::to_string(MAX_DATA_BYTES) +
                              " data bytes allowed");
            count *= static_cast<uint64_t>(d.value);
            shape_.push_back(d.value);
        }
        data_bytes_ = count * item;
        if (file_bytes_ - data_at_ != data_bytes_)
            bad(path, "holds " + std::to_string(file_bytes_ - data_at_) + " data bytes, its header says " +
                          std::to_string(data_bytes_) + " (truncated or corrupted)");
    } catch (...) {
        ::close(fd_);
        throw;
    }
}

NpyFile::~NpyFile() {
    if (mapping_ != nullptr) ::munmap(mapping_, static_cast<size_t>(file_bytes_));
    ::close(fd_);
}

NpyArray NpyFile::read(int64_t rows) const {
    NpyArray array;
    array.dtype = dtype_;
    array.shape = shape_;
    uint64_t bytes = data_bytes_;
    const int64_t keep = std::max<int64_t>(rows, 0);
    if (!shape_.empty() && keep < shape_[0]) {
        array.shape[0] = keep;
        bytes = data_bytes_ / static_cast<uint64_t>(shape_[0]) * static_cast<uint64_t>(keep);
    }
    array.data.resize(static_cast<size_t>(bytes));
    if (!pread_exact(fd_, path_, array.data.data(), array.data.size(), data_at_))
        bad(path_, "ended before the " + std::to_string(bytes) +
                       " data bytes its header declares (truncated while read)");
    return array;
}

iia_tensor NpyFile::tensor(uint64_t max_bytes) {
    if (data_bytes_ <= max_bytes) {
        loaded_ = read();
        return loaded_.tensor();
    }
    if (mapping_ == nullptr) {
        mapping_ = ::mmap(nullptr, static_cast<size_t>(file_bytes_), PROT_READ, MAP_PRIVATE, fd_, 0);
        if (mapping_ == MAP_FAILED) {
            mapping_ = nullptr;
            bad(path_, "holds " + std::to_string(data_bytes_) + " data bytes, more than the " + std::to_string(max_bytes) +
                           " that can be used, and cannot be mapped for its shape to be checked (" + std::strerror(errno) + ")");
        }
    }
    return iia_tensor{static_cast<const unsigned char*>(mapping_) + data_at_, dtype_, shape_.size(), shape_.data()};
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

void write_atomic(const std::string& flag, const std::string& path, const std::vector<unsigned char>& bytes) {
    // iia.cli.cannot_write's words: the option, the output, the cause; the temp file is never named
    auto failed = [&](int e) {
        return std::runtime_error(flag + " " + path + ": cannot write it (" + std::strerror(e) + "); " + path +
                                  " left as it was");
    };
    const size_t slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash == 0 ? 1 : slash);
    const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
    std::string tmp = dir + "/." + name + ".XXXXXX";
    std::vector<char> buf(tmp.begin(), tmp.end());
    buf.push_back('\0');
    const int fd = ::mkstemp(buf.data());
    if (fd < 0) throw failed(errno);
    tmp = buf.data();
    size_t done = 0;
    while (done < bytes.size()) {
        const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
        if (n < 0) {
            const int e = errno;
            ::close(fd);
            ::unlink(tmp.c_str());
            throw failed(e);
        }
        done += static_cast<size_t>(n);
    }
    const mode_t mask = ::umask(0);
    ::umask(mask);
    ::fchmod(fd, 0666 & ~mask);  // mkstemp makes 0600; give the mode a plain open would
    if (::close(fd) != 0 || std::rename(tmp.c_str(), path.c_str()) != 0) {
        const int e = errno;
        ::unlink(tmp.c_str());
        throw failed(e);
    }
}

}  // namespace iia_tools
