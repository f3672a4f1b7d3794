// iia-run: run a compiled iia sampler artifact from the command line through the C ABI.
//
//   iia-run DIR --noise noise.npy [--labels 3,1,... | --labels labels.npy] [--guidance G[,G...]] --out out.npy|grid.png
//           [--backend auto|tensorrt|onnxruntime-cuda|onnxruntime-cpu] [--threads N] [--no-spin] [--no-verify]
//   iia-run DIR --bench [--batch 1,8] [--iters 50] [--warmup 5] [--noise noise.npy] [--labels ID] [--guidance G]
//           [--json FILE]
//
// Errors: ONE line "error: ..." on stderr and exit status 2 (as the Python CLIs).
#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include "contract.hpp"  // MAX_THREADS (header-only constants)
#include "iia/runtime.hpp"
#include "npy.hpp"
#include "png_grid.hpp"

namespace {

const char* USAGE =
    "usage: iia-run DIR --noise NOISE.npy [--labels IDS|LABELS.npy] [--guidance G[,G...]] --out OUT.npy|OUT.png\n"
    "               [--backend auto|tensorrt|onnxruntime-cuda|onnxruntime-cpu] [--threads N] [--no-spin]\n"
    "               [--no-verify]\n"
    "       iia-run DIR --bench [--batch 1,8] [--iters 50] [--warmup 5] [--noise NOISE.npy] [--labels ID]\n"
    "               [--guidance G] [--json FILE] [--backend ...] [--threads N] [--no-spin]\n"
    "\n"
    "Runs a compiled sampler (an iia-compile artifact) through libiia_runtime: NOISE.npy [B, *sample_shape]\n"
    "(float32; float64/float16 converted), labels as comma-separated ids (one per sample, or one for all) or\n"
    "an .npy of ids [B] / one-hot [B, label_dim]; writes images float32 [B, *sample_shape] (.npy) or a PNG\n"
    "grid of images_uint8 (.png). --guidance (artifacts compiled for a guidance range): one scale for all\n"
    "samples or one per sample, comma-separated, in the artifact's range (default: its default scale).\n"
    "--bench reports p50/p90/p99 latency and the time spent outside the\n"
    "backend's run call per call. --no-spin: idle ONNX Runtime threads sleep instead of spin-waiting\n"
    "(steadier latency where busy threads outnumber free cores).\n";

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Args {
    std::string dir, noise, labels, guidance, out, backend = "auto", json;
    int threads = IIA_THREADS_DEFAULT, iters = 50, warmup = 5;  // threads: ONNX Runtime's default unless --threads
    bool bench = false, verify = true, spin = true, help = false;
    std::vector<int64_t> batches{1, 8};
};

bool ends_with(const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

std::string real_path(const std::string& path) {  // links and '..' resolved; "" when it does not exist
    char* real = ::realpath(path.c_str(), nullptr);
    if (real == nullptr) return "";
    std::string out(real);
    std::free(real);
    return out;
}

std::string parent_of(const std::string& path) {
    const size_t slash = path.rfind('/');
    return slash == std::string::npos ? "." : path.substr(0, slash == 0 ? 1 : slash);
}

// The artifact's directory resolved (DIR, or the directory of DIR/manifest.json); "" when there is none to protect
// (loading it fails later, naming it).
std::string artifact_root(const std::string& artifact) {
    struct stat st {};
    if (artifact.empty() || ::stat(artifact.c_str(), &st) != 0) return "";
    if (S_ISDIR(st.st_mode)) return real_path(artifact);
    return ends_with(artifact, "/manifest.json") || artifact == "manifest.json" ? real_path(parent_of(artifact)) : "";
}

bool within(const std::string& path, const std::string& root) {
    return root == "/" || path == root || path.compare(0, root.size() + 1, root + "/") == 0;
}

// An output FILE checked before any work, by the rule of iia/cli.py's check_output_file (the same messages):
// not '-' (standard output is not supported), not a directory, in an existing directory this process may write
// in, and never inside the artifact being run (runtime/cli.py's outside_artifact: --json DIR/manifest.json would
// destroy it), through links and '..' too: where the rename lands (the directory resolved) and, for an existing
// link, its target.
void check_output_file(const std::string& path, const std::string& flag, const std::string& artifact) {
    if (path == "-") throw UsageError(flag + " -: writing to standard output is not supported; give a file name");
    const size_t slash = path.rfind('/');
    const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
    const std::string dir = parent_of(path);
    struct stat st {};
    if (name.empty() || name == "." || name == ".." || (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)))
        throw UsageError(flag + " " + path + ": is a directory, expected a file name");
    if (::stat(dir.c_str(), &st) != 0)
        throw UsageError(flag + " " + path + ": its directory " + dir + " cannot be used (" + std::strerror(errno) + ")");
    if (!S_ISDIR(st.st_mode)) throw UsageError(flag + " " + path + ": " + dir + " is not a directory");
    if (::access(dir.c_str(), W_OK | X_OK) != 0)
        throw UsageError(flag + " " + path + ": cannot write in " + dir + " (" + std::strerror(errno) + ")");
    const std::string root = artifact_root(artifact);
    if (root.empty()) return;
    const std::string real_dir = real_path(dir), linked = real_path(path);
    if (within(real_dir == "/" ? "/" + name : real_dir + "/" + name, root) || (!linked.empty() && within(linked, root)))
        throw UsageError(flag + " " + path + ": is inside the artifact " + artifact + "; write outputs elsewhere");
}

// An integer in [lo, hi]; one too large for any integer type is out of range too, not "not an integer"
int parse_int(const std::string& option, const std::string& text, int lo, int hi) {
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || (errno != 0 && errno != ERANGE))
        throw UsageError(option + " expects an integer, got '" + text + "'");
    if (errno == ERANGE || v < lo || v > hi)
        throw UsageError(option + " must lie in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + text);
    return static_cast<int>(v);
}

std::vector<int64_t> parse_ints(const std::string& option, const std::string& text) {
    std::vector<int64_t> out;
    size_t start = 0;
    while (start <= text.size()) {
        const size_t comma = text.find(',', start);
        const std::string part = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        char* end = nullptr;
        errno = 0;
        const long long v = std::strtoll(part.c_str(), &end, 10);
        // an empty item ("1,,2", "3,") is a typo, not nothing: refused as iia.cli.int_list refuses it
        if (part.empty() || *end != '\0' || (errno != 0 && errno != ERANGE))
            throw UsageError(option + " expects comma-separated integers, got '" + text + "'");
        if (errno == ERANGE) throw UsageError(option + " " + part + " is out of range (beyond 64-bit integers)");
        out.push_back(v);
        if (comma == std::string::npos) break;
        start = comma + 1;
    }
    if (out.empty()) throw UsageError(option + " expects at least one integer, got '" + text + "'");
    return out;
}

// --guidance G[,G...]: finite decimal numbers (their range is the library's to check, with Python's message)
std::vector<float> parse_floats(const std::string& option, const std::string& text) {
    std::vector<float> out;
    size_t start = 0;
    while (start <= text.size()) {
        const size_t comma = text.find(',', start);
        const std::string part = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        char* end = nullptr;
        const double v = std::strtod(part.c_str(), &end);
        if (part.empty() || *end != '\0' || !std::isfinite(v))
            throw UsageError(option + " expects comma-separated finite numbers, got '" + text + "'");
        out.push_back(static_cast<float>(v));  // float32, as the library and iia.runtime convert it
        if (comma == std::string::npos) break;
        start = comma + 1;
    }
    return out;
}

// --guidance as the library takes it: one value is a scalar for every sample (rank 0), several are one per sample
struct Guidance {
    std::vector<float> scales;
    int64_t count = 0;
    iia_tensor tensor{};
    const iia_tensor* get() const { return scales.empty() ? nullptr : &tensor; }
};

std::unique_ptr<Guidance> read_guidance(const std::string& text) {
    auto g = std::make_unique<Guidance>();
    if (text.empty()) return g;
    g->scales = parse_floats("--guidance", text);
    g->count = static_cast<int64_t>(g->scales.size());
    g->tensor = iia_tensor{g->scales.data(), IIA_FLOAT32, g->scales.size() == 1 ? size_t(0) : size_t(1), &g->count};
    return g;
}

Args parse(int argc, char** argv) {
    Args a;
    std::vector<std::string> positional, bench_only;  // bench_only: --batch/--iters/--warmup as given
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw UsageError(arg + " expects a value");
            // an empty value is no value: --bench --labels "" silently took the default labels
            if (argv[i + 1][0] == '\0') throw UsageError(arg + " expects a value, got an empty string");
            return argv[++i];
        };
        if (arg == "-h" || arg == "--help") a.help = true;
        else if (arg == "--noise") a.noise = value();
        else if (arg == "--labels") a.labels = value();
        else if (arg == "--guidance") a.guidance = value();
        else if (arg == "--out") a.out = value();
        else if (arg == "--backend") a.backend = value();
        else if (arg == "--threads") a.threads = parse_int(arg, value(), 1, iia_native::MAX_THREADS);  // the library's rule
        else if (arg == "--no-verify") a.verify = false;
        else if (arg == "--no-spin") a.spin = false;
        else if (arg == "--bench") a.bench = true;
        else if (arg == "--batch") { a.batches = parse_ints(arg, value()); bench_only.push_back(arg); }
        else if (arg == "--iters") { a.iters = parse_int(arg, value(), 1, INT32_MAX); bench_only.push_back(arg); }
        else if (arg == "--warmup") { a.warmup = parse_int(arg, value(), 0, INT32_MAX); bench_only.push_back(arg); }
        else if (arg == "--json") a.json = value();
        else if (arg.size() > 1 && arg[0] == '-') throw UsageError("unknown option " + arg + " (see iia-run --help)");
        else positional.push_back(arg);
    }
    if (a.help) return a;
    if (positional.size() != 1)
        throw UsageError(positional.empty() ? "missing the artifact directory DIR (see iia-run --help)"
                                            : "expected one artifact directory, got " + std::to_string(positional.size()) +
                                                  " positional arguments");
    a.dir = positional[0];
    if (a.bench) {
        if (!a.out.empty()) throw UsageError("--out does not apply to --bench (use --json FILE for the rows)");
        for (int64_t b : a.batches)
            if (b < 1) throw UsageError("--batch sizes must be >= 1, got " + std::to_string(b));
        if (!a.json.empty()) check_output_file(a.json, "--json", a.dir);
        if (!a.guidance.empty() && parse_floats("--guidance", a.guidance).size() != 1)
            throw UsageError("--bench takes one --guidance scale for every sample (default: the artifact's default)");
    } else {
        if (a.noise.empty()) throw UsageError("--noise NOISE.npy is required (or pass --bench)");
        if (a.out.empty()) throw UsageError("--out OUT.npy|OUT.png is required");
        if (!a.json.empty()) throw UsageError("--json applies to --bench only");
        if (!bench_only.empty()) throw UsageError(bench_only[0] + " applies to --bench only");
        check_output_file(a.out, "--out", a.dir);
        if (!ends_with(a.out, ".npy") && !ends_with(a.out, ".png"))
            throw UsageError("--out must end in .npy (float32 images) or .png (a grid of images_uint8), got '" + a.out + "'");
    }
    return a;
}

