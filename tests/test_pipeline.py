"""The staged compile pipeline's shared pieces: option roles, the one cache, staging/publishing of outputs, and
the bounds the compiler shares with the runtimes."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from iia.calibration.fit import CalibrationOptions
from iia.cli import add_options, with_role
from iia.compiler import triton
from iia.compiler.build import CompileError, CompileOptions, compile_model
from iia.compiler.cache import SIDECAR, get_or_make
from iia.compiler.cli import main as compile_main
from iia.compiler.options import validate
from iia.compiler.stages import cached_export
from iia.runtime.contract import MAX_STATIC_BATCHES, sha256_file

ROOT = Path(__file__).resolve().parent.parent


# ---- options: roles and defaults declared once ------------------------------------------------------------
def test_one_solver_default_and_the_compile_cli_reads_roles():
    parser = argparse.ArgumentParser()
    add_options(parser, CompileOptions)
    assert parser.parse_args([]).solver == CompileOptions().solver == "auto"
    research = with_role(CalibrationOptions, "research")
    assert research == ("first_step", "fine_solver", "ridge", "guard")
    text = subprocess.run([sys.executable, "-m", "iia.compiler.cli", "--help"], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
    assert "--calib-batch" in text and "--holdout" in text and "--ridge" not in text and "--no-guard" not in text


def test_roles_give_the_lists_each_path_refuses():
    """What used to be four hand-kept lists now follows from the roles declared with each option."""
    from dataclasses import fields

    from iia.compiler.options import READ_BY_BASE_SOLVER
    from iia.evaluation.cli import FIT_ONLY

    offered = [f.name for f in fields(CalibrationOptions) if f.metadata.get("cli", True)]
    assert [n for n in offered if n in with_role(CalibrationOptions, *FIT_ONLY)] == [
        "M", "r", "batch", "first_step", "fine_solver", "ridge", "holdout", "guard"]  # iia-accuracy, base solvers
    assert [n for n in offered if n in with_role(CalibrationOptions, *READ_BY_BASE_SOLVER)] == ["schedule"]
    assert with_role(CalibrationOptions, "guard", "reference") == ("holdout", "reference_steps", "guard_level",
                                                                   "guard_candidates")  # iia-calibrate --no-guard
    assert with_role(CompileOptions, "search") == ("budget_s",)


def test_static_batch_count_is_the_runtimes_bound():
    sizes = ",".join(str(b) for b in range(1, MAX_STATIC_BATCHES + 2))
    start = time.perf_counter()
    with pytest.raises(CompileError, match=f"--static-batch gives {MAX_STATIC_BATCHES + 1} batch sizes; the "
                                           f"runtimes load at most {MAX_STATIC_BATCHES}"):
        compile_model("gmm", Path("unused-out"), CompileOptions(solver="edm", max_batch=100, static_batch=sizes,
                                                                engine=False), log=lambda text: None)
    assert time.perf_counter() - start < 5 and not Path("unused-out").exists()  # before any work
    ok = ",".join(str(b) for b in range(1, MAX_STATIC_BATCHES + 1))
    assert validate(CompileOptions(solver="edm", max_batch=100, static_batch=ok)) == list(range(1, 65))


# ---- the one cache ----------------------------------------------------------------------------------------
def _tiny(value: float) -> onnx.ModelProto:
    """y = x + c with a stored c: two of these differ only in their weights."""
    graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [numpy_helper.from_array(np.array([value], np.float32), "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("fault", ["other weights", "fifo", "link to /dev/zero", "no digest", "directory"])
def test_a_bad_export_cache_entry_is_dropped_named_and_remade(tmp_path, fault):
    good, calls, lines = _tiny(1.0), [], []

    def export():
        calls.append(1)
        return good

    entry = tmp_path / "exports" / "denoiser-k.onnx"
    assert cached_export(export, "denoiser-k.onnx", tmp_path, lines.append) is good and len(calls) == 1
    original = entry.read_bytes()
    assert cached_export(export, "denoiser-k.onnx", tmp_path, lines.append) == good and len(calls) == 1  # reused
    entry.unlink()
    if fault == "other weights":  # valid ONNX of the same graph: only the recorded digest tells
        entry.write_bytes(_tiny(2.0).SerializeToString())
    elif fault == "fifo":  # onnx.load would block on it forever
        os.mkfifo(entry)
    elif fault == "link to /dev/zero":  # would be read until memory runs out
        entry.symlink_to("/dev/zero")
    elif fault == "no digest":
        entry.write_bytes(original)
        Path(str(entry) + SIDECAR).unlink()
    else:
        entry.mkdir()
    lines.clear()
    start = time.perf_counter()
    assert cached_export(export, "denoiser-k.onnx", tmp_path, lines.append) is good and len(calls) == 2
    assert time.perf_counter() - start < 5
    assert any(line.strip().startswith(f"dropping unusable cached export, exporting again: {entry} (")
               for line in lines), lines
    assert entry.is_file() and not entry.is_symlink() and entry.read_bytes() == original  # remade
    digest, record = Path(str(entry) + SIDECAR).read_text().splitlines()
    assert digest.split() == [sha256_file(entry), str(len(original))] and json.loads(record) == {"key": entry.name}


def test_get_or_make_writes_best_effort_and_bounds_entries(tmp_path):
    lines = []
    path = tmp_path / "c" / "entry.bin"
    made = get_or_make(path, lambda: b"x" * 100, lambda data, p: data, lambda v: v, lines.append, limit=10,
                       what="cached thing", redo="making again")
    assert made == b"x" * 100 and not path.exists()  # over its bound: not cached
    (tmp_path / "afile").write_text("not a folder")  # a cache that cannot be written (even by root)
    made = get_or_make(tmp_path / "afile" / "e", lambda: b"y", lambda data, p: data, lambda v: v, lines.append,
                       limit=10, what="cached thing", redo="making again")
    assert made == b"y" and any(f"could not cache cached thing at {tmp_path / 'afile' / 'e'}" in line
                                for line in lines), lines


def test_an_entry_copied_from_another_key_is_dropped_named_and_remade(tmp_path):
    """One policy for every cache: the sidecar binds an entry to its key, so another key's entry copied over
    this one WITH its sidecar (each valid on its own) is refused."""
    lines = []

    def cached(key: str, value: bytes) -> bytes:
        return get_or_make(tmp_path / key, lambda: value, lambda data, p: data, lambda v: v, lines.append,
                           limit=100, what="cached thing", redo="making again", made_from={"model_sha256": key[0] * 4})

    assert cached("a-key", b"made for a") == b"made for a" and cached("b-key", b"made for b") == b"made for b"
    for suffix in ("", SIDECAR):
        shutil.copyfile(tmp_path / f"b-key{suffix}", tmp_path / f"a-key{suffix}")
    assert cached("a-key", b"made for a") == b"made for a"
    assert lines == [f"  dropping unusable cached thing, making again: {tmp_path / 'a-key'} (ArtifactError: it was "
                     f"made for another key, b-key (model_sha256 bbbb), not a-key)"]
    assert (tmp_path / "a-key").read_bytes() == b"made for a"  # remade, and now reused
    lines.clear()
    assert cached("a-key", b"other") == b"made for a" and lines == []
    Path(str(tmp_path / "a-key") + SIDECAR).write_text(f"{sha256_file(tmp_path / 'a-key')} 10\n")  # no key: older
    assert cached("a-key", b"made for a") == b"made for a" and "names no key" in lines[0]


def test_another_models_export_copied_with_its_sidecar_is_dropped_and_the_compile_passes(tmp_path):
    """The reported fault (issue 26): model B's export entry and sidecar copied over model A's entry made every
    compile of A fail its parity check. Two real EDM networks of one architecture, different weights."""
    from tests.edm_fixtures import make_edm_pickle

    for seed, name in enumerate("ab"):
        make_edm_pickle(tmp_path / f"{name}.pkl", seed=seed)
    opts = dict(nfe=3, solver="edm", max_batch=2, engine=False, force=True, cache_dir=str(tmp_path / "cache"))
    exports = tmp_path / "cache" / "exports"
    compile_model(str(tmp_path / "a.pkl"), tmp_path / "out", CompileOptions(**opts), log=lambda text: None)
    (entry,) = exports.glob("denoiser-*.onnx")
    compile_model(str(tmp_path / "b.pkl"), tmp_path / "out", CompileOptions(**opts), log=lambda text: None)
    (other,) = set(exports.glob("denoiser-*.onnx")) - {entry}
    for suffix in ("", SIDECAR):  # cp exports/<b entry>{,.sha256} exports/<a entry>{,.sha256}
        shutil.copyfile(str(other) + suffix, str(entry) + suffix)
    lines = []
    manifest = compile_model(str(tmp_path / "a.pkl"), tmp_path / "out", CompileOptions(**opts), log=lines.append)
    b_sha = json.loads(Path(str(other) + SIDECAR).read_text().splitlines()[1])["model_sha256"]
    assert any(line.strip() == f"dropping unusable cached export, exporting again: {entry} (ArtifactError: it was "
                               f"made for another key, {other.name} (max_batch 2, model_sha256 {b_sha}, what "
                               f"denoiser), not {entry.name})" for line in lines), lines
    assert manifest["parity"]["passed"] and manifest["model"]["sha256"] != b_sha  # A's graph: parity holds
    remade = json.loads(Path(str(entry) + SIDECAR).read_text().splitlines()[1])
    assert remade == {"key": entry.name, "what": "denoiser", "model_sha256": manifest["model"]["sha256"],
                      "max_batch": 2} and entry.read_bytes() != other.read_bytes()


def test_a_cached_export_of_another_graph_is_dropped_and_the_compile_passes(tmp_path):
    """The reported fault: a valid ONNX export of ANOTHER graph in the denoiser's cache entry."""
    opts = dict(nfe=3, solver="edm", max_batch=2, engine=False, force=True, cache_dir=str(tmp_path / "cache"))
    compile_model("digits", tmp_path / "a", CompileOptions(**opts), log=lambda text: None)
    (entry,) = (tmp_path / "cache" / "exports").glob("denoiser-*.onnx")
    (decoder,) = (tmp_path / "cache" / "exports").glob("decoder-*.onnx")
    original = entry.read_bytes()
    entry.write_bytes(decoder.read_bytes())
    lines = []
    manifest = compile_model("digits", tmp_path / "b", CompileOptions(**opts), log=lines.append)
    assert any(f"dropping unusable cached export, exporting again: {entry}" in line for line in lines)
    assert sum("reused the cached export" in line for line in lines) == 1  # the decoder's entry was fine
    assert manifest["parity"]["passed"] and entry.read_bytes() == original


