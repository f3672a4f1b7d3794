"""iia-quality: FD-digits / accuracy / RMSE table on the bundled digits model (small n, cheap calibration)."""

import math

import pytest
import torch

from iia.calibration.fit import CalibrationOptions
from iia.evaluation.quality import (GRID_SAMPLES, QUALITY_SAMPLE_SEED, main, quality_noise, quality_table,
                                     sample_chunked)
from iia.calibration.schedules import program_for
from iia.evaluation.quality_figures import grid_image_size

KEYS = {"solver", "nfe", "fd_digits", "rmse", "accuracy", "base_fd_digits", "fd_ratio_to_reference"}


@pytest.fixture(scope="module")
def digits():
    from iia.models.zoo import load_digits_model

    return load_digits_model()


@pytest.fixture(scope="module")
def report(digits, tmp_path_factory):
    torch.set_num_threads(1)
    grids = tmp_path_factory.mktemp("grids")
    options = CalibrationOptions(batch=50, holdout=16, reference_steps=32)
    return quality_table(digits, ["edm", "iia-edm"], [4, 5], n=100, options=options, chunk=40,
                         grids_dir=grids, progress=None)


def test_rows_have_keys_and_finite_values(report):
    rows = report["rows"]
    assert [(r["solver"], r["nfe"]) for r in rows] == [("edm", 5), ("iia-edm", 5), ("reference", 63)]  # NFE 4 skipped
    for r in rows:
        assert KEYS <= r.keys()
        for k in KEYS - {"solver"}:
            assert math.isfinite(r[k]), (r["solver"], k)
        assert r["fd_digits"] >= 0 and 0 <= r["accuracy"] <= 1
    ref = rows[-1]
    assert ref["rmse"] == 0.0 and ref["fd_ratio_to_reference"] == 1.0
    edm, iia = rows[0], rows[1]
    assert edm["base_fd_digits"] == edm["fd_digits"] and iia["base_fd_digits"] == edm["fd_digits"]
    assert iia["fd_ratio_to_reference"] == pytest.approx(iia["fd_digits"] / ref["fd_digits"])
    assert iia["rmse"] < edm["rmse"]  # the fit (or the guard's fallback) never loses to Heun by much
    assert report["metric"].startswith("FD-digits") and "not FID" in report["metric"]


def test_grid_png_written_with_expected_size(report):
    from PIL import Image

    assert len(report["grids"]) == 1 and report["grids"][0].endswith("quality_grid_nfe5.png")
    with Image.open(report["grids"][0]) as im:
        assert im.size == grid_image_size(3, 100)  # edm, iia-edm, reference side by side
    width, height = grid_image_size(3, 100)
    assert height > 10 * 32 and width > 3 * 10 * 32  # 10 x 10 tiles of 8x8 digits upscaled x4


def test_fixed_noise_and_balanced_labels(digits):
    noise, labels = quality_noise(digits, 30)
    again, labels2 = quality_noise(digits, 30)
    assert torch.equal(noise, again) and torch.equal(labels, (QUALITY_SAMPLE_SEED + torch.arange(30)) % 10) and torch.equal(labels, labels2)
    program = program_for(digits, "ddim", 2)
    whole = sample_chunked(program, digits, noise[:12], labels[:12], chunk=12)
    parts = sample_chunked(program, digits, noise[:12], labels[:12], chunk=5)
    assert torch.allclose(whole, parts, atol=1e-5)
    assert GRID_SAMPLES == 100


@pytest.mark.parametrize("argv, text", [
    (["--solvers", "edm,nope", "--n", "10"], "unknown solver 'nope'"),
    (["--solvers", "edm", "--nfe", "4", "--n", "10", "--onnx-check", "0"], "no valid solver/NFE"),
    (["--onnx-check", "8", "--n", "10"], "odd NFE"),
    (["gmm", "--n", "10", "--onnx-check", "0"], "FD-digits"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, text, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and text in err[-1]
    if argv[0] != "gmm":  # (loading a model first prints its description)
        assert len(err) == 1
    assert not any("Traceback" in line for line in err)
