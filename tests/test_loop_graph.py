"""Loop-form sampler graph (`iia-compile --graph loop`): one ONNX Loop around one denoiser copy, the same
numbers as the unrolled graph, weights stored once."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edm_fixtures import make_edm_pickle
from iia.calibration.sampling import sample
from iia.calibration.schedules import program_for
from iia.compiler.build import CompileError, CompileOptions, compile_model
from iia.compiler.check import CheckError, check_weight_sharing
from iia.compiler.emit import emit_sampler, initializer_bytes, linear_form
from iia.compiler.emit_loop import emit_sampler_loop
from iia.compiler.export import export_decoder, export_denoiser
from iia.compiler.fold import FoldPlan, plan_folding
from iia.models import gaussian_mixture, load
from iia.runtime.engine import fp32_layer_names


@pytest.fixture(scope="module")
def edm(tmp_path_factory):
    path = tmp_path_factory.mktemp("edm") / "edm-cond.pkl"
    make_edm_pickle(path, kind="edm-cond")
    d = load(path)
    return d, export_denoiser(d), export_decoder(d)


def folded(program, dm, label_dim=0):
    """The fold plan build.py makes for `program` on the exported denoiser `dm`."""
    return plan_folding(dm, [op.sigma for op in linear_form(program)[3]], label_dim)


def run(model, noise, labels=None):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"noise": noise.astype(np.float32)}
    if labels is not None:
        feed["class_labels"] = labels.astype(np.int64)
    return sess.run(None, feed)


@pytest.mark.parametrize("solver", ["edm", "ipndm"])
def test_loop_graph_equals_unrolled_graph(edm, solver):
    d, dm, decoder = edm
    program = program_for(d, solver, 9)
    loop = emit_sampler_loop(program, dm, d.shape, True, decoder_model=decoder, plan=folded(program, dm))
    assert [n.op_type for n in loop.graph.node].count("Loop") == 1
    body = next(n for n in loop.graph.node if n.op_type == "Loop").attribute[0].g
    convolutions = ("Conv", "ConvTranspose")  # passes/small_convs.py: the same convolution
    read = {i for n in body.node for i in n.input} | {o.name for o in body.output}
    assert all(any(o in read for o in n.output) for n in body.node)  # nothing computed for no reader (live_nodes)
    assert sum(n.op_type in convolutions for n in body.node) == sum(n.op_type == "Conv" for n in dm.graph.node)
    unrolled = emit_sampler(program, dm, d.shape, True, decoder_model=decoder, plan=folded(program, dm))
    read = {i for n in unrolled.graph.node for i in n.input} | {o.name for o in unrolled.graph.output}
    assert all(any(o in read for o in n.output) for n in unrolled.graph.node)  # no per-call sigma left unread
    rng = np.random.default_rng(5)
    for batch in (1, 3):
        noise, labels = rng.standard_normal((batch, *d.shape)), rng.integers(0, 10, batch)
        want, got = run(unrolled, noise, labels), run(loop, noise, labels)
        # float32 sums in another order (one MatMul per combination): as close to the float64 PyTorch sampler
        # as the unrolled graph is, and within 1e-5 of it relative to the output's scale
        ref = sample(program, d, torch.from_numpy(noise), torch.from_numpy(labels), dtype=torch.float64).numpy()
        assert np.abs(got[0] - ref).max() <= 2 * np.abs(want[0] - ref).max() + 1e-6
        assert np.abs(got[0] - want[0]).max() <= 1e-5 * max(1.0, np.abs(want[0]).max())
        assert np.abs(got[1].astype(int) - want[1].astype(int)).max() <= 1  # uint8 images: rounding at most
        assert got[1].shape == (batch, *d.shape[1:], d.shape[0])


def test_linear_form_reproduces_the_program():
    """x_i and the output as combinations of [noise, D_0..]: evaluated with the D's the sampler saw, they give
    the sampler's own states (float64), for a multistep solver whose updates read several past D's."""
    d = gaussian_mixture(shape=(1, 4, 4), components=3)
    program = program_for(d, "ipndm", 6)
    state, sigmas, out, calls = linear_form(program)
    assert state.shape == (6, 7) and np.all(np.triu(state[:, 1:]) == 0)  # x_i reads D_j for j < i only
    noise = torch.from_numpy(np.random.default_rng(1).standard_normal((2, *d.shape)))
    xs, ds = [], []
    x_basis = [noise.numpy()]
    for i in range(6):
        x = sum(c * v for c, v in zip(state[i], x_basis + ds)) if i else state[i, 0] * noise.numpy()
        xs.append(x)
        ds.append(d(torch.from_numpy(x), torch.full((2,), float(sigmas[i]), dtype=torch.float64)).detach().numpy())
    final = sum(c * v for c, v in zip(out, x_basis + ds))
    ref = sample(program, d, noise, None, dtype=torch.float64).numpy()
    assert np.abs(final - ref).max() < 1e-10
    assert [op.sigma for op in calls] == list(sigmas)


def test_loop_graph_stores_weights_once_and_a_duplicate_is_caught(edm):
    d, dm, _ = edm
    program = program_for(d, "edm", 9)
    loop = emit_sampler_loop(program, dm, d.shape, True, plan=folded(program, dm))
    assert check_weight_sharing(loop, initializer_bytes(dm), d.param_bytes())["ratio"] <= 1.10
    body = next(n for n in loop.graph.node if n.op_type == "Loop").attribute[0].g
    extra = [t for t in body.initializer if t.name not in {w.name for w in dm.graph.initializer}]
    # new: the one-pass BatchNormalization vectors of passes/batchnorm.py (small), and weights that
    # replace the ones they came from (passes/small_convs.py, passes/residual_scales.py)
    size = lambda ts: sum(onnx.numpy_helper.to_array(t).nbytes for t in ts)
    moved = [t for t in extra if t.name.startswith(("iia/conv/transposed_weight", "iia/scale/"))]
    assert moved and all(t.name.startswith("iia/bn/") for t in extra if t not in moved)
    assert size(t for t in extra if t not in moved) <= 0.05 * initializer_bytes(dm)
    gone = sorted(int(np.prod(w.dims)) for w in dm.graph.initializer if w.name not in {t.name for t in body.initializer})
    for t in moved:  # each one takes the place of a dropped tensor of its size (others: folded conditioning)
        gone.remove(int(np.prod(t.dims)))
    big = max(body.initializer, key=lambda t: t.ByteSize())
    for k in range(12):  # weights copied into the body must count
        dup = onnx.TensorProto()
        dup.CopyFrom(big)
        dup.name = f"copy{k}"
        body.initializer.append(dup)
    with pytest.raises(CheckError, match="weight sharing violated"):
        check_weight_sharing(loop, initializer_bytes(dm), d.param_bytes())
    # reduced-precision engines keep the body's normalisation layers in fp32
    assert fp32_layer_names(loop) and all(name.startswith("iia/loop/") for name in fp32_layer_names(loop))


def test_compile_records_the_graph_form(tmp_path):
    d = gaussian_mixture(shape=(1, 4, 4), components=3)
    for form in ("loop", "unrolled"):
        manifest = compile_model(d, tmp_path / form, CompileOptions(nfe=5, solver="edm", engine=False, graph=form),
                                 log=lambda _: None)
        assert manifest["graph"] == form
        assert json.loads((tmp_path / form / "manifest.json").read_text())["graph"] == form
        ops = {n.op_type for n in onnx.load(str(tmp_path / form / "sampler.onnx")).graph.node}
        assert ("Loop" in ops) == (form == "loop")
    with pytest.raises(CompileError, match="--graph must be one of"):
        compile_model(d, tmp_path / "bad", CompileOptions(nfe=5, solver="edm", engine=False, graph="scan"),
                      log=lambda _: None)


def _label_readers(graph):
    """Nodes of `graph` that read class_labels (directly)."""
    return [n for n in graph.node if "class_labels" in n.input]


@pytest.mark.parametrize("form", ["loop", "unrolled"])
def test_label_and_sigma_values_become_per_step_label_tables(edm, form):
    """With label_dim, everything computed from sigma, class labels and weights (label embedding, embedding
    MLP, per-block affine projections) is read from [step, label] tables: no copy of those nodes remains, the
    images are unchanged, and a label outside [0, label_dim) is an error, not another label's row."""
    from iia.compiler.fold import LABEL, plan_folding

    d, dm, _ = edm
    program = program_for(d, "edm", 9)
    emit = emit_sampler_loop if form == "loop" else emit_sampler
    tables = emit(program, dm, d.shape, True, label_dim=d.label_dim, plan=folded(program, dm, d.label_dim))
    sigma_only = emit(program, dm, d.shape, True, label_dim=d.label_dim, plan=plan_folding(
        dm, [op.sigma for op in linear_form(program)[3]], d.label_dim, table_limit=0))
    plain = emit(program, dm, d.shape, True, label_dim=d.label_dim, plan=FoldPlan())
    plan = plan_folding(dm, [1.0], d.label_dim)
    assert LABEL in {kind for _, kind in plan.values[1.0].values()}
    graphs = lambda m: [m.graph] + [a.g for n in m.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    gemms = lambda m: sum(n.op_type == "Gemm" for g in graphs(m) for n in g.node)
    assert gemms(plain) > 0 and gemms(tables) == 0 < gemms(sigma_only)
    assert [n.op_type for g in graphs(tables) for n in _label_readers(g)] == ["Reshape"]  # check_labels
    readers = [n.op_type for g in graphs(tables) for n in g.node if "iia/class_labels_checked" in n.input]
    assert set(readers) <= {"Gather", "Unsqueeze"}, readers  # only the table lookups read the labels
    rng = np.random.default_rng(3)
    for batch in (1, 4):
        noise, labels = rng.standard_normal((batch, *d.shape)), rng.integers(0, d.label_dim, batch)
        want = run(plain, noise, labels)[0]
        assert np.abs(run(tables, noise, labels)[0] - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    assert check_weight_sharing(tables, initializer_bytes(dm), d.param_bytes())["ratio"] <= 1.10
    for bad in ([0, d.label_dim], [-1, 0], [-d.label_dim, 0]):  # never another label's row, never wrapped
        for model in (tables, sigma_only, plain):
            with pytest.raises(Exception, match=f"class_labels_must_be_in_0_to_{d.label_dim - 1}"):
                run(model, rng.standard_normal((2, *d.shape)), np.array(bad))
    with pytest.raises(Exception, match="class_labels_one_per_image"):  # one label for three images: refused
        run(tables, rng.standard_normal((3, *d.shape)), np.array([1]))


def test_label_tables_fall_back_to_sigma_only_when_too_large(edm):
    """Over the table budget only the sigma-only values are folded (constant per call, broadcast rows)."""
    from iia.compiler.fold import LABEL, plan_folding

    d, dm, _ = edm
    full = plan_folding(dm, [0.5, 2.0], d.label_dim)
    small = plan_folding(dm, [0.5, 2.0], d.label_dim, table_limit=1024)
    assert LABEL in {k for _, k in full.values[0.5].values()}
    assert small.values and LABEL not in {k for v in small.values.values() for _, k in v.values()}
    assert len(small.foldable_nodes) < len(full.foldable_nodes)
    assert plan_folding(dm, [0.5], 0).foldable_nodes == small.foldable_nodes  # the same as no labels at all


def test_loop_carries_raw_network_outputs_under_edm_preconditioning(edm):
    """D = c_skip x + c_out F with net input c_in x (EDM eq. 7): the loop carries F and folds the three
    scalings into its coefficients, so no copy of those products remains; the images are unchanged. A graph
    that reads x anywhere else keeps the plain form."""
    from iia.compiler.fold import plan_folding
    from iia.compiler.passes.scalar_io import scalar_io

    d, dm, _ = edm
    program = program_for(d, "ipndm", 7)
    sigmas = [op.sigma for op in linear_form(program)[3]]
    plan = plan_folding(dm, sigmas, d.label_dim)
    io = scalar_io(plan.model.graph, plan, sigmas)
    assert io is not None and len(io.nodes) == 4
    assert np.all(io.c_out > 0) and np.all((0 < io.c_skip) & (io.c_skip <= 1))
    loop = emit_sampler_loop(program, dm, d.shape, True, label_dim=d.label_dim, plan=plan)
    body = next(n for n in loop.graph.node if n.op_type == "Loop").attribute[0].g
    gone = {"iia/loop/den/" + plan.model.graph.node[k].name for k in io.nodes}
    assert all(plan.model.graph.node[k].name for k in io.nodes) and not gone & {n.name for n in body.node}
    unrolled = emit_sampler(program, dm, d.shape, True, label_dim=d.label_dim, plan=plan)
    rng = np.random.default_rng(8)
    noise, labels = rng.standard_normal((3, *d.shape)), rng.integers(0, d.label_dim, 3)
    ref = sample(program, d, torch.from_numpy(noise), torch.from_numpy(labels), dtype=torch.float64).numpy()
    want, got = run(unrolled, noise, labels)[0], run(loop, noise, labels)[0]
    assert np.abs(got - ref).max() <= 2 * np.abs(want - ref).max() + 1e-6
    # x read once more (here: added to the output) -> not of the form
    other = onnx.ModelProto()
    other.CopyFrom(plan.model)
    g = other.graph
    final = g.output[0].name
    last = next(n for n in g.node if final in n.output)
    last.output[0] = "pre_out"
    g.node.append(onnx.helper.make_node("Add", ["pre_out", "x"], [final]))
    assert scalar_io(g, plan, sigmas) is None


def test_many_classes_fall_back_before_evaluating_every_label(tmp_path):
    """20000 classes: the tables' size is known from one image and over the budget, so only sigma is folded,
    without evaluating 20000 labels (a one-hot encoding of all of them would be 1.6 GB), and the log says why."""
    from iia.compiler.fold import LABEL, plan_folding

    path = tmp_path / "many.pkl"
    make_edm_pickle(path, "edm-cond", label_dim=20000)
    d = load(path)
    dm = export_denoiser(d)
    plan = plan_folding(dm, [0.5, 2.0, 10.0], d.label_dim)
    assert plan.values and LABEL not in {k for v in plan.values.values() for _, k in v.values()}
    assert "not per label" in plan.summary and "budget" in plan.summary


def test_label_tables_evaluated_in_chunks_equal_one_pass(edm, monkeypatch):
    from iia.compiler import fold

    d, dm, _ = edm
    whole = fold.plan_folding(dm, [0.7, 3.0], d.label_dim)
    monkeypatch.setattr(fold, "LABEL_CHUNK", 3)  # 10 labels in chunks of 3, 3, 3, 1
    chunked = fold.plan_folding(dm, [0.7, 3.0], d.label_dim)
    assert whole.values.keys() == chunked.values.keys()
    for s in whole.values:
        assert whole.values[s].keys() == chunked.values[s].keys()
        for name, (array, kind) in whole.values[s].items():
            assert chunked.values[s][name][1] == kind
            assert np.allclose(chunked.values[s][name][0], array, rtol=1e-6, atol=1e-7)  # GEMM kernels by batch
