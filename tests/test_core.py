"""Core: solver programs, the interpreter, calibration, the coefficient artifact, CLI errors."""

import json

import pytest
import torch

from iia.calibration import artifact
from iia.calibration.fit import CalibrationError, CalibrationOptions, calibrate, draw_noise, solve_scaled_ridge
from iia.calibration.evalset import rmse
from iia.calibration.sampling import reference_solution, sample
from iia.calibration.schedules import program_for
from iia.calibration.schedules import karras_sigmas
from iia.models import DenoiserError, from_callable, gaussian_mixture

FAST = dict(batch=40, holdout=32, reference_steps=64)


@pytest.fixture(scope="module")
def gmm():
    return gaussian_mixture(shape=(16,), components=4, seed=3)


def textbook_heun(D, noise, sigmas):
    """EDM's deterministic sampler written the plain way (no churn), float64 states."""
    x = noise.double() * sigmas[0]
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i], sigmas[i + 1]
        d = (x - D(x, t)) / t
        x_next = x + (t_next - t) * d
        if t_next > 0:
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x + (t_next - t) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


def test_edm_program_matches_textbook_heun(gmm):
    noise, _ = draw_noise(gmm, 8, 1)
    program = program_for(gmm, "edm", 9)
    assert program.nfe == 9 and len(program.steps) == 5
    ours = sample(program, gmm, noise)
    ref = textbook_heun(lambda x, s: gmm(x, s), noise, list(program.sigmas))
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)


def test_lemma1_x0_form_equals_heun_average(gmm):
    """Lemma 1: Heun's update equals z + h (z - Dbar)/t with Dbar = D + t/(2 t') (Dt - D)."""
    sig = karras_sigmas(4, 0.002, 80.0)
    t, t2 = float(sig[1]), float(sig[2])
    z = torch.randn(5, 16, dtype=torch.float64) * t
    D = gmm(z, t)
    zt = z + (t2 - t) * (z - D) / t
    Dt = gmm(zt, t2)
    heun = z + (t2 - t) * (0.5 * (z - D) / t + 0.5 * (zt - Dt) / t2)
    dbar = D + t / (2 * t2) * (Dt - D)
    assert torch.allclose(heun, z + (t2 - t) * (z - dbar) / t, atol=1e-12)


@pytest.mark.parametrize("solver,base", [("iia-edm", "edm"), ("biia-edm", "edm"), ("iia-ddim", "ddim")])
def test_base_coefficients_reproduce_base_solver(gmm, solver, base):
    noise, _ = draw_noise(gmm, 6, 2)
    nfe = 9
    a = sample(program_for(gmm, solver, nfe, r=2), gmm, noise)
    b = sample(program_for(gmm, base, nfe), gmm, noise)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_ddim_is_euler_in_x(gmm):
    noise, _ = draw_noise(gmm, 4, 5)
    program = program_for(gmm, "ddim", 6)
    x = noise.double() * program.sigmas[0]
    for t, t_next in zip(program.sigmas[:-1], program.sigmas[1:]):
        x = x + (t_next - t) * (x - gmm(x, t)) / t
    assert torch.allclose(sample(program, gmm, noise), x, atol=1e-12)


def test_least_squares_recovers_planted_coefficients():
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(500, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 1e-3, 50.0])
    planted = torch.tensor([0.7, -3.0, 0.02], dtype=torch.float64)
    anchor = torch.randn(500, generator=gen, dtype=torch.float64)
    target = anchor + basis @ planted
    c = solve_scaled_ridge(basis.T @ basis, basis.T @ (target - anchor), torch.zeros(3, dtype=torch.float64), 0.0)
    assert torch.allclose(c, planted, rtol=1e-8)
    # strong ridge pulls toward the base coefficients
    c_r = solve_scaled_ridge(basis.T @ basis, basis.T @ (target - anchor), torch.ones(3, dtype=torch.float64), 1e6)
    assert torch.allclose(c_r, torch.ones(3, dtype=torch.float64), atol=1e-2)


