"""The CLIs' edges (issue 26): what iia-run reads and what every CLI writes.

- iia-run's .npy reader follows numpy's format rules: a corpus of headers, each run through numpy.load and
  iia-run; where numpy refuses, iia-run refuses naming what; where numpy reads, iia-run reads the same array, or
  refuses by name what it does not take (a repeated key, which numpy silently resolves to the last, among them).
- A noise file's header is checked against the artifact before its data is read (a sparse 15 GB file under a
  1 GiB heap limit); --bench refuses the labels iia-run refuses.
- Outputs: never inside the artifact (through links and '..'); one rule for an output file in every CLI
  (iia.cli.check_output_file, the same words in iia-run): '-', a file used as a directory, a read-only
  directory, all refused up front naming the option; iia-sample's .npz and PNG published together (both or
  neither, the error naming the output and the cause, never a temp file).
"""

from __future__ import annotations

import errno
import io
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from iia.calibration.cli import calibrate_main
from iia.compiler.build import CompileOptions, compile_model
from iia.evaluation.cli import accuracy_main, bench_main
from iia.evaluation.quality import main as quality_main
from iia.models import gaussian_mixture
from iia.runtime import draw_noise, load
from iia.runtime.contract import MAX_THREADS
from iia.runtime.cli import sample_main
from test_native import native  # noqa: F401 -- the session's CMake build of iia-run (incremental)

ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH = 8
SHAPE = (1, 4, 4)
NOISE = draw_noise(0, 2, SHAPE)  # float32 [2, 1, 4, 4]: the data of every header in the corpus


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """A class-conditional (label_dim 3) and an unconditional image mixture, EDM NFE 5 (nothing to fit)."""
    root = tmp_path_factory.mktemp("outputs")
    for key, conditional in (("cond", True), ("uncond", False)):
        compile_model(gaussian_mixture(shape=SHAPE, components=3, conditional=conditional), root / key,
                      CompileOptions(nfe=5, solver="edm", force=True, max_batch=MAX_BATCH, engine=False),
                      log=lambda text: None)
    return {key: root / key for key in ("cond", "uncond")}


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr[len("error: "):-1]


def _error_of(rc: int, stderr: str) -> str:
    """The one error line of a CLI that also logs (the sampler, a progress bar): exit status 2, one 'error: '."""
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if "error: " in line]
    assert rc == 2 and len(errors) == 1, stderr
    return errors[0].split("error: ", 1)[1]


def _cli_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    return err[len("error: "):]


# ---- iia-run's .npy reader against numpy's ------------------------------------------------------------
def npy_file(header: str, version: int = 1, data: bytes | None = None) -> bytes:
    """A .npy file with `header` (padded as numpy pads it) in format `version`.0; data: what the header declares
    as numpy reads it (NOISE's bytes repeated or cut), else NOISE's bytes."""
    text = header.encode("utf-8" if version == 3 else "latin1")
    size = 2 if version == 1 else 4
    text += b" " * (63 - (8 + size + len(text)) % 64) + b"\n"
    head = b"\x93NUMPY" + bytes([version, 0]) + len(text).to_bytes(size, "little") + text
    if data is None:
        data = NOISE.tobytes()
        declared = _numpy_header(head)
        if declared is not None:
            data = np.resize(np.frombuffer(data, np.uint8), declared).tobytes()
    return head + data


def _numpy_header(head: bytes) -> int | None:
    """The data bytes numpy reads after this header (it reads what the header declares and ignores the rest), or
    None where numpy refuses the header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.load(io.BytesIO(head + bytes(4096))).nbytes
    except Exception:  # noqa: BLE001 -- any refusal, whatever numpy raises (ValueError, TypeError, OverflowError)
        return None


def _numpy_load(path: Path):
    """numpy.load's verdict: the array, or None where it refuses the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Python 2 headers read with a warning
            return np.load(path)
    except Exception:  # noqa: BLE001
        return None


def _header(descr="'<f4'", fortran="False", shape="(2, 1, 4, 4)", extra="") -> str:
    return f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, {extra}}}"


