"""One wrapper for the bookkeeping every ONNX rewrite needs, written once: who produces and who reads each
value, how often a value is read (graph outputs and subgraph bodies included), fresh names, batched node
edits, pruning of dead nodes and unread initializers, a quiet ONNX Runtime CPU session, stored-byte
accounting, and the builder the emitters append nodes with.

The passes (`compiler/passes/`), the conditioning folder (`fold.py`) and the emitters (`emit.py`, `emit_loop.py`) use it;
nothing here knows about diffusion.
"""

from __future__ import annotations

import bisect
import contextlib
import tempfile
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_DOMAINS = ("", "ai.onnx")
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # a model over this size cannot be serialised in one message
# a sampler graph storing more tensor bytes than this keeps them in one external data file (compiler/stages.py
# save_onnx; CompileOptions.external_data_bytes), and a larger export is not cached: protobuf holds at most 2 GB,
# and serialising a graph as one message takes ~4x its size in memory (its encoder's growing buffer, then the
# bytes), ~5 GB at EDM2-img64-S's size, where external data is written tensor by tensor
EXTERNAL_DATA_BYTES = 512 * 1024**2
SESSION_FILE_BYTES = 128 * 1024**2  # quiet_session, check_model_proto: larger models go through a file


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held by a node's attributes (Loop/If/Scan bodies)."""
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))]


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names read inside a node's subgraph attributes (a body may read outer values without listing them as
    the node's inputs)."""
    names = set()
    for g in subgraphs(node):
        for n in g.node:
            names.update(n.input)
            names |= subgraph_reads(n)
    return names


