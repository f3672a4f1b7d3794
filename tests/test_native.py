"""The native runtime (runtime/native: libiia_runtime, iia-run) against iia.runtime, in one process.

One CMake build per session (build/native-test, incremental; IIA_NATIVE_BUILD_DIR overrides), the CTest tests
(C ABI from C, 8 threads x 50 runs, LeakSanitizer + RSS, install tree + find_package), then the same noise,
labels and bad inputs through the C library (ctypes), `iia-run` and the Python runtime: outputs bit for bit,
messages character for character. A missing toolchain piece FAILS with the install hint; nothing skips.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edm_fixtures import make_edm_pickle
from iia.calibration.fit import CalibrationOptions
from iia.compiler.build import CompileOptions, compile_model
from iia.models import gaussian_mixture
from iia.runtime import draw_noise, load
from iia.runtime.grid import grid_array
from native_abi import ARTIFACT, BACKEND_UNAVAILABLE, INVALID_ARGUMENT, Library, LoadOptions, NativeError

ROOT = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("IIA_NATIVE_BUILD_DIR") or ROOT / "build" / "native-test")
HINT = ("install the native toolchain with .ci/install-native.sh (apt-get install cmake g++ nlohmann-json3-dev "
        "libssl-dev libpng-dev; ONNX Runtime headers: runtime/native/fetch_ort_headers.sh)")
MAX_BATCH = 8


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def _tail(proc: subprocess.CompletedProcess, n: int = 15) -> str:
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    errors = [line for line in lines if "Error" in line or "error" in line or "not found" in line]
    return " | ".join((errors or lines)[-n:])


@pytest.fixture(scope="session")
def native():
    """Configure + build once; FAILS (does not skip) with the install hint when a piece is missing."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: {HINT}")
    configure = ["cmake", "-S", ROOT, "-B", BUILD, "-DIIA_ORT_FROM_PYTHON=ON", f"-DIIA_PYTHON={sys.executable}",
                 "-DCMAKE_BUILD_TYPE=Release"]
    if not (BUILD / "CMakeCache.txt").exists() and shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    proc = _run(configure)
    if proc.returncode != 0:
        pytest.fail(f"cmake configure failed: {_tail(proc)} ({HINT})")
    proc = _run(["cmake", "--build", BUILD, "-j", str(os.cpu_count() or 2)])
    if proc.returncode != 0:
        pytest.fail(f"cmake --build failed: {_tail(proc)}")
    out = BUILD / "runtime" / "native"
    return {"build": BUILD, "iia_run": out / "iia-run", "lib": Library(str(out / "libiia_runtime.so"))}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Tiny artifacts: an EDM-format pickle (class-conditional, 3x8x8), the bundled digits model with IIA-EDM at
    NFE 9, an unconditional image mixture and a vector mixture (no images_uint8)."""
    root = tmp_path_factory.mktemp("native_artifacts")
    calib = CalibrationOptions(batch=40, holdout=32, reference_steps=32)

    def opts(**kw):  # a base solver fits nothing: no calibration flags for it
        fit = {} if kw.get("solver") in ("edm", "ddim") else {"calibration": calib}
        # with denoiser.onnx: the bad-manifest corpus edits its entry, the link tests replace it
        return CompileOptions(force=True, max_batch=MAX_BATCH, engine=False, with_denoiser=True, **fit, **kw)

    make_edm_pickle(root / "edm.pkl", kind="edm-cond")
    quiet = lambda text: None  # noqa: E731
    compile_model(str(root / "edm.pkl"), root / "edm", opts(nfe=5, solver="edm"), log=quiet)
    compile_model("digits", root / "digits", opts(nfe=9, solver="iia-edm"), log=quiet)
    compile_model(gaussian_mixture(shape=(1, 4, 4), components=3), root / "uncond", opts(nfe=5, solver="edm"), log=quiet)
    compile_model(gaussian_mixture(shape=(3,), components=2), root / "vector", opts(nfe=5, solver="edm"), log=quiet)
    # the EDM pickle again with ONNX Runtime sessions specialised for batch 1 and 3 (manifest static_batches)
    compile_model(str(root / "edm.pkl"), root / "edm_static", opts(nfe=5, solver="edm", static_batch="1,3"), log=quiet)
    return {key: root / key for key in ("edm", "digits", "uncond", "vector", "edm_static")}


@pytest.fixture(scope="session")
def python_samplers(artifacts):
    return {key: load(path, threads=1) for key, path in artifacts.items()}


@pytest.fixture(scope="session")
def native_samplers(native, artifacts):
    samplers = {key: native["lib"].load(path, threads=1) for key, path in artifacts.items()}
    yield samplers
    for s in samplers.values():
        s.close()


# ---- CTest: C ABI from C, threads, memory, install tree ------------------------------------------------
@pytest.mark.parametrize("name", ["abi_c", "threads_8x50", "memory_leak_rss", "install_find_package"])
def test_ctest(native, artifacts, name):
    env = dict(os.environ, IIA_TEST_COND=str(artifacts["edm"]), IIA_TEST_UNCOND=str(artifacts["uncond"]))
    proc = _run(["ctest", "--test-dir", native["build"], "-R", f"^{name}$", "--output-on-failure", "-V"], env=env,
                timeout=900)
    summary = [line for line in proc.stdout.splitlines() if "_test:" in line]
    print("\n".join(summary))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 tests passed" in proc.stdout.replace("100% tests passed, 0 tests failed out of 1", "1 tests passed")


# ---- bit for bit ---------------------------------------------------------------------------------------
def _labels(sampler, batch: int):
    return (np.arange(batch, dtype=np.int64) * 3 + 1) % sampler.label_dim if sampler.conditional else None


@pytest.mark.parametrize("key", ["digits", "edm", "edm_static"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_iia_run_output_equals_python_bit_for_bit(native, artifacts, python_samplers, tmp_path, key, batch):
    sampler = python_samplers[key]
    noise = draw_noise(100 + batch, batch, sampler.sample_shape)
    labels = _labels(sampler, batch)
    np.save(tmp_path / "noise.npy", noise)
    cmd = [native["iia_run"], artifacts[key], "--noise", tmp_path / "noise.npy", "--out", tmp_path / "out.npy",
           "--threads", "1", "--backend", "onnxruntime-cpu", "--labels", ",".join(map(str, labels))]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr
    native_out = np.load(tmp_path / "out.npy")
    python_out = sampler(noise, class_labels=labels)
    assert native_out.dtype == np.float32 and native_out.shape == python_out.shape
    assert np.array_equal(native_out.view(np.uint32), python_out.view(np.uint32))  # bit for bit


@pytest.mark.parametrize("key", ["digits", "edm"])
def test_c_abi_both_outputs_equal_python(native, artifacts, python_samplers, key):
    """float32 images and images_uint8 from one run; ONNX Runtime's default threads on both sides too."""
    python_default = load(artifacts[key])  # threads None
    native_default = native["lib"].load(artifacts[key], verify=False)  # IIA_THREADS_DEFAULT
    try:
        for batch in (1, 3, 8):
            noise = draw_noise(7 * batch, batch, python_default.sample_shape)
            labels = _labels(python_default, batch)
            ref = python_default.sample(noise, class_labels=labels)
            images, images_u8 = native_default.run(noise, labels, uint8=True)
            assert np.array_equal(images.view(np.uint32), ref.images.view(np.uint32))
            assert np.array_equal(images_u8, ref.images_uint8)
    finally:
        native_default.close()


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_other_float_noise_converted_like_python(native_samplers, python_samplers, dtype):
    noise = draw_noise(3, 2, (3, 8, 8)).astype(dtype)
    labels = np.array([4, 5])
    images, _ = native_samplers["edm"].run(noise, labels)
    assert np.array_equal(images, python_samplers["edm"](noise, class_labels=labels))


