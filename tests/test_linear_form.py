"""The linear-form solvers ('iia-linear-<family>', calibration/solvers.py): each state any combination of the noise
and the denoiser outputs so far, anchored on the family's own state, which the auto search's global fits fit."""

from __future__ import annotations

import json

import pytest
import torch

from iia.calibration import artifact
from iia.calibration.evalset import EvalSet, draw_noise
from iia.calibration.fit import CalibrationError, CalibrationOptions, calibrate
from iia.calibration.sampling import sample
from iia.calibration.schedules import karras_sigmas
from iia.calibration.search import SearchOptions, auto_search, to_calibration_result
from iia.calibration.search_fits import fit_global, global_program
from iia.calibration.solvers import SOLVERS, build_program, linear_name, user_solvers
from iia.compiler.build import CompileOptions, compile_model
from iia.models import gaussian_mixture

ONE_CALL = [n for n, s in SOLVERS.items() if not s.fitted and s.nfe_rule == "one"]


@pytest.fixture(scope="module")
def gmm():
    return gaussian_mixture(shape=(1, 4, 4), components=4, seed=3)


@pytest.mark.parametrize("family", ONE_CALL)
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_base_coefficients_are_the_family(gmm, family, final):
    """With its base coefficients (all 0) the linear form IS the family's sampler, on any schedule."""
    sigmas = karras_sigmas(7, gmm.sigma_min, gmm.sigma_max, 7.0).tolist()
    sigmas = sigmas if final == "zero" else sigmas[:-1]
    sigmas[2] *= 1.3  # not Karras: the anchor follows the schedule it is built on
    noise, _ = draw_noise(gmm, 6, 11)
    linear = build_program(linear_name(family), sigmas)
    assert linear.nfe == build_program(family, sigmas).nfe and all(c == 0.0 for s in linear.coefficients() for c in s)
    a, b = sample(linear, gmm, noise), sample(build_program(family, sigmas), gmm, noise)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), float((a - b).abs().max())


def test_every_state_may_use_every_value_so_far():
    program = build_program("iia-linear-ipndm", karras_sigmas(5, 0.002, 80.0, 7.0).tolist())
    for i, step in enumerate(program.steps):
        assert [label for label, _ in step.basis] == ["noise"] + [f"D{j}" for j in range(i + 1)]


def test_users_cannot_name_them(tmp_path, capsys):
    """Search-only: no local fit exists for them, so neither iia-compile/iia-calibrate nor calibrate() take one."""
    assert not any(n.startswith("iia-linear-") for n in user_solvers())
    with pytest.raises(CalibrationError, match="'iia-linear-ipndm' is fitted only by the auto search"):
        calibrate(gaussian_mixture(shape=(1, 4, 4), components=2), "iia-linear-ipndm", 5)
    from iia.compiler.cli import main as compile_main

    assert compile_main(["gmm", "--nfe", "5", "--solver", "iia-linear-ipndm", "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --solver iia-linear-ipndm:") and "fitted only by the auto search" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
    from iia.calibration.cli import calibrate_main

    assert calibrate_main(["gmm", "--nfe", "5", "--solver", "iia-linear-ipndm", "--out", str(tmp_path / "c.json")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --solver iia-linear-ipndm: a search-only solver") and len(err.splitlines()) == 1
    from iia.evaluation.cli import accuracy_main

    for argv in (["--peers", "--solvers", "iia-linear-ipndm"], ["--solvers", "iia-linear-ipndm"],
                 ["--peers", "lms", "--solvers", "ipndm,nope"]):  # refused before any work (nope was dropped)
        assert accuracy_main(argv + ["--nfe", "6"]) != 0
        out = capsys.readouterr()
        assert out.err.strip().startswith("error: --solvers ") and not out.out and len(out.err.splitlines()) == 1


def test_global_fit_in_the_linear_form_and_its_artifact(gmm, tmp_path):
    """A global fit in the linear form lowers the calibration loss; the search fits its lead in both bases (the
    linear form after the planned fits, and again in each round) and can ship the linear one through the coefficient file (rebuilt from solver, sigmas and coefficients) into an ONNX
    graph that passes parity."""
    sigmas = karras_sigmas(5, gmm.sigma_min, gmm.sigma_max, 7.0).tolist()[:-1]
    noise, _ = draw_noise(gmm, 48, 5)
    calib = EvalSet(gmm, noise, None, 64)
    program = global_program("ipndm", sigmas, SearchOptions(), linear=True)
    assert program.solver == "iia-linear-ipndm"
    assert global_program("ipndm", sigmas, SearchOptions(r=2)).solver == "iia-ipndm"
    fitted, info = fit_global(gmm, program, calib, max_iter=20)
    assert info["loss"] < 0.8 * info["loss_base"]

    cal = CalibrationOptions(holdout=32, reference_steps=32)
    opts = SearchOptions(budget_s=None, batch=48, families=("ipndm",), max_evals=40, max_iter=20, local=False,
                         rounds=2)
    result = auto_search(gmm, 5, opts, cal)
    kinds = [(c.coefficients, c.round, c.program.solver) for c in result.candidates if c.coefficients != "base"]
    assert ("global", 1, "iia-ipndm") in kinds and ("linear", 1, "iia-linear-ipndm") in kinds, kinds
    assert ("global", 2, "iia-ipndm") in kinds and ("linear", 2, "iia-linear-ipndm") in kinds, kinds  # rounds too
    chosen = min((c for c in result.candidates if c.coefficients == "linear"), key=lambda c: c.holdout["rmse"])
    result.chosen, result.program = chosen, chosen.program
    data = artifact.to_dict(to_calibration_result(result, cal, opts, gmm), gmm, 5)
    loaded = artifact.program_from_dict(data, gmm, 5)
    test_noise, _ = draw_noise(gmm, 8, 99)
    assert torch.equal(sample(loaded, gmm, test_noise), sample(chosen.program, gmm, test_noise))
    swapped = dict(data, solver="iia-linear-deis-3")  # the same basis labels: only the search's choice tells
    with pytest.raises(artifact.ArtifactError, match="not the family of the search's choice ipndm/"):
        artifact.program_from_dict(swapped, gmm, 5)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    manifest = compile_model(gmm, tmp_path / "out", CompileOptions(nfe=5, solver="auto", coefficients=str(path),
                                                                 engine=False), log=lambda s: None)
    assert manifest["solver"] == "iia-linear-ipndm" and manifest["parity"]["max_abs"] < 1e-4