def reads(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Every value name the nodes read: their inputs and what their subgraphs read."""
    names = set()
    for node in nodes:
        names.update(node.input)
        names |= subgraph_reads(node)
    return names


def attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes by name, as Python values (strings as bytes)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def element_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Known TensorProto element types by value name (graph inputs/outputs, value_info, initializers)."""
    types = {t.name: t.data_type for t in graph.initializer}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    return types


def read_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """How many times each value is read: node inputs, graph outputs, and any read inside a subgraph (the last
    two counted twice, so such a value is never taken for a single-reader intermediate)."""
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
        for name in subgraph_reads(node):
            counts[name] = counts.get(name, 0) + 2
    for o in graph.output:
        counts[o.name] = counts.get(o.name, 0) + 2
    return counts


def producers(graph: onnx.GraphProto) -> dict[str, int]:
    """Value name -> index in graph.node of the node that computes it."""
    return {o: k for k, n in enumerate(graph.node) for o in n.output}


def readers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Value name -> indices (ascending) of the nodes listing it as an input (each node once)."""
    found: dict[str, list[int]] = {}
    for k, n in enumerate(graph.node):
        for i in dict.fromkeys(n.input):
            found.setdefault(i, []).append(k)
    return found


BATCH_OPS = ("Shape", "Size")  # their value is the batch size, not a function of the sources' values


def source_cone(graph: onnx.GraphProto, sources: tuple[str, ...]) -> tuple[set[int], set[str], set[str], set[int]]:
    """What the graph computes from `sources` (value names) and constants alone, in one topological sweep:
    (nodes computing source-dependent values, those values with the sources, constant values (initializers,
    "" and outputs of nodes reading constants only), nodes computing constants). Shape/Size and control flow
    (whose bodies may read outer values not listed as inputs) are never in the cone."""
    constant = {t.name for t in graph.initializer} | {""}
    depends, nodes, constant_nodes = set(sources), set(), set()
    for k, node in enumerate(graph.node):
        if node.op_type in BATCH_OPS:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if all(i in depends or i in constant for i in node.input):
            if any(i in depends for i in node.input):
                nodes.add(k)
                depends.update(node.output)
            else:  # Constant nodes and weight-only arithmetic: constants
                constant.update(node.output)
                constant_nodes.add(k)
    return nodes, depends, constant, constant_nodes


def side_values(graph: onnx.GraphProto, sources: tuple[str, ...]) -> set[str]:
    """Values computed from `sources` and constants only (the affine-chain pass's side values)."""
    _, depends, constant, _ = source_cone(graph, sources)
    return (depends | constant) - {""}


def names_in_use(graph: onnx.GraphProto) -> set[str]:
    """Every value and node name of the graph (initializers, inputs, outputs, value_info, node inputs,
    outputs and names)."""
    taken = {t.name for t in graph.initializer} | {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
    for n in graph.node:
        taken.update(n.input)
        taken.update(n.output)
        taken.add(n.name)
    return taken


def name_factory(taken: set[str], base: str, prefix: str = ""):
    """fresh(role) -> `base/prefix+role` (+ `_k` for the first free counter k), never a name in `taken` nor
    one this factory gave before. `taken` is read, not changed."""
    given: set[str] = set()

    def fresh(role: str) -> str:
        k, name = 0, f"{base}/{prefix}{role}"
        while name in taken or name in given:
            k += 1
            name = f"{base}/{prefix}{role}_{k}"
        given.add(name)
        return name

    return fresh


def replace_nodes(graph: onnx.GraphProto, replace: dict[int, list[onnx.NodeProto]], removed: set[int]) -> None:
    """One batched edit of graph.node: node k becomes the nodes `replace[k]` (in that order), nodes in
    `removed` (and not in `replace`) go; the others keep their order."""
    nodes = []
    for k, node in enumerate(graph.node):
        if k in replace:
            nodes.extend(replace[k])
        elif k not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    """Forget the value_info of values that no longer exist."""
    kept = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def prune_initializers(graph: onnx.GraphProto, candidates: set[str] | None = None,
                       added: Iterable[onnx.TensorProto] = ()) -> None:
    """Drop the initializers nothing reads any more (node inputs, subgraph reads, graph outputs), of
    `candidates` only when given; then append `added`. The survivors keep their order and stay where they are
    (protobuf would copy every one taken out and put back: a full-size model's weights are GBs)."""
    read = reads(graph.node) | {o.name for o in graph.output}
    drop = [k for k, t in enumerate(graph.initializer)
            if t.name not in read and (candidates is None or t.name in candidates)]
    for k in reversed(drop):
        del graph.initializer[k]
    graph.initializer.extend(added)


def live_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` (topologically sorted) without those whose outputs nothing reads, transitively: a value every
    reader of which was folded away (sigma once all of sigma's uses are tables) would otherwise be computed
    at every iteration (ONNX Runtime does not prune a Loop body)."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            needed |= subgraph_reads(node)
    return kept[::-1]


def submodel(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
             outputs: list[str], name: str) -> onnx.ModelProto:
    """A model of `nodes` (topologically sorted, from `model`'s graph) computing the named `outputs` (types left
    to the runtime) from `inputs`, with the initializers of `model` they read, `model`'s opsets and IR version:
    the part of a graph the compiler evaluates once with ONNX Runtime."""
    used = reads(nodes)
    graph = helper.make_graph(nodes, name, inputs, [helper.make_empty_tensor_value_info(o) for o in outputs],
                              initializer=[t for t in model.graph.initializer if t.name in used])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub


@contextlib.contextmanager
def quiet_session(model: onnx.ModelProto, optimized: bool = True) -> Iterator:
    """An ONNX Runtime CPU session of `model`, warnings off (the graphs the compiler evaluates leave some
    Constant nodes or inputs unused, which ORT reports at every session). Models over SESSION_FILE_BYTES go
    through a temporary file with external weights, kept while the session is in use (ONNX Runtime reads the
    weights from it: no serialised copy of them, no second parse; `model` gets them back afterwards), as models
    over protobuf's 2 GB limit must. `optimized=False`: ONNX Runtime's graph optimisations off (a probe of
    shapes: no re-laid-out copies of the weights)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if stored_bytes(model) < SESSION_FILE_BYTES:
        yield ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return
    with on_disk(model) as path:
        yield ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def on_disk(model: onnx.ModelProto) -> Iterator[str]:
    """The path of a copy of `model` (a flat graph) in a temporary folder, its initializers' data in one
    external file written tensor by tensor: no serialised copy of the weights. `model` itself is not touched
    (protobuf keeps a cleared tensor's memory until the whole message is freed: moving the data out and back
    would double it)."""
    g = model.graph
    with tempfile.TemporaryDirectory(prefix="iia-model-") as tmp:
        shadow = helper.make_model(helper.make_graph(g.node, g.name, g.input, g.output, value_info=g.value_info),
                                   opset_imports=list(model.opset_import))
        shadow.ir_version = model.ir_version
        shadow.functions.extend(model.functions)
        with open(f"{tmp}/weights.bin", "wb") as f:
            for t in g.initializer:
                out = shadow.graph.initializer.add()
                if not t.HasField("raw_data") or _stored_size(t) < INLINE_BYTES:  # shapes, axes: read by inference
                    out.CopyFrom(t)
                    continue
                out.name, out.data_type = t.name, t.data_type
                out.dims.extend(t.dims)
                offset = f.tell()
                f.write(t.raw_data)
                out.data_location = TensorProto.EXTERNAL
                for key, value in (("location", "weights.bin"), ("offset", offset), ("length", f.tell() - offset)):
                    entry = out.external_data.add()
                    entry.key, entry.value = key, str(value)
        onnx.save_model(shadow, f"{tmp}/model.onnx")
        del shadow
        yield f"{tmp}/model.onnx"


INLINE_BYTES = 1024  # on_disk keeps smaller tensors in the model (as onnx's own external-data threshold)


def _stored_size(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data from its header (no copy of the data)."""
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def stored_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the top-level initializers' data, from their headers: `ModelProto.ByteSize()` would encode the
    whole message to count it (GBs of buffer at full size)."""
    return sum(_stored_size(t) for t in model.graph.initializer)


def check_model_proto(model: onnx.ModelProto) -> None:
    """onnx.checker on `model`; one over SESSION_FILE_BYTES is checked from a file (`on_disk`), not serialised."""
    if stored_bytes(model) < SESSION_FILE_BYTES:
        onnx.checker.check_model(model)
        return
    with on_disk(model) as path:
        onnx.checker.check_model(path)


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim; nothing elsewhere): a stage that freed a
    graph's GBs of tensors leaves them in the heap, counted in the process's resident memory, otherwise."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all stored tensors: initializers plus tensor-valued Constant nodes, subgraphs included (what
    weight sharing bounds)."""
    return _graph_bytes(model.graph)


def _graph_bytes(graph: onnx.GraphProto) -> int:
    """Stored bytes of a graph and of its subgraphs (a Loop body holds the loop-form denoiser's weights)."""
    total = 0
    for t in graph.initializer:
        total += numpy_helper.to_array(t).nbytes if not t.external_data else _external_size(t)
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                total += numpy_helper.to_array(a.t).nbytes
            elif a.type == onnx.AttributeProto.GRAPH:
                total += _graph_bytes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                total += sum(_graph_bytes(g) for g in a.graphs)
    return total


def _external_size(t: onnx.TensorProto) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    return 0


class GraphBuilder:
    """Collects nodes and small constant initializers with unique names (equal constants stored once)."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._consts: dict[tuple, str] = {}
        self._count = 0

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"iia/{base}_{self._count}"

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"iia/const_{len(self._consts)}"
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def inner(self, count: int) -> "GraphBuilder":
        """A builder for a subgraph body: its value names counted from `count` (never colliding with this
        builder's), its constants stored in THIS builder (the outer graph), shared with it."""
        body = GraphBuilder()
        body._count = count
        body._consts, body.initializers = self._consts, self.initializers
        return body


class Index:
    """Producer, readers, read counts and initializers of a graph's values, kept up to date by its own edit
    methods instead of being rebuilt after each edit (for passes that edit one match at a time and look
    again). Nodes are addressed by their position in graph.node; a removed node is only marked until
    `commit`, so positions stay valid meanwhile. `in_use` answers what `names_in_use` would."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.counts = read_counts(graph)
        self.readers = readers(graph)
        self.producer = producers(graph)
        self.initializers = {t.name: t for t in graph.initializer}
        self.removed: set[int] = set()
        self._uses: dict[str, int] = {}
        names = [t.name for t in graph.initializer] + [v.name for v in [*graph.input, *graph.output, *graph.value_info]]
        for n in graph.node:
            names += [*n.input, *n.output, n.name]
        self._use(names, 1)
        self.in_use = _InUse(self._uses)

    def _use(self, names: Iterable[str], step: int) -> None:
        for name in names:
            self._uses[name] = self._uses.get(name, 0) + step

    def nodes(self) -> Iterator[tuple[int, onnx.NodeProto]]:
        """(position, node) of the nodes not removed, in order."""
        return ((k, n) for k, n in enumerate(self.graph.node) if k not in self.removed)

    def set_input(self, k: int, j: int, name: str) -> None:
        """Node k reads `name` as its input j."""
        node = self.graph.node[k]
        old = node.input[j]
        node.input[j] = name
        self.counts[old] -= 1
        self.counts[name] = self.counts.get(name, 0) + 1
        self._use([old], -1)
        self._use([name], 1)
        if old not in node.input:
            self.readers[old].remove(k)
        if k not in self.readers.setdefault(name, []):
            bisect.insort(self.readers[name], k)

    def remove_node(self, k: int) -> None:
        """Node k is gone (its outputs must have no reader left)."""
        node = self.graph.node[k]
        for name in dict.fromkeys(node.input):
            self.readers[name].remove(k)
        for name in node.input:
            self.counts[name] -= 1
        for name in node.output:
            self.producer.pop(name, None)
        self._use([*node.input, *node.output, node.name], -1)
        self.removed.add(k)

    def add_initializers(self, tensors: list[onnx.TensorProto]) -> None:
        self.graph.initializer.extend(tensors)
        self.initializers.update((t.name, t) for t in tensors)
        self._use([t.name for t in tensors], 1)

    def drop_initializers(self, names: set[str]) -> None:
        """Remove the named initializers, in place: the survivors keep their order and are not copied (taking
        them out and back would copy every weight, and protobuf keeps the old copies' memory)."""
        if not names:
            return
        for name in names:
            self.initializers.pop(name, None)
        for k in reversed([k for k, t in enumerate(self.graph.initializer) if t.name in names]):
            del self.graph.initializer[k]
        self._use(names, -1)

    def commit(self) -> None:
        """Delete the removed nodes from graph.node, in one batch (positions change: the index is spent)."""
        replace_nodes(self.graph, {}, self.removed)
        self.removed = set()


class _InUse:
    def __init__(self, uses: dict[str, int]):
        self._uses = uses

    def __contains__(self, name: str) -> bool:
        return self._uses.get(name, 0) > 0
