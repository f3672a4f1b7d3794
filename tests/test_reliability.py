"""Reliability (issue 13): one test per fault kind found by attacking the CLIs, the artifact and the runtime.
Each injects the fault and asserts the right behaviour; a seeded fuzz test feeds mutated manifests and
coefficient files to load() / load_program() and accepts only ArtifactError."""

import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edm_fixtures import PersistentStub, dump_edm_style

from iia.calibration import artifact
from iia.calibration.fit import CalibrationOptions
from iia.compiler.build import CompileError, CompileOptions, compile_model, publish_artifact
from iia.compiler.cache import seal
from iia.compiler.cli import main as compile_main
from iia.evaluation.cli import accuracy_main, bench_main
from iia.evaluation.quality import main as quality_main
from iia.models import gaussian_mixture
from iia.runtime import ArtifactError, draw_noise, load
from iia.runtime.cli import sample_main
from iia.runtime.contract import SCHEMA, sha256_file

ROOT = Path(__file__).resolve().parent.parent
GMM = dict(shape=(1, 4, 4), components=3, conditional=True)
MAX_BATCH = 4


def quiet(text):
    pass


def compile_tiny(out, **kw):
    opts = dict(nfe=5, solver="edm", force=True, max_batch=MAX_BATCH, engine=False)
    opts.update(kw)
    return compile_model(gaussian_mixture(**GMM), out, CompileOptions(**opts), log=quiet)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "gmm-edm"
    compile_tiny(out)
    return out


@pytest.fixture
def copy(art, tmp_path):
    dst = tmp_path / "a"
    shutil.copytree(art, dst)
    return dst


def edit_manifest(root, change, rehash=()):
    """Apply `change(manifest)`; re-record the sha256/bytes of the files in `rehash` (a consistent forgery)."""
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    for name in rehash:
        m["files"][name] = {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
    path.write_text(json.dumps(m))


def one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1] if err else ""
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert last.startswith("error: "), err
    for needle in needles:
        assert needle in last, last
    return last


# ---- security -------------------------------------------------------------------------------------
def evil_pickle(tmp_path, marker):
    src = f"open({str(marker)!r}, 'w').write('ran')\nclass Net:\n    pass\n"
    meta = dict(type="class", version=6, module_src=src, class_name="Net", state={})
    return dump_edm_style(tmp_path / "evil.pkl", {"ema": PersistentStub(meta)})


