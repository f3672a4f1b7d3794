// 8 threads x 50 runs on ONE sampler equal the serial results bit for bit; the RAII wrapper's basics.
// usage: threads_test DIR [THREADS RUNS]
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <thread>
#include <vector>

#include "iia/runtime.hpp"

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: threads_test DIR [THREADS RUNS]\n");
        return 2;
    }
    const int n_threads = argc > 2 ? std::atoi(argv[2]) : 8, runs = argc > 3 ? std::atoi(argv[3]) : 50;
    iia::LoadOptions options;
    options.backend = "onnxruntime-cpu";
    options.threads = 1;
    iia::Sampler loaded(argv[1], options);
    iia::Sampler sampler = std::move(loaded);  // move leaves the source empty; only one free happens
    if (loaded.get() != nullptr) { std::fprintf(stderr, "FAIL: moved-from sampler still owns a handle\n"); return 1; }
    const auto& info = sampler.info();
    const int64_t batch = std::min<int64_t>(3, info.max_batch);
    std::vector<std::vector<float>> noises, labelsets, serial;
    std::vector<std::vector<int64_t>> labels(n_threads);
    for (int t = 0; t < n_threads; ++t) {
        std::mt19937 rng(static_cast<unsigned>(t));
        std::normal_distribution<float> normal;
        std::vector<float> noise(static_cast<size_t>(batch * sampler.sample_size()));
        for (float& v : noise) v = normal(rng);
        noises.push_back(noise);
        if (info.label_dim > 0)
            for (int64_t k = 0; k < batch; ++k) labels[t].push_back((t + k) % info.label_dim);
        serial.push_back(sampler.run(noise, batch, labels[t]));
    }
    // the exception carries the status and the one-line message; the batch is checked before anything is sized
    // from it, with iia.runtime's messages
    const std::string over = "noise batch " + std::to_string(batch + 1000) + " exceeds the artifact's maximum batch " +
                             std::to_string(info.max_batch) + " (split the request, or recompile with --max-batch)";
    const std::pair<int64_t, std::string> bad_batches[] = {
        {-1, "noise batch must be >= 1, got -1"}, {0, "noise batch must be >= 1, got 0"}, {batch + 1000, over}};
    for (const auto& [bad_batch, message] : bad_batches)
        for (int uint8 = 0; uint8 < 2; ++uint8) {
            try {
                if (uint8) sampler.images_uint8(noises[0], bad_batch, labels[0]);
                else sampler.run(noises[0], bad_batch, labels[0]);
                std::fprintf(stderr, "FAIL: batch %lld did not throw\n", static_cast<long long>(bad_batch));
                return 1;
            } catch (const iia::Error& err) {
                if (err.status() != IIA_ERROR_INVALID_ARGUMENT || err.what() != message) {
                    std::fprintf(stderr, "FAIL: batch %lld: status %d, '%s' (want '%s')\n", static_cast<long long>(bad_batch),
                                 err.status(), err.what(), message.c_str());
                    return 1;
                }
            }
        }
    std::vector<int> mismatches(n_threads, 0), errors(n_threads, 0);
    std::vector<std::thread> pool;
    for (int t = 0; t < n_threads; ++t)
        pool.emplace_back([&, t] {
            for (int r = 0; r < runs; ++r) {
                try {
                    const std::vector<float> out = sampler.run(noises[t], batch, labels[t]);
                    mismatches[t] += std::memcmp(out.data(), serial[t].data(), out.size() * sizeof(float)) != 0;
                } catch (const iia::Error&) {
                    ++errors[t];
                }
            }
        });
    for (auto& th : pool) th.join();
    int bad = 0;
    for (int t = 0; t < n_threads; ++t) bad += mismatches[t] + errors[t];
    std::printf("threads_test: %d threads x %d runs, batch %lld, %d mismatching or failed call(s) (%s)\n", n_threads,
                runs, static_cast<long long>(batch), bad, sampler.describe().c_str());
    return bad == 0 ? 0 : 1;
}
