"""Per-request guidance in every runtime: the Python runtime, the C ABI (ctypes), `iia-run`, the C++ RAII header and a
real tritonserver, on artifacts with the contract's `guidance` input (tests/guided_fixtures.py builds them from
compiled ones until `iia-compile --guidance LO:HI` lands): one scale per image, bit for bit across runtimes, every
bad scale refused naming `guidance` with the same message.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from guided_fixtures import make_guided_artifact
from iia.compiler.build import CompileOptions, compile_model
from iia.models import gaussian_mixture
from iia.runtime import contract, load, program
from iia.runtime.manifest import check_manifest, io_spec
from native_abi import INVALID_ARGUMENT, NativeError
from test_native import ROOT, _run, native  # noqa: F401  (the session's native build)

MAX_BATCH = 8
LO, HI, DEFAULT = 1.0, 3.0, 1.5
QUIET = dict(log=lambda text: None)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """digits (class-conditional, images_uint8) and an unconditional 1x4x4 mixture, EDM NFE 5, each as compiled
    (`plain`: one guidance scale, no input) and with the guidance input in [1, 3], default 1.5."""
    root = tmp_path_factory.mktemp("guided")
    opts = CompileOptions(nfe=5, solver="edm", max_batch=MAX_BATCH, engine=False, force=True,
                          cache_dir=str(root / "cache"), with_denoiser=True)  # the loop baseline's denoiser.onnx
    compile_model("digits", root / "digits_plain", opts, **QUIET)
    compile_model(gaussian_mixture(shape=(1, 4, 4), components=3), root / "gmm_plain", opts, **QUIET)
    for key in ("digits", "gmm"):
        make_guided_artifact(root / f"{key}_plain", root / key, LO, HI, DEFAULT)
    return {key: root / key for key in ("digits", "gmm", "digits_plain", "gmm_plain")}


@pytest.fixture(scope="module")
def samplers(artifacts):
    return {key: load(path, "onnxruntime-cpu", threads=1) for key, path in artifacts.items()}


def _noise(batch: int, shape=(1, 8, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *shape), dtype=np.float32)


def _labels(sampler, batch: int):
    return (np.arange(batch, dtype=np.int64) * 3 + 1) % sampler.label_dim if sampler.conditional else None


SCALES = np.array([1.0, 1.3, 1.7, 2.2, 2.9, 3.0], np.float32)  # the scales, and the range's end


# ---- Python runtime ------------------------------------------------------------------------------------
def test_manifest_declares_the_range_and_the_sampler_reads_it(artifacts, samplers):
    manifest = json.loads((artifacts["digits"] / "manifest.json").read_text())
    assert [t["name"] for t in manifest["inputs"]] == ["noise", "class_labels", "guidance"]
    assert manifest["inputs"][-1] == {"name": "guidance", "dtype": "float32", "shape": ["batch"], "range": [LO, HI],
                                      "default": DEFAULT}
    assert io_spec([1, 8, 8], 10, guidance=(LO, HI, DEFAULT))[0] == manifest["inputs"]
    assert samplers["digits"].guided and samplers["digits"].guidance_range == (LO, HI, DEFAULT)
    assert not samplers["digits_plain"].guided and samplers["digits_plain"].guidance_range is None


@pytest.mark.parametrize("key", ["digits", "gmm"])
def test_per_image_scale_equals_each_image_alone_at_its_scale(samplers, key):
    """One call with a scale per image gives image k what a call of the same batch with scale g_k for every image
    gives it (same batch size: batched kernels may round differently across sizes); the scale changes the output;
    None is the default for every image; a scalar is that scale for every image."""
    s = samplers[key]
    noise = _noise(len(SCALES), s.sample_shape)
    labels = _labels(s, len(SCALES))
    out = s.sample(noise, class_labels=labels, guidance=SCALES)
    assert out.guidance.dtype == np.float32 and np.array_equal(out.guidance, SCALES)
    for k, g in enumerate(SCALES):
        assert np.array_equal(out.images[k], s(noise, class_labels=labels, guidance=g)[k])
    assert not np.array_equal(out.images[0], s(noise, class_labels=labels, guidance=2.0)[0])
    default = s.sample(noise, class_labels=labels)
    assert np.array_equal(default.guidance, np.full(len(SCALES), DEFAULT, np.float32))
    assert np.array_equal(default.images, s(noise, class_labels=labels, guidance=DEFAULT))
    assert np.array_equal(s(noise, class_labels=labels, guidance=2), s(noise, class_labels=labels,
                                                                         guidance=np.full(len(SCALES), 2.0)))
    if s.is_image:
        assert np.array_equal(s.images(noise, class_labels=labels, guidance=SCALES), out.images_uint8)


ONE_EACH = "guidance must be one scale per image (shape [4]) or one for all (a scalar), got shape"
BAD_SCALES = {  # name: (guidance for a batch of 4, the message)
    "above the range": (3.5, "guidance 3.5 out of range: this artifact was compiled for guidance in [1.0, 3.0]"),
    "below the range, one image": ([1.0, 2.0, 0.99, 2.0],
                                   "guidance 0.9900000095367432 out of range: this artifact was compiled for guidance "
                                   "in [1.0, 3.0]"),
    "NaN": ([1.0, np.nan, 2.0, 2.0], "guidance must be finite, got nan"),
    "inf": (np.inf, "guidance must be finite, got inf"),
    "float64 past float32": (1e300, "guidance must be finite, got inf"),
    "too few": ([1.0, 2.0], f"{ONE_EACH} [2]"),
    "too many": ([2.0] * 5, f"{ONE_EACH} [5]"),
    "a column": (np.full((4, 1), 2.0), f"{ONE_EACH} [4, 1]"),
    "bool": (np.array(True), "guidance must be real numbers (float32 expected), got dtype bool"),
    "object dtype": (np.array([1.0, 2.0, 2.0, 2.0], dtype=object),
                     "guidance must be real numbers (float32 expected), got dtype object"),
}


@pytest.mark.parametrize("case", list(BAD_SCALES))
def test_bad_scales_refused_naming_guidance(samplers, case):
    guidance, message = BAD_SCALES[case]
    s = samplers["digits"]
    with pytest.raises(ValueError) as info:
        s(_noise(4), class_labels=_labels(s, 4), guidance=guidance)
    assert str(info.value) == message


def test_the_range_is_inclusive_after_float32_conversion(samplers):
    s = samplers["gmm"]
    noise = _noise(3, s.sample_shape)
    assert s(noise, guidance=[LO, HI, np.float64(HI) + 1e-12]).shape == (3, 1, 4, 4)  # 3 + 1e-12 is 3.0 in float32


def test_artifact_compiled_for_one_scale_refuses_guidance(samplers):
    s = samplers["digits_plain"]
    for guidance in (1.5, [1.5] * 2):
        with pytest.raises(ValueError, match=r"^this artifact was compiled for one guidance scale: guidance must be "
                                             r"None \(recompile with iia-compile --guidance LO:HI"):
            s(_noise(2), class_labels=[0, 1], guidance=guidance)
    assert s.sample(_noise(2), class_labels=[0, 1]).guidance is None


@pytest.mark.parametrize("entry, fragment", [
    (dict(range=[3.0, 1.0]), "range [3.0,1.0]"),
    (dict(default=4.0), "default 4.0"),
    (dict(dtype="int64"), "gives guidance int64"),
])
def test_malformed_guidance_entry_refused_naming_inputs(artifacts, entry, fragment):
    manifest = json.loads((artifacts["digits"] / "manifest.json").read_text())
    manifest["inputs"][-1].update(entry)
    with pytest.raises(contract.ArtifactError) as info:
        check_manifest(manifest)
    assert "field 'inputs' gives guidance" in str(info.value) and fragment in str(info.value)


def test_plan_over_nodes_round_trips_and_interpolates():
    """over_nodes stacks the nodes' plans (a name a node lacks weighs 0 there); program.json keeps the per-node
    weights; Plan.at gives each image the interpolant at its scale, exactly a node's weights at a node."""
    from iia.runtime.program import Combine, Denoise, Plan, from_json, over_nodes, to_json

    def plan(a, b):
        ops = (Denoise("d0", "noise", 80.0), Combine("x1", (("noise", a), ("d0", b))) if b else
               Combine("x1", (("noise", a),)), Denoise("d1", "x1", 1.0), Combine("out", (("x1", 1.0), ("d1", a))))
        return Plan(ops, "out")
    joined = over_nodes([1.0, 3.0], [plan(0.5, 0.25), plan(1.5, 0.0)])
    assert joined.ops[1].terms == (("noise", (0.5, 1.5)), ("d0", (0.25, 0.0)))
    doc = to_json(joined)
    assert doc["guidance"] == {"nodes": [1.0, 3.0]}
    assert doc["ops"][1]["terms"] == [["noise", [0.5, 1.5]], ["d0", [0.25, 0.0]]]
    back = from_json(json.dumps(doc).encode(), "p")
    assert back == joined
    at = back.at(np.array([1.0, 2.0, 3.0], np.float32), rank=4)
    assert np.array_equal(at.ops[1].terms[0][1].reshape(-1), np.float32([0.5, 1.0, 1.5]))
    with pytest.raises(program.ProgramError, match="share its time steps|differ"):
        over_nodes([1.0, 3.0], [plan(0.5, 0.25), Plan(plan(0.5, 0.25).ops[:1] + (Denoise("x1", "d0", 2.0),) +
                                                      plan(0.5, 0.25).ops[2:], "out")])


