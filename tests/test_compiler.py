"""Compiler: one ONNX graph per sampler, parity with PyTorch, weight sharing, atomicity, TensorRT plan."""

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edm_fixtures import make_edm_pickle
from iia.calibration.fit import CalibrationOptions
from iia.calibration.sampling import sample
from iia.calibration.schedules import program_for
from iia.calibration.solvers import Denoise
from iia.compiler.build import CompileError, CompileOptions, compile_model
from iia.compiler.check import CheckError, check_weight_sharing
from iia.compiler.emit import emit_sampler
from iia.compiler.fold import FoldPlan, conditioning_nodes, plan_folding
from iia.runtime.contract import tensorrt_unavailable_reason
from iia.runtime.engine import EnginePlan, EngineUnavailable, build_engine, sampler_inputs
from iia.compiler.export import export_denoiser
from iia.models import gaussian_mixture, load

FAST = CalibrationOptions(batch=20, holdout=16, reference_steps=32)


def options(**kw):
    from iia.calibration.solvers import get_solver

    solver = kw.setdefault("solver", "iia-edm")  # these tests compile one fitted solver unless they name another
    # a base solver fits nothing and a coefficient file fixes the fit: their calibration flags are refused
    if not kw.get("coefficients") and (solver == "auto" or get_solver(solver).fitted):
        kw.setdefault("calibration", CalibrationOptions(**vars(FAST)))
    return CompileOptions(**kw)


@pytest.fixture(scope="module")
def edm_pkl(tmp_path_factory):
    path = tmp_path_factory.mktemp("edm") / "edm-cond.pkl"
    make_edm_pickle(path, kind="edm-cond")
    return path


def folded(program, dm, label_dim=0):
    """The fold plan build.py makes for `program` on the exported denoiser `dm`."""
    return plan_folding(dm, [op.sigma for op in program.ops() if isinstance(op, Denoise)], label_dim)


def run_sampler(path, noise, labels=None):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"noise": noise.astype(np.float32)}
    if labels is not None:
        feed["class_labels"] = labels.astype(np.int64)
    return sess.run(None, feed)