READ = "read"
# name: (header, format version, iia-run's verdict: READ (the same array numpy reads) or the refusal's words)
AGREED = {
    "numpy.save's header": (_header(), 1, READ),
    "format 2.0": (_header(), 2, READ),
    "format 3.0": (_header(), 3, READ),
    "double quotes, no spaces, no trailing comma": ('{"descr":"<f4","fortran_order":False,"shape":(2,1,4,4)}', 1, READ),
    "keys in another order": ("{'shape': (2, 1, 4, 4), 'fortran_order': False, 'descr': '<f4'}", 1, READ),
    "tabs, CR LF, form feed, a comment": ("\t{'descr': '<f4',  # float32\r\n 'fortran_order': False,\f\n"
                                          " 'shape': (2, 1, 4, 4)} # done", 1, READ),
    "a leading newline": ("\n" + _header(), 1, READ),
    "hex, octal, binary, a sign, an underscore": (_header(shape="(0x2, 0o1, +0b1_00, 0x_4,)"), 1, READ),
    "a sign on its own line": (_header(shape="(2, 1, 4, +\n4)"), 1, READ),
    "parenthesised values": ("{'descr': ('<f4'), 'fortran_order': (False), 'shape': ((2), 1, 4, 4)}", 1, READ),
    "adjacent strings": ("{'descr': '<' \"f4\", 'fortran_order': False, 'shape': (2, 1, 4, 4)}", 1, READ),
    "u and r string prefixes": ("{u'descr': r'<f4', 'fortran_order': False, 'shape': (2, 1, 4, 4)}", 1, READ),
    "typestr without byte order": (_header(descr="'f4'"), 1, READ),
    "typestr with '='": (_header(descr="'=f4'"), 1, READ),
    "typestr with '|'": (_header(descr="'|f4'"), 1, READ),
    "Python 2 longs in format 1.0": (_header(shape="(2L, 1L, 4L, 4L)"), 1, READ),
    "Python 2 longs in format 2.0": (_header(shape="(2L, 1L, 4L, 4L)"), 2, READ),
    "a Python 2 long after a space": (_header(shape="(2 L, 1, 4, 4)"), 1, READ),
    # refused by numpy, and by iia-run naming what
    "a space inside a dimension": (_header(shape="(2 1, 4, 4)"), 1, "expected ',' or ')' at '1, 4, 4),"),
    "an empty item": (_header(shape="(2,, 1, 4, 4)"), 1, "unexpected ','"),
    "a lone comma": (_header(shape="(,)"), 1, "unexpected ','"),
    "an unclosed tuple": ("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1, 4, 4}", 1, "expected ',' or ')'"),
    "an unclosed dict": ("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1, 4, 4)", 1, "expected ',' or '}'"),
    "an unclosed string": ("{'descr': '<f4, 'fortran_order': False, 'shape': (2, 1, 4, 4)}", 1,
                           "expected ',' or '}'"),
    "shape a list": (_header(shape="[2, 1, 4, 4]"), 1, "'shape' [2, 1, 4, 4] is not a tuple of integers"),
    "shape an int": (_header(shape="32"), 1, "'shape' 32 is not a tuple of integers"),
    "a float dimension": (_header(shape="(2.0, 1, 4, 4)"), 1, "a number that is not an integer at '2.0"),
    "a string dimension": (_header(shape="('2', 1, 4, 4)"), 1, "'shape' ('2', 1, 4, 4) is not a tuple of integers"),
    "a bool dimension": (_header(shape="(True, 2, 4, 4)"), 1, "'shape' (True, 2, 4, 4) is not a tuple of integers"),
    "None as a dimension": (_header(shape="(None, 1, 4, 4)"), 1, "is not a tuple of integers"),
    "a negative dimension": (_header(shape="(-2, 1, 4, 4)"), 1, "'shape' (-2, 1, 4, 4) has a negative dimension"),
    "a leading zero": (_header(shape="(02, 1, 4, 4)"), 1, "a number with a leading zero at '02"),
    "two signs": (_header(shape="(2, 1, 4, - -4)"), 1, "expected a number"),
    "a dimension beyond int64": (_header(shape="(2, 1, 4, 4, 99999999999999999999, 0)"), 1, "data bytes allowed"),
    "a Python 2 long in format 3.0": (_header(shape="(2L, 1, 4, 4)"), 3, "a number that is not an integer at '2L"),
    "not Python 2's L": (_header(shape="(2 Lx, 1, 4, 4)"), 1, "expected ',' or ')' at 'Lx"),
    "no fortran_order": ("{'descr': '<f4', 'shape': (2, 1, 4, 4)}", 1, "its header has no 'fortran_order'"),
    "no keys": ("{}", 1, "its header has no 'descr'"),
    "an unknown key": (_header(extra="'x': 1"), 1, "the unknown key 'x' (the format has exactly 'descr', "
                                                   "'fortran_order' and 'shape')"),
    "an integer key": (_header(extra="1: 1"), 1, "the unknown key 1 "),
    "a bytes key": ("{b'descr': '<f4', 'fortran_order': False, 'shape': (2, 1, 4, 4)}", 1, "the unknown key b'descr'"),
    "fortran_order 0": (_header(fortran="0"), 1, "'fortran_order' 0 is not True or False"),
    "fortran_order a string": (_header(fortran="'False'"), 1, "'fortran_order' 'False' is not True or False"),
    "descr None": (_header(descr="None"), 1, "'descr' None is not a dtype"),
    "descr bytes": (_header(descr="b'<f4'"), 1, "'descr' b'<f4' is not a dtype"),
    "not a dict": ("['descr', '<f4']", 1, "its .npy header is not a dictionary"),
    "text after the dict": (_header() + " x", 1, "unexpected text after the dictionary"),
    "a call": ("dict(descr='<f4', fortran_order=False, shape=(2, 1, 4, 4))", 1, "unexpected 'dict'"),
    "a vertical tab": (_header().replace(", 'shape'", ",\v'shape'"), 1, "a non-ASCII or control byte"),
    "a NUL byte": (_header() + "\0", 1, "a non-ASCII or control byte"),
    "over numpy's 10000 bytes": (_header(extra=" " * 10000), 2, "more than the 10000 numpy.load allows"),
}
# read by numpy, refused by iia-run naming why: ambiguous (numpy silently takes the last of a repeated key:
# 'fortran_order' twice was transposed noise) or not taken by iia's runtime
STRICTER = {
    "fortran_order twice": (_header(extra="'fortran_order': True"), 1, "gives 'fortran_order' twice (numpy would "
                                                                       "silently take the last)"),
    "shape twice": (_header(extra="'shape': (1, 2, 4, 4)"), 1, "gives 'shape' twice"),
    "descr twice": (_header(extra="'descr': '<f4'"), 1, "gives 'descr' twice"),
    "Fortran order": (_header(fortran="True"), 1, "Fortran-ordered arrays are not supported"),
    "a string escape": (_header(descr="'\\x3cf4'"), 1, "a string escape (not supported)"),
    "a non-ASCII comment": (_header() + " # \u00e9", 3, "a non-ASCII or control byte"),
    "float32 spelled out": (_header(descr="'float32'"), 1, "dtype 'float32' is not supported"),
    "complex": (_header(descr="'<c8'"), 1, "dtype '<c8' is not supported"),
    "big-endian": (_header(descr="'>f4'"), 1, "big-endian arrays are not supported (dtype '>f4')"),
    "structured": (_header(descr="[('x', '<f4')]"), 1, "structured dtypes are not supported"),
}


