"""One artifact for a RANGE of guidance scales (`--guidance LO:HI`, `--cfg LO:HI`): the scale is a graph input
per image, the sampler's coefficients fitted at nodes of the range and interpolated in g (compiler/scales.py).

Checked on the guided EDM2-format pair (main net + unconditional guide) and on an EDM model trained with label
dropout (classifier-free guidance): ONNX Runtime equals the PyTorch sampler with the same interpolated constants
(rebuilt here from coefficients.json) at scales that are mostly not nodes; at a node it equals the single-scale
artifact fitted there; its held-out error at each tested scale is within 1.1x of the sampler fitted exactly at
that scale and no worse than the base; the weights are stored once; out-of-range scales are refused by the graph.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from edm_fixtures import make_edm2_pickle, make_edm_pickle
from iia.calibration.fit import CalibrationOptions
from iia.calibration.sampling import reference_solution, sample
from iia.calibration.solvers import build_program
from iia.compiler.build import CompileError, CompileOptions, compile_model
from iia.compiler.check import weight_bytes
from iia.compiler.coefficients import obtain_coefficients
from iia.compiler.options import scale_or_range
from iia.compiler.scales import chebyshev_nodes, hat_slopes, scale_table
from iia.models import load
from iia.models.edm_pickle import load_edm_pickle
from iia.models.guidance import GuidanceError, guided
from iia.runtime.contract import GUIDANCE, IMAGES, LABELS, NOISE, draw_labels, draw_noise
from iia.runtime.onnx_backend import OrtSession
from iia.runtime.program import hat_weights

TESTED = [1.0, 1.3, 1.7, 2.2, 2.9]  # the floors' scales: only 1.0 is a node of 1:3 (1, 1.19, 1.69, 2.31, 2.81, 3)
SMALL = dict(batch=32, holdout=32, reference_steps=16)  # a small fit: the checks compare samplers, not quality


def options(cache, **kw) -> CompileOptions:
    return CompileOptions(nfe=5, solver="iia-edm", engine=False, cache_dir=str(cache),
                          calibration=CalibrationOptions(**SMALL), **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("range")
    paths = {"net": root / "edm2-cond.pkl", "guide": root / "edm2-uncond-xs.pkl", "cfg": root / "edm-dropout.pkl"}
    make_edm2_pickle(paths["net"], label_dim=10, seed=0)
    make_edm2_pickle(paths["guide"], label_dim=0, model_channels=4, seed=1)
    make_edm_pickle(paths["cfg"], label_dropout=0.1, channels=8)
    return root, paths


@pytest.fixture(scope="module")
def guide_artifact(models):
    root, paths = models
    out = root / "guided-range"
    manifest = compile_model(str(paths["net"]), out, options(root / "cache", guide=str(paths["guide"]),
                                                             guidance=(1.0, 3.0)), log=lambda s: None)
    return out, manifest, load(paths["net"], guide=paths["guide"], guidance=(1.0, 3.0))


@pytest.fixture(scope="module")
def cfg_artifact(models):
    root, paths = models
    out = root / "cfg-range"
    manifest = compile_model(str(paths["cfg"]), out, options(root / "cache", cfg=(1.0, 3.0)), log=lambda s: None)
    return out, manifest, load(paths["cfg"], cfg=(1.0, 3.0))


def run_graph(out, gs, seed=7) -> tuple[dict, np.ndarray]:
    """The artifact's sampler.onnx on ONNX Runtime CPU: image b at scale gs[b] (the contract's noise/labels)."""
    feed = {NOISE: draw_noise(seed, len(gs), (3, 8, 8)), LABELS: draw_labels(seed, len(gs), 10),
            GUIDANCE: np.array(gs, np.float32)}
    return feed, OrtSession(str(out / "sampler.onnx"), "cpu", 1).run(feed, [IMAGES])[0]


def table_from_file(out):
    """The per-node samplers as coefficients.json records them, stacked as compiler.scales does."""
    data = json.loads((out / "coefficients.json").read_text())
    base = build_program(data["solver"], data["sigmas"], data["r"])
    nodes = data["guidance"]["nodes"]
    return data, scale_table(nodes, [base.with_coefficients(n["coefficients"]) for n in data["nodes"]])


def check_range_artifact(out, manifest, denoiser, cache, params):
    scales = denoiser.guidance_range
    assert manifest["inputs"][-1] == {"name": GUIDANCE, "dtype": "float32", "shape": ["batch"], "range": [1.0, 3.0],
                                      "default": 2.0}
    record = manifest["guidance"]
    assert record["range"] == [1.0, 3.0] and record["default"] == 2.0 and record["interpolation"] == "piecewise-linear"
    assert record["nodes"] == pytest.approx(chebyshev_nodes(1.0, 3.0)) and len(record["guard"]) == len(record["nodes"]) - 1
    data, table = table_from_file(out)
    assert data["guidance"]["nodes"] == record["nodes"] and data["guidance"]["guard"] == record["guard"]
    for row in record["guard"]:  # the guard's own verdict: nothing ships worse than its base
        assert row["rmse_interpolated"] <= row["rmse_base"]

    # ONNX Runtime == PyTorch with the same interpolated constants, per image, at scales mostly between nodes:
    # within 1e-4 of the output's scale (max(1, max |x|), as the compiler's parity check scales it). In absolute
    # terms 1e-5..1e-4 up to g = 2.2; at g = 2.9 the guided net's float32 rounding (ONNX Runtime's kernels vs
    # PyTorch's, amplified by g through the steps) reaches 0.9..1.8e-4 on this fixture
    feed, got = run_graph(out, TESTED)
    for b, g in enumerate(TESTED):
        g32 = float(np.float32(g))
        want = sample(table.program_at(g32), scales.at(g32), torch.from_numpy(feed[NOISE][b:b + 1]),
                      torch.from_numpy(feed[LABELS][b:b + 1])).numpy()
        assert np.abs(got[b:b + 1] - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), g

    # held-out error at each tested scale: <= 1.1x the sampler fitted exactly there, <= the base
    opts = options(cache)
    base = build_program(data["solver"], data["sigmas"], data["r"])
    noise = torch.from_numpy(draw_noise(99, 32, (3, 8, 8))).double()
    labels = torch.from_numpy(draw_labels(99, 32, 10))
    for g in TESTED:
        den = scales.at(g)
        ref = reference_solution(den, noise, labels, 16, sigma_start=base.sigmas[0])
        exact = obtain_coefficients(den, "iia-edm", opts, lambda s: None)[1]
        err = {name: float(((sample(p, den, noise, labels) - ref) ** 2).mean().sqrt())
               for name, p in (("range", table.program_at(g)), ("exact", exact), ("base", base))}
        assert err["range"] <= 1.1 * err["exact"] and err["range"] <= err["base"], (g, err)

    # weights stored once (net + guide, or the one CFG net)
    assert weight_bytes(onnx.load(str(out / "sampler.onnx")))["weights"] <= 1.10 * params
    return table


def test_guide_pair_range_artifact(models, guide_artifact):
    root, paths = models
    out, manifest, denoiser = guide_artifact
    net, guide = load_edm_pickle(paths["net"]), load_edm_pickle(paths["guide"])
    params = sum(p.numel() * 4 for m in (net.net, guide.net) for p in m.parameters())
    check_range_artifact(out, manifest, denoiser, root / "cache", params)
    assert manifest["parity"]["passed"] and set(manifest["parity"]["guidance"]) >= {"1", "1.3", "1.7", "2.2", "2.9", "3"}

    # at a node, the single-scale artifact fitted there with the same options gives the same images
    node = manifest["guidance"]["nodes"][1]
    single = root / "guided-single"
    compile_model(str(paths["net"]), single, options(root / "cache", guide=str(paths["guide"]), guidance=node),
                  log=lambda s: None)
    feed, got = run_graph(out, [node] * 3)
    del feed[GUIDANCE]
    want = OrtSession(str(single / "sampler.onnx"), "cpu", 1).run(feed, [IMAGES])[0]
    assert np.abs(got - want).max() <= 2e-5

    # out-of-range and NaN scales are refused by the graph, naming the check; nothing is clamped
    session = OrtSession(str(out / "sampler.onnx"), "cpu", 1)
    for bad in (3.5, 0.99, float("nan")):
        feed = {NOISE: draw_noise(1, 2, (3, 8, 8)), LABELS: draw_labels(1, 2, 10),
                GUIDANCE: np.array([2.0, bad], np.float32)}
        with pytest.raises(Exception, match="guidance_must_be_in_1_to_3"):
            session.run(feed, [IMAGES])


def test_cfg_range_artifact(models, cfg_artifact):
    root, paths = models
    out, manifest, denoiser = cfg_artifact
    params = sum(p.numel() * 4 for p in load_edm_pickle(paths["cfg"]).net.parameters())
    check_range_artifact(out, manifest, denoiser, root / "cache", params)
    assert manifest["guidance"]["kind"] == "cfg"


def test_unrolled_range_artifact_equals_the_loop_form(models, cfg_artifact):
    """--graph unrolled with a range: each call's combination weights interpolated per image (as the loop form's
    rows are made from them), the same fits (cache); parity passed, the loop form's images, out-of-range refused."""
    root, paths = models
    out, manifest, _ = cfg_artifact
    unrolled = root / "cfg-range-unrolled"
    m = compile_model(str(paths["cfg"]), unrolled, options(root / "cache", cfg=(1.0, 3.0), graph="unrolled"),
                      log=lambda s: None)
    assert m["parity"]["passed"] and m["inputs"][-1] == manifest["inputs"][-1]
    assert json.loads((unrolled / "coefficients.json").read_text())["nodes"] == \
        json.loads((out / "coefficients.json").read_text())["nodes"]
    _, want = run_graph(out, TESTED)
    _, got = run_graph(unrolled, TESTED)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    with pytest.raises(Exception, match="guidance_must_be_in_1_to_3"):
        run_graph(unrolled, [2.0, 3.5])


