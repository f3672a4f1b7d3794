#include "png_grid.hpp"

#include <png.h>

#include <algorithm>
#include <stdexcept>

namespace iia_tools {

Grid grid_array(const uint8_t* images, int64_t n, int64_t h, int64_t w, int64_t c, int64_t pad) {
    const int64_t shown = (c == 1 || c == 3 || c == 4) ? c : 1;
    const int64_t scale = std::max<int64_t>(1, 32 / std::max(h, w));
    const int64_t th = h * scale, tw = w * scale;
    int64_t cols = 1;
    while (cols * cols < n) ++cols;  // ceil(sqrt(n)), exactly
    cols = std::max<int64_t>(1, cols);
    const int64_t rows = std::max<int64_t>(1, (n + cols - 1) / cols);
    Grid g;
    g.height = rows * (th + pad) + pad;
    g.width = cols * (tw + pad) + pad;
    g.channels = shown;
    g.pixels.assign(static_cast<size_t>(g.height * g.width * shown), 0);
    for (int64_t k = 0; k < n; ++k) {
        const int64_t r = k / cols, q = k % cols;
        const int64_t y0 = pad + r * (th + pad), x0 = pad + q * (tw + pad);
        for (int64_t y = 0; y < th; ++y)
            for (int64_t x = 0; x < tw; ++x)
                for (int64_t ch = 0; ch < shown; ++ch)
                    g.pixels[static_cast<size_t>(((y0 + y) * g.width + x0 + x) * shown + ch)] =
                        images[((k * h + y / scale) * w + x / scale) * c + ch];
    }
    return g;
}

namespace {
void append(png_structp png, png_bytep data, png_size_t length) {
    auto* out = static_cast<std::vector<unsigned char>*>(png_get_io_ptr(png));
    out->insert(out->end(), data, data + length);
}
void flush(png_structp) {}
}  // namespace

std::vector<unsigned char> png_bytes(const Grid& g) {
    std::vector<unsigned char> out;
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
    if (!png) throw std::runtime_error("libpng could not start");
    png_infop info = png_create_info_struct(png);
    if (!info || setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        throw std::runtime_error("libpng could not encode the grid");
    }
    const int type = g.channels == 1 ? PNG_COLOR_TYPE_GRAY : g.channels == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_RGBA;
    png_set_write_fn(png, &out, append, flush);
    png_set_IHDR(png, info, static_cast<png_uint_32>(g.width), static_cast<png_uint_32>(g.height), 8, type,
                 PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    for (int64_t y = 0; y < g.height; ++y)
        png_write_row(png, const_cast<png_bytep>(g.pixels.data() + y * g.width * g.channels));
    png_write_end(png, nullptr);
    png_destroy_write_struct(&png, &info);
    return out;
}

}  // namespace iia_tools
