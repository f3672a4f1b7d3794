"""Where a sampler graph's time goes: remove one kind of node from the denoiser in the Loop body and time it.

    python scripts/ablate_loop_body.py ARTIFACT [--batch 1,8] [--rounds 100] [--threads 1]

Each variant replaces the chosen denoiser nodes of the Loop body with Identity (their first input passes
through; only shape-preserving nodes are chosen, so the graph still runs but computes something else) and
is timed interleaved with the unchanged graph on ONNX Runtime CPU. The drop in time is what those nodes
cost inside the whole graph, ONNX Runtime's NCHWc reorders around them included, which a profile of
single kernels does not show. The images are meaningless; only the times are. Used for docs/performance.md
("what bounds an EDM-format pickle").
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

DENOISER_PREFIX = "iia/loop/den/"   # compiler/emit_loop.py names the Loop body's denoiser nodes so
NORM = ("InstanceNormalization", "BatchNormalization", "Reshape")
SILU = ("Sigmoid", "Mul")


def square_conv(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> bool:
    """A Conv whose weight is [C, C, k, k] (output shape = input shape with pads k - 1)."""
    if node.op_type != "Conv":
        return False
    shape = shapes.get(node.input[1])
    return shape is not None and shape[0] == shape[1]


def variant(model: onnx.ModelProto, drop: Callable[[onnx.NodeProto], bool]) -> bytes:
    """The model with the Loop body's denoiser nodes matching `drop` replaced by Identity."""
    out = copy.deepcopy(model)
    for node in out.graph.node:
        for attr in node.attribute:
            if attr.type != onnx.AttributeProto.GRAPH:
                continue
            for inner in attr.g.node:
                if inner.name.startswith(DENOISER_PREFIX) and drop(inner):
                    first = inner.input[0]
                    del inner.input[:]
                    inner.input.append(first)
                    del inner.attribute[:]
                    inner.op_type, inner.domain = "Identity", ""
    return out.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    model = onnx.load(str(args.artifact / "sampler.onnx"))
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:   # the loop form keeps the denoiser's weights in the Loop body
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                shapes.update((t.name, tuple(t.dims)) for t in attr.g.initializer)
    variants = {
        "unchanged": model.SerializeToString(),
        "no CxC convs": variant(model, lambda n: square_conv(n, shapes)),
        "no GroupNorm": variant(model, lambda n: n.op_type in NORM),
        "no InstanceNorm": variant(model, lambda n: n.op_type == "InstanceNormalization"),
        "no BatchNorm (affine)": variant(model, lambda n: n.op_type == "BatchNormalization"),
        "no SiLU": variant(model, lambda n: n.op_type in SILU),
        "no GroupNorm+SiLU": variant(model, lambda n: n.op_type in NORM + SILU),
    }
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in args.batch.split(",")):
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.log_severity_level = 3
        options.add_free_dimension_override_by_name("batch", batch)
        sessions = {k: ort.InferenceSession(m, options, providers=["CPUExecutionProvider"]) for k, m in variants.items()}
        feed = {}
        for inp in sessions["unchanged"].get_inputs():
            shape = [batch if not isinstance(d, int) else d for d in inp.shape]
            feed[inp.name] = (np.zeros(shape, np.int64) if "int" in inp.type
                              else rng.standard_normal(shape).astype(np.float32))
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.rounds):
            for key, sess in sessions.items():
                t0 = time.perf_counter()
                sess.run(["images"], feed)
                times[key].append(time.perf_counter() - t0)
        base = float(np.median(times["unchanged"]))
        print(f"batch {batch}, {args.threads} thread(s), medians of {args.rounds} interleaved rounds:")
        for key, values in times.items():
            median = float(np.median(values))
            print(f"  {key:24s} {median * 1e3:8.3f} ms  {100 * (base - median) / base:+6.1f}% of the graph")


if __name__ == "__main__":
    main()
