// The CUDA driver probe of runtime/contract.py (cuda_device_count): no CUDA at link time, so the library loads on CPU-only machines.
#include <dlfcn.h>

#include "backend.hpp"

namespace iia_native {

int cuda_device_count() {
    void* lib = nullptr;
    for (const char* name : {"libcuda.so.1", "libcuda.so"}) {
        lib = ::dlopen(name, RTLD_NOW | RTLD_LOCAL);
        if (lib) break;
    }
    if (!lib) return 0;
    using Init = int (*)(unsigned int);
    using Count = int (*)(int*);
    auto init = reinterpret_cast<Init>(::dlsym(lib, "cuInit"));
    auto count_fn = reinterpret_cast<Count>(::dlsym(lib, "cuDeviceGetCount"));
    int count = 0;
    if (!init || !count_fn || init(0) != 0 || count_fn(&count) != 0) count = 0;
    // the driver stays loaded (as in Python's ctypes probe): unloading CUDA's driver is not supported
    return count;
}

}  // namespace iia_native
