"""Several compiled artifacts of ONE model and program against the numpy loop users would otherwise write.

    python scripts/compare_artifacts.py ART [ART ...] --batch 1,8,32 --threads 1 --iters 60 [--clock cpu]

Per batch size: the loop around the FIRST artifact's denoiser.onnx (iia.runtime.loop, its program.json; the
denoiser session fixed to that batch, as iia-bench does for static-batch graphs) and each artifact's
sampler.onnx (session fixed to the batch), timed in one interleaved run (iia.evaluation.bench.time_interleaved),
medians. Each graph's images are first checked against the loop's (max abs <= 1e-3 x their scale, as iia-bench). Prints loop ms and, per
artifact, graph ms and loop/graph (= iia-bench's speedup_vs_loop). Used for docs/performance.md's
change -> ratio table: compile the same model once per compiler version and pass the artifacts in order.
Run from the repository root (imports this checkout's iia).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iia.evaluation.bench import CLOCKS, LOOP_TOLERANCE, time_interleaved  # noqa: E402
from iia.runtime.contract import IMAGES, LABELS, NOISE, draw_labels, draw_noise, read_manifest  # noqa: E402
from iia.runtime.program import read_program  # noqa: E402
from iia.runtime.loop import DenoiserLoop  # noqa: E402
from iia.runtime.onnx_backend import OrtSession, session_options  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS))
    parser.add_argument("--no-spin", action="store_true", help="idle ONNX Runtime threads sleep instead of spinning "
                        "(all sessions alike; steadier 2-thread numbers on a 2-core machine)")
    args = parser.parse_args()
    import onnxruntime as ort

    root = Path(args.artifacts[0])
    manifest = read_manifest(root)
    plan, label_dim = read_program(root, manifest), int(manifest["label_dim"])
    for batch in [int(b) for b in args.batch.split(",")]:
        loop = DenoiserLoop(OrtSession(root / "denoiser.onnx", "cpu", args.threads, static_batch=batch,
                                       spin=not args.no_spin), plan, label_dim > 0)
        noise = draw_noise(0, batch, manifest["sample_shape"])
        labels = draw_labels(0, batch, label_dim) if label_dim else None
        feeds = {NOISE: noise} | ({LABELS: labels} if label_dim else {})
        reference = loop(noise, labels)
        calls = {"loop": lambda: loop(noise, labels)}
        for k, art in enumerate(args.artifacts):
            sess = ort.InferenceSession(str(Path(art) / "sampler.onnx"),
                                        session_options(args.threads, batch, spin=not args.no_spin),
                                        providers=["CPUExecutionProvider"])
            diff = float(np.abs(sess.run([IMAGES], feeds)[0] - reference).max())
            scale = max(1.0, float(np.abs(reference).max()))
            if not diff <= LOOP_TOLERANCE * scale:  # iia-bench's check: relative to the images' scale
                raise SystemExit(f"{art}: images differ from the loop's by {diff:.3g} (scale {scale:.3g}): "
                                 "not the same model/program")
            calls[f"{k}:{Path(art).name}"] = lambda s=sess: s.run([IMAGES], feeds)
        med = {k: float(np.median(v)) * 1e3
               for k, v in time_interleaved(calls, 3, args.iters, clock=CLOCKS[args.clock]).items()}
        cells = " | ".join(f"{k} {v:.3f} ms ({med['loop'] / v:.3f}x)" for k, v in med.items() if k != "loop")
        print(f"batch {batch}, {args.threads} thread(s){', no spin' if args.no_spin else ''}, {args.clock}: loop {med['loop']:.3f} ms | {cells}", flush=True)


if __name__ == "__main__":
    main()