# ---- the loop baseline, iia-bench, iia-sample -----------------------------------------------------------------
def test_program_plan_with_guidance_nodes_checked():
    plan = {"schema": "iia.program", "schema_version": 1, "input": "noise", "output": "x",
            "guidance": {"nodes": [1.0, 2.0, 3.0]},
            "ops": [{"op": "combine", "out": "x", "terms": [["noise", [1, 2, 3]]]}]}
    assert program.check_program(plan, "p") is plan
    for bad, fragment in ((dict(guidance={"nodes": [2.0, 1.0]}), "guidance must be"),
                          (dict(guidance={"nodes": [1.0]}), "guidance must be"),
                          (dict(ops=[{"op": "combine", "out": "x", "terms": [["noise", [1, 2]]]}]), "one per guidance"),
                          (dict(guidance=None, ops=[{"op": "combine", "out": "x", "terms": [["noise", [1, 2, 3]]]}]),
                           "guidance must be")):
        with pytest.raises(contract.ArtifactError, match=fragment):
            program.check_program({**plan, **bad}, "p")
    weights = program.hat_weights([1.0, 1.5, 2.0, 2.75, 3.0], [1.0, 2.0, 3.0])
    assert np.allclose(weights, [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.25, 0.75], [0, 0, 1]])


def test_loop_feeds_the_guided_denoiser_and_interpolates_per_image(artifacts, samplers):
    """The numpy loop around denoiser.onnx (which takes guidance) through program.json (per-node weights) gives the
    graph's samples with one scale per image, up to float32 summation order."""
    from iia.runtime.loop import DenoiserLoop
    from iia.runtime.onnx_backend import OrtSession

    s = samplers["digits"]
    plan = program.read_program(artifacts["digits"], s.manifest)
    session = OrtSession((artifacts["digits"] / contract.DENOISER_ONNX).read_bytes(), threads=1)
    loop = DenoiserLoop(session, plan, conditional=True)
    assert loop.takes_guidance and plan.nodes == (LO, HI)
    noise, labels = _noise(len(SCALES), seed=5), _labels(s, len(SCALES))
    looped = loop(noise, labels, SCALES)
    assert np.abs(looped - s(noise, class_labels=labels, guidance=SCALES)).max() <= 1e-4
    assert np.abs(looped - s(noise, class_labels=labels, guidance=2.0)).max() > 1e-2
    with pytest.raises(ValueError, match="guidance must be given"):
        loop(noise, labels)


