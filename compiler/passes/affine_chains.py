"""Collapse per-channel affine chains on the denoiser's main path into one Mul and one Add.

A residual block normalises its input and then applies two affine maps in a row: GroupNorm's own
`x * gamma + beta` and the conditioning modulation `x * (1 + s) + t` (s, t computed from sigma and the class
label). That is four full-tensor passes over the activations; written as `x * scale + shift` with

    scale = gamma * (1 + s),   shift = beta * (1 + s) + t

it is two, and scale/shift depend on sigma, labels and weights only: they join the conditioning cone, so
the compiler can evaluate them once per (step, label) into tables instead of at every call.

`side` names the values computed from constants and conditioning only (initializers, Constant outputs,
sigma/class_labels and everything computed from them). A chain is a run of elementwise Mul/Add nodes
(Sub by a side value `x - d`, Div by one `x / c` in floating point) each taking one main-path input and one
side input, where every intermediate main-path value has exactly one consumer and is not a graph output.
Walking the chain keeps (scale, shift) as side expressions: Mul c -> (scale*c, shift*c); Add d -> shift+d;
Sub d -> shift-d; Div c -> (scale/c, shift/c).

Shapes: the rewrite is the elementwise identity ((x*c1 + d1)*c2 ... ) = x*(c1*c2...) + (d1*c2 ...) on the
multidirectional broadcast of all operands. Every side operand of the chain ends in scale or in shift, and
broadcasting is associative and commutative, so the output shape (and every value) is the chain's own:
no shape information is needed. Float results change by re-association only (a few ulp).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from ..graph import (DEFAULT_DOMAINS, FLOAT_TYPES, drop_value_info, element_types, name_factory, names_in_use, read_counts,
                     replace_nodes)

AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


@dataclass(frozen=True)
class Link:
    """One elementwise node of a chain: `output = op(main, side)` (main is input 0 for Sub/Div)."""
    index: int  # position in graph.node
    op: str
    main: str
    side: str
    output: str


def affine_link(index: int, node: onnx.NodeProto, side: set[str], types: dict[str, int]) -> Link | None:
    """The node as a chain link, or None when it is not a plain elementwise op of one main and one side value."""
    if (node.op_type not in AFFINE_OPS or node.domain not in DEFAULT_DOMAINS or node.attribute
            or len(node.input) != 2 or len(node.output) != 1):
        return None
    a, b = node.input
    if not a or not b or (a in side) == (b in side):
        return None
    main, other = (b, a) if a in side else (a, b)
    if node.op_type in ("Sub", "Div") and main != a:  # d - x and c / x are not affine in the same form
        return None
    if node.op_type == "Div" and types.get(node.output[0], types.get(other)) not in FLOAT_TYPES:
        return None  # x / c == x * (1/c) only in floating point
    return Link(index, node.op_type, main, other, node.output[0])


def find_chains(graph: onnx.GraphProto, side: set[str]) -> list[list[Link]]:
    """Maximal chains of links joined through single-consumer, non-output main-path values (length >= 2)."""
    types = element_types(graph)
    counts = read_counts(graph)
    links = {k: link for k, n in enumerate(graph.node) if (link := affine_link(k, n, side, types))}
    by_main = {link.main: link for link in links.values() if counts.get(link.main, 0) == 1}
    continued = {by_main[link.output].index for link in links.values() if link.output in by_main}
    chains = []
    for k in sorted(links):
        if k in continued:
            continue
        chain = [links[k]]
        while chain[-1].output in by_main:
            chain.append(by_main[chain[-1].output])
        if len(chain) >= 2:
            chains.append(chain)
    return chains


def _coefficients(chain: list[Link], fresh) -> tuple[list[onnx.NodeProto], str | None, str | None]:
    """Side nodes computing the chain's combined (scale, shift); None stands for 1 (scale) or 0 (shift)."""
    nodes: list[onnx.NodeProto] = []

    def emit(op: str, inputs: list[str], role: str) -> str:
        out = fresh(role)
        nodes.append(helper.make_node(op, inputs, [out], name=fresh(role + "_node")))
        return out

    scale = shift = None
    for link in chain:
        if link.op == "Mul":
            scale = link.side if scale is None else emit("Mul", [scale, link.side], "scale")
            shift = None if shift is None else emit("Mul", [shift, link.side], "shift")
        elif link.op == "Div":
            scale = (emit("Reciprocal", [link.side], "scale") if scale is None
                     else emit("Div", [scale, link.side], "scale"))
            shift = None if shift is None else emit("Div", [shift, link.side], "shift")
        elif link.op == "Add":
            shift = link.side if shift is None else emit("Add", [shift, link.side], "shift")
        else:  # Sub
            shift = emit("Neg", [link.side], "shift") if shift is None else emit("Sub", [shift, link.side], "shift")
    return nodes, scale, shift


def collapse_affine_chains(graph: onnx.GraphProto, side: set[str]) -> int:
    """Rewrite every affine chain that gets shorter as `Add(Mul(x, scale), shift)`, in place.

    graph: the denoiser graph (default-domain Mul/Add/Sub/Div are considered; nodes with attributes or in
    other domains are left alone). side: names of constant/conditioning-only values; the new scale/shift
    values (and their intermediates) are added to it. The chain's final output keeps its name, so consumers
    are untouched; the new nodes replace the chain's last node in the node list (every operand is defined
    by then, so the list stays topologically sorted); value_info entries of removed intermediates are
    dropped. Returns the net number of main-path nodes removed (chain nodes minus the Mul/Add put in their
    place); the side nodes added are not counted (they are per-(step, label) constants to the compiler).
    """
    chains = find_chains(graph, side)
    replace: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    dropped_values: set[str] = set()
    saved = 0
    taken = names_in_use(graph)  # the graph is edited once, after the loop
    for chain in chains:
        fresh = name_factory(taken, chain[-1].output, prefix="affine_")
        side_nodes, scale, shift = _coefficients(chain, fresh)
        main_ops = (scale is not None) + (shift is not None)
        if main_ops >= len(chain):
            continue
        x, out = chain[0].main, chain[-1].output
        main_nodes = []
        if scale is not None:
            scaled = fresh("scaled") if shift is not None else out
            main_nodes.append(helper.make_node("Mul", [x, scale], [scaled], name=fresh("mul")))
            x = scaled
        if shift is not None:
            main_nodes.append(helper.make_node("Add", [x, shift], [out], name=fresh("add")))
        replace[chain[-1].index] = side_nodes + main_nodes
        removed.update(link.index for link in chain)
        dropped_values.update(link.output for link in chain[:-1])
        side.update(o for n in side_nodes for o in n.output)
        saved += len(chain) - main_ops
    if not replace:
        return 0
    replace_nodes(graph, replace, removed)
    drop_value_info(graph, dropped_values)
    return saved


