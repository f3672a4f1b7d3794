// Loads an artifact and runs it once through the installed headers and library.
#include <cstdio>
#include <vector>

#include "iia/runtime.hpp"

int main(int argc, char** argv) {
    if (argc != 2) return 2;
    try {
        iia::Sampler sampler(argv[1]);
        const int64_t batch = 2;
        std::vector<float> noise(static_cast<size_t>(batch * sampler.sample_size()), 0.5f);
        std::vector<int64_t> labels;
        if (sampler.info().label_dim > 0) labels = {0, 1 % sampler.info().label_dim};
        const std::vector<float> images = sampler.run(noise, batch, labels);
        std::printf("consumer: %s, %zu values, first %g\n", sampler.describe().c_str(), images.size(), images[0]);
        return 0;
    } catch (const iia::Error& err) {
        std::fprintf(stderr, "error: %s\n", err.what());
        return 1;
    }
}