def test_bench_never_unpickles_the_model_the_manifest_names(copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = evil_pickle(tmp_path, marker)
    edit_manifest(copy, lambda m: m.update(model={"kind": "edm-pkl", "name": "evil.pkl", "path": str(evil),
                                                  "sha256": sha256_file(evil)}))
    assert bench_main([str(copy), "--batch", "1", "--warmup", "0", "--iters", "1"]) == 0
    assert not marker.exists()
    assert "pass --model PATH" in capsys.readouterr().err
    # named by the user but not the artifact's model: refused BEFORE unpickling
    edit_manifest(copy, lambda m: m["model"].update(sha256="0" * 64))
    rc = bench_main([str(copy), "--batch", "1", "--warmup", "0", "--iters", "1", "--model", str(evil)])
    one_line_error(capsys, rc, "--model", "does not match", "not loading it")
    assert not marker.exists()


def test_bench_help_warns_about_model_files(capsys):
    with pytest.raises(SystemExit):
        bench_main(["--help"])
    assert "never read from the artifact" in " ".join(capsys.readouterr().out.split()).lower()


def test_help_gives_each_default_once(capsys):
    """--r and --calib-batch say auto's own defaults beside argparse's: the plain default once, not twice."""
    with pytest.raises(SystemExit):
        compile_main(["--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("iia- compile", "iia-compile")  # argparse breaks at hyphens
    assert ("(default 1; iia-compile's --solver auto, unless given: global fits with 3 history terms and in the linear form over "
            "all earlier values, the local fit 3)") in text
    assert "(default 200; iia-compile's --solver auto" in text
    assert "given) (default 1)" not in text
    assert "networks) (default 200)" not in text


# ---- resource bounds: every bound up front, one line naming the option -------------------------------
@pytest.mark.parametrize("main, argv, flag", [
    (compile_main, ["gmm", "--solver", "iia-edm", "--M", "100000000"], "--M"),
    (compile_main, ["gmm", "--r", "99"], "--r"),
    (compile_main, ["gmm", "--calib-batch", "1000000000"], "--calib-batch"),
    (compile_main, ["gmm", "--holdout", "0"], "--holdout"),
    (compile_main, ["gmm", "--reference-steps", "0"], "--reference-steps"),
    (compile_main, ["gmm", "--nfe", "100000"], "--nfe"),
    (compile_main, ["gmm", "--seed", "-1"], "--seed"),
    (sample_main, ["DIR", "--n", "0"], "--n"),
    (sample_main, ["DIR", "--n", "100000000000"], "--n"),
    (sample_main, ["DIR", "--seed", "-1"], "--seed"),
    (sample_main, ["DIR", "--labels", "99999999999999999999"], "--labels"),
    (sample_main, ["DIR", "--threads", "0"], "--threads"),
    (bench_main, ["DIR", "--batch", "0"], "--batch"),
    (bench_main, ["DIR", "--iters", "0"], "--iters"),
    (bench_main, ["DIR", "--seed", "-1"], "--seed"),
    (accuracy_main, ["--n-test", "0"], "--n-test"),
    (accuracy_main, ["--nfe", "0"], "--nfe"),
    (quality_main, ["--n", "1"], "--n"),
    (quality_main, ["--chunk", "0"], "--chunk"),
])
def test_option_bounds_fail_fast_naming_the_option(main, argv, flag, tmp_path, capsys):
    start = time.perf_counter()
    rc = main([str(tmp_path / "nothing") if a == "DIR" else a for a in argv] + (
        ["--out", str(tmp_path / "o")] if main is compile_main else []))
    last = one_line_error(capsys, rc, flag)
    assert "must" in last
    assert time.perf_counter() - start < 5  # refused before any work
    assert not (tmp_path / "o").exists()


def test_zero_never_silently_means_default():
    from iia.calibration.fit import CalibrationError

    for field in ("holdout", "reference_steps"):
        with pytest.raises(CalibrationError, match="--" + field.replace("_", "-")):
            CalibrationOptions(**{field: 0}).validate()


def fifo_or_devzero_load(root):
    """load() in a child process with a deadline: a reader that blocks or reads forever fails the test."""
    code = ("import sys, iia.runtime\ntry:\n iia.runtime.load(sys.argv[1])\nexcept iia.runtime.ArtifactError as e:\n"
            " print('ArtifactError:', e); sys.exit(0)\nsys.exit(1)")
    return subprocess.run([sys.executable, "-c", code, str(root)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("name", ["manifest.json", "sampler.onnx"])
@pytest.mark.parametrize("kind", ["devzero", "fifo"])
def test_artifact_files_must_be_bounded_regular_files(copy, name, kind):
    (copy / name).unlink()
    if kind == "devzero":
        (copy / name).symlink_to("/dev/zero")
    else:
        os.mkfifo(copy / name)
    result = fifo_or_devzero_load(copy)
    assert result.returncode == 0, result.stdout + result.stderr
    # a file linked outside the artifact (the manifest too) is refused before it is opened (containment)
    refused = "leads outside the artifact directory" if kind == "devzero" else "not a regular file"
    assert refused in result.stdout and name in result.stdout


def test_oversized_manifest_refused(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["padding"] = "x" * (5 << 20)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="more than"):
        load(copy)


def test_sample_streams_in_chunks_of_max_batch(art, tmp_path, monkeypatch):
    from iia.runtime.sampler import Sampler

    n = 3 * MAX_BATCH + 1
    out = tmp_path / "g.png"
    batches, real = [], Sampler.sample

    def spy(self, noise=None, **kw):
        batches.append(len(noise))
        return real(self, noise, **kw)

    monkeypatch.setattr(Sampler, "sample", spy)
    assert sample_main([str(art), "--n", str(n), "--seed", "5", "--labels", "2,0", "--out", str(out)]) == 0
    assert batches == [MAX_BATCH] * 3 + [1]  # never all n at once
    monkeypatch.undo()
    data = np.load(tmp_path / "g.npz")
    noise = draw_noise(5, n, (1, 4, 4))
    labels = np.resize([2, 0], n)
    assert np.array_equal(data["noise"], noise) and np.array_equal(data["labels"], labels)
    sampler = load(art)
    expected = np.concatenate([sampler(noise[s:s + MAX_BATCH], class_labels=labels[s:s + MAX_BATCH])
                               for s in range(0, n, MAX_BATCH)])
    assert data["images"].shape == (n, 1, 4, 4) and np.array_equal(data["images"], expected)
    assert out.read_bytes().startswith(b"\x89PNG")


def test_sample_out_npz_keeps_both_outputs(art, tmp_path, capsys):
    assert sample_main([str(art), "--n", "3", "--out", str(tmp_path / "x.npz")]) == 0
    assert np.load(tmp_path / "x.npz")["images"].shape == (3, 1, 4, 4)
    assert (tmp_path / "x.png").read_bytes().startswith(b"\x89PNG")
    one_line_error(capsys, sample_main([str(art), "--out", str(tmp_path / "x.jpg")]), "--out", ".png")
    one_line_error(capsys, sample_main([str(art), "--out", str(tmp_path)]), "--out", "directory")
    one_line_error(capsys, sample_main([str(art), "--labels", "1,3", "--out", str(tmp_path / "y.png")]),
                   "--labels 3 out of range", "label_dim 3")


# ---- files and signals --------------------------------------------------------------------------
def test_force_refuses_what_is_not_an_artifact(tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(CompileError, match="not an iia artifact"):
        compile_tiny(user)
    assert (user / "holiday.jpg").read_bytes() == b"precious"
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    with pytest.raises(CompileError, match="a file"):
        compile_tiny(plain)
    assert plain.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "photos"]
    # a folder whose manifest.json links to a real artifact's manifest elsewhere: the link is not followed
    real, linked = tmp_path / "real", tmp_path / "linked"
    real.mkdir()
    (real / "manifest.json").write_text(json.dumps({"schema": SCHEMA}))
    linked.mkdir()
    (linked / "manifest.json").symlink_to(real / "manifest.json")
    (linked / "mine.txt").write_text("keep me too")
    with pytest.raises(CompileError, match="not an iia artifact"):
        compile_tiny(linked)
    assert (linked / "mine.txt").read_text() == "keep me too"
    for bad in (".", ".."):
        start = time.perf_counter()
        with pytest.raises(CompileError, match="not '.' or '..'"):
            compile_tiny(Path(bad))
        assert time.perf_counter() - start < 1  # before any work
    with pytest.raises(CompileError, match="working directory"):
        compile_tiny(Path.cwd())
    with pytest.raises(CompileError, match="not the root directory"):
        compile_tiny(Path("/"))


def test_force_replace_is_atomic_and_restores_on_interrupt(art, tmp_path, monkeypatch):
    import iia.compiler.publish as publish

    out = tmp_path / "a"
    shutil.copytree(art, out)
    before = (out / "manifest.json").read_bytes()
    # the exchange path (renameat2 RENAME_EXCHANGE where the filesystem has it) or the fallback
    work = tmp_path / ".a.building-x"
    shutil.copytree(art, work)
    (work / "marker").write_text("new")
    publish_artifact(work, out, force=True)
    assert (out / "marker").read_text() == "new" and not work.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    # fallback path, Ctrl-C on the second rename: the old artifact is put back, nothing stranded
    monkeypatch.setattr(publish, "exchange", lambda a, b: False)
    work = tmp_path / ".a.building-y"
    shutil.copytree(art, work)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if Path(src) == work:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(publish.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        publish_artifact(work, out, force=True)
    monkeypatch.setattr(publish.os, "replace", real_replace)
    assert (out / "marker").read_text() == "new" and (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.building-y", "a"]  # compile_model removes its work dir


def test_sigterm_cleans_up_and_stale_build_dirs_are_removed(tmp_path):
    out = tmp_path / "t"
    dead = tmp_path / f".t.building-{socket.gethostname()}-999999999-abc"  # a pid no process can have
    dead.mkdir()
    (dead / "sampler.onnx").write_bytes(b"partial")
    code = ("import sys\nfrom iia.compiler.cli import main\n"
            "sys.exit(main(['gmm:d=64,components=64', '--solver', 'edm', '--nfe', '35', '--no-engine', "
            f"'--out', {str(out)!r}]))")
    env = dict(os.environ, IIA_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(f".t.building-*-{proc.pid}-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert list(tmp_path.glob(f".t.building-*-{proc.pid}-*")), "the compile never started building"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("terminated"), err
    assert "removed" in err and str(dead) in err  # the dead process's leftovers went first
    assert list(tmp_path.iterdir()) == []


def test_outputs_survive_a_full_disk(tmp_path):
    """RLIMIT_FSIZE makes every write past 16 KiB fail like a full disk: the previous files stay intact."""
    code = f"""
import json, resource, signal, sys
import numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from iia.runtime.contract import write_json_atomic
from iia.evaluation.accuracy import plot_table
from iia.runtime.grid import NpzWriter
root = {str(tmp_path)!r}
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
def npz():
    with NpzWriter(root + '/s.npz') as z:
        z.put('a', np.zeros(100000))
failed = 0
for job in (lambda: write_json_atomic(root + '/r.json', {{'rows': ['x' * 1000] * 200}}),
            lambda: plot_table([{{'solver': 'edm', 'nfe': n, 'rmse': 1.0 / n}} for n in range(3, 40)], root + '/p.png'),
            npz):
    try:
        job()
    except OSError:
        failed += 1
print(failed)
"""
    for name in ("r.json", "p.png", "s.npz"):
        (tmp_path / name).write_bytes(b"previous good file")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "3", result.stderr
    for name in ("r.json", "p.png", "s.npz"):
        assert (tmp_path / name).read_bytes() == b"previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "r.json", "s.npz"]  # no temp files left


# ---- the artifact contract ----------------------------------------------------------------------
@pytest.mark.parametrize("change, field", [
    (lambda m: m.update(label_dim=6), "label_dim"),  # 3 -> 6: ids 3..5 would sample an all-zero one-hot
    (lambda m: m.update(nfe=7), "nfe"),
])
def test_load_cross_checks_manifest_against_graph(copy, change, field):
    def edit(m):
        change(m)
        m["inputs"][1]["range"] = [0, m["label_dim"] - 1]

    edit_manifest(copy, edit)
    with pytest.raises(ArtifactError, match=f"compiled with {field}"):
        load(copy)


def test_load_refuses_edited_sample_shape_and_garbage_graph(copy):
    def shape(m):
        m["sample_shape"] = [1, 2, 8]
        m["inputs"][0]["shape"] = ["batch", 1, 2, 8]

    edit_manifest(copy, shape)
    with pytest.raises(ArtifactError, match="sampler.onnx takes"):
        load(copy)
    (copy / "sampler.onnx").write_bytes(b"\x08\x07garbage that hashes fine")
    edit_manifest(copy, lambda m: None, rehash=["sampler.onnx"])
    with pytest.raises(ArtifactError, match="cannot be loaded by ONNX Runtime"):
        load(copy)


@pytest.mark.parametrize("change, field", [
    (lambda m: m.update(label_dim="3"), "'label_dim'"),
    (lambda m: m.update(max_batch=10**12), "'max_batch'"),
    (lambda m: m.update(nfe=-1), "'nfe'"),
    (lambda m: m.update(sample_shape=[1, 4, True]), "'sample_shape'"),
    (lambda m: m.pop("files"), "files"),
    (lambda m: m.update(files=[]), "'files'"),
    (lambda m: m["files"]["sampler.onnx"].update(sha256="XYZ"), "'files.sampler.onnx.sha256'"),
    (lambda m: m["files"]["sampler.onnx"].update(bytes=-5), "'files.sampler.onnx.bytes'"),
    (lambda m: m.update(inputs={"name": "noise"}), "'inputs'"),
    (lambda m: m["outputs"][0].update(dtype="float128"), "'outputs[0]'"),
    (lambda m: m.update(model=[1, 2]), "'model'"),
    (lambda m: m.update(sigmas=[1.0, "x"]), "'sigmas'"),
    (lambda m: m.update(sigmas=[1.0, float("nan")]), "NaN is not a JSON number"),  # strict JSON, as the C++ runtime
])
def test_malformed_manifest_field_is_named(copy, change, field):
    path = copy / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load(copy)


def test_deeply_nested_manifest_is_an_artifact_error(copy):
    text = (copy / "manifest.json").read_text().rstrip()[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (copy / "manifest.json").write_text(text)
    with pytest.raises(ArtifactError, match="nested too deeply"):
        load(copy)


def test_nan_coefficients_refused_and_bad_cache_entry_recomputed(tmp_path):
    denoiser = gaussian_mixture(**GMM)
    calib = CalibrationOptions(batch=8, holdout=8, reference_steps=8, M=1)
    opts = dict(solver="iia-edm", nfe=5, force=True, max_batch=MAX_BATCH, engine=False, calibration=calib,
                cache_dir=str(tmp_path / "cache"))
    compile_model(denoiser, tmp_path / "a", CompileOptions(**opts), log=quiet)
    (entry,) = (tmp_path / "cache" / "coefficients").glob("*.json")
    data = json.loads(entry.read_text())
    data["steps"][1]["coefficients"][0] = float("nan")
    entry.write_text(json.dumps(data))  # json writes NaN, as a corrupted entry could hold
    seal(entry)  # its digest recorded too (a bad writer): the content checks still refuse it
    # strict JSON, refused before the model loads (CompileError naming the flag)
    with pytest.raises(CompileError, match=f"--coefficients: .*{entry.name}.*NaN is not a JSON number"):
        compile_model(denoiser, tmp_path / "b", CompileOptions(**{**opts, "calibration": CalibrationOptions()},
                                                               coefficients=str(entry)), log=quiet)
    logs = []
    compile_model(denoiser, tmp_path / "b", CompileOptions(**opts), log=logs.append)
    assert any("dropping unusable cached coefficients, recalibrating" in line and "NaN" in line for line in logs)
    fresh = json.loads(entry.read_text())
    assert all(math.isfinite(c) for s in fresh["steps"] for c in s["coefficients"])  # recomputed and re-cached
    assert any(line.strip().startswith("calibrated in") for line in logs)
    # changed after it was written (digest not re-recorded): dropped for its digest, recalibrated
    entry.write_text(entry.read_text().replace("0", "1", 1))
    logs = []
    compile_model(denoiser, tmp_path / "b", CompileOptions(**opts), log=logs.append)
    assert any("dropping unusable cached coefficients, recalibrating" in line and str(entry) in line
               and "sha256 differs" in line for line in logs)
    assert any(line.strip().startswith("calibrated in") for line in logs)


# ---- messages: every CLI failure is one line ------------------------------------------------------
def test_pickle_failures_are_one_line(tmp_path, capsys):
    def stub(name, src, state):
        meta = dict(type="class", version=6, module_src=src, class_name="Net", state=state)
        return dump_edm_style(tmp_path / name, {"ema": PersistentStub(meta)})

    empty = stub("empty.pkl", "import torch\nclass Net(torch.nn.Module):\n    pass\n", None)
    one_line_error(capsys, compile_main([str(empty), "--out", str(tmp_path / "o")]), "empty.pkl", "state")
    exits = stub("exit.pkl", "import sys\nsys.exit(3)\n", {})
    one_line_error(capsys, compile_main([str(exits), "--out", str(tmp_path / "o")]), "sys.exit(3)")
    import torch

    class Gadget:
        def __reduce__(self):
            return (os.system, ("true",))

    bad_pt = tmp_path / "model.pt"
    torch.save({"format": "iia-zoo-v1", "x": Gadget()}, bad_pt)
    last = one_line_error(capsys, compile_main([str(bad_pt), "--out", str(tmp_path / "o")]), "model.pt", "refused")
    assert "weights_only" not in last and "Re-running" not in last
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spec, needle", [
    ("gmm:components=0", "'components'"), ("gmm:spread=0", "'spread'"), ("gmm:colour=red", "unknown option 'colour'"),
    ("gmm:d=0", "'d'"), ("gmm:sigma_min=5,sigma_max=1", "sigma_min"), ("gmm:components=100000000", "'components'"),
])
def test_bad_gmm_options_are_one_line(spec, needle, tmp_path, capsys):
    one_line_error(capsys, compile_main([spec, "--out", str(tmp_path / "o")]), needle)


def test_diffusers_config_not_json_names_the_file(tmp_path, capsys):
    pytest.importorskip("diffusers")
    folder = tmp_path / "ddpm"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    (folder / "scheduler_config.json").write_text('{"_class_name": "DDPMScheduler", "clip_sample": false}')
    one_line_error(capsys, compile_main([str(folder), "--out", str(tmp_path / "o")]), str(folder / "config.json"),
                   "not readable JSON")
    (folder / "scheduler_config.json").write_text("[1, 2")
    one_line_error(capsys, compile_main([str(folder), "--out", str(tmp_path / "o")]),
                   str(folder / "scheduler_config.json"))


def test_a_failing_model_forward_is_named_as_the_models_not_as_unexpected(capsys, monkeypatch):
    """A bug in the user's network (here a ZeroDivisionError at one noise level) is reported as the model's
    forward call failing, with its exception and sigma, in the sampler path and the fits' differentiable path."""
    import torch
    from iia.calibration.sampling import sample
    from iia.calibration.search_fits import GradDenoiser
    from iia.calibration.solvers import build_program
    from iia.cli import run_cli
    from iia.models.base import Denoiser, DenoiserError

    class Buggy(torch.nn.Module):
        def forward(self, x, sigma):
            if float(sigma[0]) < 1.0:
                raise ZeroDivisionError("float division by zero")
            return x / (1 + sigma[:, None] ** 2)

    d = Denoiser(Buggy(), (4,), 0.002, 80.0)
    program = build_program("edm", [80.0, 5.0, 0.5, 0.0])
    with pytest.raises(DenoiserError, match=r"forward call failed at sigma=0\.5 on a batch of 3: ZeroDivisionError"):
        GradDenoiser(d)(torch.zeros(3, 4, dtype=torch.float64), 0.5, None)
    last = one_line_error(capsys, run_cli(lambda argv: sample(program, d, torch.zeros(3, 4))),
                          "forward call failed", "ZeroDivisionError: float division by zero")
    assert "unexpected" not in last and last.count("sigma=") == 1, last
    monkeypatch.setenv("IIA_DEBUG", "1")  # the traceback reaches the model's own line
    with pytest.raises(DenoiserError) as raised:
        run_cli(lambda argv: sample(program, d, torch.zeros(3, 4)))
    assert isinstance(raised.value.__cause__, ZeroDivisionError)


def test_unexpected_exception_is_one_line_and_debug_keeps_traceback(capsys, monkeypatch, tmp_path):
    from iia.cli import run_cli

    def boom(argv):
        raise ZeroDivisionError("float division by zero")

    one_line_error(capsys, run_cli(boom), "ZeroDivisionError", "IIA_DEBUG=1")

    def model_code_exits(argv):
        sys.exit(3)  # e.g. a network's forward, long after loading

    one_line_error(capsys, run_cli(model_code_exits), "sys.exit(3)")
    def interrupted_after_one_output(argv):
        from iia.cli import written

        written("grid.npz")
        raise KeyboardInterrupt

    assert run_cli(interrupted_after_one_output) == 130  # never "no output was written" once something was
    assert capsys.readouterr().err.strip() == "interrupted: grid.npz complete, no other output was written"

    def interrupted_after_caching(argv):  # a real cache entry (data + sidecar) stored, then Ctrl-C
        from iia.calibration.cache import store

        store(tmp_path / "cache" / "entry.bin", b"data", print, limit=100, what="a test entry")
        raise KeyboardInterrupt

    (tmp_path / "cache").mkdir()
    assert run_cli(interrupted_after_caching) == 130
    assert capsys.readouterr().err.strip() == (f"interrupted: no output was written (1 cache entry completed before "
                                               f"it kept, under {tmp_path / 'cache'})")
    # Ctrl-C while a console script imports its CLI module (seconds of torch): one line and 130 too
    (tmp_path / "slow_cli_module.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from iia.cli import _entry

    assert _entry("slow_cli_module", "main")() == 130
    assert capsys.readouterr().err.strip() == "interrupted: no output was written"
    with pytest.raises(SystemExit) as exit_info:  # argparse's own exits (usage errors, --help) are kept
        run_cli(lambda argv: __import__("argparse").ArgumentParser().parse_args(["--bogus"]))
    assert exit_info.value.code == 2
    monkeypatch.setenv("IIA_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        run_cli(boom)


CONSOLE = "import sys\nsys.path.insert(0, sys.argv[1])\nfrom iia.cli import _entry\nsys.exit(_entry(sys.argv[2], 'main')())"


def _console_script(tmp_path, name: str, source: str) -> subprocess.CompletedProcess:
    """A console script (iia.cli._entry, as pyproject's) whose CLI module is `source`, run in a child process."""
    (tmp_path / f"{name}.py").write_text(source)
    return subprocess.run([sys.executable, "-c", CONSOLE, str(tmp_path), name], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


def test_sigterm_while_a_console_script_imports_is_one_line(tmp_path):
    """iia-compile and iia-calibrate import torch with their CLI module: SIGTERM then exited 143 with nothing said."""
    proc = _console_script(tmp_path, "slow_cli", "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\n"
                                                 "time.sleep(60)\n")
    assert (proc.returncode, proc.stderr) == (143, "terminated (SIGTERM): no output was written\n")


@pytest.mark.parametrize("signame, code, said", [("SIGINT", 130, "interrupted"),
                                                 ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_an_interrupt_after_the_work_returned_says_the_output_is_complete(tmp_path, signame, code, said):
    """`timeout -s INT 2.1 iia-compile ...` that lands after w1/ was published, as the process ends (the
    interpreter's teardown: SIGINT's default action again), exited 130 with no line: it says what is complete."""
    source = ("import atexit, os, signal, time\nfrom pathlib import Path\nfrom iia.cli import run_cli, written\n\n"
              "def work(argv):\n    Path('w1').mkdir()\n    written('w1')\n    print('wrote w1/')\n    return 0\n\n"
              f"def late():  # the interrupt as the process ends, after run_cli returned\n"
              f"    os.kill(os.getpid(), signal.{signame})\n    time.sleep(60)\n\n"
              "atexit.register(late)\n\ndef main():\n    return run_cli(work, [])\n")
    proc = _console_script(tmp_path, "quick_cli", source)
    assert (proc.returncode, proc.stdout) == (code, "wrote w1/\n")
    assert proc.stderr == f"{said} after w1/ was written (it is complete)\n"


@pytest.mark.parametrize("main, argv, needles", [
    (accuracy_main, ["--peers", "dpm++2m,heun", "--solvers", "ipndm", "--nfe", "5", "--budget", "5"],
     ["--budget bounds the auto search", "--solvers ipndm runs none"]),
    (bench_main, ["DIR", "--no-eager", "--model", "x.pkl"], ["--no-eager", "--model does not apply"]),
    (bench_main, ["DIR", "--no-eager", "--eager-dtype", "float64"], ["--no-eager", "--eager-dtype does not apply"]),
    (compile_main, ["gmm", "--nfe", "1"], ["--nfe 1: no solver family of --solver auto", "(the fewest any spends: 2)"]),
    (compile_main, ["gmm", "--solver", "edm", "--nfe", "4"], ["--nfe 4: solver 'edm' needs an odd NFE"]),
    (compile_main, ["gmm", "--solver", "iia-edm", "--nfe", "9", "--reference-steps", "2"],
     ["--reference-steps 2: a reference coarser than twice the sampler's NFE 9", "at least 18"]),
    ("calibrate", ["gmm", "--solver", "iia-edm", "--nfe", "9", "--reference-steps", "2"],
     ["--reference-steps 2: a reference coarser than twice the sampler's NFE 9"]),
    ("calibrate", ["gmm", "--solver", "iia-edm", "--nfe", "4"], ["--nfe 4: solver 'iia-edm' needs an odd NFE"]),
    (accuracy_main, ["--solvers", "edm", "--nfe", "4,6"], ["--solvers edm --nfe 4,6: no listed solver", "odd NFE"]),
    (accuracy_main, ["--solvers", "iia-edm", "--nfe", "5,7", "--reference-steps", "12"],
     ["--reference-steps 12", "NFE 7"]),
    (compile_main, ["digits:x=1"], ["model 'digits:x=1': unknown option 'x'"]),
    # tester-42: --r 0, 1, 2 fitted iia-ipndm's same basis (its order's 4 derivatives) and recorded three r's
    (compile_main, ["gmm", "--solver", "iia-ipndm", "--nfe", "5", "--r", "2"],
     ["--r 2 does not shape --solver iia-ipndm's fit at NFE 5: --r 0 to 3 give the same basis (--r 4 adds a term)"]),
    ("calibrate", ["gmm", "--solver", "iia-edm", "--nfe", "5", "--r", "3"],
     ["--r 3 does not shape --solver iia-edm's fit at NFE 5: --r 2 already uses every earlier step"]),
    (compile_main, ["gmm", "--solver", "edm", "--nfe", "5", "--guide", "nope.pkl", "--guidance", "2"],
     ["--guide nope.pkl: model 'nope.pkl' not found"]),
])
def test_what_would_do_nothing_or_cannot_work_is_refused_by_flag(main, argv, needles, tmp_path, capsys):
    """A flag the run would ignore (--budget without auto, the eager loop's flags with --no-eager), an NFE no
    solver takes, a reference too coarse to judge, an option of the bundled model: one line naming it, before any
    work."""
    from iia.calibration.cli import calibrate_main

    main = calibrate_main if main == "calibrate" else main
    start = time.perf_counter()
    rc = main([str(tmp_path / "nothing") if a == "DIR" else a for a in argv]
              + (["--out", str(tmp_path / "o")] if main in (compile_main, calibrate_main) else []))
    one_line_error(capsys, rc, *needles)
    assert time.perf_counter() - start < 10 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("module, name, argv, prog", [
    ("iia.compiler.cli", "main", ["gmm", "--budge", "30"], "iia-compile"),
    ("iia.calibration.cli", "calibrate_main", ["gmm", "--forc"], "iia-calibrate"),
    ("iia.evaluation.cli", "accuracy_main", ["--solver", "edm"], "iia-accuracy"),
    ("iia.evaluation.cli", "bench_main", ["DIR", "--iter", "3"], "iia-bench"),
    ("iia.runtime.cli", "sample_main", ["DIR", "--thread", "1"], "iia-sample"),
    ("iia.evaluation.quality", "main", ["digits", "--jso", "q.json"], "iia-quality"),
    ("iia.compiler.triton", "main", ["DIR", "--repo", "r", "--forc"], "iia-export-triton"),
])
def test_flags_are_spelled_out_and_usage_errors_are_one_line(module, name, argv, prog, capsys):
    """`--budge 30` ran as --budget 30 (argparse's abbreviations); a usage error printed a 14-line usage block."""
    import importlib

    main = getattr(importlib.import_module(module), name)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    extra = " ".join(argv[-2:] if argv[-1][0] != "-" else argv[-1:])  # the abbreviation (and its value)
    assert capsys.readouterr().err == f"{prog}: error: unrecognized arguments: {extra} (see {prog} --help)\n"


def test_bench_without_torch_skips_eager_with_a_note(art):
    code = ("import sys\nsys.modules['torch'] = None\nfrom iia.evaluation.cli import bench_main\n"
            f"sys.exit(bench_main([{str(art)!r}, '--batch', '1', '--warmup', '0', '--iters', '2']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch is not installed" in result.stderr and "speed-up" in result.stdout


# ---- fuzz: only ArtifactError may come out of load() / load_program() --------------------------------
def _mutate(value, rng, depth=0):
    """A random structural mutation of a JSON value."""
    choices = [None, True, -1, 0, 2**70, 1e308, float("nan"), "", "x" * 50, [], {}, [1, [2, [3]]],
               {"sha256": "0" * 64}]
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        roll = rng.random()
        if roll < 0.2:
            value.pop(key)
        elif roll < 0.6 and depth < 4:
            value[key] = _mutate(value[key], rng, depth + 1)
        else:
            value[key] = rng.choice(choices)
        return value
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        roll = rng.random()
        if roll < 0.2:
            value.pop(i)
        elif roll < 0.3:
            value.append(rng.choice(choices))
        elif depth < 4:
            value[i] = _mutate(value[i], rng, depth + 1)
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and rng.random() < 0.5:
        return rng.choice([value + 1, -value, value * 1000, 0, value / 3])
    return rng.choice(choices)


def test_fuzz_mutated_manifests_and_coefficients_only_raise_artifact_errors(art, tmp_path):
    rng = random.Random(13)
    root = tmp_path / "f"
    shutil.copytree(art, root)
    manifest_text = (art / "manifest.json").read_text()
    coef_text = (art / "coefficients.json").read_text()
    denoiser = gaussian_mixture(**GMM)
    outcomes = {"ok": 0, "ArtifactError": 0}
    start = time.perf_counter()
    for i in range(240):
        coefficients = i % 2 == 1
        text = coef_text if coefficients else manifest_text
        if rng.random() < 0.25:  # byte-level damage
            raw = bytearray(text.encode())
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            data = bytes(raw)
        else:
            obj = json.loads(text)
            for _ in range(rng.randint(1, 3)):
                obj = _mutate(obj, rng)
            data = json.dumps(obj).encode()
        if coefficients:
            (root / "coefficients.json").write_bytes(data)
            (root / "manifest.json").write_text(manifest_text)
            edit_manifest(root, lambda m: None, rehash=["coefficients.json"])  # consistent: the hash passes
        else:
            (root / "coefficients.json").write_text(coef_text)
            (root / "manifest.json").write_bytes(data)
        try:
            load(root).close()
            if coefficients:
                artifact.load_program(root / "coefficients.json", denoiser, 5, "edm")
            outcomes["ok"] += 1
        except ArtifactError:
            outcomes["ArtifactError"] += 1
    print("fuzz outcomes", outcomes)
    assert outcomes["ArtifactError"] > 100 and outcomes["ok"] > 5, outcomes
    assert time.perf_counter() - start < 60


def test_graph_without_iia_metadata_is_named(copy):
    import onnx

    model = onnx.load(str(copy / "sampler.onnx"))
    del model.metadata_props[:]
    onnx.save_model(model, str(copy / "sampler.onnx"))
    edit_manifest(copy, lambda m: None, rehash=["sampler.onnx"])
    with pytest.raises(ArtifactError, match="records no iia graph metadata"):
        load(copy)


def test_a_signal_another_thread_takes_still_waits_for_the_deferred_block():
    """A process-directed Ctrl-C may be taken by any thread (PyTorch's and ONNX Runtime's workers); Python runs the
    handler in the main thread at its next step. A signal mask on the main thread alone let it interrupt the
    publish-and-record block; the block now holds it and delivers it after."""
    import signal
    import threading
    import time

    from iia.cli import signals_deferred

    ready, stop = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (ready.set(), stop.wait(10)))
    worker.start()
    ready.wait()
    order = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                signal.pthread_kill(worker.ident, signal.SIGINT)
                time.sleep(0.3)  # the main thread would run the handler here
                order.append("block ended")
    finally:
        stop.set()
        worker.join()
    assert order == ["block ended"]


def test_a_console_script_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path):
    """A script's background job (`iia-compile ... &` without job control) starts with SIGINT ignored, as POSIX
    has it: Ctrl-C then passes over the whole run, and the end of the run (where the console script puts its own
    handler) must not start honouring it: the work completes, 0."""
    import signal

    source = ("import atexit, os, signal\nfrom pathlib import Path\nfrom iia.cli import run_cli, written\n\n"
              "def work(argv):\n    os.kill(os.getpid(), signal.SIGINT)\n    Path('w1').mkdir()\n    written('w1')\n"
              "    print('wrote w1/')\n    return 0\n\n"
              "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n\n"
              "def main():\n    return run_cli(work, [])\n")
    (tmp_path / "ignoring_cli.py").write_text(source)
    proc = subprocess.run([sys.executable, "-c", CONSOLE, str(tmp_path), "ignoring_cli"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "wrote w1/\n", ""), proc


def test_an_empty_model_name_is_refused_not_read_as_the_current_folder(tmp_path, capsys):
    """`iia-compile ""` said ". has no UNet2DModel config.json" (tester-40): Path("") is the current folder."""
    one_line_error(capsys, compile_main(["", "--nfe", "5", "--out", str(tmp_path / "o")]), "the model is an empty name")
    assert not (tmp_path / "o").exists()


def test_guidance_and_coefficient_file_settings_are_refused_before_the_model_loads(tmp_path, capsys):
    """tester-40: `--cfg 1:0`, `--guidance 2` without --guide and a missing --coefficients file were refused after
    the model had loaded (a 230 MB pickle): refused first, here even with a model that would not load."""
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle")
    nine = tmp_path / "nine.json"  # what the checks before the model read of a coefficient file (tester-42)
    nine.write_text(json.dumps({"schema": artifact.SCHEMA, "schema_version": artifact.SCHEMA_VERSION, "nfe": 9,
                                "solver": "iia-edm"}))
    for flags, message in ((["--cfg", "1:0"], "--cfg 1:0: a range needs LO < HI"),
                           (["--coefficients", str(nine)], "holds coefficients for NFE 9, not --nfe 5: give --nfe 9"),
                           (["--coefficients", str(nine), "--nfe", "9", "--solver", "iia-ipndm"],
                            "holds coefficients for solver iia-edm, not --solver iia-ipndm: give --solver iia-edm"),
                           (["--guidance", "2"], "--guidance needs --guide"),
                           (["--coefficients", str(tmp_path / "none.json")], "none.json: no such file"),
                           (["--coefficients", str(tmp_path)], ": not a file"),
                           (["--coefficients", str(garbage)], "garbage.pkl is not readable JSON"),
                           (["--guide", str(tmp_path / "nosuch.pkl"), "--guidance", "2"],
                            "nosuch.pkl' not found")):
        one_line_error(capsys, compile_main([str(garbage), "--nfe", "5", "--out", str(tmp_path / "o"), *flags]),
                       message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("main, argv, flag", [(bench_main, ["DIR", "--batch", "1,8,1"], "--batch"),
                                              (accuracy_main, ["--model", "gmm", "--nfe", "5,7,5"], "--nfe")])
def test_a_repeated_batch_size_or_nfe_is_refused_not_run_twice(main, argv, flag, capsys):
    """tester-42: `iia-bench --batch 1,1` printed two rows for one batch size and `iia-accuracy --nfe 5,5` ran
    everything twice, where iia-compile's --static-batch refused a repeat: refused alike, before any work."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}: " in err and "is given more than once" in err, err


def test_an_empty_out_is_said_as_empty(capsys):
    """tester-42: `--out ""` was refused as `--out .` (Path("") is "."), naming a path the user never gave."""
    one_line_error(capsys, compile_main(["gmm", "--out", ""]), "--out '': empty, expected a new artifact directory")


def test_an_unrolled_graph_too_large_to_load_is_refused_before_emission(tmp_path, capsys):
    """tester-42: `--graph unrolled --nfe 1000` on digits emitted 317,990 nodes; ONNX Runtime's session creation
    then hung the parity check for 10+ minutes through Ctrl-C and SIGTERM (64k nodes took 34 s, 32k 12 s)."""
    from iia.compiler.emit import MAX_UNROLLED_NODES, unrolled_size_error

    assert unrolled_size_error(100, MAX_UNROLLED_NODES // 100) is None
    out = tmp_path / "o"
    last = one_line_error(capsys, compile_main(["digits", "--solver", "ipndm", "--nfe", "300", "--graph", "unrolled",
                                                "--no-engine", "--out", str(out)]),
                          "--graph unrolled at NFE 300: 300 copies of the denoiser's", "use --graph loop")
    assert f"over the {MAX_UNROLLED_NODES:,}" in last and not out.exists()