def test_compile_analytic_model_end_to_end(tmp_path):
    d = gaussian_mixture(shape=(1, 4, 4), components=3, seed=2)
    out = tmp_path / "outputs" / "art"  # a parent named like a golden file must not confuse the writer
    manifest = compile_model(d, out, options(nfe=9), log=lambda s: None)
    names = {p.name for p in out.iterdir()}
    assert {"sampler.onnx", "coefficients.json", "manifest.json", "golden_inputs.json", "golden_outputs.json"} <= names
    assert "denoiser.onnx" not in names  # the weights once: only --with-denoiser writes it (tests/test_memory.py)
    assert manifest["parity"]["max_abs"] <= 1e-4 and manifest["weights"]["ratio"] <= 1.10
    assert manifest["engine"]["built"] is False and manifest["engine"]["reason"]
    model = onnx.load(out / "sampler.onnx")
    assert [i.name for i in model.graph.input] == ["noise"]
    assert [o.name for o in model.graph.output] == ["images", "images_uint8"]
    # the graph IS the sampler: same noise, same result as the PyTorch interpreter, at another batch size
    from iia.calibration.artifact import load_program

    program = load_program(out / "coefficients.json", d, 9)
    noise = np.random.default_rng(7).standard_normal((3, 1, 4, 4))
    images, images_u8 = run_sampler(out / "sampler.onnx", noise)
    ref = sample(program, d, torch.from_numpy(noise)).numpy()
    assert np.abs(images - ref).max() < 1e-4
    expected_u8 = np.clip(ref * 127.5 + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.abs(images_u8.astype(int) - expected_u8.astype(int)).max() <= 1
    # the default loop form: ONE denoiser copy (its weights stored once) in a Loop of exactly NFE iterations
    assert manifest["graph"] == "loop"
    loop = next(n for n in model.graph.node if n.op_type == "Loop")
    trip = next(t for t in model.graph.initializer if t.name == loop.input[0])
    assert onnx.numpy_helper.to_array(trip) == 9
    assert sum(n.op_type == "Softmax" for n in loop.attribute[0].g.node) == 1


def test_compile_edm_pickle_conditional(tmp_path, edm_pkl):
    out = tmp_path / "edm"
    manifest = compile_model(str(edm_pkl), out, options(nfe=9, solver="iia-edm"), log=lambda s: None)
    assert manifest["model"]["sha256"] and manifest["model"]["label_dim"] == 10
    assert manifest["parity"]["max_abs"] <= 1e-4
    assert manifest["weights"]["ratio"] <= 1.10
    # + the per-(step, label) tables of folded conditioning values, at most the weights' size (fold.table_budget)
    assert manifest["weights"]["ratio_total_vs_params"] <= 2.10
    d = load(edm_pkl)
    from iia.calibration.artifact import load_program

    program = load_program(out / "coefficients.json", d, 9)
    rng = np.random.default_rng(3)
    noise, labels = rng.standard_normal((2, *d.shape)), np.array([1, 7])
    images, _ = run_sampler(out / "sampler.onnx", noise, labels)
    ref = sample(program, d, torch.from_numpy(noise), torch.from_numpy(labels)).numpy()
    assert np.abs(images - ref).max() < 1e-4


def test_weight_sharing_at_nfe_35_and_duplicate_detection():
    d = gaussian_mixture(shape=(1, 4, 4), components=3)
    dm = export_denoiser(d)
    program = program_for(d, "edm", 35)
    model = emit_sampler(program, dm, d.shape, False, plan=folded(program, dm))
    from iia.compiler.emit import initializer_bytes

    report = check_weight_sharing(model, initializer_bytes(dm), d.param_bytes())
    assert report["ratio"] <= 1.10
    # deliberately duplicate a weight at one call site: the check must catch it
    means = next(t for t in model.graph.initializer if t.name == "means")
    dup = onnx.TensorProto()
    dup.CopyFrom(means)
    dup.name = "means_copy"
    model.graph.initializer.append(dup)
    for node in model.graph.node:
        if node.name.startswith("call3/"):
            node.input[:] = ["means_copy" if n == "means" else n for n in node.input]
    with pytest.raises(CheckError, match="weight sharing violated"):
        check_weight_sharing(model, initializer_bytes(dm), d.param_bytes())


@pytest.mark.parametrize("stage", ["coefficients", "emit"])
def test_failure_mid_write_leaves_no_directory(tmp_path, stage):
    d = gaussian_mixture(shape=(4,), components=2)
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="injected"):
        compile_model(d, out, options(nfe=5, solver="edm"), log=lambda s: None, _fail_after=stage)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_write_nothing(tmp_path, edm_pkl):
    d = gaussian_mixture(shape=(4,), components=2)
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(CompileError, match="exists: pass --force"):
        compile_model(d, out, options(nfe=5), log=lambda s: None)
    (out / "client.py").write_text("mine")  # a file or a folder of the user's: --force would refuse it, so no hint
    for target in (out / "client.py", out):
        for force in (False, True):
            with pytest.raises(CompileError, match="--force replaces only an iia artifact") as err:
                compile_model(d, target, options(nfe=5, force=force), log=lambda s: None)
            assert "pass --force" not in str(err.value)
    (out / "client.py").unlink()
    with pytest.raises(ValueError, match=r"^--solver rk45: unknown solver 'rk45': .*, or auto"):
        compile_model(d, tmp_path / "a", CompileOptions(nfe=5, solver="rk45"), log=lambda s: None)
    with pytest.raises(ValueError, match="odd NFE"):
        compile_model(d, tmp_path / "b", options(nfe=8), log=lambda s: None)
    with pytest.raises(ValueError, match="not found"):
        compile_model(str(tmp_path / "nope.pkl"), tmp_path / "c", options(nfe=5), log=lambda s: None)
    # coefficients from another NFE and from another model
    first = tmp_path / "first"
    compile_model(d, first, options(nfe=5), log=lambda s: None)
    with pytest.raises(ValueError, match="NFE 5, not --nfe 7: give --nfe 5"):
        compile_model(d, tmp_path / "d", options(nfe=7, coefficients=str(first / "coefficients.json")),
                      log=lambda s: None)
    with pytest.raises(ValueError, match="calibrated for model"):
        compile_model(str(edm_pkl), tmp_path / "e", options(nfe=5, coefficients=str(first / "coefficients.json")),
                      log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "first"]