def test_bench_feeds_the_scale_to_graph_denoiser_and_loop(artifacts):
    from iia.evaluation.bench import BenchOptions, run_bench

    opts = BenchOptions(batches=(2,), iters=2, warmup=1, eager=False, threads=1, guidance=2.2)
    row = run_bench(artifacts["digits"], opts, log=lambda text: None)[0]
    assert row["denoiser_p50_ms"] is not None and row["overhead_ratio"] is not None
    assert row["loop_max_abs_diff"] is not None and row["loop_max_abs_diff"] <= 1e-4  # the loop ran at g = 2.2
    for artifact, guidance, message in ((artifacts["digits"], 3.5, "guidance 3.5 out of range"),
                                        (artifacts["digits_plain"], 2.0, "compiled for one guidance scale")):
        with pytest.raises(ValueError, match=message):
            run_bench(artifact, BenchOptions(batches=(1,), iters=1, warmup=0, eager=False, guidance=guidance),
                      log=lambda text: None)


def test_iia_sample_guidance_for_every_image(artifacts, samplers, tmp_path, capsys):
    from iia.runtime.cli import sample_main

    assert sample_main([str(artifacts["digits"]), "--n", "5", "--labels", "3", "--guidance", "2.5", "--threads", "1",
                        "--out", str(tmp_path / "g.png")]) == 0
    saved = np.load(tmp_path / "g.npz")
    assert np.array_equal(saved["guidance"], np.full(5, 2.5, np.float32))
    assert np.array_equal(saved["images"], samplers["digits"](saved["noise"], class_labels=saved["labels"],
                                                              guidance=2.5))
    capsys.readouterr()
    assert sample_main([str(artifacts["digits"]), "--n", "2", "--labels", "3", "--guidance", "3.5",
                        "--out", str(tmp_path / "bad.png")]) == 2
    assert "error: --guidance 3.5: guidance 3.5 out of range" in capsys.readouterr().err  # the flag named
    assert not (tmp_path / "bad.png").exists() and not (tmp_path / "bad.npz").exists()