@pytest.fixture(scope="module")
def reference_images(native, arts, tmp_path_factory):  # noqa: F811
    """iia-run's images for NOISE with labels 0,1 (equal to the Python runtime's)."""
    root = tmp_path_factory.mktemp("npy_reference")
    np.save(root / "noise.npy", NOISE)
    proc = _run([native["iia_run"], arts["cond"], "--noise", root / "noise.npy", "--labels", "0,1", "--out",
                 root / "out.npy", "--threads", "1"])
    assert proc.returncode == 0, proc.stderr
    images = np.load(root / "out.npy")
    assert np.array_equal(images, load(arts["cond"], threads=1)(NOISE, class_labels=[0, 1]))
    return images


@pytest.mark.parametrize("case", list(AGREED) + list(STRICTER))
def test_npy_header_read_as_numpy_reads_it(native, arts, reference_images, tmp_path, case):  # noqa: F811
    header, version, verdict = {**AGREED, **STRICTER}[case]
    path = tmp_path / "noise.npy"
    path.write_bytes(npy_file(header, version))
    numpy_array = _numpy_load(path)
    proc = _run([native["iia_run"], arts["cond"], "--noise", path, "--labels", "0,1", "--out", tmp_path / "out.npy",
                 "--threads", "1"])
    if verdict == READ:
        assert numpy_array is not None and np.array_equal(numpy_array, NOISE), "numpy reads another array"
        assert proc.returncode == 0, proc.stderr
        assert np.array_equal(np.load(tmp_path / "out.npy"), reference_images)
        return
    assert (numpy_array is None) == (case in AGREED), "numpy's verdict is not the one this case states"
    message = _one_line_error(proc)
    assert message.startswith(f"{path}: ") and verdict in message, message
    assert not (tmp_path / "out.npy").exists()


def test_npy_data_size_must_match_the_header(native, arts, tmp_path):  # noqa: F811
    """numpy reads the declared elements and ignores what follows; iia-run refuses a size that differs."""
    path = tmp_path / "long.npy"
    path.write_bytes(npy_file(_header(), data=NOISE.tobytes() * 2))
    assert np.array_equal(_numpy_load(path), NOISE)
    proc = _run([native["iia_run"], arts["cond"], "--noise", path, "--labels", "0,1", "--out", tmp_path / "o.npy"])
    assert _one_line_error(proc) == f"{path}: holds 256 data bytes, its header says 128 (truncated or corrupted)"