def test_fp16_without_engine_builder_says_so_and_continues(tmp_path):
    d = gaussian_mixture(shape=(4,), components=2)
    lines = []
    manifest = compile_model(d, tmp_path / "x", options(nfe=3, solver="edm", precision="fp16"), log=lines.append)
    assert any("--precision fp16" in line and "fp32" in line for line in lines)
    assert manifest["engine"]["built"] is False


def test_tensorrt_path_skips_with_reason_here(tmp_path):
    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a CUDA device are present: the engine is built by the compile tests")
    assert "CUDA" in reason or "tensorrt" in reason
    with pytest.raises(EngineUnavailable):
        build_engine(str(tmp_path / "missing.onnx"), EnginePlan(), str(tmp_path / "x.plan"))


def test_engine_plan_profiles_and_precisions():
    plan = EnginePlan(sampler_inputs((3, 8, 8), conditional=True), precision="fp16", opt_batch=8, max_batch=32,
                      fp32_layers=["call0/GroupNorm"], timing_cache="/tmp/t.cache")
    shapes = plan.profile_shapes()
    assert shapes["noise"] == ((1, 3, 8, 8), (8, 3, 8, 8), (32, 3, 8, 8))
    assert shapes["class_labels"] == ((1,), (8,), (32,))
    kw = plan.config_kwargs()
    assert kw["fp16"] and not kw["bf16"] and kw["precision_constraints"] == "obey"
    assert kw["load_timing_cache"] == "/tmp/t.cache"
    assert EnginePlan(precision="bf16").config_kwargs()["bf16"]
    with pytest.raises(ValueError, match="precision"):
        EnginePlan(precision="int3")
    with pytest.raises(ValueError, match="batch"):
        EnginePlan(opt_batch=100, max_batch=64)


def test_edm_heun_matches_edm_sampler_definition(edm_pkl):
    """EDM's published deterministic sampler: Karras rho=7 on the clamped range, round_sigma, float64 states."""
    d = load(edm_pkl)
    net = d.net
    num_steps = 5
    sigma_min, sigma_max = max(0.002, d.sigma_min), min(80.0, d.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / 7) + i / (num_steps - 1) * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
    t = torch.cat([d.round_sigma(t), torch.zeros(1, dtype=torch.float64)])
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(3, *d.shape, generator=gen)
    labels = torch.tensor([0, 4, 9])

    def D(x, s):
        return net(x.to(torch.float32), torch.full((x.shape[0],), float(s)), labels).to(torch.float64)

    x = latents.to(torch.float64) * t[0]
    for k in range(num_steps):
        t_cur, t_next = t[k], t[k + 1]
        d_cur = (x - D(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if k < num_steps - 1:
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * (x_next - D(x_next, t_next)) / t_next)
        x = x_next
    ours = sample(program_for(d, "edm", 2 * num_steps - 1), d, latents, labels)
    assert (ours - x).abs().max() < 1e-4


def test_cli_calibrate_and_compile_on_edm_pickle(tmp_path, edm_pkl, capsys):
    from iia.calibration.cli import calibrate_main
    from iia.compiler.cli import main as compile_main

    coef = tmp_path / "c.json"
    assert calibrate_main([str(edm_pkl), "--nfe", "5", "--batch", "20", "--holdout", "8", "--reference-steps",
                           "16", "--out", str(coef)]) == 0
    assert "sha256" in capsys.readouterr().err
    assert compile_main([str(edm_pkl), "--nfe", "5", "--coefficients", str(coef), "--out", str(tmp_path / "o"),
                         "--no-engine"]) == 0
    # the bound that applied, and why
    assert re.search(r"vs PyTorch: max abs \S+ \(tolerance \S+: (the absolute bound|10x this sampler's float32 "
                     r"floor \S+)\)", capsys.readouterr().err)
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["engine"]["reason"] == "--no-engine given"
    assert compile_main([str(edm_pkl), "--nfe", "5", "--out", str(tmp_path / "o")]) == 2
    assert "exists" in capsys.readouterr().err
    assert compile_main([str(edm_pkl), "--nfe", "5", "--out", ""]) == 2  # '.' refused, not the default name
    assert "--out '': empty, expected a new artifact directory" in capsys.readouterr().err
    assert compile_main([str(edm_pkl), "--nfe", "5", "--out", "-"]) == 2  # not a folder named '-'
    assert "--out -: writing to standard output is not supported" in capsys.readouterr().err
    # a new artifact nested in an existing one: refused before any work, nothing made there
    nested = tmp_path / "o" / "sub" / "x"
    assert compile_main([str(edm_pkl), "--nfe", "5", "--out", str(nested), "--no-engine"]) == 2
    assert f"is inside the iia artifact {tmp_path / 'o'}" in capsys.readouterr().err
    assert not (tmp_path / "o" / "sub").exists()


def test_sigma_only_subgraph_is_folded_without_duplicating_weights(edm_pkl):
    """Noise embeddings per call site become constants; the result is unchanged and weights stay shared."""
    from iia.compiler.emit import initializer_bytes

    d = load(edm_pkl)
    dm = export_denoiser(d)
    nodes, boundary = conditioning_nodes(dm.graph)  # sigma the only source
    assert nodes and boundary
    program = program_for(d, "iia-edm", 9)
    sampler = emit_sampler(program, dm, d.shape, True, plan=folded(program, dm))
    plain = emit_sampler(program, dm, d.shape, True, plan=FoldPlan())
    # each call site loses its sigma-only nodes and gains at most a Concat + Expand per boundary value
    assert len(sampler.graph.node) <= len(plain.graph.node) - 9 * (len(nodes) - 2 * len(boundary))
    assert not any(n.op_type in ("Sin", "Cos") for n in sampler.graph.node)  # the positional embedding is folded
    assert check_weight_sharing(sampler, initializer_bytes(dm), d.param_bytes())["ratio"] <= 1.10
    rng = np.random.default_rng(0)
    noise, labels = rng.standard_normal((3, *d.shape)), np.array([0, 5, 9])
    a = run_sampler_model(sampler, noise, labels)
    b = run_sampler_model(plain, noise, labels)
    # the folded graph's rewrites (BatchNormalization, ConvTranspose) re-associate float32 sums: last bits only
    assert np.abs(a - b).max() < 3e-5 * max(1.0, np.abs(b).max())


def run_sampler_model(model, noise, labels):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["images"], {"noise": noise.astype(np.float32), "class_labels": labels.astype(np.int64)})[0]


