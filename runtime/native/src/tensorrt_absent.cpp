// Built without TensorRT (IIA_WITH_TENSORRT=OFF, or AUTO and CMake found no TensorRT).
#include "backend.hpp"

namespace iia_native {

bool tensorrt_compiled() { return false; }

std::string tensorrt_unavailable_reason(const Manifest&, int) {
    if (cuda_device_count() == 0) return NO_CUDA;
    return "this iia runtime library was built without TensorRT (configure with -DIIA_WITH_TENSORRT=ON where TensorRT "
           "and CUDA are installed)";
}

std::unique_ptr<Backend> make_tensorrt(const Manifest&, const std::vector<char>&, int) {
    throw unavailable("this iia runtime library was built without TensorRT");
}

}  // namespace iia_native
