"""Triton export and serving: configs checked with tritonclient's protobuf; a REAL tritonserver (the nvidia-pytriton
wheel's binary, python backend) on 127.0.0.1 answering over HTTP and gRPC, compared with the in-process runtime."""

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

pytest.importorskip("tritonclient.grpc", reason="pip install 'tritonclient[http,grpc]' (the test extra has it)")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from iia.compiler import triton  # noqa: E402
from iia.compiler.build import CompileOptions, compile_model  # noqa: E402
from iia.compiler.publish import work_prefix  # noqa: E402
from iia.compiler.triton import TritonExportError, TritonOptions, export_repository, parse_config  # noqa: E402
from iia.evaluation import triton_server  # noqa: E402
from iia.evaluation.triton_server import LocalTritonServer, TritonUnavailable, wheel_paths  # noqa: E402
from iia.models import gaussian_mixture  # noqa: E402
from iia.runtime import load  # noqa: E402
from iia.runtime.contract import read_manifest, sha256_file, write_json_atomic  # noqa: E402

MAX_BATCH = 8
QUIET = dict(log=lambda text: None)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """digits (class-conditional image model) and an unconditional 1x4x4 mixture, EDM solver (no calibration)."""
    root = tmp_path_factory.mktemp("triton-artifacts")
    opts = dict(nfe=5, solver="edm", max_batch=MAX_BATCH, engine=False, force=True, cache_dir=str(root / "cache"))
    compile_model("digits", root / "digits", CompileOptions(**opts), **QUIET)
    compile_model(gaussian_mixture(shape=(1, 4, 4), components=3), root / "gmm", CompileOptions(**opts), **QUIET)
    return {"digits": root / "digits", "gmm": root / "gmm"}


