"""Runtime: load -> sample parity with PyTorch, input validation, threads, integrity, backends, CLIs."""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import iia.runtime
import iia.runtime.devices
from iia.calibration.artifact import load_program
from iia.calibration.fit import CalibrationOptions
from iia.calibration.sampling import sample
from iia.compiler.build import CompileOptions, compile_model
from iia.models import gaussian_mixture
from iia.runtime import ArtifactError, BackendUnavailable, draw_noise, load
from iia.evaluation.bench import KEYS
from iia.evaluation.cli import bench_main
from iia.runtime.cli import sample_main
from iia.runtime.trt_backend import plan_mismatch

MAX_BATCH = 16
# NFE 9: at NFE 5 the Lemma-1 coefficients of these tiny mixtures reach 5e2..9e3, which amplifies float32
# rounding of the graph to 2e-4..3e-3 against the float64 reference; at NFE 9 (max ~40) it is ~2.5e-5.
NFE = 9
MODELS = {
    "uncond": dict(shape=(1, 4, 4), components=3),
    "cond": dict(shape=(1, 4, 4), components=3, conditional=True),
    "vector": dict(shape=(3,), components=2),
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    calib = CalibrationOptions(batch=20, holdout=16, reference_steps=32)
    out = {}
    for key, config in MODELS.items():
        compile_model(gaussian_mixture(**config), root / key,
                      CompileOptions(nfe=NFE, solver="iia-edm", force=True, max_batch=MAX_BATCH, engine=False,
                                     cache_dir=str(root / "cache"), calibration=calib, with_denoiser=True),
                      log=lambda text: None)
        out[key] = root / key
    return out


@pytest.fixture(scope="module")
def samplers(artifacts):
    return {key: load(path) for key, path in artifacts.items()}


def reference(path, config, noise, labels):
    denoiser = gaussian_mixture(**config)
    program = load_program(path / "coefficients.json", denoiser)
    y = None if labels is None else torch.from_numpy(labels)
    return sample(program, denoiser, torch.from_numpy(noise), y).numpy()


@pytest.mark.parametrize("key", ["uncond", "cond", "vector"])
def test_round_trip_matches_pytorch_reference(artifacts, samplers, key):
    s = samplers[key]
    assert s.backend == "onnxruntime-cpu" and s.max_batch == MAX_BATCH and s.nfe == NFE
    noise = draw_noise(7, 12, s.sample_shape)
    labels = np.arange(12) % 3 if s.conditional else None
    out = s(noise, class_labels=labels)
    assert out.dtype == np.float32 and out.shape == (12, *s.sample_shape)
    ref = reference(artifacts[key], MODELS[key], noise, labels)
    assert np.abs(out - ref).max() < 1e-4


def test_images_uint8_and_sample(samplers):
    s = samplers["cond"]
    x = s(seed=3, batch_size=5, class_labels=2)
    img = s.images(seed=3, batch_size=5, class_labels=2)
    assert img.dtype == np.uint8 and img.shape == (5, 4, 4, 1)
    expected = np.clip(x * 127.5 + 128, 0, 255).transpose(0, 2, 3, 1)
    assert np.abs(img.astype(np.float64) - expected).max() <= 1.0
    both = s.sample(seed=3, batch_size=5, class_labels=2)
    assert np.array_equal(both.images, x) and np.array_equal(both.images_uint8, img)
    assert both.class_labels.tolist() == [2] * 5
    with pytest.raises(ValueError, match="needs an image model"):
        samplers["vector"].images(seed=0)


def test_determinism(samplers):
    s = samplers["uncond"]
    a, b = s(seed=1, batch_size=4), s(seed=1, batch_size=4)
    assert np.array_equal(a, b)
    assert not np.allclose(a, s(seed=2, batch_size=4))
    noise = draw_noise(1, 4, s.sample_shape)
    assert np.array_equal(s(noise), a)  # seed= draws exactly draw_noise(seed)
    # float64 noise is converted to float32 explicitly (documented), not refused
    assert np.array_equal(s(noise.astype(np.float64)), a)
    assert s(seed=0).shape == (1, 1, 4, 4)  # batch defaults to 1
    assert samplers["cond"](seed=0, class_labels=[0, 1, 2]).shape[0] == 3  # ... or to the labels given


def test_every_image_seed_is_within_the_contract(samplers):
    """Image k of seed s uses s + k: the runtime refuses a batch whose last image seed passes MAX_SEED, as the Triton
    model refuses that image's seed (seed 2**62 with 4 images ran here and was refused there)."""
    from iia.runtime.contract import MAX_SEED

    s = samplers["uncond"]
    assert s(seed=MAX_SEED).shape[0] == 1 and s(seed=MAX_SEED - 3, batch_size=4).shape[0] == 4
    with pytest.raises(ValueError, match=r"image seeds seed\.\.seed\+3 must lie in \[0, 4611686018427387904\]"):
        s(seed=MAX_SEED, batch_size=4)
    assert all(draw_noise(None, 64, (1,)).shape == (64, 1) for _ in range(20))  # fresh entropy stays within it


def test_sample_refuses_image_seeds_past_the_contract_before_loading(tmp_path, capsys):
    """iia-sample --seed S --n N: images S..S+N-1, refused naming --seed before the artifact is read (it was
    refused after loading, as 'seed S with N images', without the flag); --seed MAX_SEED alone is fine."""
    from iia.runtime.contract import MAX_SEED

    missing = tmp_path / "no-such-artifact"  # never read: the refusal comes first
    assert sample_main([str(missing), "--seed", str(MAX_SEED), "--n", "2", "--out", str(tmp_path / "g.png")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --seed {MAX_SEED} with --n 2:") and f"--seed <= {MAX_SEED - 1}" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "g.png").exists()


def test_one_hot_labels_equal_ids(samplers):
    s = samplers["cond"]
    ids = np.array([0, 2, 1, 2])
    assert np.array_equal(s(seed=4, class_labels=np.eye(3)[ids]), s(seed=4, class_labels=ids))
    assert np.array_equal(s(seed=4, class_labels=ids.tolist()), s(seed=4, class_labels=ids.astype(np.int32)))


GOOD = np.zeros((2, 1, 4, 4), np.float32)
NAN = GOOD.copy()
NAN[1, 0, 2, 2] = np.nan
INF = GOOD.copy()
INF[0, 0, 0, 0] = -np.inf


@pytest.mark.parametrize("key,kwargs,match", [
    ("uncond", dict(noise=np.zeros((2, 1, 4, 5), np.float32)), r"shape \[B, 1, 4, 4\], got \[2, 1, 4, 5\]"),
    ("uncond", dict(noise=np.zeros((1, 4, 4), np.float32)), r"shape \[B, 1, 4, 4\].*batch axis"),
    ("uncond", dict(noise=np.zeros((2, 1, 4, 4), np.int64)), "float array.*int64"),
    ("uncond", dict(noise=NAN), "NaN/Inf"),
    ("uncond", dict(noise=INF), "NaN/Inf"),
    ("uncond", dict(noise=np.zeros((MAX_BATCH + 1, 1, 4, 4), np.float32)), f"maximum batch {MAX_BATCH}"),
    ("uncond", dict(batch_size=MAX_BATCH + 1), f"batch_size {MAX_BATCH + 1} exceeds.*maximum batch {MAX_BATCH}"),
    ("uncond", dict(batch_size=0), "batch_size must be >= 1"),
    ("uncond", dict(noise=np.zeros((0, 1, 4, 4), np.float32)), "noise batch must be >= 1"),
    ("uncond", dict(noise=GOOD, seed=1), "seed applies only when noise is None"),
    ("uncond", dict(noise=GOOD, batch_size=3), "batch_size 3 does not match the noise batch 2"),
    ("uncond", dict(seed=0, class_labels=[0]), "unconditional.*class_labels must be None"),
    ("cond", dict(seed=0, batch_size=2), r"class-conditional \(label_dim 3\): pass class_labels"),
    ("cond", dict(noise=GOOD, class_labels=[0, 3]), r"class label 3 out of range.*label_dim 3.*\[0, 2\]"),
    ("cond", dict(noise=GOOD, class_labels=[-1, 0]), r"class label -1 out of range"),
    ("cond", dict(noise=GOOD, class_labels=[0, 1, 2]), "expected 2 class labels.*got 3"),
    ("cond", dict(noise=GOOD, class_labels=[0.0, 1.0]), "ids must be integers"),
    ("cond", dict(noise=GOOD, class_labels=np.ones((2, 3))), "exactly one 1"),
    ("cond", dict(noise=GOOD, class_labels=np.eye(4)[:2]), r"one-hot class_labels must have shape \[2, 3\]"),
])
def test_bad_inputs_raise_value_error(samplers, key, kwargs, match):
    with pytest.raises(ValueError, match=match):
        samplers[key](**kwargs)


def test_concurrent_calls_equal_serial(samplers):
    s = samplers["cond"]
    jobs = [(draw_noise(100 + k, 1 + k % 5, s.sample_shape), np.arange(1 + k % 5) % 3) for k in range(16)]
    serial = [s(noise, class_labels=labels) for noise, labels in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda job: s(job[0], class_labels=job[1]), jobs))
    for a, b in zip(serial, parallel):
        assert np.array_equal(a, b)


def copy_artifact(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupted_file_refused(artifacts, tmp_path):
    bad = copy_artifact(artifacts["uncond"], tmp_path / "bad")
    data = bytearray((bad / "sampler.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / "sampler.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"sampler\.onnx is corrupted"):
        load(bad)
    with pytest.raises(ArtifactError, match=r"sampler\.onnx is corrupted") as info:
        load(bad, backend="onnxruntime-cpu")
    listed = json.loads((bad / "manifest.json").read_text())["files"]["sampler.onnx"]["sha256"]
    # both digests whole: two that differ only past a prefix must not read as equal
    assert f"sha256 {hashlib.sha256(bytes(data)).hexdigest()}, the manifest says {listed} " in str(info.value)
    (bad / "coefficients.json").unlink()
    with pytest.raises(ArtifactError, match=r"coefficients\.json is missing"):
        load(bad)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load(tmp_path)


def test_foreign_or_newer_manifest_refused(artifacts, tmp_path):
    newer = copy_artifact(artifacts["uncond"], tmp_path / "newer")
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["schema_version"] = 2
    (newer / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="written by a newer iia: schema version 2, this runtime reads 1"):
        load(newer)
    manifest.update(schema="something.else", schema_version=1)
    (newer / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not an iia artifact manifest"):
        load(newer)


def test_unavailable_backends_explain_why(artifacts):
    with pytest.raises(BackendUnavailable, match="backend 'tensorrt' is unavailable: .*(no TensorRT plan|CUDA)"):
        load(artifacts["uncond"], backend="tensorrt")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailable, match="backend 'onnxruntime-cuda' is unavailable: "):
            load(artifacts["uncond"], backend="onnxruntime-cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        load(artifacts["uncond"], backend="cuda")
    for threads in (0, 100_000, 2.5, "2"):  # 100000 would start 100000 ONNX Runtime threads; 2.5 is no count
        with pytest.raises(ValueError, match=rf"threads must lie in \[1, 1024\], got {threads!r}"):
            load(artifacts["uncond"], threads=threads)
    s = load(artifacts["uncond"] / "manifest.json", threads=1)  # DIR/manifest.json works too
    assert s.backend == "onnxruntime-cpu" and [name for name, _ in s.fallbacks] == ["tensorrt", "onnxruntime-cuda"]


def test_plan_for_other_tensorrt_or_gpu_refused_and_auto_falls_back(artifacts, tmp_path, monkeypatch):
    assert plan_mismatch({"tensorrt": "10.1", "compute_capability": "8.9"}, "10.1", "8.9") is None
    text = plan_mismatch({"tensorrt": "10.1", "compute_capability": "8.9"}, "10.1", "9.0")
    assert "TensorRT 10.1" in text and "8.9" in text and "9.0" in text
    # an artifact whose plan was built elsewhere, on a machine "with" a GPU and TensorRT 10.9
    art = copy_artifact(artifacts["uncond"], tmp_path / "plan")
    (art / "sampler.plan").write_bytes(b"not a real plan")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["engine"] = {"built": True, "tensorrt": "8.6.1", "compute_capability": "8.0", "precision": "fp32"}
    manifest["files"]["sampler.plan"] = {"sha256": iia.runtime.contract.sha256_file(art / "sampler.plan"), "bytes": 15}
    (art / "manifest.json").write_text(json.dumps(manifest))
    import iia.runtime.trt_backend as trt_backend

    def no_deserialize(*_):
        raise AssertionError("an incompatible plan must not reach TensorRT")

    fake = types.SimpleNamespace(__version__="10.9.0", Runtime=no_deserialize, Logger=no_deserialize)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(iia.runtime.devices, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(trt_backend, "gpu_compute_capability", lambda device=0: "9.0")
    with pytest.raises(BackendUnavailable, match=r"TensorRT 8\.6\.1 .*capability 8\.0.*TensorRT 10\.9\.0 .*capability 9\.0"):
        load(art, backend="tensorrt")
    s = load(art)  # auto: falls back to ONNX Runtime, saying why
    assert s.backend.startswith("onnxruntime") and "TensorRT 8.6.1" in s.fallbacks[0][1]
    assert s(seed=0, batch_size=2).shape == (2, 1, 4, 4)
    (art / "sampler.plan").write_bytes(b"not a real plaN")  # a corrupted plan is refused even when unused
    with pytest.raises(ArtifactError, match=r"sampler\.plan is corrupted"):
        load(art)


def test_import_and_sample_without_torch(artifacts, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        BLOCKED = ("torch", "onnx", "polygraphy")

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        import iia.runtime
        from iia.runtime.cli import sample_main
        s = iia.runtime.load({str(artifacts["cond"])!r})
        assert s(seed=0, class_labels=[0, 1]).shape == (2, 1, 4, 4)
        assert sample_main([{str(artifacts["cond"])!r}, "--n", "3", "--out", {str(tmp_path / "g.png")!r}]) == 0
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_iia_sample_writes_png_and_npz(artifacts, samplers, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert sample_main([str(artifacts["cond"]), "--n", "10", "--seed", "5", "--labels", "1,2", "--out", str(out)]) == 0
    image = Image.open(out)
    tile = 4 * 8 + 2  # 4x4 upscaled x8, 2-pixel gaps; 10 images -> 4 columns, 3 rows
    assert image.size == (4 * tile + 2, 3 * tile + 2)
    data = np.load(tmp_path / "grid.npz")
    assert data["labels"].tolist() == [1, 2] * 5
    expected = samplers["cond"](seed=5, batch_size=10, class_labels=data["labels"])
    assert np.array_equal(data["images"], expected) and np.array_equal(data["noise"], draw_noise(5, 10, (1, 4, 4)))
    # n over the maximum batch is run in chunks; a 1-D model gets only the npz, and says why
    assert sample_main([str(artifacts["vector"]), "--n", str(MAX_BATCH + 3), "--out", str(tmp_path / "v.png")]) == 0
    assert "needs an image model" in capsys.readouterr().err
    assert not (tmp_path / "v.png").exists() and np.load(tmp_path / "v.npz")["images"].shape == (MAX_BATCH + 3, 3)
    assert sample_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "not found" in capsys.readouterr().err
    for main, flag, inside in ((sample_main, "--out", "x.png"), (bench_main, "--json", "manifest.json")):
        # an output inside the artifact would change it (iia-bench --json DIR/manifest.json destroyed it)
        assert main([str(artifacts["cond"]), flag, str(artifacts["cond"] / inside)]) == 2
        assert f"is inside the artifact {artifacts['cond']}" in capsys.readouterr().err
    assert load(artifacts["cond"]) is not None
    assert sample_main([str(artifacts["cond"]), "--labels", "3", "--out", str(tmp_path / "b.png")]) == 2
    assert "--labels 3 out of range: this model has label_dim 3, expected ids in [0, 2]" in capsys.readouterr().err


def test_iia_bench_writes_rows(artifacts, tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    assert bench_main([str(artifacts["cond"]), "--batch", "1,4", "--iters", "3", "--warmup", "1", "--threads", "1",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 4]
    for row in rows:
        assert set(KEYS) <= set(row)
        assert row["backend"] == "onnxruntime-cpu" and row["threads"] == 1
        assert row["p50_ms"] > 0 and row["overhead_ratio"] > 0 and row["speedup_vs_eager"] > 0
        assert row["eager_max_abs_diff"] < 1e-3
        # the numpy loop around denoiser.onnx runs the same sampler (program.json) and is timed beside it
        assert row["loop_p50_ms"] > 0 and row["speedup_vs_loop"] > 0 and row["loop_max_abs_diff"] < 1e-4
    assert "overhead" in capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the bench gives torch its thread count back
    assert bench_main([str(artifacts["uncond"]), "--batch", str(MAX_BATCH + 1), "--no-eager"]) == 2
    assert f"maximum batch {MAX_BATCH}" in capsys.readouterr().err


def test_bench_is_a_loop_over_runners(artifacts):
    """iia-bench's baselines share one interface (name, why_not, setup, run); one that cannot run here is
    skipped with its reason, and that reason reaches the row."""
    from iia.evaluation.bench import BenchOptions, make_runners, run_bench
    from iia.evaluation.runners import Batch

    sampler = load(artifacts["cond"], "onnxruntime-cpu", threads=1)
    runners = make_runners(sampler, BenchOptions(eager=False), 1, log=lambda _: None)
    assert [r.name for r in runners] == ["sampler", "denoiser", "decoder", "loop", "eager"]
    assert [r.why_not for r in runners] == [None, None, None, None, "--no-eager"]
    batch = Batch(draw_noise(3, 4, sampler.sample_shape), np.arange(4) % sampler.label_dim)
    for runner in runners:  # in order: the loop runs on the denoiser's session of this batch
        runner.setup(batch)
    graph = runners[0].run(batch)
    assert graph.shape == (4, *sampler.sample_shape) and runners[3].diff < 1e-4  # loop vs graph, checked by setup
    images = runners[3].run(batch)[0]  # the graph decodes, so the loop ends with one decoder.onnx call
    assert np.abs(images.astype(int) - sampler.images(batch.noise, class_labels=batch.labels).astype(int)).max() <= 1
    assert runners[1].run(batch)[0].shape == graph.shape and runners[2].run(batch)[0].dtype == np.uint8
    for runner in runners:
        runner.close()
    rows = run_bench(artifacts["uncond"], BenchOptions(batches=(2,), warmup=0, iters=1, threads=1, loop=False,
                                                       eager=False), log=lambda _: None)
    assert rows[0]["loop_note"] == "--no-loop" and rows[0]["eager_note"] == "--no-eager"
    assert rows[0]["loop_p50_ms"] is None and rows[0]["eager_p50_ms"] is None and rows[0]["denoiser_p50_ms"] > 0


class _Weird:  # an object numpy turns into a 0-d object array
    pass


@pytest.mark.parametrize("kwargs", [
    dict(seed=0, batch_size=2, class_labels=np.uint64(2**63)),  # was OverflowError (the int64 cast)
    dict(seed=0, batch_size=2, class_labels=np.uint64(2**64 - 1)),
    dict(seed=0, batch_size=2, class_labels=2**70),
    dict(seed=0, class_labels=[2**63, 0]),
    dict(seed=0, class_labels=[2**64, 0]),
    dict(seed=0, class_labels=[2**100, 0]),
    dict(seed=0, class_labels=np.array([2**63, 1], np.uint64)),
    dict(seed=0, batch_size=2, class_labels=-2**70),
    dict(seed=0, batch_size=2, class_labels="1"),
    dict(seed=0, batch_size=2, class_labels=True),
    dict(seed=0, batch_size=2, class_labels=1.5),
    dict(seed=0, batch_size=2, class_labels=_Weird()),
    dict(seed=0, class_labels=[[1], [2, 0]]),
    dict(seed=0, class_labels=[None, 1]),
    dict(seed=0, class_labels=np.full((2, 3), np.nan)),
    dict(seed=0, class_labels=np.zeros((2, 3, 1))),
    dict(seed=-1, batch_size=2, class_labels=[0, 1]),
    dict(seed=1.5, batch_size=2, class_labels=[0, 1]),
    dict(seed="0", batch_size=2, class_labels=[0, 1]),
    dict(seed=0, batch_size=np.uint64(2**63), class_labels=0),
    dict(seed=0, batch_size=-2**70, class_labels=0),
    dict(seed=0, batch_size=2.0, class_labels=0),
    dict(noise=np.zeros((2, 1, 4, 4), complex), class_labels=[0, 1]),
    dict(noise=np.array([["a"]]), class_labels=[0, 1]),
    dict(noise=[[1, 2], [3]], class_labels=[0, 1]),
    dict(noise=_Weird(), class_labels=[0, 1]),
    dict(noise=np.full((2, 1, 4, 4), 1e300), class_labels=[0, 1]),  # inf after the float32 conversion
    dict(seed=0, batch_size=2, class_labels=np.array([1, 2], dtype=object)),  # was StopIteration (all in range)
    dict(seed=0, class_labels=np.array([1, 2**70], dtype=object)),
    dict(noise=np.zeros((2, 1, 4, 4), dtype=object), class_labels=[0, 1]),
    dict(seed=0, batch_size=2, class_labels=[0, 1], guidance=np.array([1.0, 2.0], dtype=object)),
])
@pytest.mark.parametrize("call", ["__call__", "images", "sample"])
def test_every_bad_input_to_the_python_api_is_a_value_error(samplers, kwargs, call):
    """The documented contract: bad inputs raise ValueError (code that catches it, like the Triton model, sees
    every one), never OverflowError/TypeError from numpy underneath."""
    sampler = samplers["cond"]
    with pytest.raises(ValueError) as info:
        getattr(sampler, call)(**kwargs)
    assert "\n" not in str(info.value)


def test_listed_file_linked_outside_the_artifact_is_never_read(artifacts, tmp_path):
    """A listed file that is a link to a file outside the artifact is refused before it is opened: the message
    names the listed path and nothing of the outside file (no digest, no size), through a link to the file and
    through a linked directory alike."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"outside data " * 1000)
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    for name in ("denoiser.onnx", "sampler.onnx", "coefficients.json"):
        bad = copy_artifact(artifacts["uncond"], tmp_path / f"bad-{name}")
        (bad / name).unlink()
        (bad / name).symlink_to(secret)
        for verify in (True, False) if name == "sampler.onnx" else (True,):  # verify=False reads only the graph
            with pytest.raises(ArtifactError, match="leads outside the artifact directory") as info:
                load(bad, verify=verify)
            message = str(info.value)
            assert digest[:16] not in message and str(secret.stat().st_size) not in message
            assert str(bad / name) in message
    # a link that stays inside is followed as before
    ok = copy_artifact(artifacts["uncond"], tmp_path / "inside")
    (ok / "denoiser.onnx").rename(ok / "real.bin")
    (ok / "denoiser.onnx").symlink_to("real.bin")
    load(ok)


def test_manifest_linked_outside_is_never_read(artifacts, tmp_path):
    """manifest.json follows the listed files' containment rule: a link to a file outside the artifact (a token,
    /proc/self/environ) is refused before it is opened, and no message carries what it holds."""
    token = tmp_path / "tok.txt"
    token.write_text('{"schema": "AKIA-SECRET-TOKEN-123"}')
    for target in (token, Path("/proc/self/environ"), tmp_path / "absent.json"):
        bad = copy_artifact(artifacts["uncond"], tmp_path / f"bad-{target.name}")
        (bad / "manifest.json").unlink()
        (bad / "manifest.json").symlink_to(target)
        with pytest.raises(ArtifactError) as info:
            load(bad)
        assert str(info.value) == (f"{bad / 'manifest.json'} leads outside the artifact directory or to no file (a "
                                   f"link is followed only to a file inside it)")


def test_link_outside_to_a_missing_file_reads_as_one_to_an_existing_file(artifacts, tmp_path):
    """No existence oracle: a listed file linked outside says the same whether the outside file exists or not."""
    messages = []
    for target in (tmp_path / "exists.bin", tmp_path / "missing.bin", tmp_path / "exists.bin" / "x"):
        (tmp_path / "exists.bin").write_bytes(b"outside")
        bad = copy_artifact(artifacts["uncond"], tmp_path / f"bad{len(messages)}")
        (bad / "denoiser.onnx").unlink()
        (bad / "denoiser.onnx").symlink_to(target)
        with pytest.raises(ArtifactError) as info:
            load(bad)
        messages.append(str(info.value).replace(str(bad), "ART"))
    assert len(set(messages)) == 1 and "leads outside the artifact directory" in messages[0], messages


def test_a_file_given_as_the_artifact_is_named_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ArtifactError) as info:
        load(tmp_path / "afile")
    assert str(info.value) == f"{tmp_path / 'afile'} is a file, not an artifact directory (give the directory " \
                              f"iia-compile made)"
    with pytest.raises(ArtifactError, match="not found"):
        load(tmp_path / "nope")