# ---- C ABI, iia-run, C++ header: bit for bit, the same refusals -------------------------------------------------
def test_native_contract_names_guidance():
    text = (ROOT / "runtime" / "native" / "src" / "contract.hpp").read_text()
    assert re.search(r'inline constexpr const char\* GUIDANCE = "([^"]*)";', text).group(1) == contract.GUIDANCE


@pytest.mark.parametrize("key", ["digits", "gmm"])
def test_c_abi_per_image_scales_equal_python_bit_for_bit(native, artifacts, samplers, key):
    s = samplers[key]
    n = native["lib"].load(artifacts[key], threads=1)
    try:
        assert n.guidance() == (LO, HI, DEFAULT)
        noise, labels = _noise(len(SCALES), s.sample_shape, seed=3), _labels(s, len(SCALES))
        for guidance in (SCALES, SCALES.astype(np.float64), 2.5, None, np.array([1, 2, 3, 1, 2, 3], np.int32)):
            images, images_u8 = n.run(noise, labels, guidance=guidance, uint8=s.is_image)
            expected = s.sample(noise, class_labels=labels, guidance=guidance)
            assert np.array_equal(images, expected.images)
            if s.is_image:
                assert np.array_equal(images_u8, expected.images_uint8)
        assert np.array_equal(n.run(noise, labels)[0], s(noise, class_labels=labels))  # iia_run: the default
    finally:
        n.close()
    plain = native["lib"].load(artifacts[f"{key}_plain"], threads=1)
    assert plain.guidance() is None
    plain.close()


def test_c_abi_refuses_what_python_refuses_with_the_same_message(native, artifacts, samplers):
    n = native["lib"].load(artifacts["digits"], threads=1)
    plain = native["lib"].load(artifacts["digits_plain"], threads=1)
    try:
        # an object array has no C buffer to hand over (the C ABI takes typed tensors): Python-only cases
        cases = [(n, samplers["digits"], g) for g, _ in BAD_SCALES.values() if np.asarray(g).dtype != object]
        cases += [(n, samplers["digits"], np.float16(0.5)), (plain, samplers["digits_plain"], 2.0)]
        for native_sampler, python_sampler, guidance in cases:
            noise, labels = _noise(4), _labels(python_sampler, 4)
            with pytest.raises(ValueError) as expected:
                python_sampler(noise, class_labels=labels, guidance=guidance)
            with pytest.raises(NativeError) as info:
                native_sampler.run(noise, labels, guidance=guidance)
            assert info.value.status == INVALID_ARGUMENT and info.value.message == str(expected.value)
        with pytest.raises(NativeError, match=r"^iia_run_options.struct_size is 8, expected \d+ \(initialise it with "
                                              r"iia_run_options_init\)$"):
            n.run(_noise(1), [0], guidance=2.0, options_size=8)
    finally:
        n.close()
        plain.close()