def _relist(root: Path, manifest: dict, names) -> None:
    for name in names:
        manifest["files"][name] = {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
    write_json_atomic(root / "manifest.json", manifest)


def _with_plan(src: Path, dst: Path, cc: str) -> Path:
    """A copy of an artifact that lists a TensorRT plan for compute capability `cc` (bytes that no TensorRT would
    load: only the exporter's placement and config are under test here; scripts/device_check.sh's triton-plan
    check builds a real one)."""
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    (dst / "sampler.plan").write_bytes(b"placeholder plan for " + cc.encode())
    manifest["engine"] = {"built": True, "tensorrt": "10.0", "compute_capability": cc, "precision": "fp32"}
    _relist(dst, manifest, ["sampler.plan"])
    return dst


# ---- configs (no server) ------------------------------------------------------------------------------
def test_standard_configs_parse_and_match_the_manifest(artifacts, tmp_path):
    manifest = read_manifest(artifacts["digits"])
    plans = [_with_plan(artifacts["digits"], tmp_path / f"cc{cc}", cc) for cc in ("8.0", "9.0")]
    models = export_repository(plans, tmp_path / "repo", TritonOptions(name="d", instances=2, threads=3,
                                                                       preferred_batch=[4, 8]), **QUIET)
    assert sorted(models) == ["d_onnxruntime", "d_python", "d_tensorrt"]
    for name, model_dir in models.items():
        config = parse_config((model_dir / "config.pbtxt").read_text())
        triton.check_config(config, manifest)
        assert config.name == name and config.max_batch_size == MAX_BATCH
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
        assert config.instance_group[0].count == 2
        ins = {t.name: (list(t.dims), t.HasField("reshape")) for t in config.input}
        assert ins["noise"] == ([1, 8, 8], False) and ins["class_labels"] == ([1], True)  # [B] in the graph
        assert {t.name: list(t.dims) for t in config.output} == {"images": [1, 8, 8], "images_uint8": [8, 8, 1]}
    trt = parse_config((models["d_tensorrt"] / "config.pbtxt").read_text())
    assert trt.platform == "tensorrt_plan" and dict(trt.cc_model_filenames) == {"8.0": "model_8.0.plan",
                                                                              "9.0": "model_9.0.plan"}
    for cc in ("8.0", "9.0"):
        assert (models["d_tensorrt"] / "1" / f"model_{cc}.plan").read_bytes() == (tmp_path / f"cc{cc}" / "sampler.plan").read_bytes()
    ort = parse_config((models["d_onnxruntime"] / "config.pbtxt").read_text())
    assert ort.platform == "onnxruntime_onnx" and ort.parameters["intra_op_thread_count"].string_value == "3"
    assert parse_config((models["d_python"] / "config.pbtxt").read_text()).parameters["threads"].string_value == "3"
    assert (models["d_onnxruntime"] / "1" / "model.onnx").read_bytes() == (artifacts["digits"] / "sampler.onnx").read_bytes()
    # one plan: model.plan, no per-capability map
    one = export_repository(plans[0], tmp_path / "repo1", TritonOptions(name="d", backends=["tensorrt"]), **QUIET)
    config = parse_config((one["d_tensorrt"] / "config.pbtxt").read_text())
    assert not config.cc_model_filenames and (one["d_tensorrt"] / "1" / "model.plan").is_file()
    # KIND_CPU: the plan is left out by default, and refused when asked for
    cpu = export_repository(plans[0], tmp_path / "repo2", TritonOptions(name="d", kind="cpu"), **QUIET)
    assert sorted(cpu) == ["d_onnxruntime", "d_python"]
    with pytest.raises(TritonExportError, match="--kind cpu cannot serve a TensorRT plan"):
        export_repository(plans[0], tmp_path / "repo3", TritonOptions(kind="cpu", backends=["tensorrt"]), **QUIET)


def test_check_config_catches_mismatches(artifacts):
    manifest = read_manifest(artifacts["digits"])
    good = triton.standard_config(manifest, "m", "onnxruntime", TritonOptions())
    for mutate, needle in [(lambda c: c.input[0].dims.__setitem__(2, 9), "noise has dims [1, 8, 9]"),
                           (lambda c: setattr(c.output[1], "data_type", 11), "images_uint8 has TYPE_FP32"),
                           (lambda c: setattr(c, "max_batch_size", 4), "max_batch_size 4"),
                           (lambda c: c.input.pop(), "input class_labels is missing"),
                           (lambda c: c.input[1].ClearField("reshape"), "class_labels has dims [1] (model side [1])")]:
        config = type(good)()
        config.CopyFrom(good)
        mutate(config)
        with pytest.raises(TritonExportError, match=__import__("re").escape(needle)):
            triton.check_config(config, manifest)
    with pytest.raises(TritonExportError, match="does not parse as a Triton ModelConfig"):
        parse_config('name: "m"\nmax_batch_sise: 4\n')


def test_onnx_model_with_external_data_runs_from_the_repository(artifacts, tmp_path):
    art = tmp_path / "ext"
    shutil.copytree(artifacts["digits"], art)
    model = onnx.load(str(art / "sampler.onnx"))
    onnx.save_model(model, str(art / "sampler.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="sampler.onnx.data")  # as compiler.build.save_onnx does over 2 GB
    _relist(art, read_manifest(art), ["sampler.onnx", "sampler.onnx.data"])
    models = export_repository(art, tmp_path / "repo", TritonOptions(name="x", kind="cpu", backends=["onnxruntime"]),
                               **QUIET)
    version = models["x_onnxruntime"] / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "sampler.onnx.data"]
    session = onnxruntime.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    noise = np.random.default_rng(0).standard_normal((3, 1, 8, 8), dtype=np.float32)
    labels = np.array([0, 5, 9])
    got = session.run(["images"], {"noise": noise, "class_labels": labels})[0]
    assert np.array_equal(got, load(artifacts["digits"], "onnxruntime-cpu")(noise, class_labels=labels))


def test_export_is_atomic_and_refuses_by_name(artifacts, tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    (repo / "d_python").mkdir(parents=True)
    (repo / "d_python" / "keep").write_text("mine")
    with pytest.raises(TritonExportError, match="already holds model"):
        export_repository(artifacts["digits"], repo, TritonOptions(name="d", kind="cpu"), **QUIET)
    # --force replaces what an export wrote, never a directory of the user's
    with pytest.raises(TritonExportError, match="d_python was not written by iia-export-triton"):
        export_repository(artifacts["digits"], repo, TritonOptions(name="d", kind="cpu", backends=["python"],
                                                                   force=True), **QUIET)
    assert (repo / "d_python" / "keep").read_text() == "mine"
    # no name ('' was the working directory, said as '/'), standard output, a folder inside an artifact, the
    # artifact itself (it wrote x_python/ into it), a folder holding an artifact (Triton takes it for a model)
    holder = tmp_path / "holder"
    holder.mkdir()
    shutil.copytree(artifacts["gmm"], holder / "art")
    for bad, said in (("", "--repo '': name a directory"), ("-", "--repo '-': name a directory"),
                      (Path(artifacts["digits"]) / "repo", "is inside the iia artifact"),
                      (artifacts["digits"], "is an iia artifact; name a model repository of its own"),
                      (holder, f"holds the iia artifact {holder / 'art'}")):
        with pytest.raises(TritonExportError, match=re.escape(said)):
            export_repository(artifacts["digits"], bad, TritonOptions(name="d", kind="cpu"), **QUIET)
    assert not (Path(artifacts["digits"]) / "repo").exists() and not list(Path(artifacts["digits"]).glob("d_*"))
    assert sorted(p.name for p in holder.iterdir()) == ["art"]
    shutil.rmtree(holder)
    (repo / "d_python" / "keep").unlink()
    (repo / "d_python").rmdir()
    export_repository(artifacts["digits"], repo, TritonOptions(name="d", kind="cpu", backends=["python"]), **QUIET)
    (repo / "d_python" / "keep").write_text("mine")

    def boom(*args):  # mid-export: the work folder lies BESIDE the repo (Triton would load a folder inside it)
        assert [p.name for p in repo.iterdir()] == ["d_python"]
        assert len(list(tmp_path.glob(f"{work_prefix(repo)}*"))) == 1
        raise OSError("disk full (injected)")

    monkeypatch.setattr(triton, "_python_files", boom)
    with pytest.raises(OSError, match="injected"):
        export_repository(artifacts["digits"], repo, TritonOptions(name="d", kind="cpu", force=True), **QUIET)
    assert sorted(p.name for p in repo.iterdir()) == ["d_python"]  # nothing new, no temp dirs left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert (repo / "d_python" / "keep").read_text() == "mine"
    monkeypatch.undo()
    assert triton.main([str(artifacts["digits"]), "--repo", str(repo), "--name", "d", "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --backend tensorrt:") and "no TensorRT plan" in err and "\n" not in err
    assert triton.main([str(artifacts["digits"]), "--repo", str(repo), "--backend", "onnx"]) == 2
    assert "--backend onnx: expected any of tensorrt, onnxruntime, python" in capsys.readouterr().err
    assert triton.main([str(artifacts["digits"]), "--repo", str(repo), "--preferred-batch", "4,16"]) == 2
    assert "exceeds the artifact's max batch 8" in capsys.readouterr().err
    assert triton.main([str(artifacts["digits"]), "--repo", str(repo), "--name", "d", "--kind", "cpu",
                        "--backend", "python", "--force"]) == 0
    assert not (repo / "d_python" / "keep").exists() and (repo / "d_python" / "1" / "model.py").is_file()


def test_sigterm_and_stale_work_folders_leave_the_repository_clean(artifacts, tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = work_prefix(repo)
    stale, live = tmp_path / f"{prefix}{dead.pid}-abc", tmp_path / f"{prefix}{os.getpid()}-abc"
    for folder in (stale, live):
        (folder / "m" / "1").mkdir(parents=True)  # what a SIGKILLed export leaves

    def terminated(*args):  # SIGTERM arrives mid-export, as from `kill` or a container stop
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(triton, "_python_files", terminated)
    assert triton.main([str(artifacts["digits"]), "--repo", str(repo), "--kind", "cpu", "--backend", "python"]) == 143
    assert "terminated (SIGTERM): no output was written" in capsys.readouterr().err
    assert not repo.exists() and not stale.exists() and live.is_dir()  # the new repo went; a live folder stays
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_options_refused_by_name_and_the_serve_hint(artifacts, tmp_path, capsys):
    art, repo = str(artifacts["digits"]), str(tmp_path / "repo")
    for args, needle in [(["--backend", "python,python"], "--backend python,python: python given more than once"),
                         (["--preferred-batch", "8,4,4"], "--preferred-batch 8,4,4: 4 given more than once"),
                         (["--name", ""], "--name '': a model name here is"),
                         (["--name", "."], "--name '.'"), (["--name", ".."], "--name '..'"),
                         (["--name", ".hidden"], "--name '.hidden'"), (["--name", "a/b"], "--name 'a/b'")]:
        assert triton.main([art, "--repo", repo, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: " + needle) and err.count("\n") == 1, err
    assert not Path(repo).exists() or not list(Path(repo).iterdir())
    assert triton.main([art, "--repo", repo, "--name", "d", "--kind", "cpu", "--backend", "python",
                        "--preferred-batch", "8,2,4"]) == 0
    out = capsys.readouterr().out
    assert f"python -m iia.evaluation.triton_server {Path(repo).resolve()}" in out
    config = parse_config((Path(repo) / "d_python" / "config.pbtxt").read_text())
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert triton.main([art, "--repo", repo, "--name", "g"]) == 0  # default: KIND_GPU, onnxruntime + python
    assert "serve on a GPU host with Triton's ONNX Runtime, Python backend(s)" in capsys.readouterr().out
    # the local server refuses, by file, what its CPU, Python-only binary cannot load
    assert triton_server.main([repo, "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert "g_onnxruntime/config.pbtxt: onnxruntime_onnx model" in err and err.count("\n") == 1, err


def test_python_model_imports_only_numpy_iia_runtime_and_triton_utils():
    tree = ast.parse(triton.PYTHON_MODEL_TEMPLATE.read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m.split(".")[0] for m in modules} <= {"json", "pathlib", "numpy", "iia", "triton_python_backend_utils"}
    assert {m for m in modules if m.startswith("iia")} <= {"iia.runtime", "iia.runtime.contract"}


# ---- a real tritonserver -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    try:
        wheel_paths()
    except TritonUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Triton tests: {err}")
        pytest.skip(str(err))
    repo = tmp_path_factory.mktemp("triton-repo")
    opts = dict(kind="cpu", backends=["python"], max_queue_delay_us=20000, threads=1)
    export_repository(artifacts["digits"], repo, TritonOptions(name="digits", **opts), **QUIET)
    export_repository(artifacts["gmm"], repo, TritonOptions(name="gmm", **opts), **QUIET)
    elsewhere = tmp_path_factory.mktemp("not-the-checkout")  # the stub must find iia from any directory
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        srv = LocalTritonServer(repo, timeout=180).start()
    finally:
        os.chdir(cwd)
    try:
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture(scope="module")
def digits(artifacts):
    return load(artifacts["digits"], "onnxruntime-cpu")


def _client(server, protocol):
    return (grpcclient.InferenceServerClient(server.grpc_url) if protocol == "grpc"
            else httpclient.InferenceServerClient(server.http_url))


def _inputs(protocol, **arrays):
    mod = grpcclient if protocol == "grpc" else httpclient
    dtypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    out = []
    for name, arr in arrays.items():
        item = mod.InferInput(name, list(arr.shape), dtypes[arr.dtype])
        item.set_data_from_numpy(arr)
        out.append(item)
    return out


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_outputs_equal_the_in_process_runtime(server, digits, protocol):
    client = _client(server, protocol)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits_python") and client.is_model_ready("gmm_python")
    meta = client.get_model_metadata("digits_python")
    names = [i.name for i in meta.inputs] if protocol == "grpc" else [i["name"] for i in meta["inputs"]]
    assert names == ["noise", "class_labels", "seed"]
    noise = np.random.default_rng(1).standard_normal((3, 1, 8, 8), dtype=np.float32)
    labels = np.array([2, 7, 9], dtype=np.int64)
    out = client.infer("digits_python", _inputs(protocol, noise=noise, class_labels=labels[:, None]))
    expected = digits.sample(noise, class_labels=labels)
    assert np.array_equal(out.as_numpy("images"), expected.images)
    assert np.array_equal(out.as_numpy("images_uint8"), expected.images_uint8)
    # server-side noise from per-image seeds 40, 41, 42 == sampler(seed=40, batch_size=3) in process
    out = client.infer("digits_python", _inputs(protocol, seed=np.arange(40, 43, dtype=np.int64)[:, None],
                                                class_labels=labels[:, None]))
    assert np.array_equal(out.as_numpy("images"), digits(seed=40, batch_size=3, class_labels=labels))
    gmm = load(Path(digits.root).parent / "gmm", "onnxruntime-cpu")
    out = client.infer("gmm_python", _inputs(protocol, seed=np.array([[5]], dtype=np.int64)))
    assert np.array_equal(out.as_numpy("images"), gmm(seed=5, batch_size=1))
    client.close()


def _batch_stats(client, model):
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def test_dynamic_batching_merges_concurrent_requests(server, digits):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    before = _batch_stats(client, "digits_python")
    n = 12
    rng = np.random.default_rng(2)
    noises = rng.standard_normal((n, 1, 1, 8, 8), dtype=np.float32)
    results, errors, barrier = [None] * n, [], threading.Barrier(n)

    def one(k):
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            barrier.wait()
            results[k] = c.infer("digits_python", _inputs("grpc", noise=noises[k],
                                                          class_labels=np.array([[k % 10]]))).as_numpy("images")
        except Exception as err:
            errors.append(err)
        finally:
            c.close()

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    after = _batch_stats(client, "digits_python")
    formed = {b: after.get(b, 0) - before.get(b, 0) for b in after if after.get(b, 0) > before.get(b, 0)}
    assert sum(b * c for b, c in formed.items()) == n and max(formed) > 1, formed
    for k in range(n):  # batched with strangers, each answer is still what the runtime gives for its noise
        assert np.array_equal(results[k], digits(noises[k], class_labels=[k % 10]))
    client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_requests_get_our_error_and_the_server_keeps_serving(server, digits, protocol):
    client = _client(server, protocol)
    noise = np.random.default_rng(3).standard_normal((2, 1, 8, 8), dtype=np.float32)
    label = np.array([[1], [2]], dtype=np.int64)
    bad_nan = noise.copy()
    bad_nan[1, 0, 3, 3] = np.nan
    cases = [
        (dict(noise=noise[:, :, :, :7].copy(), class_labels=label), "unexpected shape for input 'noise'"),
        (dict(noise=noise, class_labels=np.array([[1], [10]], dtype=np.int64)), "class label 10 out of range"),
        (dict(noise=bad_nan, class_labels=label), "noise contains 1 NaN/Inf value(s)"),
        (dict(noise=noise, seed=np.array([[1], [2]], dtype=np.int64), class_labels=label), "either noise or seed"),
        (dict(class_labels=label), "give noise (FP32 [B, 1, 8, 8]) or seed"),
        (dict(seed=np.array([[-1], [2]], dtype=np.int64), class_labels=label), f"seeds must lie in [0, {2**62}], got -1"),
        (dict(seed=np.array([[2**63 - 1], [2]], dtype=np.int64), class_labels=label),  # iia-sample's --seed bound
         f"seeds must lie in [0, {2**62}], got {2**63 - 1}"),
        (dict(noise=noise), "give class_labels (INT64 [B, 1], one id in [0, 9] per image)"),
    ]
    bad_request = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"  # not 500 / INTERNAL
    for arrays, needle in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer("digits_python", _inputs(protocol, **arrays))
        assert needle in str(err.value), str(err.value)
        assert err.value.status() == bad_request, (needle, err.value.status())
    assert client.is_server_live() and client.is_model_ready("digits_python")
    out = client.infer("digits_python", _inputs(protocol, noise=noise, class_labels=label))
    assert np.array_equal(out.as_numpy("images"), digits(noise, class_labels=[1, 2]))
    client.close()


def test_local_server_command_serves_from_another_directory(server, artifacts, tmp_path):
    """The documented local recipe: `python -m iia.evaluation.triton_server REPO`, started outside the checkout."""
    import iia

    env = dict(os.environ, PYTHONPATH=str(Path(iia.__file__).resolve().parent.parent))
    cmd = [sys.executable, "-m", "iia.evaluation.triton_server", str(server.repo), "--http-port", "0",
           "--grpc-port", "0", "--metrics-port", "0"]
    # started as a background job of a non-interactive shell is (a CI's `cmd &`): SIGINT inherited ignored
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {server.repo}: HTTP 127.0.0.1:"), (line, proc.stderr.read() if not line else "")
        grpc_url = line.split("gRPC ", 1)[1].split(",", 1)[0]
        client = grpcclient.InferenceServerClient(grpc_url)
        out = client.infer("gmm_python", _inputs("grpc", seed=np.array([[7]], dtype=np.int64)))
        assert np.array_equal(out.as_numpy("images"), load(artifacts["gmm"], "onnxruntime-cpu")(seed=7, batch_size=1))
        client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    assert rc == 0 and "tritonserver stopped" in proc.stderr.read()


def test_free_ports_are_distinct_and_avoid_the_taken_ones():
    """Three ports for one server (HTTP, gRPC, metrics) chosen together never repeat (CI once got HTTP == gRPC)."""
    from iia.evaluation.triton_server import free_ports

    for _ in range(200):
        taken = tuple(free_ports(1))
        ports = free_ports(3, taken=taken)
        assert len(set(ports)) == 3 and not set(ports) & set(taken)


def _leftovers(prefix: str) -> list[str]:
    return [p.name for p in Path("/dev/shm").glob(f"{prefix}*")] if Path("/dev/shm").is_dir() else []


def test_a_model_that_fails_to_load_is_named_with_its_cause_and_nothing_is_left(server, artifacts, tmp_path):
    """A tampered artifact: the start error names the model and the sha256 mismatch in one line (it was the tail
    of Triton's option table), keeps the log, and no process, shared memory or work folder of it stays."""
    repo = tmp_path / "repo"
    export_repository(artifacts["gmm"], repo, TritonOptions(name="gmm", kind="cpu", backends=["python"], threads=1),
                      **QUIET)
    sampler = repo / "gmm_python" / "1" / "artifact" / "sampler.onnx"
    data = bytearray(sampler.read_bytes())
    data[-1] ^= 1
    sampler.write_bytes(bytes(data))
    srv = LocalTritonServer(repo, timeout=120)
    envs = _python_envs()
    with pytest.raises(TritonUnavailable) as err:
        srv.start()
    message = str(err.value)
    try:
        assert "\n" not in message and "model gmm_python version 1" in message and "sha256" in message, message
        kept = Path(message.split("(its log: ", 1)[1].rstrip(")"))
        assert "failed to load" in kept.read_text()
        kept.unlink()
        assert srv.process is None and not _leftovers(srv.shm_prefix)
    finally:
        srv.cleanup()
    assert srv.work is None and not _leftovers(srv.shm_prefix) and _python_envs() <= envs


def _python_envs() -> set[str]:
    return {p.name for p in Path("/tmp").glob("python_env_*")}


def test_a_server_stopped_before_it_is_ready_leaves_no_scratch_folder(server, artifacts, tmp_path):
    """Stopped while its model loads (here: --timeout 0.5 s), the python backend leaves its empty /tmp/python_env_*
    scratch folder behind (the tester found one per early stop): cleanup() removes the ones this start made."""
    repo = tmp_path / "repo"
    export_repository(artifacts["gmm"], repo, TritonOptions(name="gmm", kind="cpu", backends=["python"], threads=1),
                      **QUIET)
    envs = _python_envs()
    for timeout in (0.5, 1.5):
        srv = LocalTritonServer(repo, timeout=timeout)
        with pytest.raises(TritonUnavailable, match="not ready after"):
            srv.start()
        srv.cleanup()
        assert _python_envs() <= envs and srv.work is None and not _leftovers(srv.shm_prefix)


def test_the_local_server_command_refuses_before_starting(server, artifacts, tmp_path, capsys):
    """Ports given twice or in use, a bad --timeout, an artifact or empty folder instead of a repository: one line
    each, naming the option or folder, before any server starts (a port in use let a server left running answer
    the readiness check, and the new one said 'serving' and then exited)."""
    main = triton_server.main
    repo = str(server.repo)
    busy = server.http_port  # the module's server listens there
    cases = [
        ([repo, "--http-port", "45123", "--grpc-port", "45123"], "--grpc-port 45123: --http-port is 45123 too"),
        ([repo, "--http-port", str(busy), "--grpc-port", "0", "--metrics-port", "0"], f"127.0.0.1:{busy} is in use"),
        ([repo, "--timeout", "-1", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"], "--timeout"),
        ([str(artifacts["gmm"]), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"],
         "an iia artifact, not a model repository"),
        ([str(tmp_path), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"], "no model in it"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, (argv, err)


def test_sigterm_stops_the_local_server_cleanly(server, tmp_path):
    """SIGTERM is a server's normal stop: exit 0, 'tritonserver stopped', no tritonserver left in its session."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "iia.evaluation.triton_server", str(server.repo), "--http-port", "0",
           "--grpc-port", "0", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), (line, proc.stderr.read() if not line else "")
        grpc_port = int(line.split("gRPC 127.0.0.1:", 1)[1].split(",", 1)[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    err = proc.stderr.read()
    assert rc == 0 and "tritonserver stopped" in err and "terminated" not in err, (rc, err)
    assert not triton_server.port_in_use(grpc_port)


def test_failure_cause_reads_triton_logs():
    """The one-line cause from the three kinds of log the server leaves: model load failures, an error line, a
    usage error (the option table, then the reason)."""
    from iia.evaluation.triton_server import failure_cause

    load = ('E1207 05:04:31.8 10881 model_lifecycle.cc:642] "failed to load \'m_python\' version 1: Internal: '
            'ArtifactError: x/sampler.onnx is corrupted\\n\\nAt:\\n  a.py(3): f\\n"\n'
            'E1207 05:04:31.9 10881 server.cc:241] "CudaDriverHelper has not been initialized."\n'
            "error: creating server: Internal - failed to load all models\n")
    assert failure_cause(load) == "model m_python version 1: Internal: ArtifactError: x/sampler.onnx is corrupted"
    socket_log = ('E1207 05:04:31.9 10881 server.cc:241] "CudaDriverHelper has not been initialized."\n'
                  "E1207 05:04:32.0 10881 grpc_server.cc:2466] \"Socket '127.0.0.1:8001' already in use \"\n"
                  "error: creating server: Internal - failed to start\n")
    assert failure_cause(socket_log) == "Socket '127.0.0.1:8001' already in use"
    usage = "Usage: tritonserver [options]\n  --trace-log-frequency <integer>\n\tDefault is 0.\n\nThe server cannot " \
            "listen to HTTP requests and GRPC requests at the same address and port 127.0.0.1:1\n"
    assert failure_cause(usage).startswith("The server cannot listen to HTTP requests and GRPC requests")
    assert failure_cause("") == "(its log is empty)"


def test_work_folders_of_a_killed_local_server_are_removed_by_the_next():
    """A SIGKILLed `triton_server` cannot clean up (its tritonserver dies with it, but a backend stub started while
    it loaded outlives it, with its shared memory): the next start removes the work folders of owners that are
    gone, kills the stubs running from them and unlinks their regions, and leaves a live owner's alone."""
    import tempfile

    from iia.evaluation.triton_process import remove_stale_work

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = Path(tempfile.mkdtemp(prefix=f"iia-triton-{gone.pid}-"))
    live = Path(tempfile.mkdtemp(prefix=f"iia-triton-{os.getpid()}-"))
    stubs, regions = [], []
    try:
        for folder in (stale, live):
            stub = folder / "backends" / "python" / "triton_python_backend_stub"
            stub.parent.mkdir(parents=True)
            shutil.copy2(shutil.which("sleep"), stub)  # a process running from the folder, as the stub does
            stubs.append(subprocess.Popen([str(stub), "300"], start_new_session=True))
            region = Path("/dev/shm") / f"iia-{folder.name.rsplit('-', 1)[-1]}-test-region"
            region.write_bytes(b"x")
            regions.append(region)
        remove_stale_work()
        assert not stale.exists() and live.is_dir()
        assert stubs[0].wait(timeout=10) == -signal.SIGKILL and stubs[1].poll() is None
        assert not regions[0].exists() and regions[1].exists()
    finally:
        for proc in stubs:
            proc.kill()
            proc.wait()
        for region in regions:
            region.unlink(missing_ok=True)
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)
