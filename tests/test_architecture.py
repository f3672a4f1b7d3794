"""The layout the rest of the code relies on: one import direction, one contract, one noise convention."""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "calibration", "compiler", "runtime", "evaluation")
# What each package may import of iia, besides itself and the top-level `iia` (version, stdlib-only CLI plumbing).
# The contract module is the bottom layer: every package may follow it.
ALLOWED = {
    "models": {"iia.runtime.contract"},
    "calibration": {"iia.models", "iia.runtime.contract", "iia.runtime.program"},
    "compiler": {"iia.models", "iia.calibration", "iia.runtime"},
    "runtime": set(),
    "evaluation": {"iia.models", "iia.calibration", "iia.compiler", "iia.runtime"},
}


def iia_imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute name) for every import of an iia module in `path`: `import iia.x`, `from iia.x import y`
    (as iia.x.y, so `from iia import calibration` is iia.calibration), relative imports resolved, and
    `importlib.import_module("iia...")` / `__import__("iia...")` with a literal name."""
    tree = ast.parse(path.read_text(), str(path))
    parts = ["iia", package, *path.relative_to(ROOT / package).with_suffix("").parts]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "iia"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[:len(parts) - node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "iia":
                found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            name = node.args[0].value
            if func in ("import_module", "__import__") and isinstance(name, str) and name.split(".")[0] == "iia":
                found.append((node.lineno, name))
    return found


def upward_imports() -> list[str]:
    bad = []
    for package in PACKAGES:
        own = f"iia.{package}"
        allowed = ALLOWED[package] | {own}
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in iia_imports(path, package):
                if module in ("iia", "iia.cli") or module.startswith(("iia.cli.", "iia.__")):
                    continue
                if not any(module == a or module.startswith(a + ".") for a in allowed):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


def test_imports_run_one_way():
    assert upward_imports() == []


def test_the_direction_check_catches_an_upward_import(tmp_path, monkeypatch):
    # the checker itself must be able to fail: plant an upward import in a fake tree
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "runtime" / "bad.py").write_text(
        "from iia.calibration.sampling import sample\nfrom .contract import NOISE\nimport iia.cli\n"
        "from iia import calibration\nfrom .. import compiler\nimport importlib\n"
        "importlib.import_module('iia.models.base')\n__import__('iia.evaluation')\nfrom iia import __version__\n")
    (tmp_path / "models" / "ok.py").write_text("from ..runtime.contract import NOISE\nfrom iia.runtime import contract\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert upward_imports() == ["runtime/bad.py:1 imports iia.calibration.sampling.sample",
                                "runtime/bad.py:4 imports iia.calibration", "runtime/bad.py:5 imports iia.compiler",
                                "runtime/bad.py:7 imports iia.models.base", "runtime/bad.py:8 imports iia.evaluation"]


def test_nothing_imports_evaluation():
    users = [f"{p}:{line}" for package in PACKAGES if package != "evaluation"
             for p in sorted((ROOT / package).rglob("*.py")) for line, m in iia_imports(p, package)
             if m == "iia.evaluation" or m.startswith("iia.evaluation.")]
    assert users == []


def test_contract_names_are_defined_once():
    """The graph's tensor names and the manifest's schema are string literals in the contract module only."""
    literals = ['"noise"', '"class_labels"', '"images"', '"images_uint8"', '"iia.artifact"', '"manifest.json"',
                '"sampler.onnx"', '"sampler.plan"', '"denoiser.onnx"', '"denoised"']
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "runtime" / "contract.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if re.search(r"^\s*[A-Z_]+\s*=", code) and any(lit in code for lit in literals):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


# ---- one noise convention ----------------------------------------------------------------------------
def test_image_k_of_seed_s_is_independent_of_the_batch():
    from iia.runtime.contract import draw_labels, draw_noise

    five = draw_noise(7, 5, (1, 4, 4))
    assert five.dtype == np.float32 and five.shape == (5, 1, 4, 4)
    assert np.array_equal(five[3], draw_noise(10, 1, (1, 4, 4))[0])
    assert np.array_equal(draw_labels(7, 5, 10)[3:], draw_labels(10, 2, 10))
    assert draw_labels(7, 5, 10).dtype == np.int64 and list(draw_labels(8, 4, 3)) == [2, 0, 1, 2]
    assert not np.array_equal(five[0], five[1])
    with pytest.raises(ValueError, match="seed"):
        draw_noise(-1, 2, (3,))


def test_same_seed_same_noise_and_images_everywhere(tmp_path):
    """iia-sample, the Python runtime, calibration's noise, the compiler's parity feed and iia-quality's noise
    all follow the contract: the same seed gives the same noise, labels and images."""
    import iia.runtime
    from iia.calibration.fit import draw_noise as calibration_noise
    from iia.compiler.build import CompileOptions, compile_model
    from iia.compiler.check import parity_feed
    from iia.evaluation.quality import quality_noise
    from iia.models import gaussian_mixture, load
    from iia.runtime.cli import sample_main
    from iia.runtime.contract import LABELS, NOISE, draw_labels, draw_noise

    d = gaussian_mixture(shape=(1, 4, 4), components=3, conditional=True)
    art = tmp_path / "art"
    compile_model(d, art, CompileOptions(nfe=3, solver="edm", engine=False, max_batch=4), log=lambda *_: None)
    seed, n = 11, 6
    expected = draw_noise(seed, n, d.shape)
    # iia-sample (chunks of max_batch 4) and the runtime
    assert sample_main([str(art), "--n", str(n), "--seed", str(seed), "--out", str(tmp_path / "g.png")]) == 0
    saved = np.load(tmp_path / "g.npz")
    assert np.array_equal(saved["noise"], expected)
    sampler = iia.runtime.load(art)
    labels = saved["labels"]
    direct = sampler.sample(seed=seed, batch_size=4, class_labels=labels[:4])
    assert np.array_equal(direct.noise, expected[:4]) and np.array_equal(direct.images, saved["images"][:4])
    # calibration and the compiler's parity check
    noise64, cal_labels = calibration_noise(d, n, seed)
    assert noise64.dtype == torch.float64 and np.array_equal(noise64.numpy().astype(np.float32), expected)
    assert np.array_equal(cal_labels.numpy(), draw_labels(seed, n, d.label_dim))
    feed = parity_feed(d, n, seed)
    assert np.array_equal(feed[NOISE], expected) and np.array_equal(feed[LABELS], cal_labels.numpy())
    # iia-quality's noise and default labels are iia-sample's
    digits = load("digits")
    q_noise, q_labels = quality_noise(digits, n, seed)
    assert np.array_equal(q_noise.numpy().astype(np.float32), draw_noise(seed, n, (1, 8, 8)))
    assert np.array_equal(q_labels.numpy(), (seed + np.arange(n)) % 10)
    assert np.array_equal(labels, draw_labels(seed, n, d.label_dim))  # iia-sample's default labels


# ---- coefficient files are tied to the solver definition ------------------------------------------------------
def test_coefficient_file_with_other_basis_labels_is_refused(tmp_path):
    from iia.calibration import artifact
    from iia.calibration.fit import CalibrationResult, CalibrationOptions
    from iia.calibration.schedules import program_for
    from iia.models import gaussian_mixture
    from iia.runtime.contract import ArtifactError

    d = gaussian_mixture(shape=(4,), components=2)
    base = program_for(d, "iia-edm", 5)
    data = artifact.to_dict(CalibrationResult(base, base, base, CalibrationOptions()), d, 5)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    assert artifact.load_program(path, d, 5, "iia-edm").coefficients() == base.coefficients()
    swapped = json.loads(json.dumps(data))
    labels = swapped["steps"][1]["basis"]
    swapped["steps"][1]["basis"] = labels[::-1]
    path.write_text(json.dumps(swapped))
    with pytest.raises(ArtifactError, match=re.escape(f"basis {labels[::-1]}, solver iia-edm defines {labels}")):
        artifact.load_program(path, d, 5, "iia-edm")
    old = dict(data, solver_definition=1)
    path.write_text(json.dumps(old))
    with pytest.raises(ArtifactError, match="solver definition 1"):
        artifact.load_program(path, d, 5, "iia-edm")


def test_tampered_coefficient_files_are_refused_by_name(tmp_path):
    from iia.calibration import artifact
    from iia.calibration.fit import CalibrationOptions, CalibrationResult
    from iia.calibration.schedules import program_for
    from iia.models import gaussian_mixture
    from iia.runtime.contract import ArtifactError

    d = gaussian_mixture(shape=(4,), components=2)
    base = program_for(d, "iia-edm", 9)
    data = artifact.to_dict(CalibrationResult(base, base, base, CalibrationOptions()), d, 9)

    def refused(mutate, match):
        bad = json.loads(json.dumps(data))
        mutate(bad)
        with pytest.raises(ArtifactError, match=match):
            artifact.program_from_dict(bad, d, 9, "iia-edm", source="c.json")

    refused(lambda b: b["steps"].__setitem__(slice(1, 3), b["steps"][2:0:-1]), "steps reordered or edited")
    refused(lambda b: b.__setitem__("sigmas", sorted(b["sigmas"])), "strictly decreasing")
    refused(lambda b: b["sigmas"].__setitem__(0, 5000.0), "above the model's sigma_max")
    refused(lambda b: b.pop("nfe"), "c.json lacks field 'nfe'")
    refused(lambda b: b.__setitem__("model", None), "c.json is inconsistent")
    refused(lambda b: b["steps"][1]["coefficients"].__setitem__(0, 1e300), "absurd")
    refused(lambda b: b["steps"][1]["coefficients"].__setitem__(0, float("nan")), "non-finite")


def test_compile_refuses_calibration_flags_with_coefficients(tmp_path, capsys):
    from iia.calibration import artifact
    from iia.calibration.fit import CalibrationOptions, CalibrationResult
    from iia.calibration.schedules import program_for
    from iia.compiler.cli import main
    from iia.models import load

    d = load("gmm:d=4,components=2")
    base = program_for(d, "iia-edm", 5)
    path = tmp_path / "c.json"
    artifact.save(CalibrationResult(base, base, base, CalibrationOptions()), d, 5, path)
    assert main(["gmm:d=4,components=2", "--nfe", "5", "--coefficients", str(path), "--M", "5", "--no-engine",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--M does not apply" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, match", [
    (["--solver", "edm", "--M", "9", "--r", "3"], "--solver edm is a base solver and fits nothing: --M, --r do not apply"),
    (["--solver", "ddim", "--calib-batch", "7", "--seed", "4"], "--calib-batch, --seed do not apply"),
    (["--solver", "iia-edm", "--budget", "60"], "--budget bounds the --solver auto search"),
    (["--schedule", "exponential"], "--schedule exponential does not apply to --solver auto"),
    # a flag typed at its default value is refused all the same (it was given, and would be ignored)
    (["--solver", "edm", "--seed", "0"], "--solver edm is a base solver and fits nothing: --seed does not apply"),
    (["--solver", "iia-edm", "--budget", "180"], "--budget bounds the --solver auto search"),
    (["--schedule", "default"], "--schedule default does not apply to --solver auto"),
    (["--solver", "edm", "--precision", "fp16"], "--precision fp16 sets the TensorRT engine's precision; --no-engine"),
    (["--solver", "edm", "--static-batch", "1,,3"], "--static-batch must be comma-separated batch sizes, got '1,,3'"),
    (["--solver", "edm", "--static-batch", " "], "--static-batch ' ' gives no batch sizes"),
    (["--solver", "edm", "--static-batch", "8,1,8"], "--static-batch gives 8 more than once ('8,1,8')"),
])
def test_compile_refuses_flags_the_chosen_path_ignores(tmp_path, capsys, argv, match):
    """A flag the chosen solver would not use is refused by name before anything is computed or written."""
    from iia.compiler.cli import main

    assert main(["gmm:d=4,components=2", "--nfe", "5", "--no-engine", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_base_solver_keeps_its_schedule_flag(tmp_path):
    from iia.compiler.build import CompileError, CompileOptions, refuse_unused_options
    from iia.calibration.fit import CalibrationOptions

    refuse_unused_options(CompileOptions(solver="edm", calibration=CalibrationOptions(schedule="exponential")))
    with pytest.raises(CompileError, match="--schedule karras does not apply to --solver auto"):
        refuse_unused_options(CompileOptions(solver="auto", calibration=CalibrationOptions(schedule="karras")))


def test_base_solver_coefficients_must_be_its_own(tmp_path):
    from iia.calibration import artifact
    from iia.calibration.fit import CalibrationOptions, CalibrationResult
    from iia.calibration.schedules import program_for
    from iia.models import gaussian_mixture
    from iia.runtime.contract import ArtifactError

    d = gaussian_mixture(shape=(4,), components=2)
    base = program_for(d, "edm", 5)
    data = artifact.to_dict(CalibrationResult(base, base, base, CalibrationOptions()), d, 5)
    assert artifact.program_from_dict(data, d, 5, "edm").coefficients() == base.coefficients()
    data["steps"][0]["coefficients"][0] = 5.0
    with pytest.raises(ArtifactError, match="solver edm fits nothing, but step 0 holds"):
        artifact.program_from_dict(data, d, 5, "edm")


def test_symlink_loop_and_nan_manifest_are_artifact_errors(tmp_path):
    from iia.runtime.contract import ArtifactError, parse_json, read_regular, write_json_atomic

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(ArtifactError, match="Too many levels of symbolic links"):
        read_regular(loop, 100)
    with pytest.raises(ArtifactError, match="NaN is not a JSON number"):
        parse_json(b'{"sigma_max": NaN}', "m.json")
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "x.json", {"a": float("nan")})
    assert not (tmp_path / "x.json").exists()


def test_program_plan_nfe_and_values_checked():
    from iia.runtime.contract import ArtifactError
    from iia.runtime.program import PROGRAM_SCHEMA, PROGRAM_VERSION, check_program, check_program_nfe, from_json

    def plan(ops):
        return {"schema": PROGRAM_SCHEMA, "schema_version": PROGRAM_VERSION, "input": "noise", "ops": ops,
                "output": ops[-1]["out"]}

    ok = plan([{"op": "combine", "out": "z0", "terms": [["noise", 80.0]]},
               {"op": "denoise", "out": "D0", "state": "z0", "sigma": 80.0},
               {"op": "combine", "out": "z1", "terms": [["D0", 1.0]]}])
    check_program(ok, "p.json")
    check_program_nfe(from_json(json.dumps(ok).encode(), "p.json"), {"nfe": 1}, "p.json")
    with pytest.raises(ArtifactError, match="makes 1 denoiser calls, the manifest's NFE is 2"):
        check_program_nfe(from_json(json.dumps(ok).encode(), "p.json"), {"nfe": 2}, "p.json")
    bad = json.loads(json.dumps(ok))
    bad["ops"][2]["terms"][0][1] = float("nan")
    with pytest.raises(ArtifactError, match="finite weight"):
        check_program(bad, "p.json")
    bad["ops"][2]["terms"][0] = [["D0"], 1.0]
    with pytest.raises(ArtifactError, match="finite weight"):
        check_program(bad, "p.json")
    bad = json.loads(json.dumps(ok))
    bad["ops"][1]["sigma"] = 1e308
    with pytest.raises(ArtifactError, match="finite number > 0"):
        check_program(bad, "p.json")


def test_unguarded_coefficients_ship_with_a_warning_and_say_so(tmp_path):
    """iia-calibrate --no-guard is the user's choice; compiling its file ships the fit but never silently."""
    from iia.calibration import artifact
    from iia.calibration.fit import CalibrationOptions, calibrate
    from iia.compiler.build import UNGUARDED, CompileOptions, compile_model
    from iia.models import load

    d = load("gmm:d=4,components=2")
    result = calibrate(d, "iia-edm", 5, CalibrationOptions(batch=16, guard=False))
    assert result.guard == {} and result.program.coefficients() != result.base_program.coefficients()
    # What is under test is how an UNGUARDED file ships, not how well a 16-noise least-squares fit is
    # conditioned (that depends on the machine's floating-point path: CI refused it as unstable in float32).
    # So the file carries the base coefficients nudged by 1%: unguarded, changed, and stable by construction.
    nudged = [[c * 1.01 for c in step] for step in result.base_program.coefficients()]
    result.program = result.fitted_program = result.base_program.with_coefficients(nudged)
    path = tmp_path / "c.json"
    artifact.save(result, d, 5, path)
    lines = []
    manifest = compile_model(d, tmp_path / "o", CompileOptions(nfe=5, solver="iia-edm", coefficients=str(path),
                                                               engine=False), log=lines.append)
    assert any("--no-guard" in line and UNGUARDED in line for line in lines)
    assert manifest["guard"] == {"decision": UNGUARDED}
    # a guarded file is not flagged
    guarded = calibrate(d, "iia-edm", 5, CalibrationOptions(batch=16, holdout=16, reference_steps=32))
    artifact.save(guarded, d, 5, tmp_path / "g.json")
    lines = []
    manifest = compile_model(d, tmp_path / "o2", CompileOptions(nfe=5, solver="iia-edm", coefficients=str(tmp_path / "g.json"),
                                                                engine=False), log=lines.append)
    assert not any(UNGUARDED in line for line in lines) and manifest["guard"]["decision"]