def test_calibration_improves_iia_edm_at_low_nfe(gmm):
    result = calibrate(gmm, "iia-edm", 5, **FAST)
    assert result.guard["rmse_chosen"] < 0.5 * result.guard["rmse_base"]
    fitted = [s for s in result.steps if s["fitted"]]
    assert fitted and all(s["local_rmse_fitted"] <= s["local_rmse_base"] for s in fitted)
    # fresh noise, not seen by the calibration
    noise, labels = draw_noise(gmm, 64, 999)
    ref = reference_solution(gmm, noise, labels, 128)
    assert rmse(sample(result.program, gmm, noise), ref) < rmse(sample(result.base_program, gmm, noise), ref)


def test_guard_falls_back_when_fit_loses(gmm):
    """Plant coefficients that lose end to end: the guard must return the base solver."""
    from iia.calibration.fit import guard_end_to_end

    base = program_for(gmm, "iia-edm", 9)
    losing = base.with_coefficients(
        [[c * 4.0 for c in s.coefficients] if s.fittable else s.coefficients for s in base.steps])
    chosen, guard = guard_end_to_end(gmm, base, losing, CalibrationOptions(**FAST))
    assert guard["decision"] == "base"
    assert guard["rmse_fitted"] > guard["rmse_base"] == guard["rmse_chosen"]
    assert chosen.coefficients() == base.coefficients()


def test_conditional_calibration_uses_labels():
    cond = gaussian_mixture(shape=(8,), components=3, conditional=True, seed=1)
    result = calibrate(cond, "iia-edm", 5, **FAST)
    assert result.guard["rmse_chosen"] <= result.guard["rmse_base"]
    noise, labels = draw_noise(cond, 10, 0, labels=[2])
    assert labels.tolist() == [2] * 10


def test_artifact_round_trip(gmm, tmp_path):
    result = calibrate(gmm, "biia-edm", 7, **FAST)
    path = tmp_path / "c.json"
    data = artifact.save(result, gmm, 7, path)
    assert data["guard"]["decision"] and data["versions"]["torch"]
    loaded = artifact.load_program(path, gmm, 7, "biia-edm")
    assert loaded.coefficients() == result.program.coefficients()
    noise, _ = draw_noise(gmm, 4, 0)
    assert torch.equal(sample(loaded, gmm, noise), sample(result.program, gmm, noise))


def test_artifact_mismatches_are_clear(gmm, tmp_path):
    result = calibrate(gmm, "iia-edm", 5, **FAST)
    path = tmp_path / "c.json"
    artifact.save(result, gmm, 5, path)
    with pytest.raises(artifact.ArtifactError, match="NFE 5, not 9"):
        artifact.load_program(path, gmm, 9)
    other = gaussian_mixture(shape=(16,), components=4, seed=4)
    with pytest.raises(artifact.ArtifactError, match="calibrated for model"):
        artifact.load_program(path, other, 5)
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(artifact.ArtifactError, match="schema version 99"):
        artifact.load_program(path)
    path.write_text("{not json")
    with pytest.raises(artifact.ArtifactError, match="not readable JSON"):
        artifact.load_program(path)
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(artifact.ArtifactError, match="not an iia coefficient file"):
        artifact.load_program(path)


@pytest.mark.parametrize("solver,nfe,msg", [("edm", 8, "odd NFE"), ("iia-edm", 1, "odd NFE"), ("ddim", 1, "NFE >= 2"),
                                            ("heun3", 9, "unknown solver")])
def test_invalid_nfe_and_solver(gmm, solver, nfe, msg):
    with pytest.raises(ValueError, match=msg):
        program_for(gmm, solver, nfe)


@pytest.mark.parametrize("opts,msg", [({"M": 0}, "M"), ({"r": -1}, "r "), ({"batch": 1}, "batch")])
def test_bad_calibration_options(gmm, opts, msg):
    with pytest.raises(CalibrationError, match=msg):
        calibrate(gmm, "iia-edm", 9, **opts)


def test_misbehaving_denoiser_names_the_sigma_of_the_call():
    def nan_late(x, sigma, labels):
        return torch.where(sigma.reshape(-1, 1) < 1.0, torch.full_like(x, float("nan")), x * 0.5)

    d = from_callable(nan_late, (4,))
    with pytest.raises(DenoiserError, match=r"^denoiser returned NaN/Inf at sigma=0\.\d+$"):
        sample(program_for(d, "edm", 9), d, torch.randn(2, 4))
    wrong = from_callable(lambda x, s, l: x[:, :2], (4,))
    with pytest.raises(DenoiserError, match="shape"):
        sample(program_for(wrong, "edm", 5), wrong, torch.randn(2, 4))