def test_one_hot_and_scalar_labels_equal_ids(native_samplers, python_samplers):
    noise = draw_noise(5, 3, (3, 8, 8))
    ids = np.array([2, 9, 0])
    by_ids, _ = native_samplers["edm"].run(noise, ids)
    one_hot = np.eye(10, dtype=np.float32)[ids]
    assert np.array_equal(native_samplers["edm"].run(noise, one_hot)[0], by_ids)
    scalar = np.array(4, dtype=np.int32)
    assert np.array_equal(native_samplers["edm"].run(noise, scalar)[0],
                          python_samplers["edm"](noise, class_labels=4))


@pytest.mark.parametrize("key", ["digits", "edm"])
def test_iia_run_png_grid_equals_python_grid(native, artifacts, python_samplers, tmp_path, key):
    from PIL import Image

    sampler = python_samplers[key]
    noise = draw_noise(1, 5, sampler.sample_shape)
    labels = _labels(sampler, 5)
    np.save(tmp_path / "noise.npy", noise)
    proc = _run([native["iia_run"], artifacts[key], "--noise", tmp_path / "noise.npy", "--out", tmp_path / "g.png",
                 "--threads", "1", "--labels", ",".join(map(str, labels))])
    assert proc.returncode == 0, proc.stderr
    expected = grid_array(sampler.images(noise, class_labels=labels))
    pixels = np.asarray(Image.open(tmp_path / "g.png"))
    assert np.array_equal(pixels, expected[..., 0] if expected.shape[2] == 1 else expected)


# ---- bad inputs: the same one-line messages ------------------------------------------------------------
def _noise(batch=2, shape=(3, 8, 8), dtype=np.float32):
    return draw_noise(0, batch, shape).astype(dtype)


def _with(value, index=5, dtype=np.float32):
    noise = _noise(dtype=dtype)
    noise.reshape(-1)[index] = value
    return noise


BAD_INPUTS = {  # name: (artifact, noise, labels)
    "int noise": ("edm", _noise().astype(np.int32), [0, 1]),
    "bool noise": ("edm", np.zeros((2, 3, 8, 8), bool), [0, 1]),
    "no batch axis": ("edm", _noise()[0], [0]),
    "wrong shape": ("edm", draw_noise(0, 2, (3, 8, 9)), [0, 1]),
    "rank 5": ("edm", draw_noise(0, 2, (1, 3, 8, 8)), [0, 1]),
    "batch 0": ("edm", np.zeros((0, 3, 8, 8), np.float32), [0]),
    "batch over max": ("edm", draw_noise(0, MAX_BATCH + 1, (3, 8, 8)), list(range(MAX_BATCH + 1))),
    "NaN noise": ("edm", _with(np.nan), [0, 1]),
    "Inf noise": ("edm", _with(-np.inf), [0, 1]),
    "float64 overflow": ("edm", _with(1e39, dtype=np.float64), [0, 1]),
    "float16 inf": ("edm", _with(np.inf, dtype=np.float16), [0, 1]),
    "labels missing": ("edm", _noise(), None),
    "label too big": ("edm", _noise(), [0, 10]),
    "label negative": ("edm", _noise(), [-1, 0]),
    "label uint64 huge": ("edm", _noise(), np.array([0, 2**63 + 5], np.uint64)),
    "float ids": ("edm", _noise(), np.array([0.0, 1.0], np.float32)),
    "bool ids": ("edm", _noise(), np.array([True, False])),
    "scalar float label": ("edm", _noise(), 3.0),
    "scalar out of range": ("edm", _noise(), np.int64(12)),
    "too many labels": ("edm", _noise(), [0, 1, 2]),
    "one-hot wrong width": ("edm", _noise(), np.zeros((2, 9), np.float32)),
    "one-hot two ones": ("edm", _noise(), np.array([[1, 1] + [0] * 8, [1] + [0] * 9], np.float32)),
    "one-hot half": ("edm", _noise(), np.array([[0.5] + [0] * 9, [1] + [0] * 9], np.float32)),
    "labels rank 3": ("edm", _noise(), np.zeros((2, 10, 1), np.int64)),
    "labels on unconditional": ("uncond", draw_noise(0, 2, (1, 4, 4)), [0, 1]),
    "vector noise shape": ("vector", draw_noise(0, 2, (4,)), None),
}


def _python_message(sampler, noise, labels) -> str:
    with pytest.raises(ValueError) as info, np.errstate(over="ignore"):  # float64 1e39 -> inf is the case
        sampler(noise, class_labels=labels)
    return str(info.value)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_same_message_through_c_abi(native_samplers, python_samplers, case):
    key, noise, labels = BAD_INPUTS[case]
    expected = _python_message(python_samplers[key], noise, labels)
    with pytest.raises(NativeError) as info:
        native_samplers[key].run(noise, None if labels is None else np.asarray(labels))
    assert info.value.status == INVALID_ARGUMENT
    assert info.value.message == expected


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_same_message_through_iia_run(native, artifacts, python_samplers, tmp_path, case):
    key, noise, labels = BAD_INPUTS[case]
    expected = _python_message(python_samplers[key], noise, labels)
    np.save(tmp_path / "noise.npy", noise)
    cmd = [native["iia_run"], artifacts[key], "--noise", tmp_path / "noise.npy", "--out", tmp_path / "out.npy"]
    if labels is not None:
        arr = np.asarray(labels)
        if arr.ndim == 1 and arr.dtype.kind == "i":
            cmd += ["--labels", ",".join(map(str, arr))]
        else:
            np.save(tmp_path / "labels.npy", arr)
            cmd += ["--labels", tmp_path / "labels.npy"]
    proc = _run(cmd)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {expected}\n"  # one line, Python's message
    assert not (tmp_path / "out.npy").exists()


# ---- bad artifacts: the same messages -----------------------------------------------------------------
def _edit_manifest(change):
    def mutate(path: Path):
        data = json.loads((path / "manifest.json").read_text())
        change(data)
        (path / "manifest.json").write_text(json.dumps(data))
    return mutate