std::string shape_text(const std::vector<int64_t>& shape) {
    std::string out = "[";
    for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
    return out + "]";
}

// Labels: an .npy passes through as is (dtype, ids or one-hot: the library validates); comma-separated ids
// are one per sample, or one id (rank 0) for the whole batch.
struct Labels {
    iia_tools::NpyArray ids;                   // --labels 3,1,...
    std::unique_ptr<iia_tools::NpyFile> file;  // --labels LABELS.npy: its header read, its data not yet
    bool given = false;

    iia_tensor tensor(uint64_t max_bytes) { return file ? file->tensor(max_bytes) : ids.tensor(); }
};

Labels read_labels(const std::string& text) {
    Labels l;
    if (text.empty()) return l;
    l.given = true;
    if (ends_with(text, ".npy")) {
        l.file = std::make_unique<iia_tools::NpyFile>(text);
        return l;
    }
    const std::vector<int64_t> ids = parse_ints("--labels", text);
    l.ids.dtype = IIA_INT64;
    if (ids.size() > 1) l.ids.shape = {static_cast<int64_t>(ids.size())};
    l.ids.data.resize(ids.size() * sizeof(int64_t));
    std::memcpy(l.ids.data.data(), ids.data(), l.ids.data.size());
    return l;
}

void print_header(const iia::Sampler& s, const std::string& dir) {
    const iia_info& i = s.info();
    std::fprintf(stderr, "%s: model %s, solver %s, nfe %lld, sample_shape %s, %s, max_batch %lld\n%s\n", dir.c_str(),
                 i.model, i.solver, static_cast<long long>(i.nfe), shape_text(s.sample_shape()).c_str(),
                 i.label_dim > 0 ? ("label_dim " + std::to_string(i.label_dim)).c_str() : "unconditional",
                 static_cast<long long>(i.max_batch), s.describe().c_str());
}