# ---- outputs: checked up front, the option and the cause named ------------------------------------------
def test_outputs_under_a_file_are_refused_up_front(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    start = time.perf_counter()
    assert compile_main(["gmm", "--solver", "edm", "--nfe", "3", "--no-engine", "--out", str(afile / "x")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {afile / 'x'}: {afile} is a file, not a directory\n"
    assert triton.main(["no-such-artifact", "--repo", str(afile)]) == 2  # before the artifact is even read
    assert capsys.readouterr().err == f"error: --repo {afile} is a file, not a directory\n"
    assert triton.main(["no-such-artifact", "--repo", str(afile / "repo")]) == 2
    assert capsys.readouterr().err == f"error: --repo {afile / 'repo'}: {afile} is a file, not a directory\n"
    assert time.perf_counter() - start < 10 and afile.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_compile_onto_a_full_disk_names_the_option_and_the_cause(tmp_path):
    """RLIMIT_FSIZE makes every write past 8 KiB fail as a full disk would (EFBIG; ENOSPC reads the same)."""
    out = tmp_path / "out" / "art"
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))\n"
            "from iia.compiler.cli import main\n"
            f"sys.exit(main(['digits', '--solver', 'edm', '--nfe', '3', '--no-engine', '--out', {str(out)!r}]))")
    env = dict(os.environ, PYTHONPATH=str(ROOT), IIA_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr
    assert last.startswith(f"error: --out {out}: no room to write the output in {out.parent}"), last
    assert "File too large" in last and last.endswith("nothing was published")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no artifact, no work folder, no new "out"


# ---- outputs on mount points and full disks: the option named, nothing new left ---------------------------
@pytest.fixture
def mounted(tmp_path):
    """A 4 MiB tmpfs mounted at tmp_path/mnt (another filesystem than tmp_path, as a Docker volume is)."""
    point = tmp_path / "mnt"
    point.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(point)], capture_output=True,
                              text=True, timeout=30)
    except OSError as err:
        pytest.skip(f"no mount command here ({err}): outputs on mount points are untested")
    if proc.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here ({proc.stderr.strip()}): outputs on mount points "
                    f"are untested")
    yield point
    subprocess.run(["umount", str(point)], check=True, timeout=30)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "cache")