def test_hat_weights_interpolate_between_nodes():
    nodes = chebyshev_nodes(1.0, 3.0, 4)
    assert nodes == pytest.approx([1.0, 1.5, 2.5, 3.0])
    w = hat_weights([1.0, 1.25, 1.5, 2.9, 3.0], nodes)
    assert np.allclose(w.sum(1), 1) and np.allclose(w[0], [1, 0, 0, 0]) and np.allclose(w[1], [0.5, 0.5, 0, 0])
    assert np.allclose(w[2], [0, 1, 0, 0]) and np.allclose(w[3], [0, 0, 0.2, 0.8]) and np.allclose(w[4], [0, 0, 0, 1])
    # the graph's form (slopes and intercepts) is the same function
    a_l, b_l, a_r, b_r = hat_slopes(nodes)
    g = np.linspace(1.0, 3.0, 41).reshape(-1, 1)
    assert np.allclose(np.clip(np.minimum(a_l * g + b_l, a_r * g + b_r), 0, 1), hat_weights(g, nodes))


def test_range_options_are_parsed_and_checked(models, tmp_path):
    root, paths = models
    assert scale_or_range("1.4", "--guidance") == 1.4 and scale_or_range("1:7.5", "--cfg") == (1.0, 7.5)
    with pytest.raises(Exception, match="--guidance takes a scale"):
        scale_or_range("1:2:3", "--guidance")
    guide = str(paths["guide"])
    refused = [(dict(coefficients=str(tmp_path / "c.json")), "a coefficient file holds one scale")]
    for kw, message in refused:
        opts = CompileOptions(nfe=5, engine=False, guide=guide, guidance=(1.0, 3.0), **{"solver": "iia-edm", **kw})
        with pytest.raises(CompileError, match=message):
            compile_model(str(paths["net"]), tmp_path / "x", opts, log=lambda s: None)
    with pytest.raises(CompileError, match="--guidance-default applies to a range"):
        compile_model(str(paths["net"]), tmp_path / "x", CompileOptions(solver="edm", guidance_default=2.0),
                      log=lambda s: None)
    net, guide_net = load_edm_pickle(paths["net"]), load_edm_pickle(paths["guide"])
    with pytest.raises(GuidanceError, match="a range needs LO < HI"):
        guided(net, guide_net, (3.0, 1.0))
    with pytest.raises(GuidanceError, match="--guidance-default 4 lies outside"):
        guided(net, guide_net, (1.0, 3.0), default=4.0)
    assert guided(net, guide_net, (1.0, 3.0), default=1.5).guidance_range.default == 1.5