def test_cli_errors_are_one_line(capsys, tmp_path):
    from iia.calibration.cli import calibrate_main

    assert calibrate_main(["gmm", "--nfe", "8"]) == 2
    err = capsys.readouterr().err
    assert "odd NFE" in err and "Traceback" not in err
    assert calibrate_main(["gmm", "--M", "0"]) == 2
    err = capsys.readouterr().err
    assert "--M must lie in [1, 64], got 0" in err and len(err.strip().splitlines()) == 1
    assert calibrate_main([str(tmp_path / "missing.pkl")]) == 2
    assert "not found" in capsys.readouterr().err
    for solver in ("rk45", "edm"):  # unknown, and a base solver (nothing to fit): the flag named
        assert calibrate_main([str(tmp_path / "missing.pkl"), "--solver", solver]) == 2  # before loading the model
        assert f"error: --solver {solver}: iia-calibrate fits an IIA variant: " in capsys.readouterr().err


def test_cli_calibrate_writes_artifact(tmp_path):
    from iia.calibration.cli import calibrate_main

    out = tmp_path / "coef.json"
    assert calibrate_main(["gmm:d=16,components=4", "--nfe", "5", "--batch", "20", "--holdout", "16",
                           "--reference-steps", "32", "--out", str(out)]) == 0
    assert artifact.read(out)["nfe"] == 5


def test_cli_calibrate_default_name_carries_the_model(tmp_path, monkeypatch):
    """Without --out, iia-calibrate writes <model>-<solver>-nfe<N>.json (as iia-compile names its directory), so
    two models calibrated in one folder do not overwrite each other."""
    from pathlib import Path

    from iia.calibration.cli import calibrate_main
    from iia.cli import default_output

    monkeypatch.chdir(tmp_path)
    assert calibrate_main(["gmm:components=4,d=16", "--nfe", "5", "--batch", "20", "--holdout", "16",
                           "--reference-steps", "32"]) == 0
    assert [p.name for p in tmp_path.glob("*.json")] == ["gmm-components4-d16-iia-edm-nfe5.json"]
    assert default_output("/x/edm-cifar10.pkl", "iia-edm", 5, ".json") == Path("edm-cifar10-iia-edm-nfe5.json")
    assert default_output("/x/sd-vae/", "auto", 9) == Path("sd-vae-auto-nfe9")
    assert default_output("gmm:spread=0.5,d=16", "auto", 9) == Path("gmm-spread0.5-d16-auto-nfe9")
    # an existing output is refused before any work (as iia-compile's directory), replaced with --force
    small = ["--nfe", "5", "--batch", "20", "--holdout", "16", "--reference-steps", "32"]
    before = (tmp_path / "gmm-components4-d16-iia-edm-nfe5.json").stat().st_mtime_ns
    assert calibrate_main(["gmm:components=4,d=16"] + small) == 2
    assert (tmp_path / "gmm-components4-d16-iia-edm-nfe5.json").stat().st_mtime_ns == before
    assert calibrate_main(["gmm:components=4,d=16", "--force"] + small) == 0
    assert calibrate_main(["gmm", "--out", ""] + small) == 2  # refused, not the default name
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["gmm-components4-d16-iia-edm-nfe5.json"]


def test_guide_with_a_narrower_noise_range_says_so():
    """--guide narrows the sampler to the noise range both nets cover: a 'changed:' line says it, never silent."""
    from iia.models import gaussian_mixture
    from iia.models.guidance import guided

    net = gaussian_mixture(shape=(4,), components=2)
    same = guided(net, gaussian_mixture(shape=(4,), components=2, seed=1), 1.5)
    assert (same.sigma_min, same.sigma_max) == (0.002, 80.0) and not any("narrowed" in r for r in same.report)
    narrow = guided(net, gaussian_mixture(shape=(4,), components=2, seed=1, sigma_min=0.01, sigma_max=40.0), 1.5)
    assert (narrow.sigma_min, narrow.sigma_max) == (0.01, 40.0)
    assert any("changed: sigma range [0.002, 80] narrowed to [0.01, 40]" in r for r in narrow.report)
