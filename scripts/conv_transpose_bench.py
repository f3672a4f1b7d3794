"""A 3x3 convolution with few output channels as Conv vs as the equal ConvTranspose, on ONNX Runtime CPU.

    python scripts/conv_transpose_bench.py [--threads 1] [--size 16] [--iters 300]

Why compiler/passes/small_convs.py `small_convs_to_transposed` exists and where its threshold (TRANSPOSE_MAX_OUT_CHANNELS)
comes from: ONNX Runtime runs Conv in a blocked channel layout (NCHWc, 8 channels a block with AVX2, 16 with
AVX-512) and pads the output channels up to a block, so C_in -> 3 costs what C_in -> 16 costs; ConvTranspose
is a GEMM whose cost follows C_out. Prints, per (C_in, batch, C_out), the median time of one session run of
each form (interleaved) and conv/transpose (> 1: the rewrite pays); both outputs are checked equal first.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def model(op: str, weight: np.ndarray, bias: np.ndarray, batch: int, c_in: int, c_out: int, size: int) -> bytes:
    node = helper.make_node(op, ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c_in, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c_out, size, size])],
                              initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), {args.size}x{args.size}, 3x3 pad 1; times in us")
    print(f"{'C_in':>5} {'batch':>5} {'C_out':>5} {'Conv':>9} {'ConvT':>9} {'Conv/ConvT':>10}")
    for c_in in (32, 128):
        for batch in (1, 8):
            for c_out in (1, 3, 4, 8, 16):
                w = (rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32)
                b = rng.standard_normal(c_out).astype(np.float32)
                w_t = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
                conv = ort.InferenceSession(model("Conv", w, b, batch, c_in, c_out, args.size), options,
                                            providers=["CPUExecutionProvider"])
                trans = ort.InferenceSession(model("ConvTranspose", w_t, b, batch, c_in, c_out, args.size), options,
                                             providers=["CPUExecutionProvider"])
                feed = {"x": rng.standard_normal((batch, c_in, args.size, args.size)).astype(np.float32)}
                assert np.allclose(conv.run(None, feed)[0], trans.run(None, feed)[0], atol=1e-4)
                times = {"conv": [], "trans": []}
                for _ in range(20):
                    conv.run(None, feed), trans.run(None, feed)
                for _ in range(args.iters):
                    for key, sess in (("conv", conv), ("trans", trans)):
                        t0 = time.perf_counter()
                        sess.run(None, feed)
                        times[key].append(time.perf_counter() - t0)
                a, t = (float(np.median(times[k])) * 1e6 for k in ("conv", "trans"))
                print(f"{c_in:>5} {batch:>5} {c_out:>5} {a:>9.1f} {t:>9.1f} {a / t:>10.2f}")


if __name__ == "__main__":
    main()