def test_tensorrt_profile_covers_the_guidance_input():
    """A range graph's engine profile has the per-image guidance input over the same batch range as the noise
    (TensorRT cannot build an engine whose dynamic input lacks a profile); one-scale graphs have no such input."""
    from iia.runtime.contract import GUIDANCE, NOISE
    from iia.runtime.engine import EnginePlan, denoiser_inputs, sampler_inputs

    shapes = EnginePlan(sampler_inputs((4, 8, 8), conditional=True, guided=True), max_batch=16).profile_shapes()
    assert shapes[GUIDANCE] == ((1,), (8,), (16,)) and shapes[NOISE][2] == (16, 4, 8, 8)
    assert GUIDANCE not in sampler_inputs((4, 8, 8), conditional=True)
    assert GUIDANCE in denoiser_inputs((4, 8, 8), conditional=False, guided=True)


def test_auto_over_a_range_ships_what_the_search_chose_at_the_centre(models, tmp_path):
    """--solver auto with a range and a --budget too short for references: the search at the centre ships its
    prior base unsearched; base coefficients do not depend on g, so every node ships them; the artifact still
    takes `guidance` (the guided denoiser reads it), and the record says what was chosen at which scale and
    how the budget was split."""
    from iia.compiler.scales_search import SEARCH_SHARE

    root, paths = models
    out = tmp_path / "auto-range"
    opts = CompileOptions(nfe=5, solver="auto", budget_s=1.0, engine=False, cache_dir=str(tmp_path / "cache"),
                          cfg=(1.0, 3.0))
    lines = []
    manifest = compile_model(str(paths["cfg"]), out, opts, log=lines.append)
    record = manifest["guidance"]
    assert record["search"]["g"] == 2.0 and record["search"]["coefficients"] == "base"
    assert record["budget"]["total_s"] == 1.0 and record["budget"]["search_s"] == pytest.approx(SEARCH_SHARE * 1.0)
    assert any("the search at g = 2" in line for line in lines)
    data, table = table_from_file(out)
    assert data["guidance"]["search"]["chosen"] == record["search"]["chosen"] == f"{data['solver']}/sigma_min/karras/base"
    assert [row["chosen"] for row in data["search"]["candidates"]] == [True]  # the search's table: the prior alone
    assert all(n["coefficients"] == data["nodes"][0]["coefficients"] for n in data["nodes"])
    assert data["guard"] == {"decision": "not checked: the same constants at every node (nothing interpolated)",
                             "scales": []}  # nothing between nodes to judge: never "no worse" over no scale
    assert manifest["inputs"][-1]["name"] == GUIDANCE and manifest["parity"]["passed"]
    _, got = run_graph(out, [1.0, 3.0], seed=3)
    feed, again = run_graph(out, [3.0, 1.0], seed=3)  # same noise, scales swapped: the outputs follow g
    assert not np.allclose(got[0], again[0], atol=1e-3)