int run_once(const Args& a) {
    iia::LoadOptions options;
    options.backend = a.backend;
    options.threads = a.threads;
    options.verify = a.verify;
    options.spin = a.spin;
    // headers first (a missing or malformed file is refused before the artifact loads), data after the artifact
    // bounds it: a file larger than max_batch samples of the widest dtype (8 bytes) is never read into memory,
    // the library refuses its shape (batch, dimensions, dtype) with Python's message before reading an element
    iia_tools::NpyFile noise(a.noise);
    Labels labels = read_labels(a.labels);
    const auto guidance = read_guidance(a.guidance);
    iia::Sampler sampler(a.dir, options);
    const iia_info& info = sampler.info();
    const uint64_t widest = 8, most = static_cast<uint64_t>(info.max_batch);
    const iia_tensor noise_t = noise.tensor(most * static_cast<uint64_t>(sampler.sample_size()) * widest);
    const uint64_t label_width = static_cast<uint64_t>(std::max<int64_t>(info.label_dim, 1));  // ids: 1, one-hot: label_dim
    const iia_tensor labels_t = labels.tensor(most * label_width * widest);
    // outputs for at most max_batch samples (a larger batch is refused before anything is written)
    const int64_t batch = noise.shape().empty() ? 0 : std::clamp<int64_t>(noise.shape()[0], 0, info.max_batch);
    const size_t count = static_cast<size_t>(batch * sampler.sample_size());
    const bool png = ends_with(a.out, ".png");
    if (png && !sampler.info().is_image)
        throw iia::Error(IIA_ERROR_INVALID_ARGUMENT,
                         "a PNG grid needs an image model ([C, H, W] samples); this one has sample shape " +
                             shape_text(sampler.sample_shape()) + ": write --out OUT.npy");
    // at least one element: a NULL buffer would mean "output not requested" (an empty batch is refused anyway)
    std::vector<float> images(png ? 0 : std::max<size_t>(count, 1));
    std::vector<uint8_t> images_u8(png ? std::max<size_t>(count, 1) : 0);
    sampler.run(noise_t, labels.given ? &labels_t : nullptr, png ? nullptr : images.data(), count,
                png ? images_u8.data() : nullptr, count, guidance->get());
    print_header(sampler, a.dir);  // after success: a failure is ONE line
    if (png) {
        const iia_info& i = sampler.info();  // [C, H, W] -> uint8 [B, H, W, C]
        const auto grid = iia_tools::grid_array(images_u8.data(), batch, i.sample_shape[1], i.sample_shape[2],
                                                i.sample_shape[0]);
        iia_tools::write_atomic("--out", a.out, iia_tools::png_bytes(grid));
        std::printf("wrote %s (%lldx%lld grid of %lld images)\n", a.out.c_str(), static_cast<long long>(grid.width),
                    static_cast<long long>(grid.height), static_cast<long long>(batch));
    } else {
        std::vector<int64_t> shape{batch};
        const auto ss = sampler.sample_shape();
        shape.insert(shape.end(), ss.begin(), ss.end());
        iia_tools::write_atomic("--out", a.out,
                                iia_tools::npy_bytes(IIA_FLOAT32, shape, images.data(), images.size() * sizeof(float)));
        std::printf("wrote %s (float32 %s)\n", a.out.c_str(), shape_text(shape).c_str());
    }
    return 0;
}