# ---- headers before data; --bench refuses what a run refuses ---------------------------------------------
def _huge_noise(path: Path, batch: int) -> Path:
    """float32 [batch, 1, 4, 4] whose data is a hole: the header is written, the size set as truncate does."""
    head = npy_file(_header(shape=f"({batch}, 1, 4, 4)"), data=b"")
    path.write_bytes(head)
    os.truncate(path, len(head) + batch * 64)
    return path


def _heap_limit(limit: int = 2**30):
    """preexec_fn: at most `limit` bytes of heap (RLIMIT_DATA counts malloc and writable private mappings, not a
    read-only mapping of a file): reading 15 GB of noise into memory fails (std::bad_alloc) under it."""
    return lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def test_iia_run_checks_a_huge_noise_header_before_reading_the_data(native, arts, tmp_path):  # noqa: F811
    batch = 15 * 10**9 // 64  # 15 GB of float32 [B, 1, 4, 4]
    noise = _huge_noise(tmp_path / "huge.npy", batch)
    start = time.monotonic()
    proc = _run([native["iia_run"], arts["cond"], "--noise", noise, "--labels", "0", "--out", tmp_path / "out.npy"],
                preexec_fn=_heap_limit(), timeout=300)
    seconds = time.monotonic() - start
    assert _one_line_error(proc) == (f"noise batch {batch} exceeds the artifact's maximum batch {MAX_BATCH} (split "
                                     f"the request, or recompile with --max-batch)")
    assert seconds < 20, f"{seconds:.1f} s: the data was read"
    # int64 label ids [B] for a batch of 2: refused by shape, unread
    labels = tmp_path / "labels.npy"
    head = npy_file(_header(descr="'<i8'", shape=f"({batch},)"), data=b"")
    labels.write_bytes(head)
    os.truncate(labels, len(head) + batch * 8)
    np.save(tmp_path / "noise.npy", NOISE)
    proc = _run([native["iia_run"], arts["cond"], "--noise", tmp_path / "noise.npy", "--labels", labels, "--out",
                 tmp_path / "out.npy"], preexec_fn=_heap_limit(), timeout=300)
    assert _one_line_error(proc) == f"expected 2 class labels (one per sample), got {batch}"
    # --bench reads only the rows its largest batch uses
    proc = _run([native["iia_run"], arts["cond"], "--bench", "--noise", noise, "--batch", "2", "--iters", "1",
                 "--warmup", "0"], preexec_fn=_heap_limit(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("key, labels, words", [
    ("cond", "-1", "class label -1 out of range: this model has label_dim 3, expected ids in [0, 2]"),
    ("cond", "3", "class label 3 out of range: this model has label_dim 3, expected ids in [0, 2]"),
    ("uncond", "0", "this model is unconditional (label_dim 0): class_labels must be None"),
    ("uncond", "3", "this model is unconditional (label_dim 0): class_labels must be None"),
    # an empty value is no value: --bench took the default labels, a run the model's refusal (or none at all)
    ("cond", "", "--labels expects a value, got an empty string"),
    ("uncond", "", "--labels expects a value, got an empty string"),
])
def test_iia_run_bench_refuses_the_labels_a_run_refuses(native, arts, tmp_path, key, labels, words):  # noqa: F811
    np.save(tmp_path / "noise.npy", NOISE)
    run = _run([native["iia_run"], arts[key], "--noise", tmp_path / "noise.npy", "--labels", labels, "--out",
                tmp_path / "out.npy"])
    bench = _run([native["iia_run"], arts[key], "--bench", "--labels", labels, "--batch", "2", "--iters", "1",
                  "--warmup", "0"])
    assert _one_line_error(run) == _one_line_error(bench) == words
    assert bench.stdout == ""  # refused before anything is printed or timed


def test_iia_run_bench_with_a_label_id(native, arts):  # noqa: F811
    proc = _run([native["iia_run"], arts["cond"], "--bench", "--labels", "2", "--batch", "1,3", "--iters", "2",
                 "--warmup", "0", "--threads", "1"])
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.startswith("onnxruntime-cpu")]) == 2