def test_parity_mismatch_is_the_samplers_in_one_line(tmp_path, edm_pkl, capsys):
    """A graph that is not the checked program fails as a sampler mismatch (not as the decode stage's uint8
    images, checked after it), and polygraphy prints no report of its own around the one-line error."""
    from iia.compiler.check import check_parity
    from iia.compiler.export import export_decoder

    d = load(edm_pkl)
    program, dm = program_for(d, "edm", 9), export_denoiser(d)
    graph = emit_sampler(program, dm, d.shape, True, decoder_model=export_decoder(d), label_dim=d.label_dim,
                         plan=folded(program, dm, d.label_dim))
    onnx.save(graph, str(tmp_path / "sampler.onnx"))
    capsys.readouterr()
    with pytest.raises(CheckError, match="output differs from the PyTorch sampler"):
        check_parity(str(tmp_path / "sampler.onnx"), program_for(d, "edm", 5), d, decode=True)
    out = capsys.readouterr()
    assert "[E]" not in out.out + out.err and "[W]" not in out.out + out.err
    assert check_parity(str(tmp_path / "sampler.onnx"), program_for(d, "edm", 9), d, decode=True)["passed"]


def test_sampler_unstable_in_float32_is_refused_naming_that(tmp_path):
    """A denoiser whose float32 rounding is amplified (here sin(1e4 x): a float32 ulp of x moves it by ~1)
    makes PyTorch's own float32 sampler far from float64; 10x that floor would pass anything, so parity
    refuses it naming the cause, not the graph or the decode stage."""
    from iia.compiler.check import FLOAT32_UNSTABLE, check_parity
    from iia.models import from_callable

    d = from_callable(lambda x, sigma, labels: torch.sin(1e4 * x), (1, 4, 4), name="chaotic")
    program, dm = program_for(d, "edm", 5), export_denoiser(d)
    graph = emit_sampler(program, dm, d.shape, False, plan=folded(program, dm))
    onnx.save(graph, str(tmp_path / "sampler.onnx"))
    with pytest.raises(CheckError, match=f"not stable in float32.*> {FLOAT32_UNSTABLE:g} of it"):
        check_parity(str(tmp_path / "sampler.onnx"), program_for(d, "edm", 5), d)