def _gmm_artifact(path: Path) -> Path:
    assert compile_main(["gmm", "--solver", "edm", "--nfe", "3", "--max-batch", "2", "--no-engine",
                         "--out", str(path)]) == 0
    return path


def test_outputs_that_are_mount_points(tmp_path, mounted, capsys, monkeypatch):
    """`--repo` on a mount point is served (its work folder inside it, the one place on its filesystem);
    `--out` on one is refused up front naming --out (it could only fail at the final rename, EBUSY/EXDEV)."""
    monkeypatch.setenv("IIA_CACHE_DIR", str(tmp_path / "cache"))
    art = _gmm_artifact(tmp_path / "art")
    for force in ([], ["--force"]):  # new models, then replaced ones
        argv = [str(art), "--repo", str(mounted), "--name", "g", "--kind", "cpu", "--backend", "onnxruntime,python"]
        assert triton.main(argv + force) == 0, capsys.readouterr().err
        assert sorted(p.name for p in mounted.iterdir()) == ["g_onnxruntime", "g_python"]  # no work folder left
        assert _names(tmp_path) == ["art", "mnt"]
    for model in mounted.iterdir():
        shutil.rmtree(model)
    shutil.copytree(art, mounted, dirs_exist_ok=True)  # an artifact at the mount root
    capsys.readouterr()
    start = time.perf_counter()
    for force in ([], ["--force"]):
        assert compile_main(["gmm", "--solver", "edm", "--nfe", "3", "--no-engine", "--out", str(mounted)] + force) == 2
        assert capsys.readouterr().err == (
            f"error: --out {mounted} is a mount point (another filesystem than {tmp_path}): the output is built "
            f"beside it and renamed into place, which cannot replace a mount point; give a new directory inside "
            f"it, e.g. --out {mounted / 'NAME'}\n")
    assert time.perf_counter() - start < 10  # before any work
    assert _names(tmp_path) == ["art", "mnt"]  # no .mnt.old-*, no .mnt.building-*
    assert sha256_file(mounted / "sampler.onnx") == sha256_file(art / "sampler.onnx")
    # the directory inside it the message suggests: not while an artifact is there (a stray folder in it)
    assert compile_main(["gmm", "--solver", "edm", "--nfe", "3", "--no-engine", "--out", str(mounted / "a")]) == 2
    assert "is inside the iia artifact" in capsys.readouterr().err
    for entry in mounted.iterdir():
        entry.unlink()
    assert compile_main(["gmm", "--solver", "edm", "--nfe", "3", "--no-engine", "--out", str(mounted / "a")]) == 0


def test_a_triton_export_onto_a_full_disk_leaves_nothing_new(tmp_path, capsys, monkeypatch):
    """RLIMIT_FSIZE as in the compile test: the new repository (and its new parent) go again."""
    monkeypatch.setenv("IIA_CACHE_DIR", str(tmp_path / "cache"))
    art = _gmm_artifact(tmp_path / "art")
    repo = tmp_path / "new" / "repo"
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))\n"
            "from iia.compiler.triton import main\n"
            f"sys.exit(main([{str(art)!r}, '--repo', {str(repo)!r}, '--kind', 'cpu', '--backend', 'onnxruntime']))")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr
    assert last.startswith(f"error: --repo {repo}: no room to write the output in {repo.parent}"), last
    assert "File too large" in last and last.endswith("nothing was published")
    assert _names(tmp_path) == ["art"]  # no repo/, no new/, no work folder