@pytest.mark.parametrize("args, words", [
    # an integer out of range, even past 64 bits, is refused with the range, not as "not an integer"
    (["--bench", "--iters", "99999999999999"], "--iters must lie in [1, 2147483647], got 99999999999999"),
    (["--bench", "--iters", "0"], "--iters must lie in [1, 2147483647], got 0"),
    (["--bench", "--warmup", "-1"], "--warmup must lie in [0, 2147483647], got -1"),
    (["--bench", "--threads", "99999999999999999999"],
     f"--threads must lie in [1, {MAX_THREADS}], got 99999999999999999999"),
    (["--bench", "--batch", "1,99999999999999999999"],
     "--batch 99999999999999999999 is out of range (beyond 64-bit integers)"),
    (["--bench", "--iters", "many"], "--iters expects an integer, got 'many'"),
    # no option takes an empty value: each was silently the default (no JSON written, random noise, ...)
    (["--bench", "--json", ""], "--json expects a value, got an empty string"),
    (["--bench", "--noise", ""], "--noise expects a value, got an empty string"),
    (["--bench", "--guidance", ""], "--guidance expects a value, got an empty string"),
    (["--noise", "noise.npy", "--out", ""], "--out expects a value, got an empty string"),
    # a --bench setting without --bench would be ignored
    (["--noise", "noise.npy", "--out", "x.npy", "--iters", "3"], "--iters applies to --bench only"),
    (["--noise", "noise.npy", "--out", "x.npy", "--batch", "2"], "--batch applies to --bench only"),
])
def test_iia_run_refuses_option_values_by_their_fault(native, arts, tmp_path, args, words):  # noqa: F811
    np.save(tmp_path / "noise.npy", NOISE)
    proc = _run([native["iia_run"], arts["cond"], *args], cwd=tmp_path)
    assert _one_line_error(proc) == words
    assert proc.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["noise.npy"]


# ---- outputs never inside the artifact ----------------------------------------------------------------
def test_no_output_lands_inside_the_artifact(native, arts, tmp_path, capsys):  # noqa: F811
    """iia-run (--out, --bench --json), iia-sample and iia-bench: the artifact as a directory, as its
    manifest.json or through a link; the output directly inside, through a linked directory, through '..', or an
    existing link into the artifact. Nothing is written; the artifact stays as it was."""
    art = tmp_path / "art"
    shutil.copytree(arts["cond"], art)
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    (tmp_path / "linked").symlink_to(art)
    (tmp_path / "sub").mkdir()
    for name in ("rows.json", "out.npy", "out.png"):  # existing links to a file of the artifact
        (tmp_path / name).symlink_to(art / "manifest.json")
    np.save(tmp_path / "noise.npy", NOISE)
    noise = ["--noise", tmp_path / "noise.npy", "--labels", "0,1"]
    ways = [art, tmp_path / "linked", tmp_path / "sub" / ".." / "art"]
    json_outs = [art / "manifest.json", *(way / "rows.json" for way in ways), tmp_path / "rows.json"]
    npy_outs = [art / "manifest.json", *(way / "x.npy" for way in ways), tmp_path / "out.npy"]
    png_outs = [*(way / "x.png" for way in ways), tmp_path / "out.png"]
    for artifact in (art, art / "manifest.json", tmp_path / "linked"):
        runs = [(["--bench", "--json", out], "--json", out) for out in json_outs]
        runs += [([*noise, "--out", out], "--out", out) for out in npy_outs]
        for args, flag, out in runs:
            proc = _run([native["iia_run"], artifact, *args])
            assert _one_line_error(proc) == f"{flag} {out}: is inside the artifact {artifact}; write outputs elsewhere"
            assert proc.stdout == ""
        for out in png_outs:
            message = _cli_error(capsys, sample_main([str(artifact), "--out", str(out)]))
            assert message.startswith("--out ") and message.endswith(f"is inside the artifact {artifact}; write "
                                                                     f"outputs elsewhere"), message
        for out in (way / "x.npz" for way in ways):  # the .npz named, as given (the PNG beside it was named)
            message = _cli_error(capsys, sample_main([str(artifact), "--out", str(out)]))
            assert message == f"--out {out}: is inside the artifact {artifact}; write outputs elsewhere"
        for out in json_outs:
            message = _cli_error(capsys, bench_main([str(artifact), "--json", str(out)]))
            assert message == f"--json {out}: is inside the artifact {artifact}; write outputs elsewhere"
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before


