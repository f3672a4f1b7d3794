// A PNG grid of uint8 images [N, H, W, C], laid out as runtime/grid.py does (libpng writes it).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace iia_tools {

struct Grid {
    int64_t height = 0, width = 0, channels = 0;
    std::vector<uint8_t> pixels;  // [height, width, channels]
};

// runtime/grid.py's grid_array: tiles upscaled (nearest) to >= 32 px, 2 px padding, ceil(sqrt(N)) columns;
// channel counts other than 1, 3, 4 show the first channel.
Grid grid_array(const uint8_t* images, int64_t n, int64_t h, int64_t w, int64_t c, int64_t pad = 2);

// Encode with libpng (gray, RGB or RGBA, 8 bit); throws std::runtime_error.
std::vector<unsigned char> png_bytes(const Grid& grid);

}  // namespace iia_tools