@pytest.mark.parametrize("key, guidance", [("digits", "1,1.3,1.7,2.2,2.9,3"), ("digits", "2.5"), ("gmm", None)])
def test_iia_run_guidance_equals_python_bit_for_bit(native, artifacts, samplers, tmp_path, key, guidance):
    s = samplers[key]
    noise, labels = _noise(6, s.sample_shape, seed=4), _labels(s, 6)
    np.save(tmp_path / "noise.npy", noise)
    cmd = [native["iia_run"], artifacts[key], "--noise", tmp_path / "noise.npy", "--out", tmp_path / "out.npy",
           "--threads", "1"]
    if labels is not None:
        cmd += ["--labels", ",".join(map(str, labels))]
    if guidance is not None:
        cmd += ["--guidance", guidance]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr
    scales = None if guidance is None else np.array([float(g) for g in guidance.split(",")])
    scales = scales[0] if scales is not None and scales.size == 1 else scales
    assert np.array_equal(np.load(tmp_path / "out.npy"), s(noise, class_labels=labels, guidance=scales))


@pytest.mark.parametrize("key, guidance", [("digits", "3.5"), ("digits", "1,2"), ("digits", "nan"),
                                           ("digits_plain", "2")])
def test_iia_run_refuses_bad_scales_with_python_message(native, artifacts, samplers, tmp_path, key, guidance):
    s = samplers[key]
    np.save(tmp_path / "noise.npy", _noise(4))
    proc = _run([native["iia_run"], artifacts[key], "--noise", tmp_path / "noise.npy", "--labels", "1,2,3,4",
                 "--guidance", guidance, "--out", tmp_path / "out.npy"])
    assert proc.returncode == 2 and not (tmp_path / "out.npy").exists()
    if guidance == "nan":  # not a finite number: refused by iia-run's parser before the artifact loads
        assert proc.stderr == "error: --guidance expects comma-separated finite numbers, got 'nan'\n"
        return
    scales = [float(g) for g in guidance.split(",")]
    with pytest.raises(ValueError) as expected:
        s(_noise(4), class_labels=[1, 2, 3, 4], guidance=scales[0] if len(scales) == 1 else scales)
    assert proc.stderr == f"error: {expected.value}\n"


CXX_DRIVER = r"""
#include <cstdio>
#include <iia/runtime.hpp>
int main(int, char** argv) {
    iia::LoadOptions options;
    options.backend = "onnxruntime-cpu";
    options.threads = 1;
    iia::Sampler sampler(argv[1], options);
    const iia_guidance& g = sampler.guidance();
    std::printf("%d %g %g %g\n", g.guided, g.lo, g.hi, g.default_scale);
    std::vector<float> noise(3 * sampler.sample_size());
    for (size_t k = 0; k < noise.size(); ++k) noise[k] = static_cast<float>(k % 7) * 0.25f - 0.75f;
    std::FILE* out = std::fopen(argv[2], "wb");
    for (const std::vector<float>& scales : {std::vector<float>{1.0f, 2.2f, 2.9f}, std::vector<float>{2.5f},
                                             std::vector<float>{}}) {
        const std::vector<float> images = sampler.run(noise, 3, {1, 4, 7}, scales);
        std::fwrite(images.data(), sizeof(float), images.size(), out);
    }
    std::fclose(out);
    try {
        sampler.run(noise, 3, {1, 4, 7}, {4.0f});
    } catch (const iia::Error& err) {
        std::printf("%d %s\n", static_cast<int>(err.status()), err.what());
    }
}
"""