@pytest.mark.parametrize("kind", ["global", "local"])
def test_auto_range_fits_the_chosen_candidate_at_every_node(models, kind):
    """The node stage of --solver auto over a range, given what the search chose (here by hand: EDM on Karras
    steps, global or local coefficients): fitted at every node on the searched time steps within the deadline,
    the guard between nodes leaves nothing worse than the base; a deadline that affords no references ships the
    base coefficients at every node."""
    import time

    from iia.calibration.schedules import program_for
    from iia.compiler.scales import NODES
    from iia.compiler.scales_search import Choice, fit_nodes

    root, paths = models
    denoiser = load(paths["cfg"], cfg=(1.0, 3.0))
    scales, nodes = denoiser.guidance_range, chebyshev_nodes(1.0, 3.0, NODES)
    # a fitted candidate's program is the IIA variant's (base coefficients here: where the search's fit started)
    program = build_program("iia-edm", program_for(scales.at(2.0), "edm", 5, 1, "karras", "zero").sigmas, 1)
    choice = Choice(f"edm/zero/karras/{kind}", "edm", "zero", "karras", kind, program)
    opts = CompileOptions(nfe=5, calibration=CalibrationOptions(batch=8, holdout=8, reference_steps=8))
    started = time.perf_counter()
    programs, fits, rows, plan = fit_nodes(scales, nodes, choice, opts, started + 12.0, lambda s: None)
    assert time.perf_counter() - started <= 12.0 + 5.0  # the guard's scoring may run a little past its estimate
    assert plan["plan"]["calibration_noises"] == 8 and plan["plan"].get("fits", True)
    assert all(p.solver == "iia-edm" and p.sigmas == program.sigmas for p in programs)
    assert len({tuple(map(tuple, p.coefficients())) for p in programs}) > 1  # the constants follow g
    assert len(rows) == NODES - 1 and all(r["rmse_interpolated"] <= r["rmse_base"] for r in rows)
    assert all(f["kind"] == kind for f in fits)

    lines = []
    programs, fits, rows, plan = fit_nodes(scales, nodes, choice, opts, time.perf_counter() + 0.01, lines.append)
    assert plan["plan"]["fits"] is False and rows == [] and "dropped" in plan
    assert all(p.coefficients() == program.coefficients() for p in programs)
    assert all(f["decision"].startswith("base: ") for f in fits)  # recorded as what shipped
    assert any("node fits dropped" in line and "the guard is not needed" in line for line in lines)


def test_a_node_fit_out_of_time_is_recorded_as_base(models):
    """A global fit cut before its first step returns the base constants: recorded as base (not "fitted"), with
    equal held-out errors; the node ships the base program."""
    import time

    from iia.calibration.evalset import evaluation_set
    from iia.calibration.schedules import program_for
    from iia.compiler.scales_search import Choice, NodePlan, fit_at

    root, paths = models
    den = load(paths["cfg"], cfg=(1.0, 3.0)).guidance_range.at(2.0)
    program = build_program("iia-edm", program_for(den, "edm", 5, 1, "karras", "zero").sigmas, 1)
    choice = Choice("edm/zero/karras/global", "edm", "zero", "karras", "global", program)
    plan = NodePlan(8, 8, 8, False, True, 0.0, 0.0)
    sets = {"calib": evaluation_set(den, 8, 0, 8), "hold": evaluation_set(den, 8, 1, 8)}
    shipped, record = fit_at(den, choice, plan, CalibrationOptions(), 5, 1, time.perf_counter() - 1.0, sets)
    assert record["evals"] == 1 and record["rmse_fitted"] == record["rmse_base"]
    assert record["decision"] == "base: the fit stopped before its first step (no time left)"
    assert shipped.coefficients() == program.coefficients()