def test_no_report_or_coefficient_file_lands_inside_any_artifact(tmp_path, capsys):
    """iia-accuracy --json/--plot (--peers too), iia-calibrate --out (even with --force) and iia-quality --json/
    --plot/--grids are refused inside an iia artifact by the check iia-compile's --out uses (`iia-accuracy --json
    cy/manifest.json` destroyed the artifact), before any work; the artifact stays as it was."""
    import json

    from iia.runtime.contract import SCHEMA

    art = tmp_path / "cy"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({"schema": SCHEMA}))
    (tmp_path / "linked").symlink_to(art)
    runs = [(accuracy_main, ["--json", art / "manifest.json"]), (accuracy_main, ["--plot", art / "x.png"]),
            (accuracy_main, ["--peers", "--json", tmp_path / "linked" / "p.json"]),
            (calibrate_main, ["gmm", "--out", art / "coefficients.json", "--force"]),
            (calibrate_main, ["gmm", "--out", tmp_path / "linked" / ".." / "cy" / "c.json"]),
            (quality_main, ["--json", art / "q.json"]), (quality_main, ["--plot", art / "q.png"]),
            (quality_main, ["--grids", art]), (quality_main, ["--grids", art / "grids"])]
    for main, argv in runs:
        flag, out = argv[-2:] if argv[-1] != "--force" else argv[-3:-1]
        message = _cli_error(capsys, main([str(a) for a in argv]))
        assert message == f"{flag} {out}: is inside the iia artifact {art}; choose a path outside it", message
    assert sorted(p.name for p in art.iterdir()) == ["manifest.json"]
    assert json.loads((art / "manifest.json").read_text()) == {"schema": SCHEMA}


