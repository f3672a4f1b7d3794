"""A per-request guidance artifact made by hand, with the contract's shape, until `iia-compile --guidance LO:HI`
produces real ones: a compiled artifact whose sampler.onnx is rewritten to take `guidance` float32 [B] and
its manifest rewritten (make_manifest, real sha256s) to declare it. Every runtime loads it as it would a
compiled one.

The rewritten graph scales each image's noise by its own guidance scale before the sampler runs
(noise_k * g_k): every output (images, images_uint8) then depends on g, per image and nonlinearly, so a
runtime that feeds the wrong scale, or one scale for all, or mixes images up in a batch, gives other bits.
The loop baseline's files follow: program.json first computes the scaled noise as a combine op whose weight is
given at two guidance nodes, lo and hi (the plan's per-node weights; their hat interpolant at g is g itself),
and denoiser.onnx takes `guidance` [B] as its last input, as a guided denoiser does (here it adds g * 0).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from iia.runtime.contract import (DENOISED, DENOISER_ONNX, GOLDEN_INPUTS, GOLDEN_OUTPUTS, GUIDANCE, MANIFEST, NOISE,
                                  PROGRAM, SAMPLER_ONNX, read_manifest, sha256_file, write_json_atomic)
from iia.runtime.manifest import guidance_input, make_manifest
from iia.runtime.program import check_program

SCALED = "iia_test_guided_noise"


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of value `old` in `graph` and its subgraphs (Loop bodies read outer values by name) -> `new`."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_reads(attr.g, old, new)
            for sub in attr.graphs:
                _rename_reads(sub, old, new)


def guided_sampler(model: onnx.ModelProto, rank: int) -> onnx.ModelProto:
    """sampler.onnx taking `guidance` [batch] after its other inputs: the sampler runs on noise * g per image."""
    graph = model.graph
    _rename_reads(graph, NOISE, SCALED)
    shape = helper.make_tensor("iia_test_guidance_shape", TensorProto.INT64, [rank + 1], [-1] + [1] * rank)
    graph.initializer.append(shape)
    nodes = [helper.make_node("Reshape", [GUIDANCE, shape.name], ["iia_test_guidance_column"]),
             helper.make_node("Mul", [NOISE, "iia_test_guidance_column"], [SCALED])]
    for k, node in enumerate(nodes):
        graph.node.insert(k, node)
    graph.input.append(helper.make_tensor_value_info(GUIDANCE, TensorProto.FLOAT, ["batch"]))
    onnx.checker.check_model(model)
    return model


def guided_denoiser(model: onnx.ModelProto) -> onnx.ModelProto:
    """denoiser.onnx taking `guidance` [batch] last: denoised + 0 * g (bit-identical for finite g)."""
    graph = model.graph
    raw = "iia_test_denoised_raw"
    for node in graph.node:
        node.output[:] = [raw if name == DENOISED else name for name in node.output]
    rank = len(graph.output[0].type.tensor_type.shape.dim) - 1
    shape = helper.make_tensor("iia_test_guidance_shape", TensorProto.INT64, [rank + 1], [-1] + [1] * rank)
    zero = helper.make_tensor("iia_test_zero", TensorProto.FLOAT, [], [0.0])
    graph.initializer.extend([shape, zero])
    graph.node.extend([helper.make_node("Reshape", [GUIDANCE, shape.name], ["iia_test_guidance_column"]),
                       helper.make_node("Mul", ["iia_test_guidance_column", zero.name], ["iia_test_zeros"]),
                       helper.make_node("Add", [raw, "iia_test_zeros"], [DENOISED])])
    graph.input.append(helper.make_tensor_value_info(GUIDANCE, TensorProto.FLOAT, ["batch"]))
    onnx.checker.check_model(model)
    return model


def guided_program(plan: dict, lo: float, hi: float) -> dict:
    """program.json whose first op scales the noise by g (weights lo and hi at guidance nodes lo and hi)."""
    rename = lambda name: SCALED if name == NOISE else name  # noqa: E731
    ops = [{"op": "combine", "out": SCALED, "terms": [[NOISE, [lo, hi]]]}]
    for op in plan["ops"]:
        op = dict(op)
        if op["op"] == "denoise":
            op["state"] = rename(op["state"])
        else:
            op["terms"] = [[rename(name), w] for name, w in op["terms"]]
        ops.append(op)
    return check_program({**plan, "guidance": {"nodes": [lo, hi]}, "ops": ops}, PROGRAM)


def make_guided_artifact(src: str | Path, dst: str | Path, lo: float = 1.0, hi: float = 3.0,
                         default: float = 1.5) -> Path:
    """A copy of artifact `src` at `dst` whose graph takes guidance in [lo, hi] (default `default`), its manifest
    rewritten with make_manifest: the guidance input, the top-level guidance record, the rewritten files' sha256
    and bytes (sampler.onnx, denoiser.onnx, program.json; the golden files, made for the graph without guidance,
    are dropped)."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    model = guided_sampler(onnx.load(str(dst / SAMPLER_ONNX)), len(manifest["sample_shape"]))
    onnx.save(model, str(dst / SAMPLER_ONNX))
    onnx.save(guided_denoiser(onnx.load(str(dst / DENOISER_ONNX))), str(dst / DENOISER_ONNX))
    write_json_atomic(dst / PROGRAM, guided_program(json.loads((dst / PROGRAM).read_text()), lo, hi))
    for name in (GOLDEN_INPUTS, GOLDEN_OUTPUTS):
        (dst / name).unlink(missing_ok=True)
        manifest["files"].pop(name, None)
    manifest.pop("golden", None)
    for name in (SAMPLER_ONNX, DENOISER_ONNX, PROGRAM):
        manifest["files"][name] = {"sha256": sha256_file(dst / name), "bytes": (dst / name).stat().st_size}
    manifest["inputs"] = [*manifest["inputs"], guidance_input(lo, hi, default)]
    manifest["guidance"] = {"range": [lo, hi], "default": default, "nodes": [lo, default, hi],
                            "interpolation": "test fixture: noise scaled by g"}
    fields = {k: v for k, v in manifest.items() if k not in ("schema", "schema_version")}
    write_json_atomic(dst / MANIFEST, make_manifest(**fields))
    return dst