@pytest.mark.parametrize("which, argv, match", [
    ("accuracy", ["--solvers", "edm", "--budget", "5"], "--budget applies with --peers only"),
    ("accuracy", ["--solvers", "edm", "--fd"], "--fd applies with --peers only"),
    ("accuracy", ["--solvers", "edm,ddim", "--M", "3"], "--solvers edm,ddim fits nothing: --M does not apply"),
    ("calibrate", ["gmm", "--no-guard", "--holdout", "10"], "--no-guard runs no held-out guard: --holdout does not apply"),
])
def test_other_clis_refuse_flags_they_would_ignore(capsys, which, argv, match):
    from iia.calibration.cli import calibrate_main
    from iia.evaluation.cli import accuracy_main

    assert {"accuracy": accuracy_main, "calibrate": calibrate_main}[which](argv) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


# ---- one program, one executor (issue 23) --------------------------------------------------------------
def test_step_execution_liveness_and_program_json_are_defined_once():
    """The executor, liveness and program.json's writer/reader (module-level functions) live in runtime/program.py
    only (Triton's `TritonPythonModel.execute` is another thing); the PyTorch
    interpreter, the IIA fit, the search and the runtime's loop call that executor."""
    # (`reads` of a program op; compiler/graph.py's `reads(nodes)` of ONNX nodes is another thing)
    defs = re.compile(r"^def (execute|advance|run_program|run_calls|finish_step|live_after|last_reads|live_values|"
                      r"to_json|from_json|program_document|program_plan|check_program|read_program|linear_form)\(|"
                      r"^def (_?reads)\(op\b")
    found: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                m = defs.match(line)
                if m:
                    found.setdefault(m.group(1) or m.group(2), []).append(f"{path.relative_to(ROOT)}:{n}")
    program = "runtime/program.py"
    # emit.linear_form is a thin wrapper naming its error EmitError; everything else is defined once, at the bottom
    assert {name: [w for w in where if not w.startswith("compiler/emit.py")] for name, where in found.items()} == {
        name: [w for w in where if w.startswith(program)] for name, where in found.items()}
    for name in ("execute", "last_reads", "reads", "to_json", "from_json", "linear_form"):
        assert len([w for w in found[name] if w.startswith(program)]) == 1, name
    assert "return program_linear_form(program.plan())" in (ROOT / "compiler" / "emit.py").read_text()
    for caller in ("calibration/sampling.py", "calibration/fit.py", "calibration/search_fits.py", "runtime/loop.py"):
        assert re.search(r"\bexecute\(", (ROOT / caller).read_text()), caller