# ---- one rule for an output file, in every CLI, up front ------------------------------------------------
def test_dash_is_refused_by_every_cli(native, arts, tmp_path, capsys, monkeypatch):  # noqa: F811
    """'-' is no file name here (no CLI writes to standard output): refused by iia-run, iia-sample, iia-bench,
    iia-accuracy, iia-quality and iia-calibrate alike, before any work, and no file named '-' appears."""
    monkeypatch.chdir(tmp_path)
    said = "writing to standard output is not supported; give a file name"
    proc = _run([native["iia_run"], arts["cond"], "--bench", "--json", "-"], cwd=tmp_path)
    assert _one_line_error(proc) == f"--json -: {said}"
    np.save(tmp_path / "noise.npy", NOISE)
    proc = _run([native["iia_run"], arts["cond"], "--noise", "noise.npy", "--out", "-"], cwd=tmp_path)
    assert _one_line_error(proc) == f"--out -: {said}"
    for main, argv in ((sample_main, ["nothing", "--out", "-"]), (bench_main, ["nothing", "--json", "-"]),
                       (accuracy_main, ["--json", "-"]), (accuracy_main, ["--plot", "-"]),
                       (quality_main, ["--json", "-"]), (calibrate_main, ["--out", "-"])):
        flag = argv[-2]
        assert _cli_error(capsys, main(argv)) == f"{flag} -: {said}", (main, argv)
    assert not (tmp_path / "-").exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """(a directory this process cannot create files in, strerror's words for why): mode 0555 for a user; as root
    (who writes through file modes) a read-only tmpfs mounted there, or a skip where root may not mount."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path, os.strerror(errno.EACCES)
        path.chmod(0o755)
        return
    proc = _run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", path])
    if proc.returncode != 0:
        pytest.skip(f"running as root without the right to mount a read-only tmpfs ({proc.stderr.strip()}): "
                    f"root writes in any directory whatever its mode, so none can be made read-only here")
    try:
        yield path, os.strerror(errno.EROFS)
    finally:
        _run(["umount", path])


def test_read_only_directory_refused_up_front(native, arts, read_only_dir, capsys):  # noqa: F811
    """The output's directory cannot take files: refused before the artifact is even opened (the artifact named
    here does not exist), naming the option, the directory and the cause; a missing directory below it too."""
    ro, cause = read_only_dir
    out = ro / "x.png"
    assert _cli_error(capsys, sample_main(["nothing", "--out", str(out)])) == f"--out {out}: cannot write in {ro} ({cause})"
    assert _cli_error(capsys, bench_main(["nothing", "--json", str(out.with_suffix(".json"))])) == \
        f"--json {out.with_suffix('.json')}: cannot write in {ro} ({cause})"
    proc = _run([native["iia_run"], arts["cond"], "--bench", "--json", ro / "x.json"])
    assert _one_line_error(proc) == f"--json {ro / 'x.json'}: cannot write in {ro} ({cause})"
    assert proc.stdout == ""


def test_a_missing_directory_is_refused_not_made(native, arts, tmp_path, capsys):  # noqa: F811
    """A file output in a directory that does not exist (a mistyped path) is refused up front, in the same words by
    iia-sample, iia-bench and iia-run, and nothing is created (iia-sample made /nonexist at the root)."""
    for out, cause in ((tmp_path / "new" / "x.png", "No such file or directory"),
                       (tmp_path / "new" / "deeper" / "x.png", "No such file or directory")):
        expected = f"its directory {out.parent} cannot be used ({cause})"
        assert _cli_error(capsys, sample_main([str(arts["cond"]), "--n", "1", "--out", str(out)])) == \
            f"--out {out}: {expected}"
        assert _cli_error(capsys, bench_main([str(arts["cond"]), "--json", str(out.with_suffix(".json"))])) == \
            f"--json {out.with_suffix('.json')}: {expected}"
        proc = _run([native["iia_run"], arts["cond"], "--bench", "--json", out.with_suffix(".json")])
        assert _one_line_error(proc) == f"--json {out.with_suffix('.json')}: {expected}"
    assert not (tmp_path / "new").exists()


def test_a_file_used_as_a_directory_refused_up_front(native, arts, tmp_path, capsys):  # noqa: F811
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    out = afile / "x.png"
    assert _cli_error(capsys, sample_main(["nothing", "--out", str(out)])) == f"--out {out}: {afile} is not a directory"
    json_out = out.with_suffix(".json")
    assert _cli_error(capsys, bench_main(["nothing", "--json", str(json_out)])) == \
        f"--json {json_out}: {afile} is not a directory"
    proc = _run([native["iia_run"], arts["cond"], "--bench", "--json", afile / "x.json"])
    assert _one_line_error(proc) == f"--json {afile / 'x.json'}: {afile} is not a directory"
    deeper = afile / "sub" / "x.png"  # below a file: the OS's own cause, as iia-run says it
    assert _cli_error(capsys, sample_main(["nothing", "--out", str(deeper)])) == \
        f"--out {deeper}: its directory {afile / 'sub'} cannot be used (Not a directory)"
    proc = _run([native["iia_run"], arts["cond"], "--bench", "--json", deeper.with_suffix(".json")])
    assert _one_line_error(proc) == \
        f"--json {deeper.with_suffix('.json')}: its directory {afile / 'sub'} cannot be used (Not a directory)"
    assert afile.read_text() == "not a directory"


# ---- iia-sample: the .npz and the PNG, both or neither ----------------------------------------------------
def _old_pair(art: Path, out: Path) -> dict[str, bytes]:
    assert sample_main([str(art), "--n", "64", "--seed", "1", "--out", str(out)]) == 0
    return {p.name: p.read_bytes() for p in out.parent.iterdir()}


def test_sample_npz_write_fails_both_old_files_stay(arts, tmp_path, capsys):
    """The .npz cannot be written (RLIMIT_FSIZE: 'File too large', a real write error): the old .npz and PNG stay,
    no temp file is left, and the error names the .npz and the cause."""
    out = tmp_path / "pair" / "x.png"
    out.parent.mkdir()
    old = _old_pair(arts["uncond"], out)
    capsys.readouterr()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = _run([sys.executable, "-m", "iia.runtime.cli", arts["uncond"], "--n", "64", "--seed", "2", "--out", out],
                preexec_fn=small_files, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    npz = out.with_suffix(".npz")
    assert _error_of(proc.returncode, proc.stderr) == (f"--out {npz}: cannot write it ({os.strerror(errno.EFBIG)}); "
                                                       f"{npz} and {out} left as they were")
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == old


def test_sample_png_write_fails_the_new_npz_is_not_published(arts, tmp_path, capsys):
    """The disk fills while the PNG is written (a tmpfs with room for the new .npz only: a real ENOSPC): the old
    .npz and PNG stay as they were (the new .npz was never renamed over the old), no temp file is left, and the
    error names the PNG and the cause. Needs root to mount the tmpfs; skipped otherwise."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = _run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk]) if os.geteuid() == 0 else None
    if proc is None or proc.returncode != 0:
        pytest.skip("a full disk needs a small tmpfs, and mounting one needs root")
    try:
        out = disk / "x.png"
        old = _old_pair(arts["uncond"], out)
        page = os.statvfs(disk).f_frsize
        room = -(-len(old["x.npz"]) // page) * page  # the new .npz has the old one's size
        free = os.statvfs(disk).f_bavail * page
        (disk / "filler").write_bytes(b"\1" * (free - room))
        filled = {**old, "filler": (disk / "filler").read_bytes()}
        capsys.readouterr()
        rc = sample_main([str(arts["uncond"]), "--n", "64", "--seed", "2", "--out", str(out)])
        message = _error_of(rc, capsys.readouterr().err)
        npz = out.with_suffix(".npz")
        assert message == (f"--out {out}: cannot write it ({os.strerror(errno.ENOSPC)}); {npz} and {out} left as "
                           f"they were")
        assert {p.name: p.read_bytes() for p in disk.iterdir()} == filled
    finally:
        _run(["umount", disk])


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a file system with no free block left (a 64 KiB tmpfs filled by `filler`): writes there fail
    with a real ENOSPC. Needs root to mount the tmpfs; skipped otherwise."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = _run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", disk]) if os.geteuid() == 0 else None
    if proc is None or proc.returncode != 0:
        pytest.skip("a full disk needs a small tmpfs, and mounting one needs root"
                    + (f" ({proc.stderr.strip()})" if proc is not None else ""))
    try:
        (disk / "filler").write_bytes(b"\1" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize))
        assert os.statvfs(disk).f_bavail == 0
        yield disk
    finally:
        _run(["umount", disk])