def _flip_byte(name, offset=100):
    def mutate(path: Path):
        data = bytearray((path / name).read_bytes())
        data[offset] ^= 0xFF
        (path / name).write_bytes(bytes(data))
    return mutate


def _truncate(name):
    def mutate(path: Path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:-10])
    return mutate


def _replace_listed(name, data: bytes):
    def mutate(path: Path):
        import hashlib

        (path / name).write_bytes(data)
        _edit_manifest(lambda d: d["files"][name].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))(path)
    return mutate


def _rewrite_graph(change):
    def mutate(path: Path):
        import onnx

        model = onnx.load(str(path / "sampler.onnx"))
        change(model)
        _replace_listed("sampler.onnx", model.SerializeToString())(path)
    return mutate


def _rename_input(model, old, new):
    for graph_input in model.graph.input:
        if graph_input.name == old:
            graph_input.name = new
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]


BAD_ARTIFACTS = {  # name: (mutation, C status)
    "no manifest": (lambda p: (p / "manifest.json").unlink(), ARTIFACT),
    "manifest not JSON": (lambda p: (p / "manifest.json").write_text("{not json"), ARTIFACT),
    "manifest a list": (lambda p: (p / "manifest.json").write_text("[1, 2]"), ARTIFACT),
    "foreign schema": (_edit_manifest(lambda d: d.update(schema="other.thing")), ARTIFACT),
    "newer schema": (_edit_manifest(lambda d: d.update(schema_version=2)), ARTIFACT),
    "string schema_version": (_edit_manifest(lambda d: d.update(schema_version="1")), ARTIFACT),
    "float schema_version": (_edit_manifest(lambda d: d.update(schema_version=1.5)), ARTIFACT),
    "no schema_version": (_edit_manifest(lambda d: d.pop("schema_version")), ARTIFACT),
    "missing fields": (_edit_manifest(lambda d: [d.pop("nfe"), d.pop("label_dim")]), ARTIFACT),
    "max_batch 0": (_edit_manifest(lambda d: d.update(max_batch=0)), ARTIFACT),
    "negative shape": (_edit_manifest(lambda d: d.update(sample_shape=[3, -8, 8])), ARTIFACT),
    "file outside": (_edit_manifest(lambda d: d["files"].update({"../x": {"sha256": "0" * 64}})), ARTIFACT),
    "no sha256": (_edit_manifest(lambda d: d["files"]["denoiser.onnx"].pop("sha256")), ARTIFACT),
    "corrupted sampler.onnx": (_flip_byte("sampler.onnx"), ARTIFACT),
    "truncated sampler.onnx": (_truncate("sampler.onnx"), ARTIFACT),
    "corrupted golden file": (_flip_byte("golden_outputs.json", 20), ARTIFACT),
    "missing denoiser.onnx": (lambda p: (p / "denoiser.onnx").unlink(), ARTIFACT),
    "missing sampler.onnx": (lambda p: (p / "sampler.onnx").unlink(), ARTIFACT),
    "renamed input": (_edit_manifest(lambda d: d["inputs"][0].update(name="x")), ARTIFACT),
    # differs only past the 16th character: both digests are printed whole, so they read as different
    "sha256 edited at its end": (_edit_manifest(lambda d: d["files"]["denoiser.onnx"].update(
        sha256=d["files"]["denoiser.onnx"]["sha256"][:-1] + ("0" if d["files"]["denoiser.onnx"]["sha256"][-1] != "0"
                                                             else "1"))), ARTIFACT),
    "bad sha256 text": (_edit_manifest(lambda d: d["files"]["denoiser.onnx"].update(sha256="XYZ")), ARTIFACT),
    "huge sample": (_edit_manifest(lambda d: d.update(sample_shape=[65536, 65536, 1])), ARTIFACT),
    "noise shape disagrees": (_edit_manifest(lambda d: d["inputs"][0].update(shape=["batch", 3, 8, 9])), ARTIFACT),
    "labels range disagrees": (_edit_manifest(lambda d: d["inputs"][1].update(range=[0, 3])), ARTIFACT),
    "duplicate output": (_edit_manifest(lambda d: d["outputs"].append(dict(d["outputs"][0]))), ARTIFACT),
    "solver not a string": (_edit_manifest(lambda d: d.update(solver=5)), ARTIFACT),
    "sigmas not finite": (_edit_manifest(lambda d: d.update(sigmas=[1.0, "x"])), ARTIFACT),
    "edited nfe": (_edit_manifest(lambda d: d.update(nfe=7)), ARTIFACT),
    "edited label range and dim": (_edit_manifest(lambda d: [d.update(label_dim=5), d["inputs"][1].update(range=[0, 4])]),
                                   ARTIFACT),
    "graph without metadata": (_rewrite_graph(lambda m: m.ClearField("metadata_props")), ARTIFACT),
    "graph input renamed": (_rewrite_graph(lambda m: _rename_input(m, "noise", "x0")), ARTIFACT),
    "garbage graph with its hash": (_replace_listed("sampler.onnx", b"this is not an onnx model"), ARTIFACT),
    "manifest is a directory": (lambda p: [(p / "manifest.json").unlink(), (p / "manifest.json").mkdir()], ARTIFACT),
    "listed file is a FIFO": (lambda p: [(p / "golden_outputs.json").unlink(), os.mkfifo(p / "golden_outputs.json")],
                              ARTIFACT),
    "listed file grew": (lambda p: (p / "denoiser.onnx").write_bytes((p / "denoiser.onnx").read_bytes() + b"x"), ARTIFACT),
    "static batch over max": (_edit_manifest(lambda d: d.update(static_batches=[1, 99])), ARTIFACT),
    "deeply nested JSON": (lambda p: (p / "manifest.json").write_text("[" * 100000 + "]" * 100000), ARTIFACT),
    "manifest with a UTF-8 BOM": (lambda p: (p / "manifest.json").write_bytes(b"\xef\xbb\xbf" + (p / "manifest.json")
                                                                               .read_bytes()), ARTIFACT),
    "label range past label_dim": (_edit_manifest(lambda d: d["inputs"][1].update(range=[0, 20])), ARTIFACT),
}


def _python_load_message(path, **kw) -> str:
    with pytest.raises((ValueError, RuntimeError)) as info:
        load(path, **kw)
    return str(info.value)


@pytest.fixture
def edm_copy(artifacts, tmp_path):
    dst = tmp_path / "artifact"
    shutil.copytree(artifacts["edm"], dst)
    return dst


def _verdict(message: str) -> str:
    """What a refusal says, whatever its wording (the runtimes need not match byte for byte): the manifest field
    it names; else the kind of bad JSON; else the file and the fault, without a parser's or the OS's detail."""
    field = re.search(r"field '([^']+)'", message)
    if field:
        return f"field {field.group(1)}"
    for kind in ("not readable JSON", "nested too deeply", "leads outside the artifact directory",
                 "has an invalid schema_version"):
        if kind in message:
            return kind
    return message.split(" (")[0]