def test_cxx_header_takes_guidance(native, artifacts, samplers, tmp_path):
    """The RAII header: guidance() reports the range; run(noise, batch, labels, scales) gives Python's bits for
    per-image, one-for-all and default scales; an out-of-range scale throws iia::Error with Python's message."""
    (tmp_path / "driver.cpp").write_text(CXX_DRIVER)
    lib_dir = Path(native["lib"].lib._name).parent
    build = _run(["c++", "-std=c++17", "-O1", "-I", ROOT / "runtime" / "native" / "include", tmp_path / "driver.cpp",
                  "-L", lib_dir, "-liia_runtime", f"-Wl,-rpath,{lib_dir}", "-o", tmp_path / "driver"])
    assert build.returncode == 0, build.stderr[-2000:]
    proc = _run([tmp_path / "driver", artifacts["digits"], tmp_path / "out.bin"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "1 1 3 1.5"
    s = samplers["digits"]
    with pytest.raises(ValueError) as expected:
        s(_noise(3), class_labels=[1, 4, 7], guidance=4.0)
    assert lines[1] == f"{INVALID_ARGUMENT} {expected.value}"
    noise = (np.arange(3 * 64) % 7).astype(np.float32) * np.float32(0.25) - np.float32(0.75)
    noise = noise.reshape(3, 1, 8, 8)
    got = np.fromfile(tmp_path / "out.bin", np.float32).reshape(3, 3, 1, 8, 8)
    for k, scales in enumerate(([1.0, 2.2, 2.9], 2.5, None)):
        scales = None if scales is None else np.asarray(scales, np.float32)
        assert np.array_equal(got[k], s(noise, class_labels=[1, 4, 7], guidance=scales))


# ---- Triton: a real tritonserver, requests with different scales in one dynamic batch ---------------------------
def test_triton_configs_declare_guidance(artifacts, tmp_path):
    from iia.compiler.triton import TritonOptions, export_repository, parse_config

    export_repository(artifacts["digits"], tmp_path / "repo",
                      TritonOptions(name="g", kind="cpu", backends=["onnxruntime", "python"]), **QUIET)
    for backend, optional in (("onnxruntime", False), ("python", True)):
        config = parse_config((tmp_path / "repo" / f"g_{backend}" / "config.pbtxt").read_text())
        entry = next(t for t in config.input if t.name == "guidance")
        assert list(entry.dims) == [1] and entry.HasField("reshape") and list(entry.reshape.shape) == []
        assert entry.optional == optional


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    from iia.compiler.triton import TritonOptions, export_repository
    from iia.evaluation.triton_server import LocalTritonServer, TritonUnavailable, wheel_paths

    pytest.importorskip("tritonclient.grpc", reason="pip install 'tritonclient[http,grpc]' (the test extra has it)")
    try:
        wheel_paths()
    except TritonUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Triton tests: {err}")
        pytest.skip(str(err))
    repo = tmp_path_factory.mktemp("guided-triton-repo")
    export_repository(artifacts["digits"], repo, TritonOptions(name="digits", kind="cpu", backends=["python"],
                                                               max_queue_delay_us=200000, threads=1), **QUIET)
    srv = LocalTritonServer(repo, timeout=180).start()
    try:
        yield srv
    finally:
        srv.cleanup()


def test_triton_serves_different_scales_in_one_dynamic_batch(server, samplers):
    """Concurrent requests, each with its own scales (one with none: the default), merged by Triton's dynamic
    batcher into ONE sampler call; each answer equals the in-process runtime's for its noise, labels and scales;
    an out-of-range scale gets our message and the others are served."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    s = samplers["digits"]
    n = 6
    noises = [_noise(1, seed=10 + k) for k in range(n)]
    scales = [np.array([[g]], np.float32) for g in (1.0, 1.3, 1.7, 2.2, 2.9)] + [None]
    results, errors, barrier = [None] * n, [], threading.Barrier(n)

    def inputs(noise, label, guidance):
        arrays = {"noise": noise, "class_labels": np.array([[label]], np.int64)}
        if guidance is not None:
            arrays["guidance"] = guidance
        out = []
        for name, arr in arrays.items():
            item = grpcclient.InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT64")
            item.set_data_from_numpy(arr)
            out.append(item)
        return out

    def stats(client):
        model = client.get_inference_statistics("digits_python", as_json=True)["model_stats"][0]
        return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in model.get("batch_stats", [])}

    client = grpcclient.InferenceServerClient(server.grpc_url)
    before = stats(client)

    def one(k):
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            barrier.wait()
            results[k] = c.infer("digits_python", inputs(noises[k], k, scales[k])).as_numpy("images")
        except Exception as err:
            errors.append(err)
        finally:
            c.close()

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    after = stats(client)
    formed = {b: after.get(b, 0) - before.get(b, 0) for b in after if after.get(b, 0) > before.get(b, 0)}
    assert sum(b * c for b, c in formed.items()) == n and max(formed) > 1, formed
    for k in range(n):
        guidance = None if scales[k] is None else scales[k][:, 0]
        assert np.array_equal(results[k], s(noises[k], class_labels=[k], guidance=guidance))
    with pytest.raises(InferenceServerException, match=r"guidance 3\.5 out of range: this artifact was compiled for "
                                                       r"guidance in \[1\.0, 3\.0\]"):
        client.infer("digits_python", inputs(noises[0], 0, np.array([[3.5]], np.float32)))
    assert client.is_model_ready("digits_python")
    client.close()


# ---- a real range artifact (iia-compile --cfg LO:HI, from the guidance-compile branch) ------------------------
def test_real_range_artifact_through_every_runtime(native, tmp_path):
    """A classifier-free-guided EDM pickle compiled with `--cfg 1:3 --solver iia-edm` (fitted at the nodes,
    interpolated between): Python and the C ABI give the same bits with one scale per image, iia-run too; both
    refuse 3.5 with the same message; iia-bench's loop baseline (denoiser.onnx with guidance, program.json with
    per-node weights) computes the graph's sampler at a scale between nodes."""
    pytest.importorskip("iia.compiler.scales", reason="iia-compile --cfg LO:HI (the guidance-compile branch) not merged")
    from edm_fixtures import make_edm_pickle
    from iia.calibration.fit import CalibrationOptions
    from iia.evaluation.bench import BenchOptions, run_bench

    make_edm_pickle(tmp_path / "cfg.pkl", label_dropout=0.1, channels=8)
    out = tmp_path / "range"
    compile_model(str(tmp_path / "cfg.pkl"), out, CompileOptions(
        nfe=5, solver="iia-edm", engine=False, max_batch=MAX_BATCH, cfg=(1.0, 3.0), cache_dir=str(tmp_path / "cache"),
        calibration=CalibrationOptions(batch=32, holdout=32, reference_steps=32), with_denoiser=True), **QUIET)
    python, c = load(out, "onnxruntime-cpu", threads=1), native["lib"].load(out, threads=1)
    try:
        assert python.guidance_range == c.guidance() and python.guidance_range[:2] == (1.0, 3.0)
        noise, labels = _noise(len(SCALES), (3, 8, 8), seed=6), np.arange(len(SCALES)) % 10
        expected = python.sample(noise, class_labels=labels, guidance=SCALES)
        images, images_u8 = c.run(noise, labels, guidance=SCALES, uint8=True)
        assert np.array_equal(images, expected.images) and np.array_equal(images_u8, expected.images_uint8)
        with pytest.raises(ValueError) as refused:
            python(noise, class_labels=labels, guidance=3.5)
        with pytest.raises(NativeError) as info:
            c.run(noise, labels, guidance=3.5)
        assert info.value.message == str(refused.value) and str(refused.value).startswith("guidance 3.5 out of range")
    finally:
        c.close()
    np.save(tmp_path / "noise.npy", noise)
    proc = _run([native["iia_run"], out, "--noise", tmp_path / "noise.npy", "--labels", ",".join(map(str, labels)),
                 "--guidance", ",".join(f"{g:g}" for g in SCALES), "--threads", "1", "--out", tmp_path / "o.npy"])
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.load(tmp_path / "o.npy"), expected.images)
    row = run_bench(out, BenchOptions(batches=(4,), iters=2, warmup=1, eager=False, threads=1, guidance=2.9),
                    log=lambda text: None)[0]
    assert row["overhead_ratio"] is not None and row["loop_max_abs_diff"] <= 1e-4
