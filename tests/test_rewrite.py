"""compiler/passes/ (affine_chains, batchnorm, residual_scales, small_convs): affine chains on the main path collapse to one Mul + one Add whose coefficients are
side (constant/conditioning-only) values; the rewritten graph computes the same numbers in ONNX Runtime."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edm_fixtures import make_edm_pickle
from iia.compiler.export import export_denoiser
from iia.compiler.passes.affine_chains import collapse_affine_chains
from iia.compiler.passes.batchnorm import affine_to_batchnorm, example_feeds
from iia.compiler.passes.residual_scales import MAX_ABSORBED_SCALE, absorb_residual_scales
from iia.compiler.passes.small_convs import TRANSPOSE_MAX_OUT_CHANNELS, small_convs_to_transposed
from iia.models import load
from iia.runtime.contract import DENOISER_LABELS, DENOISER_SIGMA, DENOISER_X


def side_values(graph: onnx.GraphProto) -> set[str]:
    """Initializers, Constant outputs, sigma/class_labels and everything computed from them alone (Shape/Size
    excluded: they depend on the batch)."""
    side = {t.name for t in graph.initializer} | {DENOISER_SIGMA, DENOISER_LABELS}
    for node in graph.node:
        if node.op_type == "Constant":
            side.update(node.output)
        elif node.op_type not in ("Shape", "Size") and node.input and all(i in side for i in node.input if i):
            side.update(node.output)
    return side


def main_path_nodes(graph: onnx.GraphProto, side: set[str]) -> int:
    return sum(not all(o in side for o in node.output) for node in graph.node)


def assert_topologically_sorted(graph: onnx.GraphProto):
    defined = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {""}
    for node in graph.node:
        missing = [i for i in node.input if i not in defined]
        assert not missing, f"{node.name} ({node.op_type}) reads {missing} before they are defined"
        defined.update(node.output)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feeds: list[dict]):
    a, b = session(before), session(after)
    for feed in feeds:
        for x, y in zip(a.run(None, feed), b.run(None, feed)):
            assert x.shape == y.shape
            assert np.abs(x - y).max() <= 1e-5 * max(1.0, np.abs(x).max())  # re-association: a few ulp


def denoiser_feeds(model: onnx.ModelProto, batches=(1, 3), seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    names = {i.name for i in model.graph.input}
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    feeds = []
    for b in batches:
        sigma = np.exp(rng.uniform(np.log(0.002), np.log(80.0), b)).astype(np.float32)
        feed = {DENOISER_X: (rng.standard_normal((b, *shape)) * (1 + sigma[:, None, None, None])).astype(np.float32),
                DENOISER_SIGMA: sigma}
        if DENOISER_LABELS in names:
            feed[DENOISER_LABELS] = rng.integers(0, 10, b).astype(np.int64)
        feeds.append(feed)
    return feeds


@pytest.fixture(scope="module")
def digits_onnx():
    return export_denoiser(load("digits"))


def test_digits_residual_block_affines_collapse(digits_onnx):
    model = copy.deepcopy(digits_onnx)
    side = side_values(model.graph)
    original_side = set(side)
    before = main_path_nodes(model.graph, side)
    removed = collapse_affine_chains(model.graph, side)
    after = main_path_nodes(model.graph, side)
    # each residual block's GroupNorm affine + modulation (Mul, Add, Mul, Add) becomes Mul, Add: 2 nodes saved
    assert removed > 0 and removed % 2 == 0
    assert before - after == removed
    new_side = side - original_side
    assert new_side, "the combined coefficients must be new side values"
    producers = {o: n for n in model.graph.node for o in n.output}
    for name in new_side:
        node = producers[name]
        assert node.op_type in ("Mul", "Add", "Sub", "Div", "Neg", "Reciprocal")
        assert all(i in side for i in node.input), f"{name} is not computed from side values alone"
    assert side_values(model.graph) >= new_side  # the test's own propagation agrees that they are side values
    assert_topologically_sorted(model.graph)
    gone = {o for n in digits_onnx.graph.node for o in n.output} - {o for n in model.graph.node for o in n.output}
    assert gone and not gone & {v.name for v in model.graph.value_info}  # no value_info of removed values
    onnx.checker.check_model(model, full_check=True)
    assert_same_outputs(digits_onnx, model, denoiser_feeds(model, (1, 3)))
    # a second pass finds nothing left to collapse
    assert collapse_affine_chains(model.graph, side) == 0


def test_edm_pickle_denoiser_is_unchanged_where_conditioning_precedes_the_norm(tmp_path):
    """The EDM-format fixture adds the embedding before GroupNorm (no modulation after it): only 2-node chains,
    which cannot get shorter, so the pass must leave the graph exactly as it was."""
    make_edm_pickle(tmp_path / "net.pkl", "edm-cond", resolution=16, channels=32)
    model = export_denoiser(load(tmp_path / "net.pkl"))
    original = model.SerializeToString()
    assert collapse_affine_chains(model.graph, side_values(model.graph)) == 0
    assert model.SerializeToString() == original


# ----------------------------------------------------------------------------------- hand-built graphs

C = 3


def tiny_model(nodes, outputs, x_shape=(2, C, 4, 4), out_shape=None, extra_inputs=(), extra_inits=()):
    rng = np.random.default_rng(1)
    side_names = sorted({i for n in nodes for i in n.input if i.startswith("c_")})
    inits = [numpy_helper.from_array(rng.uniform(0.5, 2.0, (C, 1, 1)).astype(np.float32), name) for name in side_names]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)), *extra_inputs]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(out_shape or x_shape)) for o in outputs]
    graph = helper.make_graph(nodes, "tiny", inputs, outs, initializer=inits + list(extra_inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    return model


def rewrite(model, side=None):
    out = copy.deepcopy(model)
    side = {t.name for t in out.graph.initializer} if side is None else side
    removed = collapse_affine_chains(out.graph, side)
    onnx.checker.check_model(out, full_check=True)
    assert_topologically_sorted(out.graph)
    return out, removed


def x_feed(shape=(2, C, 4, 4), seed=2):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def test_side_operand_first_and_sub_div_collapse():
    nodes = [helper.make_node("Mul", ["c_g", "x"], ["a"]),       # side value as input 0
             helper.make_node("Add", ["c_b", "a"], ["b"]),
             helper.make_node("Div", ["b", "c_s"], ["c"]),       # x / c
             helper.make_node("Sub", ["c", "c_t"], ["d"]),       # x - d
             helper.make_node("Mul", ["d", "c_u"], ["e"]),
             helper.make_node("Add", ["e", "c_v"], ["y"])]
    model = tiny_model(nodes, ["y"])
    out, removed = rewrite(model)
    assert removed == 4
    main = [n for n in out.graph.node if "x" in n.input or "y" in n.output]
    assert [n.op_type for n in main] == ["Mul", "Add"] and main[-1].output[0] == "y"
    assert_same_outputs(model, out, [x_feed()])


def test_side_minus_main_and_side_over_main_end_a_chain():
    nodes = [helper.make_node("Mul", ["x", "c_g"], ["a"]),
             helper.make_node("Sub", ["c_b", "a"], ["b"]),       # d - x: not affine in the (scale, shift) form
             helper.make_node("Mul", ["b", "c_s"], ["c"]),
             helper.make_node("Div", ["c_t", "c"], ["y"])]       # c / x
    model = tiny_model(nodes, ["y"])
    out, removed = rewrite(model)
    assert removed == 0
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in nodes]


@pytest.mark.parametrize("case", ["two_consumers", "graph_output"])
def test_shared_or_output_intermediates_stop_the_chain(case):
    nodes = [helper.make_node("Mul", ["x", "c_g"], ["a"]),
             helper.make_node("Add", ["a", "c_b"], ["b"]),
             helper.make_node("Mul", ["b", "c_s"], ["c"]),
             helper.make_node("Add", ["c", "c_t"], ["y"])]
    outputs = ["y"]
    if case == "two_consumers":
        nodes.append(helper.make_node("Relu", ["b"], ["r"]))
        outputs.append("r")
    else:
        outputs.append("b")
    model = tiny_model(nodes, outputs)
    out, removed = rewrite(model)
    assert removed == 0  # two 2-node chains around "b": neither gets shorter
    assert out.SerializeToString() == model.SerializeToString()
    # the same chain without the extra reader collapses 4 -> 2 (the guard above is what stopped it)
    plain, removed = rewrite(tiny_model(nodes[:4], ["y"]))
    assert removed == 2
    assert_same_outputs(tiny_model(nodes[:4], ["y"]), plain, [x_feed()])


def test_broadcast_by_side_operands_keeps_the_output_shape():
    """x [2,1,4,4] is broadcast to [2,3,4,4] by the chain's side values: every side operand ends in scale or
    shift, so the rewritten output has the same (broadcast) shape and values."""
    nodes = [helper.make_node("Mul", ["x", "c_g"], ["a"]),
             helper.make_node("Add", ["a", "c_b"], ["b"]),
             helper.make_node("Mul", ["b", "c_s"], ["y"])]
    model = tiny_model(nodes, ["y"], x_shape=(2, 1, 4, 4), out_shape=(2, C, 4, 4))
    out, removed = rewrite(model)
    assert removed == 1
    feed = x_feed((2, 1, 4, 4))
    assert session(out).run(None, feed)[0].shape == (2, C, 4, 4)
    assert_same_outputs(model, out, [feed])


def test_conditioning_input_side_values_and_batch_shapes():
    """Side values computed from sigma ([B,1,1,1] after a Reshape) combine per batch row."""
    sigma = helper.make_tensor_value_info("sigma", TensorProto.FLOAT, ["batch"])
    shape4 = numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "k_shape")
    nodes = [helper.make_node("Reshape", ["sigma", "k_shape"], ["s4"]),
             helper.make_node("Mul", ["x", "c_g"], ["a"]),
             helper.make_node("Add", ["a", "c_b"], ["b"]),
             helper.make_node("Mul", ["b", "s4"], ["c"]),
             helper.make_node("Add", ["c", "s4"], ["y"])]
    model = tiny_model(nodes, ["y"], x_shape=("batch", C, 4, 4), extra_inputs=[sigma],
                       extra_inits=[shape4])
    side = {t.name for t in model.graph.initializer} | {"sigma", "s4"}
    out, removed = rewrite(model, side)
    assert removed == 2
    feeds = []
    for b in (1, 3):
        feed = x_feed((b, C, 4, 4), seed=b)
        feed["sigma"] = np.linspace(0.1, 5, b).astype(np.float32)
        feeds.append(feed)
    assert_same_outputs(model, out, feeds)


# ------------------------------------------------------------------------ constant affines as BatchNormalization

def test_groupnorm_affines_become_one_pass_batchnorm(digits_onnx):
    """digits: every GroupNorm's stored `x * gamma + beta` is one BatchNormalization; same numbers; gamma/beta
    no longer stored twice."""
    model = copy.deepcopy(digits_onnx)
    removed = affine_to_batchnorm(model, example_feeds(model))
    onnx.checker.check_model(model, full_check=True)
    assert_topologically_sorted(model.graph)
    norms = sum(n.op_type == "InstanceNormalization" for n in digits_onnx.graph.node)
    assert removed == norms == sum(n.op_type == "BatchNormalization" for n in model.graph.node) > 0
    assert len(model.graph.node) == len(digits_onnx.graph.node) - removed
    read = {i for n in model.graph.node for i in n.input}
    assert all(t.name in read for t in model.graph.initializer)  # the replaced gamma/beta tensors are dropped
    assert_same_outputs(digits_onnx, model, denoiser_feeds(digits_onnx, batches=(1, 3, 8)))


@pytest.mark.parametrize("case", ["x_broadcast", "spatial_gamma", "shared_product", "side_beta"])
def test_affines_that_are_not_per_channel_stay(case):
    """Only a channel-wise affine of a full-shaped x, read once, with stored gamma and beta, is converted."""
    rng = np.random.default_rng(4)
    gamma_shape = (C, 4, 4) if case == "spatial_gamma" else (C, 1, 1)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 2, gamma_shape).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.uniform(-1, 1, (C, 1, 1)).astype(np.float32), "beta")]
    x_shape = (2, 1, 4, 4) if case == "x_broadcast" else (2, C, 4, 4)
    nodes = [helper.make_node("Mul", ["x", "gamma"], ["a"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    beta = "beta"
    if case == "side_beta":  # beta computed at run time, not a stored tensor
        inputs.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, C, 1, 1]))
        beta = "t"
    nodes.append(helper.make_node("Add", ["a", beta], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, C, 4, 4])]
    if case == "shared_product":
        outputs.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, C, 4, 4]))
    model = helper.make_model(helper.make_graph(nodes, "t", inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 20)])
    before = copy.deepcopy(model)
    assert affine_to_batchnorm(model, example_feeds(model)) == 0
    assert model == before
    # the plain per-channel case is converted and equal
    plain = helper.make_model(helper.make_graph(
        [helper.make_node("Mul", ["x", "gamma"], ["a"]), helper.make_node("Add", ["a", "beta"], ["y"])], "p",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, C, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, C, 4, 4])],
        initializer=[numpy_helper.from_array(rng.uniform(0.5, 2, (C, 1, 1)).astype(np.float32), "gamma"), inits[1]]),
        opset_imports=[helper.make_opsetid("", 20)])
    converted = copy.deepcopy(plain)
    assert affine_to_batchnorm(converted, example_feeds(converted)) == 1
    assert [n.op_type for n in converted.graph.node] == ["BatchNormalization"]
    assert_same_outputs(plain, converted, [x_feed()])


def conv_model(out_channels: int, kernel=(3, 3), bias=True, in_channels=8, **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(out_channels + sum(kernel))
    inits = [numpy_helper.from_array(rng.standard_normal((out_channels, in_channels, *kernel)).astype(np.float32), "w")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), "b"))
    node = helper.make_node("Conv", ["x", "w", "b"][:2 + bias], ["y"], **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", in_channels, 9, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out_channels, "h", "w"])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("out_channels,kernel,attrs", [
    (3, (3, 3), {"pads": [1, 1, 1, 1]}),              # a UNet's last convolution to pixels
    (4, (3, 3), {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}),  # ... to latents
    (1, (1, 1), {}),                                   # pointwise, no pads attribute
    (2, (5, 3), {"pads": [2, 1, 2, 1]}),              # non-square kernel
    (3, (3, 3), {"pads": [0, 1, 0, 1]}),              # padded along one axis only
    (3, (3, 3), {"auto_pad": "VALID"}),
])
def test_small_convolutions_become_equal_conv_transpose(out_channels, kernel, attrs):
    """Conv with at most TRANSPOSE_MAX_OUT_CHANNELS outputs -> ConvTranspose with flipped, transposed weights:
    ONNX Runtime's Conv on the original and its ConvTranspose on the rewrite agree (batch 1 and 3)."""
    assert out_channels <= TRANSPOSE_MAX_OUT_CHANNELS
    before = conv_model(out_channels, kernel, **attrs)
    after = copy.deepcopy(before)
    assert small_convs_to_transposed(after.graph) == 1
    onnx.checker.check_model(after, full_check=True)
    assert [n.op_type for n in after.graph.node] == ["ConvTranspose"]
    assert [t.name for t in after.graph.initializer if t.name == "w"] == []  # the Conv's layout is not kept too
    rng = np.random.default_rng(1)
    assert_same_outputs(before, after, [{"x": rng.standard_normal((b, 8, 9, 7)).astype(np.float32)} for b in (1, 3)])