def test_a_rounding_model_reads_back_its_own_karras_schedule(tmp_path):
    """A model that rounds its sigmas (iDDPM's table) starts its Karras base at sigma_max rounded up (80.2037 for
    80): coefficient files it wrote were refused as 'above the model's sigma_max', so its cached coefficients were
    dropped at every compile; a schedule above the rounded start is still refused."""
    from iia.calibration import artifact
    from iia.calibration.fit import CalibrationOptions, CalibrationResult
    from iia.calibration.schedules import program_for
    from iia.models import from_callable
    from iia.runtime.contract import ArtifactError

    table = torch.cat([torch.logspace(math.log10(0.002), math.log10(79.0), 400, dtype=torch.float64),
                       torch.tensor([80.2037], dtype=torch.float64)])

    def nearest(sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return table[(sigma.reshape(-1, 1) - table).abs().argmin(dim=1)].reshape(sigma.shape)

    d = from_callable(lambda x, s, l: x / (1 + s.reshape(-1, 1) ** 2), (4,), round_sigma=nearest)
    base = program_for(d, "ipndm", 5)
    data = artifact.to_dict(CalibrationResult(base, base, base, CalibrationOptions()), d, 5)
    data["sigmas"][0] = 80.2037
    assert artifact.program_from_dict(json.loads(json.dumps(data)), d, 5, "ipndm", source="c.json").sigmas[0] == 80.2037
    data["sigmas"][0] = 81.0
    with pytest.raises(ArtifactError, match="above the model's sigma_max 80.2037"):
        artifact.program_from_dict(data, d, 5, "ipndm", source="c.json")
