"""`iia-sample` and the body of `iia-bench`: torch-free (the eager baseline is passed in by iia.evaluation)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iia.cli import int_list, run_cli

from .contract import BACKENDS

BACKEND_CHOICES = ("auto", *BACKENDS)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="DIR", help="artifact directory written by iia-compile")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="default auto: TensorRT > ONNX Runtime CUDA > ONNX Runtime CPU, the first usable here")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")


def _labels_for(sampler, given: list[int] | None, n: int, seed: int):
    import numpy as np

    from .contract import draw_labels

    if not sampler.conditional:
        if given:
            raise ValueError("this model is unconditional: --labels does not apply")
        return None
    if not given:
        _err(f"no --labels given: image k of seed s gets class (s + k) mod {sampler.label_dim}")
        return draw_labels(seed, n, sampler.label_dim)
    ids = np.asarray(given, dtype=np.int64)
    return np.resize(ids, n)  # repeated cyclically to n samples


def _sample(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="iia-sample",
        description="Sample from a compiled artifact: a PNG grid plus an .npz of the raw outputs "
                    "(images float32, noise, labels) beside it.")
    _add_common(parser)
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="first image seed: image k uses numpy default_rng(seed + k) (default 0)")
    parser.add_argument("--labels", type=int_list, default=None,
                        help="class ids, comma-separated, repeated to --n (default: image k of seed s gets class (s + k) mod label_dim)")
    parser.add_argument("--out", default="grid.png", help="PNG path (default grid.png); the .npz goes beside it")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    import numpy as np

    from . import describe, draw_noise, load
    from .grid import grid_array, save_npz, save_png

    sampler = load(args.artifact, args.backend, threads=args.threads)
    _err(f"{sampler!r}\n{describe(sampler)}")
    labels = _labels_for(sampler, args.labels, args.n, args.seed)
    noise = draw_noise(args.seed, args.n, sampler.sample_shape)  # drawn at once: independent of max_batch
    images, images_u8 = [], []
    for start in range(0, args.n, sampler.max_batch):
        part = slice(start, start + sampler.max_batch)
        out = sampler.sample(noise[part], class_labels=None if labels is None else labels[part])
        images.append(out.images)
        if out.images_uint8 is not None:
            images_u8.append(out.images_uint8)
    out_png = Path(args.out)
    out_npz = out_png.with_suffix(".npz")
    save_npz(out_npz, images=np.concatenate(images), noise=noise,
             labels=np.zeros(0, np.int64) if labels is None else labels, seed=np.int64(args.seed))
    if not sampler.is_image:
        _err(f"a PNG grid needs an image model ([C, H, W] samples); this one has sample shape "
             f"{list(sampler.sample_shape)}, so only the .npz was written")
        print(f"wrote {out_npz}")
        return 0
    grid = grid_array(np.concatenate(images_u8))
    save_png(grid, out_png)
    print(f"wrote {out_png} ({grid.shape[1]}x{grid.shape[0]}) and {out_npz}")
    return 0


def bench(argv=None, eager_factory=None) -> int:
    """`iia-bench`'s body; `eager_factory` (see iia.runtime.bench.EagerFactory) supplies the eager baseline."""
    parser = argparse.ArgumentParser(
        prog="iia-bench",
        description="Latency of a compiled sampler per batch size: p50/p90/p99, images/s, the overhead ratio "
                    "sampler / (NFE x one denoiser call) on the same backend (floor 1.0), and the speed-up over "
                    "the PyTorch eager sampler (same solver, coefficients, device and threads).")
    _add_common(parser)
    parser.add_argument("--batch", type=int_list, default=[1, 8, 32], help="batch sizes (default 1,8,32)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager reference")
    parser.add_argument("--eager-dtype", default="float32", choices=("float32", "float64"),
                        help="state dtype of the eager loop (default float32, what a service runs)")
    parser.add_argument("--model", default=None,
                        help="model for the eager reference (default: rebuilt from the manifest's identity)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .bench import BenchOptions, format_table, run_bench

    opts = BenchOptions(backend=args.backend, batches=tuple(args.batch), warmup=args.warmup, iters=args.iters,
                        threads=args.threads, eager=not args.no_eager, eager_dtype=args.eager_dtype,
                        model=args.model, seed=args.seed)
    rows = run_bench(args.artifact, opts, log=_err, eager_factory=eager_factory)
    print(format_table(rows))
    if args.json:
        from .contract import write_json_atomic

        write_json_atomic(Path(args.json), rows)
        print(f"wrote {args.json}")
    return 0


def sample_main(argv=None) -> int:
    return run_cli(_sample, argv)


def bench_main(argv=None) -> int:
    """`iia-bench` without an eager baseline (the installed `iia-bench` is iia.evaluation.cli's, which adds it)."""
    return run_cli(bench, argv)


if __name__ == "__main__":
    sys.exit(sample_main())