@pytest.mark.parametrize("out_channels,attrs", [
    (TRANSPOSE_MAX_OUT_CHANNELS + 1, {"pads": [1, 1, 1, 1]}),  # blocked layout already efficient enough
    (3, {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    (3, {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    (4, {"group": 2, "pads": [1, 1, 1, 1]}),
    (3, {"pads": [3, 3, 3, 3]}),                               # pads past kernel - 1: no ConvTranspose equivalent
    (3, {"pads": [1, 1, 0, 2]}),                               # asymmetric: ONNX Runtime CUDA would run it on CPU
    (3, {"auto_pad": "SAME_UPPER"}),
])
def test_other_convolutions_stay(out_channels, attrs):
    model = conv_model(out_channels, in_channels=8 // attrs.get("group", 1) if "group" in attrs else 8, **attrs)
    before = copy.deepcopy(model)
    assert small_convs_to_transposed(model.graph) == 0
    assert model == before


# ------------------------------------------------------------------------- residual scales absorbed

def residual_net(blocks=3, scale=0.5**0.5, case="plain", channels=8, groups=4) -> onnx.ModelProto:
    """conv_in -> `blocks` x [x = (x + conv(silu(GN(x)))) * scale] -> GN -> silu -> conv_out, as exported
    (GroupNorm as Reshape -> InstanceNormalization -> Reshape -> Mul/Add affine; the Reshape target read off
    the input with Shape). case: "plain", "concat" (the first block output also feeds a skip Concat),
    "negative" (scale < 0), "shared_weight" (two blocks share one conv weight), "output" (the first block
    output is also a graph output)."""
    rng = np.random.default_rng(7)
    inits, nodes = [], []
    const = lambda name, a: inits.append(numpy_helper.from_array(np.asarray(a, np.float32), name)) or name
    ints = lambda name, a: inits.append(numpy_helper.from_array(np.asarray(a, np.int64), name)) or name
    ints("groups_shape", [0, groups, -1])
    const("ones", np.ones(groups)), const("zeros", np.zeros(groups))
    const("scale", [-scale if case == "negative" else scale])

    def conv(x, out, cin, cout, tag):
        w = "w_block0" if case == "shared_weight" and tag == "w_block1" else tag
        if w == tag:
            const(w, rng.standard_normal((cout, cin, 3, 3)) * 0.3)
        const(f"b_{tag}", rng.standard_normal(cout) * 0.1)
        nodes.append(helper.make_node("Conv", [x, w, f"b_{tag}"], [out], pads=[1, 1, 1, 1]))

    def group_norm(x, out, tag):
        nodes.extend([helper.make_node("Shape", [x], [f"{tag}_shape"]),
                      helper.make_node("Reshape", [x, "groups_shape"], [f"{tag}_g"]),
                      helper.make_node("InstanceNormalization", [f"{tag}_g", "ones", "zeros"], [f"{tag}_n"], epsilon=1e-5),
                      helper.make_node("Reshape", [f"{tag}_n", f"{tag}_shape"], [f"{tag}_r"]),
                      helper.make_node("Mul", [f"{tag}_r", const(f"{tag}_gamma", rng.uniform(0.5, 2, (channels, 1, 1)))], [f"{tag}_m"]),
                      helper.make_node("Add", [f"{tag}_m", const(f"{tag}_beta", rng.uniform(-1, 1, (channels, 1, 1)))], [f"{tag}_a"]),
                      helper.make_node("Sigmoid", [f"{tag}_a"], [f"{tag}_s"]),
                      helper.make_node("Mul", [f"{tag}_a", f"{tag}_s"], [out])])

    conv("x", "h0", 3, channels, "w_in")
    h = "h0"
    for k in range(blocks):
        group_norm(h, f"act{k}", f"gn{k}")
        conv(f"act{k}", f"f{k}", channels, channels, f"w_block{k}")
        nodes.append(helper.make_node("Add", [h, f"f{k}"], [f"sum{k}"]))
        nodes.append(helper.make_node("Mul", [f"sum{k}", "scale"], [f"h{k + 1}"]))
        h = f"h{k + 1}"
    group_norm(h, "act_out", "gn_out")
    conv("act_out", "y", channels, 3, "w_out")
    outputs = [("y", 3)]
    if case == "concat":
        nodes.append(helper.make_node("Concat", ["h1", "h0"], ["skip"], axis=1))
        outputs.append(("skip", 2 * channels))
    if case == "output":
        outputs.append(("h1", channels))
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", c, 8, 8]) for o, c in outputs],
                              initializer=inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.checker.check_model(model)
    return model


def test_residual_scales_are_absorbed_by_group_norms_and_convolutions():
    """Every `(x + F(x)) * c` of a chain of blocks disappears: its GroupNorm reader takes eps / c^2, the next
    residual convolution W / c, the last factor ends in the head's GroupNorm; ONNX Runtime's outputs equal."""
    before = residual_net()
    after = copy.deepcopy(before)
    assert absorb_residual_scales(after.graph) == 3
    onnx.checker.check_model(after, full_check=True)
    assert_topologically_sorted(after.graph)
    assert not any(n.op_type == "Mul" and (n.input[1] == "scale" or n.input[1].startswith("iia/scale/"))
                   for n in after.graph.node)
    assert sum(n.op_type == "Mul" for n in after.graph.node) == sum(n.op_type == "Mul" for n in before.graph.node) - 3
    eps = sorted(next(a.f for a in n.attribute if a.name == "epsilon")
                 for n in after.graph.node if n.op_type == "InstanceNormalization")
    np.testing.assert_allclose(eps, [1e-5, 2e-5, 4e-5, 8e-5], rtol=1e-5)  # eps / c^2 for c = sqrt(1/2), c^2 ...
    rng = np.random.default_rng(3)
    assert_same_outputs(before, after, [{"x": rng.standard_normal((b, 3, 8, 8)).astype(np.float32)} for b in (1, 3)])


@pytest.mark.parametrize("case", ["concat", "negative", "shared_weight", "output"])
def test_residual_scales_stay_where_a_reader_cannot_absorb_them(case):
    """A block output that also feeds a skip Concat or a graph output, a negative factor (GroupNorm would flip
    sign), a convolution weight shared by two blocks: those Mul nodes stay; the outputs are unchanged."""
    before = residual_net(case=case)
    after = copy.deepcopy(before)
    removed = absorb_residual_scales(after.graph)
    onnx.checker.check_model(after, full_check=True)
    if case == "negative":
        assert removed == 0 and after == before
    else:  # the first block's Mul stays; later ones may still go
        assert any(n.op_type == "Mul" and n.output[0] == "h1" for n in after.graph.node)
    rng = np.random.default_rng(3)
    assert_same_outputs(before, after, [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}])


def test_edm_pickle_skip_scales_are_absorbed(tmp_path):
    """The EDM-format fixture's blocks end in `* skip_scale`: all absorbed, the denoiser computes the same."""
    make_edm_pickle(tmp_path / "net.pkl", "edm-cond", resolution=16, channels=32)
    model = export_denoiser(load(tmp_path / "net.pkl"))
    after = copy.deepcopy(model)
    assert absorb_residual_scales(after.graph) >= 2
    onnx.checker.check_model(after, full_check=True)
    assert_same_outputs(model, after, denoiser_feeds(model, batches=(1, 3)))


def test_absorbed_factors_stay_bounded_along_a_long_chain():
    """12 blocks at c = sqrt(1/2): factors are absorbed only while every constant they create stays within
    [1/MAX_ABSORBED_SCALE, MAX_ABSORBED_SCALE] (activations at most 4x, epsilons at most 16x the exported ones);
    a scale outside that range is never absorbed. Outputs equal either way."""
    before = residual_net(blocks=12)
    after = copy.deepcopy(before)
    removed = absorb_residual_scales(after.graph)
    assert 0 < removed < 12
    factors = [float(numpy_helper.to_array(t).reshape(-1)[0]) for t in after.graph.initializer
               if t.name.startswith("iia/scale/factor")]
    assert all(1 / MAX_ABSORBED_SCALE <= f <= MAX_ABSORBED_SCALE for f in factors)
    eps = [next(a.f for a in n.attribute if a.name == "epsilon") for n in after.graph.node if n.op_type == "InstanceNormalization"]
    assert max(eps) <= 1e-5 * MAX_ABSORBED_SCALE**2 * (1 + 1e-6)
    rng = np.random.default_rng(3)
    assert_same_outputs(before, after, [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}])
    small = residual_net(blocks=3, scale=0.01)
    assert absorb_residual_scales(copy.deepcopy(small).graph) == 0


def test_scale_of_a_rank_0_value_stays():
    """u * c with c of shape [1] is rank 1 when u is a scalar: not absorbed (the shape would change)."""
    nodes = [helper.make_node("ReduceSum", ["x"], ["u"], keepdims=0),
             helper.make_node("Mul", ["u", "c"], ["y"]),
             helper.make_node("Mul", ["y", "d"], ["z"])]
    graph = helper.make_graph(nodes, "r0", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
                              initializer=[numpy_helper.from_array(np.array([0.5], np.float32), "c"),
                                           numpy_helper.from_array(np.array([2.0], np.float32), "d")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    before = copy.deepcopy(model)
    assert absorb_residual_scales(model.graph) == 0 and model == before


def test_shared_small_convolution_weight_is_transposed_once():
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((3, 8, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 5, 5])], initializer=[w])
    before = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    after = copy.deepcopy(before)
    assert small_convs_to_transposed(after.graph) == 2
    assert len(after.graph.initializer) == 1 and after.graph.initializer[0].name != "w"
    assert_same_outputs(before, after, [{"x": rng.standard_normal((2, 8, 5, 5)).astype(np.float32)}])


# ------------------------------------------------------------------------------------- the pass list, optimize

def test_optimize_runs_the_listed_passes_once_in_order_and_each_can_be_switched_off(digits_onnx):
    """optimize = the passes of PASSES in order on a copy (the exported model untouched); a pass switched off
    by name rewrites nothing and is reported 0; an unknown name is refused naming the passes."""
    from iia.compiler.graph import side_values as cone
    from iia.compiler.passes import PASS_NAMES, optimize

    assert PASS_NAMES == ("affine_chains", "batchnorm", "residual_scales", "small_convs")
    original = digits_onnx.SerializeToString()
    sources = (DENOISER_SIGMA, DENOISER_LABELS)
    full = optimize(digits_onnx, sources)
    assert digits_onnx.SerializeToString() == original
    assert list(full.counts) == list(PASS_NAMES) and all(n > 0 for n in full.counts.values())
    # by hand, in the same order, on a copy: the same graph
    by_hand = copy.deepcopy(digits_onnx)
    collapse_affine_chains(by_hand.graph, cone(by_hand.graph, sources))
    affine_to_batchnorm(by_hand, example_feeds(by_hand))
    absorb_residual_scales(by_hand.graph)
    small_convs_to_transposed(by_hand.graph)
    assert by_hand.SerializeToString() == full.model.SerializeToString()
    no_bn = optimize(digits_onnx, sources, disabled=frozenset({"batchnorm"}))
    assert no_bn.counts["batchnorm"] == 0 and not any(n.op_type == "BatchNormalization" for n in no_bn.model.graph.node)
    assert "affines as BatchNormalization" in full.summary() and "BatchNormalization" not in no_bn.summary()
    assert_same_outputs(digits_onnx, no_bn.model, denoiser_feeds(digits_onnx, (2,)))
    with pytest.raises(ValueError, match="no graph pass named fusion; the passes are affine_chains"):
        optimize(digits_onnx, sources, disabled=frozenset({"fusion"}))


def test_residual_scale_index_matches_a_rebuilt_one():
    """absorb_residual_scales keeps producer/reader/count indexes up to date edit by edit (no rebuild per
    removal): after each removal they equal indexes built afresh from the edited graph."""
    from iia.compiler.graph import producers, read_counts, readers
    from iia.compiler.passes import residual_scales

    model = residual_net(blocks=6)
    checked = []
    apply = residual_scales._apply_absorb

    def apply_and_compare(index, *args):
        apply(index, *args)
        live = onnx.GraphProto()
        live.CopyFrom(index.graph)
        replace = [n for k, n in enumerate(live.node) if k not in index.removed]
        del live.node[:]
        live.node.extend(replace)
        position = {k: j for j, k in enumerate(k for k in range(len(index.graph.node)) if k not in index.removed)}
        assert {v: [position[k] for k in ks] for v, ks in index.readers.items() if ks} == readers(live)
        assert {v: position[k] for v, k in index.producer.items()} == producers(live)
        assert {v: c for v, c in index.counts.items() if c} == read_counts(live)
        checked.append(True)

    residual_scales._apply_absorb = apply_and_compare
    try:
        assert absorb_residual_scales(model.graph) > 0
    finally:
        residual_scales._apply_absorb = apply
    assert len(checked) == absorb_residual_scales(residual_net(blocks=6).graph)
