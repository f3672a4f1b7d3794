#include "contract.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace iia_native {

std::string py_repr(const std::string& text) {
    // Python: single quotes unless the text has ' and no " ; escapes \\, \n, \r, \t and other controls.
    const bool dq = text.find('\'') != std::string::npos && text.find('"') == std::string::npos;
    const char quote = dq ? '"' : '\'';
    std::string out(1, quote);
    for (unsigned char c : text) {
        if (c == '\\') out += "\\\\";
        else if (c == static_cast<unsigned char>(quote)) { out += '\\'; out += static_cast<char>(c); }
        else if (c == '\n') out += "\\n";
        else if (c == '\r') out += "\\r";
        else if (c == '\t') out += "\\t";
        else if (c < 0x20 || c == 0x7f) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", c);
            out += buf;
        } else out += static_cast<char>(c);
    }
    out += quote;
    return out;
}

std::string py_float_repr(double value) {
    if (std::isnan(value)) return "nan";
    if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
    // shortest digits that round-trip, then Python's layout: scientific iff exponent < -4 or >= 16
    char buf[64];
    for (int precision = 1; precision <= 17; ++precision) {
        std::snprintf(buf, sizeof buf, "%.*e", precision - 1, value);
        if (std::strtod(buf, nullptr) == value) break;
    }
    std::string s(buf);
    const size_t e = s.find('e');
    int exponent = std::atoi(s.c_str() + e + 1);
    std::string mantissa = s.substr(0, e);
    bool negative = false;
    if (!mantissa.empty() && mantissa[0] == '-') { negative = true; mantissa.erase(0, 1); }
    std::string digits;
    for (char c : mantissa) if (c != '.') digits += c;
    while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
    std::string out;
    if (exponent < -4 || exponent >= 16) {
        out = digits.substr(0, 1);
        if (digits.size() > 1) out += "." + digits.substr(1);
        char eb[16];
        std::snprintf(eb, sizeof eb, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
        out += eb;
    } else if (exponent < 0) {
        out = "0." + std::string(static_cast<size_t>(-exponent - 1), '0') + digits;
    } else {
        const size_t point = static_cast<size_t>(exponent) + 1;
        if (digits.size() <= point) out = digits + std::string(point - digits.size(), '0') + ".0";
        else out = digits.substr(0, point) + "." + digits.substr(point);
    }
    return negative ? "-" + out : out;
}

std::string join(const std::vector<std::string>& parts, const std::string& sep) {
    std::string out;
    for (size_t i = 0; i < parts.size(); ++i) {
        if (i) out += sep;
        out += parts[i];
    }
    return out;
}

std::string py_list(const std::vector<int64_t>& values) {
    std::vector<std::string> parts;
    for (int64_t v : values) parts.push_back(std::to_string(v));
    return "[" + join(parts, ", ") + "]";
}

std::string py_list(const std::vector<std::string>& names) {
    std::vector<std::string> parts;
    for (const auto& n : names) parts.push_back(py_repr(n));
    return "[" + join(parts, ", ") + "]";
}

std::string normalize_path(const std::string& path) {
    if (path.empty()) return ".";
    const bool absolute = path[0] == '/';
    std::vector<std::string> parts;
    std::stringstream stream(path);
    std::string part;
    while (std::getline(stream, part, '/'))
        if (!part.empty() && part != ".") parts.push_back(part);
    std::string out = (absolute ? "/" : "") + join(parts, "/");
    return out.empty() ? "." : out;
}

std::string path_join(const std::string& root, const std::string& name) {
    if (root == ".") return name;
    if (!root.empty() && root.back() == '/') return root + name;
    return root + "/" + name;
}

std::string path_name(const std::string& path) {
    const std::string norm = normalize_path(path);
    if (norm == "." || norm == "/") return "";
    const size_t slash = norm.rfind('/');
    return slash == std::string::npos ? norm : norm.substr(slash + 1);
}

const char* dtype_name(iia_dtype dtype) {
    switch (dtype) {
        case IIA_FLOAT32: return "float32";
        case IIA_FLOAT64: return "float64";
        case IIA_FLOAT16: return "float16";
        case IIA_INT8: return "int8";
        case IIA_INT16: return "int16";
        case IIA_INT32: return "int32";
        case IIA_INT64: return "int64";
        case IIA_UINT8: return "uint8";
        case IIA_UINT16: return "uint16";
        case IIA_UINT32: return "uint32";
        case IIA_UINT64: return "uint64";
        case IIA_BOOL: return "bool";
    }
    return "unknown";
}

size_t dtype_size(iia_dtype dtype) {
    switch (dtype) {
        case IIA_INT8: case IIA_UINT8: case IIA_BOOL: return 1;
        case IIA_FLOAT16: case IIA_INT16: case IIA_UINT16: return 2;
        case IIA_FLOAT32: case IIA_INT32: case IIA_UINT32: return 4;
        case IIA_FLOAT64: case IIA_INT64: case IIA_UINT64: return 8;
    }
    return 0;
}

}  // namespace iia_native
