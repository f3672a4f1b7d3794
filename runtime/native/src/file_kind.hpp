// What a path that is not a regular file is, in words (runtime/contract.py's open_regular messages): shared by
// the library's artifact reader and iia-run's .npy reader (header-only: the tool reaches the library through
// the C ABI only).
#pragma once

#include <sys/stat.h>

namespace iia_native {

inline const char* file_kind(mode_t mode) {
    if (S_ISDIR(mode)) return "a directory";
    if (S_ISFIFO(mode)) return "a FIFO";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISSOCK(mode)) return "a socket";
    return "not a regular file";
}

}  // namespace iia_native