@pytest.mark.parametrize("case", list(BAD_ARTIFACTS))
def test_bad_artifact_same_message(native, edm_copy, case):
    mutate, status = BAD_ARTIFACTS[case]
    mutate(edm_copy)
    expected = _python_load_message(edm_copy)
    with pytest.raises(NativeError) as info:
        native["lib"].load(edm_copy)
    assert info.value.status == status
    assert _verdict(info.value.message) == _verdict(expected) and "\n" not in info.value.message
    np.save(edm_copy.parent / "noise.npy", draw_noise(0, 1, (3, 8, 8)))
    proc = _run([native["iia_run"], edm_copy, "--noise", edm_copy.parent / "noise.npy", "--labels", "0",
                 "--out", edm_copy.parent / "out.npy"])
    assert proc.returncode == 2 and proc.stderr == f"error: {info.value.message}\n"


def test_missing_dir_and_manifest_path(native, artifacts, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(NativeError) as info:
        native["lib"].load(missing)
    assert info.value.status == ARTIFACT and info.value.message == _python_load_message(missing)
    (tmp_path / "afile").write_text("x")  # a file is named a file, not "not found"
    with pytest.raises(NativeError) as info:
        native["lib"].load(tmp_path / "afile")
    assert info.value.status == ARTIFACT and info.value.message == _python_load_message(tmp_path / "afile")
    assert info.value.message == f"{tmp_path / 'afile'} is a file, not an artifact directory (give the directory " \
                                 f"iia-compile made)"
    with pytest.raises(NativeError) as info:  # not "'.' is not an iia artifact"
        native["lib"].load("")
    assert info.value.message == _python_load_message("") == "the artifact path is empty"
    by_manifest = native["lib"].load(artifacts["edm"] / "manifest.json")  # DIR/manifest.json works too
    assert by_manifest.info.label_dim == 10
    by_manifest.close()


def test_backend_choice_same_messages(native, artifacts, edm_copy):
    lib = native["lib"]
    for backend in ("onnxruntime-cuda", "tensorrt"):
        expected = _python_load_message(artifacts["edm"], backend=backend)
        with pytest.raises(NativeError) as info:
            lib.load(artifacts["edm"], backend=backend)
        assert info.value.status == BACKEND_UNAVAILABLE and info.value.message == expected
    for kw in ({"backend": "bogus"}, {"threads": 0}, {"threads": -2}):  # (-1 is IIA_THREADS_DEFAULT: Python's None)
        with pytest.raises(NativeError) as info:
            lib.load(artifacts["edm"], **kw)
        assert info.value.status == INVALID_ARGUMENT and info.value.message == _python_load_message(artifacts["edm"], **kw)
    # auto: the same fallbacks, said the same way
    native_auto = lib.load(artifacts["edm"])
    from iia.runtime import describe

    assert native_auto.describe() == describe(load(artifacts["edm"]))
    native_auto.close()
    # a plan that claims to be built: without a GPU both skip TensorRT for the same reason, and a corrupted
    # plan is refused after the choice of ONNX Runtime
    (edm_copy / "sampler.plan").write_bytes(b"not really a plan")
    import hashlib

    def add_plan(d):
        d["files"]["sampler.plan"] = {"sha256": hashlib.sha256(b"not really a plan").hexdigest(), "bytes": 17}
        d["engine"] = {"built": True, "tensorrt": "10.0.0", "compute_capability": "9.0", "precision": "fp32"}

    _edit_manifest(add_plan)(edm_copy)
    native_plan = lib.load(edm_copy)
    assert native_plan.describe() == describe(load(edm_copy))
    native_plan.close()
    (edm_copy / "sampler.plan").write_bytes(b"not really a plaN")
    expected = _python_load_message(edm_copy)
    with pytest.raises(NativeError) as info:
        lib.load(edm_copy)
    assert info.value.message == expected and "sampler.plan is corrupted" in expected


# ---- iia-run: usage errors and --bench ------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["--bogus"], "unknown option --bogus"),
    ([], "--noise NOISE.npy is required"),
    (["--noise", "n.npy"], "--out OUT.npy|OUT.png is required"),
    (["--noise", "n.npy", "--out", "x.txt"], "--out must end in .npy"),
    (["--noise", "missing.npy", "--out", "x.npy"], "missing.npy: No such file or directory"),
    (["--noise", "notnpy.npy", "--out", "x.npy"], "notnpy.npy: not a .npy file"),
    (["--noise", "n.npy", "--out", "x.npy", "--labels", "a,b"], "--labels expects comma-separated integers"),
    (["--noise", "n.npy", "--out", "x.npy", "--threads", "two"], "--threads expects an integer"),
    (["--noise", "n.npy", "--out", "x.npy", "--backend", "gpu"], "unknown backend 'gpu'"),
    (["--noise", "n.npy", "--out", "x.png", "--labels", "1"], "a PNG grid needs an image model"),
    (["--bench", "--batch", "9"], "batch size 9 exceeds the artifact's maximum batch 8"),
    (["--noise", "n.npy", "--out", "x.npy", "--threads", "0"], "--threads must lie in [1, 1024], got 0"),
    (["--bench", "--threads", "0"], "--threads must lie in [1, 1024], got 0"),
    (["--noise", "n.npy", "--out", "x.npy", "--threads", "100000"], "--threads must lie in [1, 1024], got 100000"),
    (["--noise", "n.npy", "--out", "x.npy", "--labels", "3,"], "--labels expects comma-separated integers, got '3,'"),
    # output paths are checked before any work: nothing is loaded, run or benchmarked (stdout stays empty)
    (["--bench", "--json", "/nonexistent/x.json"],
     "--json /nonexistent/x.json: its directory /nonexistent cannot be used (No such file or directory)"),
    (["--bench", "--json", "adir.npy"], "--json adir.npy: is a directory, expected a file name"),
    (["--noise", "n.npy", "--out", "/nonexistent/out.npy"], "--out /nonexistent/out.npy: its directory /nonexistent"),
    (["--noise", "n.npy", "--out", "adir.npy"], "--out adir.npy: is a directory, expected a file name"),
    (["--noise", "n.npy", "--out", "n.npy/x.npy"], "--out n.npy/x.npy: n.npy is not a directory"),
])
def test_iia_run_usage_errors_are_one_line(native, artifacts, tmp_path, args, fragment):
    np.save(tmp_path / "n.npy", draw_noise(0, 2, (3,)))
    (tmp_path / "notnpy.npy").write_text("hello")
    (tmp_path / "adir.npy").mkdir()
    key = "vector" if "x.png" in args else "edm"
    proc = _run([native["iia_run"], artifacts[key], *args], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and fragment in proc.stderr, proc.stderr
    assert proc.stdout == ""


def _npy_header(descr: str, shape: str) -> bytes:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def test_iia_run_reads_only_bounded_regular_npy_files(native, artifacts, tmp_path):
    """--noise/--labels: a device, a FIFO or a directory is refused at once (no hang, no read to exhaustion), and
    what is read is bounded by the header's declared shape, which must match the file's size."""
    os.mkfifo(tmp_path / "fifo.npy")
    (tmp_path / "dir.npy").mkdir()
    (tmp_path / "huge.npy").write_bytes(_npy_header("<f4", "(1099511627776, 1099511627776)"))
    (tmp_path / "short.npy").write_bytes(_npy_header("<f4", "(1000,)") + b"\0" * 16)
    (tmp_path / "long.npy").write_bytes(_npy_header("<f4", "(2,)") + b"\0" * 12)
    np.save(tmp_path / "noise.npy", draw_noise(0, 2, (3, 8, 8)))
    cases = [
        ("--noise", "/dev/zero", "/dev/zero: is a character device, not a regular .npy file"),
        ("--noise", tmp_path / "fifo.npy", f"{tmp_path / 'fifo.npy'}: is a FIFO, not a regular .npy file"),
        ("--labels", tmp_path / "fifo.npy", f"{tmp_path / 'fifo.npy'}: is a FIFO, not a regular .npy file"),
        ("--noise", tmp_path / "dir.npy", f"{tmp_path / 'dir.npy'}: is a directory, not a regular .npy file"),
        ("--noise", tmp_path / "huge.npy", f"{tmp_path / 'huge.npy'}: its header declares shape (1099511627776, "
                                           f"1099511627776), more than the 17179869184 data bytes allowed"),
        ("--noise", tmp_path / "short.npy", f"{tmp_path / 'short.npy'}: holds 16 data bytes, its header says 4000 "
                                            f"(truncated or corrupted)"),
        ("--labels", tmp_path / "long.npy", f"{tmp_path / 'long.npy'}: holds 12 data bytes, its header says 8 "
                                            f"(truncated or corrupted)"),
    ]
    for flag, path, message in cases:
        args = ["--noise", tmp_path / "noise.npy", "--labels", "0,1"]
        args[args.index(flag) + 1] = path
        proc = _run([native["iia_run"], artifacts["edm"], *args, "--out", tmp_path / "out.npy"], timeout=60)
        assert (proc.returncode, proc.stderr) == (2, f"error: {message}\n"), (flag, path)
        assert not (tmp_path / "out.npy").exists()


def test_no_spin_through_c_abi_and_iia_run_equals_python(native, artifacts, python_samplers, tmp_path):
    """spin 0 (Python: load(spin=False), iia-run --no-spin) with 2 threads: the same bits as Python's; a caller
    built against the header before `spin` (struct_size ending at `verify`) is accepted; other sizes refused."""
    lib, key = native["lib"], "edm"
    python_sleepy = load(artifacts[key], "onnxruntime-cpu", threads=2, spin=False)
    noise = draw_noise(5, 3, python_sleepy.sample_shape)
    labels = _labels(python_sleepy, 3)
    want = python_sleepy(noise, class_labels=labels)
    before_spin = LoadOptions.spin.offset
    for options in ({"spin": False}, {"struct_size": before_spin}):
        sampler = lib.load(artifacts[key], "onnxruntime-cpu", threads=2, **options)
        try:
            assert np.array_equal(sampler.run(noise, labels)[0].view(np.uint32), want.view(np.uint32))
        finally:
            sampler.close()
    for size in (before_spin - 4, ctypes.sizeof(LoadOptions) + 4):
        with pytest.raises(NativeError, match="struct_size is"):
            lib.load(artifacts[key], struct_size=size)
    np.save(tmp_path / "noise.npy", noise)
    proc = _run([native["iia_run"], artifacts[key], "--noise", tmp_path / "noise.npy", "--out", tmp_path / "out.npy",
                 "--threads", "2", "--no-spin", "--backend", "onnxruntime-cpu", "--labels", ",".join(map(str, labels))])
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy").view(np.uint32), want.view(np.uint32))


def test_c_abi_refuses_a_freed_handle(native, artifacts):
    """A freed sampler's magic number is cleared: a second free and a call on it fail with a status and a message
    instead of crashing (best effort: using a freed handle stays undefined behaviour, see runtime.h)."""
    lib = native["lib"]
    sampler = lib.load(artifacts["edm"], threads=1)
    handle, sampler.handle = sampler.handle, None
    assert lib.lib.iia_free(handle) == 0
    assert lib.lib.iia_free(handle) == INVALID_ARGUMENT
    assert lib.lib.iia_last_error().decode() == "invalid or freed sampler handle"
    sampler.handle = handle
    with pytest.raises(NativeError) as info:
        sampler.run(draw_noise(0, 1, (3, 8, 8)), np.array([0]))
    assert (info.value.status, info.value.message) == (INVALID_ARGUMENT, "invalid or freed sampler handle")
    assert sampler.describe() == ""
    sampler.handle = None
    assert lib.lib.iia_free(None) == 0


def test_tensorrt_on_names_what_is_missing(tmp_path):
    """-DIIA_WITH_TENSORRT=ON where TensorRT's header is found but not libnvinfer: the error names libnvinfer only."""
    (tmp_path / "trt" / "include").mkdir(parents=True)
    (tmp_path / "trt" / "include" / "NvInferRuntime.h").write_text("// only the header\n")
    proc = _run(["cmake", "-S", ROOT, "-B", tmp_path / "b", "-DIIA_WITH_TENSORRT=ON", f"-DTENSORRT_ROOT={tmp_path / 'trt'}",
                 "-DIIA_ORT_FROM_PYTHON=ON", f"-DIIA_PYTHON={sys.executable}", "-DIIA_BUILD_TESTS=OFF"])
    assert proc.returncode != 0
    error = " ".join(proc.stderr.split())
    assert "IIA_WITH_TENSORRT=ON but not found: TensorRT's library libnvinfer (pass -DTENSORRT_ROOT=" in error, error
    assert "NvInferRuntime.h" not in error and "(TRUE)" not in error


def test_iia_run_bench_reports_latency_and_overhead(native, artifacts, tmp_path):
    proc = _run([native["iia_run"], artifacts["edm"], "--bench", "--batch", "1,2", "--iters", "5", "--warmup", "1",
                 "--threads", "1", "--json", tmp_path / "bench.json"])
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["backend"] == "onnxruntime-cpu" and len(r["times_ms"]) == 5
        assert 0 < r["backend_run_p50_ms"] <= r["p50_ms"] and r["outside_run_p50_us"] >= 0
    assert "outside us" in proc.stdout


# ---- one contract: the C++ constants are the Python contract's ------------------------------------------
def test_native_contract_constants_equal_python_contract():
    """runtime/native/src/contract.hpp restates the contract's names for C++; they must be iia.runtime.contract's
    (the C++ library must not need Python to build, so they are compared here rather than generated). The bounds
    and the manifest's field table are generated: see test_generated_manifest_header_is_current."""
    from iia.runtime import contract

    text = (ROOT / "runtime" / "native" / "src" / "contract.hpp").read_text()
    native = dict(re.findall(r'inline constexpr const char\* (\w+) = "([^"]*)";', text))
    native.update((k, int(v)) for k, v in re.findall(r"inline constexpr int (\w+) = (\d+);", text))
    assert not re.search(r"int64_t MAX_\w+ =", text)  # bounds come from the generated header only
    pairs = {"NOISE": contract.NOISE, "LABELS": contract.LABELS, "IMAGES": contract.IMAGES,
             "IMAGES_U8": contract.IMAGES_U8, "SCHEMA": contract.SCHEMA, "SCHEMA_VERSION": contract.SCHEMA_VERSION,
             "MANIFEST": contract.MANIFEST, "SAMPLER_ONNX": contract.SAMPLER_ONNX, "PLAN": contract.SAMPLER_PLAN,
             "NO_CUDA": contract.NO_CUDA, "SAMPLER_ONNX_DATA": contract.SAMPLER_ONNX_DATA,
             "TENSORRT": contract.TENSORRT, "ORT_CUDA": contract.ORT_CUDA, "ORT_CPU": contract.ORT_CPU,
             "BATCH_AXIS": contract.BATCH_AXIS, "BOM_REFUSED": contract.BOM_REFUSED}
    assert {k: native.get(k) for k in pairs} == pairs
    order = re.search(r"BACKENDS\[\] = \{([^}]*)\}", (ROOT / "runtime" / "native" / "src" / "runtime.cpp").read_text())
    assert tuple(native[name.strip()] for name in order.group(1).split(",")) == contract.BACKENDS  # auto's order


def test_generated_manifest_header_is_current():
    """runtime/native/src/manifest_fields.hpp is runtime/manifest.py's FIELDS and the contract's bounds, generated:
    edit the table, regenerate (the command is in the header), never the header."""
    from iia.runtime.manifest import NATIVE_BOUNDS, NATIVE_HEADER, native_header

    assert (ROOT / NATIVE_HEADER).read_text() == native_header()
    header = native_header()
    from iia.runtime import contract
    for name in NATIVE_BOUNDS:
        assert f"inline constexpr int64_t {name} = {getattr(contract, name)};" in header
    for required in contract.REQUIRED:
        assert re.search(rf'\{{"{required}", FieldKind::\w+, true,', header)


def test_missing_build_dependency_fails_with_the_install_hint(native, tmp_path):
    """What the session fixture reports when a piece is missing: CMake stops with the apt package to install."""
    proc = _run(["cmake", "-S", ROOT, "-B", tmp_path / "b", "-DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=TRUE",
                 "-DIIA_ORT_FROM_PYTHON=ON", f"-DIIA_PYTHON={sys.executable}"])
    assert proc.returncode != 0
    assert "nlohmann-json not found: apt-get install nlohmann-json3-dev" in proc.stderr


# ---- one strict JSON profile, one field table: a shared corpus of bad manifests, both runtimes ------------
def _text_edit(change):
    """Mutate manifest.json's bytes (for what json.dumps cannot write: duplicates, NUL, bad escapes)."""
    def mutate(path: Path):
        (path / "manifest.json").write_bytes(change((path / "manifest.json").read_bytes()))
    return mutate


def _deep(depth: int):  # an unknown field whose value nests `depth` arrays (the manifest itself is level 1)
    return _text_edit(lambda text: text.replace(b"{", b'{"deep": ' + b"[" * depth + b"]" * depth + b", ", 1))


def _static_batches(n: int):
    return _edit_manifest(lambda d: d.update(max_batch=n, static_batches=list(range(1, n + 1))))


def _guidance_entry(first: bool = False, **change):
    """A `guidance` input entry (runtime/manifest.py guidance_input) with `change` (None: the key removed), last in
    `inputs` or, with `first`, before class_labels: a malformed one is refused before the graph is opened."""
    def edit(d):
        entry = {"name": "guidance", "dtype": "float32", "shape": ["batch"], "range": [1.0, 3.0], "default": 1.5}
        entry.update(change)
        entry = {k: v for k, v in entry.items() if v is not None}
        d["inputs"].insert(1 if first else len(d["inputs"]), entry)
    return _edit_manifest(edit)


# case -> the verdict both runtimes must give (None: both accept the artifact)
MANIFEST_CORPUS = {
    "file entry without bytes": (_edit_manifest(lambda d: d["files"]["denoiser.onnx"].pop("bytes")),
                                 "field files.denoiser.onnx.bytes"),
    "file entry with bytes null": (_edit_manifest(lambda d: d["files"]["denoiser.onnx"].update(bytes=None)),
                                   "field files.denoiser.onnx.bytes"),
    "file entry with bytes true": (_edit_manifest(lambda d: d["files"]["golden_inputs.json"].update(bytes=True)),
                                   "field files.golden_inputs.json.bytes"),
    "file entry with float bytes": (_edit_manifest(lambda d: d["files"]["denoiser.onnx"].update(
        bytes=float(d["files"]["denoiser.onnx"]["bytes"]))), "field files.denoiser.onnx.bytes"),
    "NUL byte and garbage after the manifest": (_text_edit(lambda t: t + b"\0garbage {"), "not readable JSON"),
    "NUL byte inside": (_text_edit(lambda t: t.replace(b"{", b"{\0", 1)), "not readable JSON"),
    "unknown field nested 600 deep": (_deep(600), "nested too deeply"),
    "unknown field nested 990 deep": (_deep(990), "nested too deeply"),
    "unknown field nested 64 deep (65 levels)": (_deep(64), "nested too deeply"),
    "unknown field nested 63 deep (64 levels, the limit)": (_deep(63), None),
    "label range [false, 9]": (_edit_manifest(lambda d: d["inputs"][1].update(range=[False, 9])), "field inputs"),
    "label range [0.0, 9]": (_edit_manifest(lambda d: d["inputs"][1].update(range=[0.0, 9])), "field inputs"),
    "label range of 3 items": (_edit_manifest(lambda d: d["inputs"][1].update(range=[0, 9, 9])), "field inputs"),
    "file name with a lone high surrogate escape": (
        _text_edit(lambda t: t.replace(b'"denoiser.onnx"', b'"denoiser\\ud800.onnx"')), "not readable JSON"),
    "lone low surrogate in an unknown field": (_text_edit(lambda t: t.replace(b"{", b'{"x": "\\udc00", ', 1)),
                                               "not readable JSON"),
    "escaped NUL in a file name": (_text_edit(lambda t: t.replace(b'"denoiser.onnx"', b'"denoiser\\u0000.onnx"')),
                                   "field files"),
    "duplicate top-level key": (_text_edit(lambda t: t.replace(b"{", b'{"nfe": 5, ', 1)), "not readable JSON"),
    "duplicate key in a file entry": (_text_edit(lambda t: t.replace(b'"denoiser.onnx": {', b'"denoiser.onnx": {"bytes": 1, ', 1)),
                                      "not readable JSON"),
    "UTF-8 byte order mark": (_text_edit(lambda t: b"\xef\xbb\xbf" + t), "not readable JSON"),
    "solver edited (still valid)": (_edit_manifest(lambda d: d.update(solver="SOLVER")), None),
    "invalid UTF-8 byte": (_text_edit(lambda t: t.replace(b'"solver"', b'"solv\xffer"', 1)), "not readable JSON"),
    "NaN in sigmas": (_text_edit(lambda t: t.replace(b'"sigmas": [', b'"sigmas": [NaN, ', 1)), "not readable JSON"),
    "nfe true": (_edit_manifest(lambda d: d.update(nfe=True)), "field nfe"),
    "nfe 5.0": (_edit_manifest(lambda d: d.update(nfe=5.0)), "field nfe"),
    "nfe past 64 bits": (_text_edit(lambda t: re.sub(rb'"nfe": \d+', b'"nfe": 100000000000000000000000', t)),
                         "field nfe"),
    "label_dim false": (_edit_manifest(lambda d: d.update(label_dim=False)), "field label_dim"),
    "sample_shape with a bool": (_edit_manifest(lambda d: d.update(sample_shape=[3, True, 8])), "field sample_shape"),
    "sigmas with a bool": (_edit_manifest(lambda d: d.update(sigmas=[1.0, True])), "field sigmas"),
    "r a string": (_edit_manifest(lambda d: d.update(r="2")), "field r"),
    "model a list": (_edit_manifest(lambda d: d.update(model=[1])), "field model"),
    "engine a string": (_edit_manifest(lambda d: d.update(engine="built")), "field engine"),
    "static_batches with a bool": (_edit_manifest(lambda d: d.update(static_batches=[True])), "field static_batches"),
    "65 static batches": (_static_batches(65), "field static_batches"),
    "64 static batches": (_static_batches(64), None),
    "schema_version true": (_edit_manifest(lambda d: d.update(schema_version=True)), "has an invalid schema_version"),
    "10 inputs": (_edit_manifest(lambda d: d.update(inputs=d["inputs"] * 5)), "field inputs"),
    # one number rule: a number past the double range is unreadable JSON wherever it is (nlohmann's rule)
    "1e400 in an unknown field": (_text_edit(lambda t: t.replace(b"{", b'{"zz": 1e400, ', 1)), "not readable JSON"),
    "-2e308 nested in an unknown field": (_text_edit(lambda t: t.replace(b"{", b'{"zz": {"q": [-2e308]}, ', 1)),
                                          "not readable JSON"),
    "2e308 in parity.max_abs": (_text_edit(lambda t: re.sub(rb'"max_abs": [^,}]+', b'"max_abs": 2e308', t, count=1)),
                                "not readable JSON"),
    "1e400 as guidance": (_text_edit(lambda t: re.sub(rb'"guidance": null', b'"guidance": 1e400', t, count=1)),
                          "not readable JSON"),
    "label_dim 1e400": (_text_edit(lambda t: re.sub(rb'"label_dim": \d+', b'"label_dim": 1e400', t)), "not readable JSON"),
    "400-digit integer in an unknown field": (_text_edit(lambda t: t.replace(b"{", b'{"zz": ' + b"9" * 400 + b", ", 1)),
                                              "not readable JSON"),
    "309-digit integer (past the double range)": (
        _text_edit(lambda t: t.replace(b"{", b'{"zz": -' + b"9" * 309 + b", ", 1)), "not readable JSON"),
    "308-digit integer (a finite double)": (
        _text_edit(lambda t: t.replace(b"{", b'{"zz": ' + b"9" * 308 + b", ", 1)), None),
    "1e-400 in an unknown field (reads as 0)": (_text_edit(lambda t: t.replace(b"{", b'{"zz": 1e-400, ', 1)), None),
    "sampler.onnx not listed": (_edit_manifest(lambda d: d["files"].pop("sampler.onnx")), "field files"),
    **{f"guidance input {case}": (_guidance_entry(**change), "field inputs") for case, change in {
        "range reversed": dict(range=[3.0, 1.0]), "range empty": dict(range=[2.0, 2.0]),
        "range with a bool": dict(range=[True, 3.0]), "range of 1 item": dict(range=[1.0]),
        "range a string": dict(range="1:3"), "range absent": dict(range=None),
        "default below the range": dict(default=0.5), "default above the range": dict(default=3.5),
        "default a string": dict(default="1.5"), "default absent": dict(default=None),
        "dtype float16": dict(dtype="float16"), "dtype int64": dict(dtype="int64"),
        "shape [batch, 1]": dict(shape=["batch", 1]), "before class_labels": dict(first=True)}.items()},
}


def _python_verdict(path) -> str | None:
    try:
        load(path, threads=1).close()
    except (ValueError, RuntimeError) as err:
        return _verdict(str(err))
    return None


def _native_verdict(native, path) -> str | None:
    try:
        native["lib"].load(path, threads=1).close()
    except NativeError as err:
        assert err.status == ARTIFACT and "\n" not in err.message, err.message
        return _verdict(err.message)
    return None


@pytest.mark.parametrize("case", list(MANIFEST_CORPUS))
def test_both_runtimes_refuse_the_same_manifests_naming_the_same_field(native, edm_copy, case):
    """The shared corpus: each bad manifest is refused by the Python loader and the C library for the same reason
    (the same field, or the same strict-JSON rule), never accepted by one of them."""
    mutate, verdict = MANIFEST_CORPUS[case]
    mutate(edm_copy)
    assert _python_verdict(edm_copy) == verdict
    assert _native_verdict(native, edm_copy) == verdict


def test_listed_file_linked_outside_is_never_read_by_the_c_library(native, edm_copy, tmp_path):
    """Containment: a listed file that is a link to a file outside the artifact is refused before it is opened,
    by the C library and iia-run as by iia.runtime; no message carries the outside file's digest or size."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"outside data " * 1000)
    digest, size = hashlib.sha256(secret.read_bytes()).hexdigest(), secret.stat().st_size
    np.save(tmp_path / "noise.npy", draw_noise(0, 1, (3, 8, 8)))
    for name in ("sampler.onnx", "denoiser.onnx", "coefficients.json"):
        original = (edm_copy / name).read_bytes()
        (edm_copy / name).unlink()
        (edm_copy / name).symlink_to(secret)
        with pytest.raises(NativeError) as info:
            native["lib"].load(edm_copy)
        proc = _run([native["iia_run"], edm_copy, "--noise", tmp_path / "noise.npy", "--labels", "0",
                     "--out", tmp_path / "out.npy"])
        for message in (info.value.message, proc.stderr, _python_load_message(edm_copy)):
            assert "leads outside the artifact directory" in message and str(edm_copy / name) in message
            assert digest[:16] not in message and str(size) not in message
        assert proc.returncode == 2
        (edm_copy / name).unlink()
        (edm_copy / name).write_bytes(original)
    # a link that stays inside the artifact is followed; the artifact directory itself may be a link
    (edm_copy / "denoiser.onnx").rename(edm_copy / "denoiser.bin")
    (edm_copy / "denoiser.onnx").symlink_to("denoiser.bin")
    (tmp_path / "linked").symlink_to(edm_copy)
    native["lib"].load(tmp_path / "linked").close()
    load(tmp_path / "linked").close()


def test_manifest_linked_outside_is_never_read_and_no_existence_oracle(native, edm_copy, tmp_path):
    """manifest.json is held to the listed files' containment rule in both runtimes (a link to a token file or to
    /proc/self/environ is not opened, nothing it holds is printed); a link outside says the same whether its
    target exists, is missing, or lies under a file."""
    token = tmp_path / "tok.txt"
    token.write_text('"AKIA-SECRET-TOKEN-123\n')
    np.save(tmp_path / "noise.npy", draw_noise(0, 1, (3, 8, 8)))
    (tmp_path / "exists.bin").write_bytes(b"outside")
    targets = {"manifest.json": (token, Path("/proc/self/environ"), tmp_path / "missing.json"),
               "denoiser.onnx": (tmp_path / "exists.bin", tmp_path / "missing.bin", tmp_path / "exists.bin" / "x")}
    for name, links in targets.items():
        original = (edm_copy / name).read_bytes()
        expected = (f"{edm_copy / name} leads outside the artifact directory or to no file (a link is followed only "
                    f"to a file inside it)")
        seen = set()
        for target in links:
            (edm_copy / name).unlink()
            (edm_copy / name).symlink_to(target)
            with pytest.raises(NativeError) as info:
                native["lib"].load(edm_copy)
            proc = _run([native["iia_run"], edm_copy, "--noise", tmp_path / "noise.npy", "--labels", "0",
                         "--out", tmp_path / "out.npy"])
            seen.add(info.value.message)  # a listed file's adds the manifest's size for it: the same each time
            assert info.value.status == ARTIFACT and info.value.message.startswith(expected)
            assert _python_load_message(edm_copy) == info.value.message
            assert proc.returncode == 2 and proc.stderr == f"error: {info.value.message}\n"
        assert len(seen) == 1, seen
        (edm_copy / name).unlink()
        (edm_copy / name).write_bytes(original)


DRIVER = r"""
#include "artifact.hpp"
#include <cstdio>
int main(int, char** argv) {
    try { iia_native::read_manifest(argv[1]); std::puts("accepted"); }
    catch (const iia_native::Error& e) { std::puts(e.what()); }
}
"""


def test_one_bound_changed_in_the_field_table_both_runtimes_follow(native, artifacts, tmp_path, monkeypatch):
    """The manifest's fields are declared once: lower nfe's bound in runtime/manifest.py FIELDS to 7 and both
    the Python checker and the C++ checker (built from the header generated from that table) refuse NFE 9 naming
    nfe, and still accept NFE 5."""
    import dataclasses

    from iia.runtime import manifest

    fields = tuple(dataclasses.replace(f, hi=7) if f.name == "nfe" else f for f in manifest.FIELDS)
    src = tmp_path / "src"
    shutil.copytree(ROOT / "runtime" / "native" / "src", src)
    (src / "manifest_fields.hpp").write_text(manifest.native_header(fields))
    (src / "driver.cpp").write_text(DRIVER)
    build = _run(["c++", "-std=c++17", "-O0", "-I", src, "-I", ROOT / "runtime" / "native" / "include",
                  src / "driver.cpp", src / "artifact.cpp", src / "contract.cpp", "-lcrypto", "-o", tmp_path / "check"])
    assert build.returncode == 0, _tail(build)
    monkeypatch.setattr(manifest, "FIELDS", fields)
    for key, nfe in (("digits", 9), ("edm", 5)):
        native_says = _run([tmp_path / "check", artifacts[key]]).stdout.strip()
        try:
            manifest.read_manifest(artifacts[key])
            python_says = "accepted"
        except ValueError as err:
            python_says = str(err)
        if nfe > 7:
            assert _verdict(native_says) == _verdict(python_says) == "field nfe"
            assert "[1, 7], got 9" in native_says and "[1, 7], got 9" in python_says
        else:
            assert native_says == python_says == "accepted"


# ---- a sampler whose tensors live in sampler.onnx.data ------------------------------------------------------
def test_external_data_artifact_runs_in_both_runtimes_and_is_contained(native, artifacts, tmp_path):
    """Over CompileOptions.external_data_bytes (512 MiB by default; 0 here forces it) sampler.onnx keeps its
    tensors in ONE file sampler.onnx.data, listed in the manifest: iia.runtime and the C library load it (ONNX
    Runtime reads the data beside the model) and sample exactly what the one-file graph samples; a missing data
    file, or one linked outside the artifact, is refused by both before anything is loaded."""
    quiet = lambda text: None  # noqa: E731
    pickle = artifacts["edm"].parent / "edm.pkl"
    out = tmp_path / "external"
    manifest = compile_model(str(pickle), out, CompileOptions(nfe=5, solver="edm", max_batch=MAX_BATCH, engine=False,
                                                              external_data_bytes=0), log=quiet)
    assert {"sampler.onnx", "sampler.onnx.data"} <= set(manifest["files"])
    data_bytes = manifest["files"]["sampler.onnx.data"]["bytes"]
    assert data_bytes >= 0.9 * manifest["weights"]["weights"] > 0  # the weights are in the data file
    assert (out / "sampler.onnx").stat().st_size < data_bytes
    noise, labels = draw_noise(3, 2, (3, 8, 8)), np.array([1, 7])
    want = load(artifacts["edm"], threads=1).sample(noise, class_labels=labels).images
    assert np.array_equal(load(out, threads=1).sample(noise, class_labels=labels).images, want)
    assert np.array_equal(load(out, threads=1, verify=False).sample(noise, class_labels=labels).images, want)
    c = native["lib"].load(out, threads=1)
    try:
        assert np.array_equal(c.run(noise, labels)[0], want)
    finally:
        c.close()
    data = out / "sampler.onnx.data"
    saved = tmp_path / "saved.data"
    data.rename(saved)  # missing
    with pytest.raises(NativeError) as info:
        native["lib"].load(out)
    assert info.value.status == ARTIFACT and "sampler.onnx.data" in info.value.message
    assert "sampler.onnx.data" in _python_load_message(out)
    data.symlink_to(saved)  # the same bytes, outside the artifact: not followed, verified or not
    for verify in (True, False):
        with pytest.raises(NativeError) as info:
            native["lib"].load(out, verify=verify)
        assert info.value.status == ARTIFACT and "leads outside the artifact directory" in info.value.message
        message = _python_load_message(out, verify=verify)
        assert "leads outside the artifact directory" in message and str(data) in message