def test_a_full_disk_names_the_option_the_output_and_the_cause(native, arts, full_disk, tmp_path, capsys):  # noqa: F811
    """The write itself fails (the checks before the run pass: the directory is writable): iia-bench --json,
    iia-run --out (.npy and .png) and iia-run --bench --json say which option, which file and why, in one line
    (iia-bench said only '[Errno 28] No space left on device', iia-run only 'cannot write FILE: ...'); no temp
    file is left and an existing output stays as it was."""
    full = os.strerror(errno.ENOSPC)
    old = full_disk / "old.json"  # an earlier output: the failed write must not have replaced it
    os.rename(full_disk / "filler", old)
    before = old.read_bytes()

    def said(flag, out):
        return f"{flag} {out}: cannot write it ({full}); {out} left as it was"

    for out in (full_disk / "b.json", old):
        rc = bench_main([str(arts["uncond"]), "--batch", "1", "--iters", "1", "--warmup", "0", "--no-eager",
                         "--no-loop", "--json", str(out)])
        assert _error_of(rc, capsys.readouterr().err) == said("--json", out)
    np.save(tmp_path / "noise.npy", NOISE)
    for out in (full_disk / "o.npy", full_disk / "o.png"):
        proc = _run([native["iia_run"], arts["uncond"], "--noise", tmp_path / "noise.npy", "--out", out])
        assert _error_of(proc.returncode, proc.stderr) == said("--out", out) and proc.stdout == ""
    for out in (full_disk / "b.json", old):
        proc = _run([native["iia_run"], arts["uncond"], "--bench", "--batch", "1", "--iters", "1", "--warmup", "0",
                     "--json", out])
        assert _error_of(proc.returncode, proc.stderr) == said("--json", out)
    assert [p.name for p in full_disk.iterdir()] == ["old.json"] and old.read_bytes() == before


def test_output_files_put_back_what_a_failed_rename_pair_replaced(tmp_path):
    """publish's second rename fails (its target became a non-empty directory after the up-front check): the first
    output, already replaced, gets its previous file back; no temp or kept link is left; the error names the
    output and the cause."""
    from iia.cli import OutputFiles

    first, second = tmp_path / "x.npz", tmp_path / "x.png"
    first.write_bytes(b"old npz")
    with pytest.raises(OSError) as info:
        with OutputFiles("--out", [first, second]) as outputs:
            for path in (first, second):
                with outputs.writing(path) as temp:
                    temp.write_bytes(b"new")
            second.mkdir()
            (second / "inside").write_text("a directory in the way")
            outputs.publish()
    assert str(info.value) == (f"--out {second}: cannot write it ({os.strerror(errno.EISDIR)}); {first} and {second} "
                               f"left as they were")
    assert first.read_bytes() == b"old npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz", "x.png"]


def test_sample_out_keeps_the_spelling_of_the_name_given(tmp_path):
    """`--out x.NPZ` names the .npz as typed (not x.npz); its PNG companion gets the lower-case suffix."""
    from iia.runtime.cli import output_paths

    assert output_paths(str(tmp_path / "x.NPZ")) == (tmp_path / "x.png", tmp_path / "x.NPZ")
    assert output_paths(str(tmp_path / "y.PNG")) == (tmp_path / "y.PNG", tmp_path / "y.npz")
    assert output_paths(str(tmp_path / "z.png")) == (tmp_path / "z.png", tmp_path / "z.npz")


def test_a_plot_format_it_cannot_write_is_refused_up_front(tmp_path, capsys):
    """iia-accuracy --plot x.txt ran the whole table, then ended in matplotlib's error: the suffix is checked first,
    for the table and the peer report alike, and nothing is written."""
    for argv in (["--plot", str(tmp_path / "x.txt")], ["--peers", "--plot", str(tmp_path / "x.txt")]):
        assert _cli_error(capsys, accuracy_main(argv)) == (
            f"--plot {tmp_path / 'x.txt'}: the plot's format comes from its suffix, one of .png, .pdf, .svg, .jpg")
    assert list(tmp_path.iterdir()) == []
