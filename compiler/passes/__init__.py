"""The sampler graph's rewrites, one module per pass, run in the order listed here.

Each pass states its identity and preconditions in its module docstring and edits the graph in place,
returning how many matches it rewrote. `optimize` runs the listed passes once, in order, on a copy of the
exported denoiser (`denoiser.onnx` stays as exported); any pass can be switched off by name. Order matters:
the affine chains take the conditioning modulation together with GroupNorm's own affine, and only what they
leave becomes BatchNormalization.

Not in the list: `weight_preprocessing` runs at export (it changes `denoiser.onnx` itself), `scalar_io`
matches EDM's scalings for the loop emitter (it needs the fold plan and edits nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx

from ..graph import side_values
from .affine_chains import collapse_affine_chains
from .batchnorm import affine_to_batchnorm, example_feeds
from .residual_scales import absorb_residual_scales
from .small_convs import small_convs_to_transposed


@dataclass(frozen=True)
class Pass:
    name: str  # what `optimize(..., disabled=)` calls it
    says: str  # the compile log's words for its count
    run: Callable[[onnx.ModelProto, tuple[str, ...]], int]  # (model, conditioning sources) -> matches rewritten


PASSES = (
    Pass("affine_chains", "main-path nodes saved by collapsing affine chains",
         lambda model, sources: collapse_affine_chains(model.graph, side_values(model.graph, sources))),
    Pass("batchnorm", "affines as BatchNormalization",
         lambda model, sources: affine_to_batchnorm(model, example_feeds(model))),
    Pass("residual_scales", "residual scales absorbed", lambda model, sources: absorb_residual_scales(model.graph)),
    Pass("small_convs", "small convolutions as ConvTranspose",
         lambda model, sources: small_convs_to_transposed(model.graph)),
)
PASS_NAMES = tuple(p.name for p in PASSES)


@dataclass(frozen=True)
class Optimized:
    model: onnx.ModelProto  # the rewritten copy
    counts: dict[str, int]  # pass name -> matches rewritten (every listed pass, 0 when off or none)

    def summary(self) -> str:
        """One line for the compile log: what each pass did, 'none' when nothing."""
        says = {p.name: p.says for p in PASSES}
        return ", ".join(f"{n} {says[name]}" for name, n in self.counts.items() if n) or "none"


def optimize(model: onnx.ModelProto, sources: tuple[str, ...], disabled: frozenset[str] = frozenset()) -> Optimized:
    """Run every pass of PASSES not in `disabled`, once, in order, on a copy of `model` (a denoiser graph);
    `sources`: the graph inputs the conditioning is computed from (sigma, and class labels when they are
    tabled), whose cone the affine-chain pass may extend. ValueError names an unknown pass."""
    unknown = sorted(set(disabled) - set(PASS_NAMES))
    if unknown:
        raise ValueError(f"no graph pass named {', '.join(unknown)}; the passes are {', '.join(PASS_NAMES)}")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    counts = {p.name: 0 if p.name in disabled else p.run(copy, sources) for p in PASSES}
    return Optimized(copy, counts)


def optimize_decoder(decoder: onnx.GraphProto) -> onnx.GraphProto:
    """The decode stage's graph with its small convolutions transposed (a VAE's last C -> 3 convolution; see
    small_convs), as a copy: the only pass that applies to a decoder."""
    copy = onnx.GraphProto()
    copy.CopyFrom(decoder)
    small_convs_to_transposed(copy)
    return copy
