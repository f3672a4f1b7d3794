// Memory: LOAD_LOOPS load/run/free cycles (built with -fsanitize=leak: LeakSanitizer fails the process on a
// leak at exit), then RUNS runs on one sampler with the resident set size sampled: it must stay flat.
// usage: memory_test DIR [LOAD_LOOPS RUNS MAX_GROWTH_KB]
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <vector>

#include "iia/runtime.h"

static long rss_kb() {
    std::ifstream statm("/proc/self/statm");
    long pages = 0, resident = 0;
    statm >> pages >> resident;
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: memory_test DIR [LOAD_LOOPS RUNS MAX_GROWTH_KB]\n");
        return 2;
    }
    const int loops = argc > 2 ? std::atoi(argv[2]) : 200, runs = argc > 3 ? std::atoi(argv[3]) : 2000;
    const long max_growth = argc > 4 ? std::atol(argv[4]) : 1024;
    iia_load_options options;
    iia_load_options_init(&options);
    options.backend = "onnxruntime-cpu";
    options.threads = 1;
    iia_sampler* s = nullptr;
    if (iia_load(argv[1], &options, &s) != IIA_OK) { std::fprintf(stderr, "FAIL: %s\n", iia_last_error()); return 1; }
    iia_info info;
    iia_get_info(s, &info);
    iia_free(s);
    int64_t item = 1;
    for (size_t i = 0; i < info.rank; ++i) item *= info.sample_shape[i];
    std::vector<int64_t> shape{1};
    shape.insert(shape.end(), info.sample_shape, info.sample_shape + info.rank);
    std::vector<float> noise(static_cast<size_t>(item)), out(noise.size());
    std::mt19937 rng(0);
    std::normal_distribution<float> normal;
    for (float& v : noise) v = normal(rng);
    int64_t label = 0, one = 1;
    const iia_tensor n{noise.data(), IIA_FLOAT32, shape.size(), shape.data()};
    const iia_tensor l{&label, IIA_INT64, 1, &one};
    const iia_tensor* labels = info.label_dim > 0 ? &l : nullptr;
    long rss_loop_early = 0;
    for (int i = 0; i < loops; ++i) {
        s = nullptr;
        if (iia_load(argv[1], &options, &s) != IIA_OK || iia_run(s, &n, labels, out.data(), out.size(), nullptr, 0) != IIA_OK) {
            std::fprintf(stderr, "FAIL: %s\n", iia_last_error());
            return 1;
        }
        // a failing call allocates an error message and temporaries too
        iia_run(s, &n, nullptr, out.data(), out.size(), nullptr, 0);
        iia_free(s);
        if (i == loops / 10) rss_loop_early = rss_kb();
    }
    const long rss_loop_end = rss_kb();
    if (iia_load(argv[1], &options, &s) != IIA_OK) { std::fprintf(stderr, "FAIL: %s\n", iia_last_error()); return 1; }
    long rss_early = 0;
    for (int i = 0; i < runs; ++i) {
        if (iia_run(s, &n, labels, out.data(), out.size(), nullptr, 0) != IIA_OK) {
            std::fprintf(stderr, "FAIL: %s\n", iia_last_error());
            return 1;
        }
        if (i == runs / 10) rss_early = rss_kb();
    }
    const long rss_end = rss_kb();
    iia_free(s);
    std::printf("memory_test: %d load/run/free loops: RSS %ld -> %ld kB; %d runs: RSS %ld kB after %d runs -> %ld kB "
                "(limit +%ld kB)\n", loops, rss_loop_early, rss_loop_end, runs, rss_early, runs / 10, rss_end, max_growth);
    if (rss_end - rss_early > max_growth) {
        std::fprintf(stderr, "FAIL: RSS grew %ld kB over %d runs\n", rss_end - rss_early, runs - runs / 10);
        return 1;
    }
    return 0;
}
