"""`iia-sample`: torch-free, like the rest of iia.runtime."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from iia.cli import (OutputFiles, ProgressBar, add_options, check_options, check_output_file, cli_parser, int_list,
                     option, options_from, run_cli, written)

from .options import RunOptions
from .contract import MAX_LABEL_DIM, MAX_SEED, refuse_inside_artifact

GRID_MAX = 1024  # the PNG grid shows at most this many samples (all of them go to the .npz)


@dataclass
class SampleOptions(RunOptions):
    """`iia-sample`'s options, declared once (bounds checked by iia.cli.check_options, naming the flag)."""

    n: int = option(64, "number of samples; drawn and written in chunks of the artifact's max batch", lo=1, hi=10**7)
    seed: int = option(0, "first image seed: image k uses numpy default_rng(seed + k)", lo=0, hi=MAX_SEED)
    labels: list[int] | None = option(None, "class ids, comma-separated, repeated to --n (default: image k of seed s "
                                            "gets class (s + k) mod label_dim)", parse=int_list, lo=0, hi=MAX_LABEL_DIM - 1)
    out: str = option("grid.png", "PNG grid path; the .npz of raw outputs (images float32, noise, labels, seed) goes "
                                  "beside it with suffix .npz (an --out ending in .npz names the .npz, the PNG beside it)")


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="DIR", help="artifact directory written by iia-compile")


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
    bad = [label for label in given if not 0 <= label < sampler.label_dim]  # one message for -1 and for 10
    if bad:
        raise ValueError(f"--labels {bad[0]} out of range: this model has label_dim {sampler.label_dim}, expected "
                         f"ids in [0, {sampler.label_dim - 1}]")
    if len(given) > n:
        raise ValueError(f"--labels gives {len(given)} class ids for --n {n} samples: the ids past the "
                         f"first {n} would be unused")
    ids = np.asarray(given, dtype=np.int64)
    return np.resize(ids, n)  # repeated cyclically to n samples


def outside_artifact(path: Path | None, artifact: str, flag: str) -> None:
    """Refuse an output path inside the artifact being read (ValueError naming `flag`): writing there would
    change, or overwrite, a verified artifact (--json DIR/manifest.json destroyed it)."""
    if path is None:
        return
    from .contract import artifact_root

    root = artifact_root(artifact).resolve()
    target = path.resolve()
    if target == root or root in target.parents:
        raise ValueError(f"{flag} {path}: is inside the artifact {artifact}; write outputs elsewhere")


def output_paths(out: str) -> tuple[Path, Path]:
    """(png, npz) for --out: distinct files, checked before any work."""
    path = check_output_file(out, "--out")
    if path.suffix.lower() not in (".png", ".npz"):
        raise ValueError(f"--out {out}: expected a name ending in .png (the grid; the .npz goes beside it) or .npz")
    png, npz = path.with_suffix(".png"), path.with_suffix(".npz")
    # the name given keeps its spelling (x.NPZ stays x.NPZ); its companion gets the lower-case suffix
    png, npz = (path, npz) if path.suffix.lower() == ".png" else (png, path)
    check_output_file(png, "--out")
    check_output_file(npz, "--out")
    return png, npz


def _sample(argv=None) -> int:
    parser = cli_parser(
        prog="iia-sample",
        description="Sample from a compiled artifact: a PNG grid plus an .npz of the raw outputs "
                    "(images float32, noise, labels; guidance: the scale of each image, for an artifact compiled "
                    "for a guidance range) beside it.")
    _add_common(parser)
    add_options(parser, SampleOptions)
    args = parser.parse_args(argv)
    opts = options_from(SampleOptions, args)
    check_options(opts)
    if opts.seed + opts.n - 1 > MAX_SEED:  # image k's seed is seed + k (before the artifact is loaded)
        raise ValueError(f"--seed {opts.seed} with --n {opts.n}: image seeds run to {opts.seed + opts.n - 1}, over "
                         f"the contract's {MAX_SEED} (give --seed <= {MAX_SEED - opts.n + 1})")
    png, npz = output_paths(opts.out)
    for path in (Path(opts.out), png, npz):  # the name given first: the error names what the user typed
        outside_artifact(path, args.artifact, "--out")
        refuse_inside_artifact(path, "--out")  # nor inside any other artifact
    import numpy as np

    from . import describe, draw_noise, load
    from .grid import NpzWriter, grid_array, save_png

    sampler = load(args.artifact, opts.backend, threads=opts.threads, spin=opts.spin)
    _err(f"{sampler!r}\n{describe(sampler)}")
    n, chunk = opts.n, sampler.max_batch
    try:  # a scale out of range, or one this artifact cannot take: before any work
        sampler.check_guidance(opts.guidance, 1)
    except ValueError as err:
        raise ValueError(f"--guidance {opts.guidance}: {err}") from None
    labels = _labels_for(sampler, opts.labels, n, opts.seed)
    parts = [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    shown = min(n, GRID_MAX) if sampler.is_image else 0
    grid_images = []
    bar = ProgressBar("sampling", enabled=len(parts) > 1)
    with OutputFiles("--out", [npz, png] if sampler.is_image else [npz]) as outputs:  # both or neither
        # streamed: memory holds one chunk (plus the grid's first GRID_MAX images)
        with outputs.writing(npz) as npz_temp, NpzWriter(npz_temp) as archive:
            with archive.array("images", np.float32, (n, *sampler.sample_shape)) as images:
                for k, part in enumerate(parts):
                    noise = draw_noise(opts.seed + part.start, part.stop - part.start, sampler.sample_shape)
                    out = sampler.sample(noise, class_labels=None if labels is None else labels[part],
                                         guidance=opts.guidance)
                    images.write(out.images)
                    if part.start < shown:
                        grid_images.append(out.images_uint8[: shown - part.start])
                    bar(part.stop, n)
            with archive.array("noise", np.float32, (n, *sampler.sample_shape)) as noise_out:
                for part in parts:  # per-image seeds: the same noise again, chunk by chunk
                    noise_out.write(draw_noise(opts.seed + part.start, part.stop - part.start, sampler.sample_shape))
            bar.close()
            archive.put("labels", np.zeros(0, np.int64) if labels is None else labels)
            archive.put("seed", np.int64(opts.seed))
            if sampler.guided:  # the scale every image used (float32, as the graph took it)
                archive.put("guidance", sampler.check_guidance(opts.guidance, n))
        if sampler.is_image:
            grid = grid_array(np.concatenate(grid_images))
            with outputs.writing(png) as png_temp:
                save_png(grid, png_temp)
        outputs.publish()
    written(npz)
    if not sampler.is_image:
        _err(f"a PNG grid needs an image model ([C, H, W] samples); this one has sample shape "
             f"{list(sampler.sample_shape)}, so only the .npz was written")
        print(f"wrote {npz}")
        return 0
    written(png)
    if shown < n:
        _err(f"the grid shows the first {shown} of {n} samples (all {n} are in {npz})")
    print(f"wrote {png} ({grid.shape[1]}x{grid.shape[0]}) and {npz}")
    return 0


def sample_main(argv=None) -> int:
    return run_cli(_sample, argv)


if __name__ == "__main__":
    sys.exit(sample_main())