double percentile(std::vector<double> v, double q) {  // numpy's default (linear) percentile
    std::sort(v.begin(), v.end());
    const double pos = q / 100.0 * static_cast<double>(v.size() - 1);
    const size_t lo = static_cast<size_t>(std::floor(pos)), hi = std::min(lo + 1, v.size() - 1);
    return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

double round_to(double v, int digits) {
    const double f = std::pow(10.0, digits);
    return std::round(v * f) / f;
}

int run_bench(const Args& a) {
    iia::LoadOptions options;
    options.backend = a.backend;
    options.threads = a.threads;
    options.verify = a.verify;
    options.spin = a.spin;
    iia::Sampler sampler(a.dir, options);
    const iia_info& info = sampler.info();
    const int64_t item = sampler.sample_size();
    for (int64_t b : a.batches)
        if (b > info.max_batch)
            throw iia::Error(IIA_ERROR_INVALID_ARGUMENT, "batch size " + std::to_string(b) +
                                                             " exceeds the artifact's maximum batch " +
                                                             std::to_string(info.max_batch));
    // noise: rows of --noise (float32 [N, *sample_shape], its header checked before any data is read; rows past
    // the largest batch are never used, so never read) repeated, else standard normal from a fixed seed
    std::vector<float> pool;
    if (!a.noise.empty()) {
        const iia_tools::NpyFile file(a.noise);
        const std::vector<int64_t>& shape = file.shape();
        const std::vector<int64_t> sample = sampler.sample_shape();
        if (file.dtype() != IIA_FLOAT32 || shape.size() != sample.size() + 1 || shape[0] < 1 ||
            !std::equal(sample.begin(), sample.end(), shape.begin() + 1))
            throw iia::Error(IIA_ERROR_INVALID_ARGUMENT, a.noise + ": --bench needs float32 noise [N, " +
                                                             shape_text(sample).substr(1) + " (N >= 1), got " +
                                                             (file.dtype() == IIA_FLOAT32 ? "float32 " : "not float32, ") +
                                                             shape_text(shape));
        const iia_tools::NpyArray rows = file.read(*std::max_element(a.batches.begin(), a.batches.end()));
        pool.resize(rows.data.size() / 4);
        std::memcpy(pool.data(), rows.data.data(), rows.data.size());
    } else {
        std::mt19937_64 rng(0);
        std::normal_distribution<float> normal;
        pool.resize(static_cast<size_t>(item * 64));
        for (float& v : pool) v = normal(rng);
    }
    // labels: one --labels id for every sample (a rank-0 tensor, as iia-run without --bench passes it: the library
    // refuses a bad id, or any id for an unconditional model, with the same message), else 0, 1, 2, ... in turn
    bool fixed = false;
    int64_t fixed_label = 0;
    if (!a.labels.empty()) {
        const auto ids = parse_ints("--labels", a.labels);
        if (ids.size() != 1) throw UsageError("--bench takes one --labels id for every sample (default: 0, 1, 2, ... in turn)");
        fixed = true;
        fixed_label = ids[0];
    }
    const iia_tensor fixed_t{&fixed_label, IIA_INT64, 0, nullptr};
    const auto guidance = read_guidance(a.guidance);  // one scale for every sample (parse checked it is one)
    struct Call {  // one batch size's inputs and output buffer
        std::vector<int64_t> shape, labels;
        std::vector<float> noise, images;
        iia_tensor noise_t{}, labels_t{};
        const iia_tensor* labels_p = nullptr;
    };
    auto make_call = [&](int64_t batch) {
        auto c = std::make_unique<Call>();
        c->noise.resize(static_cast<size_t>(batch * item));
        for (size_t k = 0; k < c->noise.size(); ++k) c->noise[k] = pool[k % pool.size()];
        for (int64_t k = 0; k < batch && info.label_dim > 0; ++k) c->labels.push_back(k % info.label_dim);
        c->shape = {batch};
        c->shape.insert(c->shape.end(), info.sample_shape, info.sample_shape + info.rank);
        c->noise_t = iia_tensor{c->noise.data(), IIA_FLOAT32, c->shape.size(), c->shape.data()};
        c->labels_t = iia_tensor{c->labels.data(), IIA_INT64, 1, c->shape.data()};
        c->labels_p = fixed ? &fixed_t : info.label_dim > 0 ? &c->labels_t : nullptr;
        c->images.resize(c->noise.size());
        return c;
    };
    {  // one untimed call checks the inputs before anything is printed: a refusal is one line, the library's
        const auto check = make_call(a.batches[0]);
        sampler.run(check->noise_t, check->labels_p, check->images.data(), check->images.size(), nullptr, 0,
                    guidance->get());
    }
    print_header(sampler, a.dir);
    nlohmann::ordered_json rows = nlohmann::ordered_json::array();
    std::printf("%-16s %5s %3s %9s %9s %9s %10s %12s %12s\n", "backend", "batch", "thr", "p50 ms", "p90 ms", "p99 ms",
                "img/s", "outside us", "backend ms");
    for (int64_t batch : a.batches) {
        const auto c = make_call(batch);
        auto call = [&] {
            sampler.run(c->noise_t, c->labels_p, c->images.data(), c->images.size(), nullptr, 0, guidance->get());
        };
        for (int k = 0; k < a.warmup; ++k) call();
        std::vector<double> total_ms, outside_us, backend_ms;
        for (int k = 0; k < a.iters; ++k) {
            const auto start = std::chrono::steady_clock::now();
            call();
            const auto stop = std::chrono::steady_clock::now();
            const double ns = static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(stop - start).count());
            const double inside = static_cast<double>(iia_last_backend_ns());
            total_ms.push_back(ns / 1e6);
            backend_ms.push_back(inside / 1e6);
            outside_us.push_back((ns - inside) / 1e3);
        }
        double mean = 0, outside_mean = 0;
        for (double t : total_ms) mean += t / static_cast<double>(total_ms.size());
        for (double t : outside_us) outside_mean += t / static_cast<double>(outside_us.size());
        const double p50 = percentile(total_ms, 50), p90 = percentile(total_ms, 90), p99 = percentile(total_ms, 99);
        const double out50 = percentile(outside_us, 50), back50 = percentile(backend_ms, 50);
        const bool default_threads = a.threads == IIA_THREADS_DEFAULT;
        std::printf("%-16s %5lld %3s %9.3f %9.3f %9.3f %10.1f %12.2f %12.3f\n", info.backend,
                    static_cast<long long>(batch), default_threads ? "-" : std::to_string(a.threads).c_str(), p50, p90,
                    p99, static_cast<double>(batch) / (mean / 1e3), out50, back50);
        rows.push_back({{"backend", info.backend}, {"batch", batch},
                        {"threads", default_threads ? nlohmann::ordered_json() : nlohmann::ordered_json(a.threads)},
                        {"p50_ms", round_to(p50, 4)}, {"p90_ms", round_to(p90, 4)}, {"p99_ms", round_to(p99, 4)},
                        {"mean_ms", round_to(mean, 4)},
                        {"images_per_s", round_to(static_cast<double>(batch) / (mean / 1e3), 2)},
                        {"outside_run_p50_us", round_to(out50, 3)}, {"outside_run_mean_us", round_to(outside_mean, 3)},
                        {"backend_run_p50_ms", round_to(back50, 4)}, {"nfe", info.nfe}, {"solver", info.solver},
                        {"model", info.model}, {"warmup", a.warmup}, {"iters", a.iters}, {"artifact", a.dir},
                        {"times_ms", total_ms}});
    }
    std::printf("NFE %lld (%s), model %s; outside = per-call time not spent in the backend's run (%s); threads - = "
                "ONNX Runtime's default (JSON null)\n", static_cast<long long>(info.nfe), info.solver, info.model,
                "validation, tensor wrapping");
    if (!a.json.empty()) {
        const std::string text = rows.dump(2) + "\n";
        iia_tools::write_atomic("--json", a.json, std::vector<unsigned char>(text.begin(), text.end()));
        std::printf("wrote %s\n", a.json.c_str());
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const Args a = parse(argc, argv);
        if (a.help) {
            std::fputs(USAGE, stdout);
            return 0;
        }
        return a.bench ? run_bench(a) : run_once(a);
    } catch (const std::exception& err) {
        std::string line = err.what();
        std::replace(line.begin(), line.end(), '\n', ' ');
        std::fprintf(stderr, "error: %s\n", line.c_str());
        return 2;
    }
}
