"""Checks of an emitted sampler graph: ONNX validity, weight sharing, parity with the PyTorch sampler.

Parity runs through polygraphy: ONNX Runtime CPU (`OnnxrtRunner`) against a polygraphy runner that wraps
the PyTorch reference sampler, compared by `Comparator.compare_accuracy` with a simple elementwise check.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.comparator import Comparator
from polygraphy.comparator.compare import SimpleCompareFunc
from polygraphy.json import save_json

from iia.calibration.sampling import sample
from iia.calibration.solvers import Program
from iia.cli import Ticker
from iia.models.base import Denoiser
from iia.runtime.contract import (GOLDEN_INPUTS, GOLDEN_OUTPUTS, GUIDANCE, IMAGES, IMAGES_U8, LABELS, LATENTS, NOISE,
                                  ORT_CPU, draw_labels, draw_noise)
from iia.runtime.onnx_backend import OrtSession

from .graph import initializer_bytes

SAMPLER_CONST_PREFIX = "iia/"


class CheckError(ValueError):
    pass


def check_model_file(path: str | Path) -> None:
    """onnx.checker plus strict shape inference (`full_check`: types checked, errors raised) of a saved model,
    read by onnx's C++ checker from the file (external data beside it included): no serialised copy of a large
    graph in Python. Raises on an invalid graph."""
    onnx.checker.check_model(str(path), full_check=True)


def weight_bytes(model: onnx.ModelProto) -> dict:
    """Stored bytes split into the denoiser's tensors (weights) and the sampler's own baked scalars."""
    total = initializer_bytes(model)
    sampler = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer
                  if t.name.startswith(SAMPLER_CONST_PREFIX))
    return {"total": int(total), "sampler_constants": int(sampler), "weights": int(total - sampler)}


def check_weight_sharing(model: onnx.ModelProto, denoiser_bytes: int, param_bytes: int, limit: float = 1.10) -> dict:
    """Every call site must share the denoiser's tensors: the sampler graph stores at most `limit` x the
    bytes of ONE exported denoiser call (`denoiser_bytes`), plus its own baked scalars. Also reported against
    the module's parameter bytes (which the exporter itself may exceed by folding a weight)."""
    sizes = weight_bytes(model)
    ratio = sizes["weights"] / max(denoiser_bytes, 1)
    report = dict(sizes, denoiser_onnx_bytes=int(denoiser_bytes), param_bytes=int(param_bytes), ratio=round(ratio, 5),
                  ratio_vs_params=round(sizes["weights"] / max(param_bytes, 1), 5),
                  ratio_total_vs_params=round(sizes["total"] / max(param_bytes, 1), 5))
    if ratio > limit:
        raise CheckError(f"weight sharing violated: the graph stores {sizes['weights']} bytes of model tensors, "
                         f"one denoiser call (+ the decode stage) has {denoiser_bytes} ({ratio:.2f}x > {limit}x): a "
                         f"call site duplicates weights")
    return report


class TorchSamplerRunner(BaseRunner):
    """The PyTorch reference sampler behind polygraphy's runner interface (with `decode`, it also returns the
    decode stage's uint8 images of the float64 samples, cast to float32 as the graph's decoder receives them)."""

    def __init__(self, program: Program, denoiser: Denoiser, name: str = "pytorch-reference", decode: bool = False,
                 tick: Callable[[int], None] | None = None):
        super().__init__(name=name)
        self.program, self.denoiser, self.tick = program, denoiser, tick
        self.samples = LATENTS if denoiser.is_latent else IMAGES
        self.decode = denoiser.decode_stage() if decode else None

    def activate_impl(self):
        pass

    def deactivate_impl(self):
        pass

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata().add(NOISE, np.float32, (None, *self.denoiser.shape))
        if self.denoiser.conditional:
            meta.add(LABELS, np.int64, (None,))
        return meta

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        labels = torch.from_numpy(feed_dict[LABELS]) if LABELS in feed_dict else None
        with counting_calls(self.denoiser, self.tick):
            out = sample(self.program, self.denoiser, torch.from_numpy(feed_dict[NOISE]), labels).to(torch.float32)
        result = OrderedDict([(self.samples, out.numpy())])
        if self.decode is not None:
            with torch.no_grad():
                result[IMAGES_U8] = self.decode(out).numpy()
        self.inference_time = time.perf_counter() - start
        return result


def parity_feed(denoiser: Denoiser, batch: int, seed: int) -> OrderedDict:
    """The parity inputs: the contract's noise and labels for `seed` (what iia-sample would draw)."""
    feed = OrderedDict([(NOISE, draw_noise(seed, batch, denoiser.shape))])
    if denoiser.conditional:
        feed[LABELS] = draw_labels(seed, batch, denoiser.label_dim)
    scales = getattr(denoiser, "guidance_range", None)
    if scales is not None:  # a guidance range: every image at the default scale
        feed[GUIDANCE] = np.full(batch, scales.default, np.float32)
    return feed


def uint8_agreement(a: np.ndarray, b: np.ndarray, levels: int = 1) -> float:
    """Fraction of uint8 values of `a` and `b` that differ by at most `levels`."""
    if a.shape != b.shape:
        return 0.0
    return float((np.abs(a.astype(np.int16) - b.astype(np.int16)) <= levels).mean())


# The parity batch. 2 is the smallest that checks what parity must: a dynamic batch dimension and per-image
# inputs that are not mixed across images (a batch of 1 cannot show either). Models up to PARITY_LARGE_PARAMS
# keep 4 (their checks cost seconds; their golden files and manifests stay as they were); larger ones run 2,
# since the PyTorch side costs 2 x NFE denoiser calls per image (~0.2-0.3 s each at EDM's CIFAR-10 size on a CPU).
PARITY_BATCH, PARITY_BATCH_LARGE, PARITY_LARGE_PARAMS = 4, 2, 10_000_000


def parity_batch(denoiser: Denoiser) -> int:
    """PARITY_BATCH, or PARITY_BATCH_LARGE above PARITY_LARGE_PARAMS parameters."""
    params = sum(p.numel() for p in denoiser.net.parameters())
    return PARITY_BATCH_LARGE if params > PARITY_LARGE_PARAMS else PARITY_BATCH


@contextmanager
def counting_calls(denoiser: Denoiser, tick: Callable[[int], None] | None):
    """Calls `tick(done)` after each call of the denoiser's network (a forward hook, removed on exit)."""
    if tick is None:
        yield
        return
    done = 0

    def hook(*_):
        nonlocal done
        done += 1
        tick(done)
    handle = denoiser.net.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


FLOAT32_UNSTABLE = 1e-3  # PyTorch's float32 sampler this far (relative to the output's scale) from float64: refused


def check_parity(model_path: str, program: Program, denoiser: Denoiser, batch: int | None = None, seed: int = 1234,
                 atol: float = 1e-4, golden_dir: str | Path | None = None, decode: bool = False,
                 min_uint8_agreement: float = 0.999, log: Callable[[str], None] | None = None) -> dict:
    """ONNX Runtime CPU vs the PyTorch sampler on fresh noise; raises CheckError above the tolerance, or when
    the sampler itself is not stable in float32 (PyTorch's float32 run more than FLOAT32_UNSTABLE of the
    output's scale from its float64 run: the tolerance, 10x that floor, would then check nothing).

    With `decode`, also the graph's images_uint8 against the model's decode stage in PyTorch: at least
    `min_uint8_agreement` of the values within +-1 level (float32 rounding can move a value across a level).

    `batch`: noises (None: `parity_batch`, 2 for large models, see PARITY_BATCH). The PyTorch side logs its
    progress per denoiser call (`log`; default stderr) at least every ~10 s when it runs that long.

    With `golden_dir`, the inputs and ONNX Runtime's outputs are saved there as GOLDEN_INPUTS/GOLDEN_OUTPUTS
    for `polygraphy run sampler.onnx --trt --load-inputs ... --load-outputs ...` on a GPU machine.
    """
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING  # polygraphy's per-inference logs drown the compiler's
    batch = parity_batch(denoiser) if batch is None else batch
    feed = parity_feed(denoiser, batch, seed)
    # the PyTorch side's progress: the float64 sampler (the runner), then its float32 floor, NFE calls each
    ticker = Ticker("parity, PyTorch denoiser calls", log)
    torch_runner = TorchSamplerRunner(program, denoiser, decode=decode,
                                      tick=lambda done: ticker(done, 2 * program.nfe))
    name = torch_runner.samples
    runners = [torch_runner,
               OnnxrtRunner(SessionFromOnnx(model_path, providers=["CPUExecutionProvider"]))]
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # its report of a mismatch: the CheckError below says it in one line
        results = Comparator.run(runners, data_loader=[feed])
    ref = results[0][1][0][name]
    got = results[1][1][0][name]
    # The graph runs in float32; large fitted coefficients amplify float32 rounding. Measure that floor with the
    # PyTorch sampler in float32 and allow 10x it where that exceeds `atol` (reported either way): ONNX Runtime
    # rounds in another order, so its float32 error is of the same size, not the same value.
    labels = torch.from_numpy(feed[LABELS]) if LABELS in feed else None
    with counting_calls(denoiser, lambda done: ticker(program.nfe + done, 2 * program.nfe)):
        f32 = sample(program, denoiser, torch.from_numpy(feed[NOISE]), labels, dtype=torch.float32).numpy()
    f32_floor = float(np.abs(f32.astype(np.float64) - ref.astype(np.float64)).max())
    scale = max(1.0, float(np.abs(ref).max()))
    if not f32_floor <= FLOAT32_UNSTABLE * scale:  # then 10x the floor would let anything pass: say so instead
        raise CheckError(f"the sampler is not stable in float32: PyTorch's own float32 run differs from float64 by "
                         f"max abs {f32_floor:.3g} at output scale {scale:.3g} (> {FLOAT32_UNSTABLE:g} of it); the "
                         f"float32 graph cannot be trusted for this model/solver/NFE")
    tolerance = max(atol, 10 * f32_floor)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        accuracy = Comparator.compare_accuracy(
            results, compare_func=SimpleCompareFunc(atol=tolerance, rtol=0.0, check_shapes=True,
                                                     find_output_func=lambda out, i, r: [name] if out == name else []))
    err = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    report = {"backend": ORT_CPU, "batch": batch, "max_abs": float(err.max()),
              "max_rel": float((err / np.maximum(np.abs(ref), 1e-3)).max()), "atol": atol,
              "float32_floor": f32_floor, "tolerance": tolerance, "passed": bool(accuracy), "output": name}
    if not accuracy:  # before the decode check: a sampler mismatch is not the decode stage's
        raise CheckError(f"ONNX Runtime output differs from the PyTorch sampler: max abs {report['max_abs']:.3g} "
                         f"> {tolerance:.3g} (float32 floor of this sampler {f32_floor:.3g})")
    if decode:
        report["images_uint8_within_1"] = check_decode_agreement(
            results[0][1][0][IMAGES_U8], results[1][1][0][IMAGES_U8], min_uint8_agreement)
    if golden_dir is not None:
        save_golden(golden_dir, feed, results[1])
    return report


def check_decode_agreement(want: np.ndarray, got: np.ndarray, minimum: float) -> float:
    """Share of uint8 values of ONNX Runtime's decode (`got`) within +-1 level of PyTorch's (`want`); CheckError
    below `minimum` (a decode stage that rounds differently moves a few values by one level, never more)."""
    agreement = uint8_agreement(want, got)
    if agreement < minimum:
        raise CheckError(f"ONNX Runtime's images_uint8 differ from the PyTorch decode stage: {agreement:.4%} of "
                         f"values within +-1 level (< {minimum:.1%})")
    return agreement


def save_golden(golden_dir, feed, result) -> None:
    """The polygraphy golden files of the artifact: `feed` as golden_inputs.json, ONNX Runtime's `result` (a
    runner's (name, outputs) pair) as golden_outputs.json, for `polygraphy run --load-inputs/--load-outputs`."""
    from polygraphy.comparator import RunResults

    save_json([feed], str(Path(golden_dir) / GOLDEN_INPUTS))
    golden = RunResults()
    golden.append(result)
    golden.save(str(Path(golden_dir) / GOLDEN_OUTPUTS))


def check_static_batches(model_path: str, batches: list[int], denoiser: Denoiser, tolerance: float,
                         seed: int = 4321) -> dict[int, float]:
    """Each static-batch specialisation (ONNX Runtime CPU, free dimension fixed) against the dynamic graph on
    the contract's noise of that batch: {batch: max abs difference}; CheckError above `tolerance` (the
    parity check's), or when a specialised session rejects its own batch size."""
    dynamic = OrtSession(model_path, "cpu", 1)
    name = LATENTS if denoiser.is_latent else IMAGES
    report = {}
    for batch in batches:
        feed = dict(parity_feed(denoiser, batch, seed))
        want = dynamic.run(feed, [name])[0]
        try:
            got = OrtSession(model_path, "cpu", 1, static_batch=batch).run(feed, [name])[0]
        except Exception as err:  # ONNX Runtime raises its own exception types
            raise CheckError(f"the graph specialised for batch {batch} does not run: {type(err).__name__}: {err}") from None
        diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
        if not diff <= tolerance:
            raise CheckError(f"the graph specialised for batch {batch} differs from the dynamic graph: max abs "
                             f"{diff:.3g} > {tolerance:.3g}")
        report[batch] = diff
    return report


PARITY_FRACTIONS = (0.0, 0.15, 0.35, 0.6, 0.95, 1.0)  # of a guidance range: its ends and scales between (g 1, 1.3,
# 1.7, 2.2, 2.9, 3 for 1:3), most of them not nodes


def check_range_parity(model_path: str, table, scales, denoiser: Denoiser, seed: int = 1234, atol: float = 1e-4,
                       golden_dir: str | Path | None = None, decode: bool = False,
                       min_uint8_agreement: float = 0.999) -> dict:
    """A guidance-range graph (ONNX Runtime CPU) against the PyTorch sampler with the same interpolated
    constants, one image per scale of PARITY_FRACTIONS of [lo, hi] in ONE batch: image b runs
    `table.program_at(g_b)` (compiler.scales) on the denoiser guided at g_b (`scales.at`). Tolerance and the
    float32 stability refusal as `check_parity`; with `golden_dir`, the golden files."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING  # polygraphy's per-inference logs drown the compiler's
    gs = [scales.lo + f * (scales.hi - scales.lo) for f in PARITY_FRACTIONS]
    feed = parity_feed(denoiser, len(gs), seed)
    feed[GUIDANCE] = np.array(gs, np.float32)
    runner = OnnxrtRunner(SessionFromOnnx(model_path, providers=["CPUExecutionProvider"]))
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        results = Comparator.run([runner], data_loader=[feed])
    name = LATENTS if denoiser.is_latent else IMAGES
    got = results[0][1][0][name]
    refs, f32s = [], []
    for b, g in enumerate(gs):
        program, den = table.program_at(float(np.float32(g))), scales.at(float(np.float32(g)))
        noise = torch.from_numpy(feed[NOISE][b:b + 1])
        labels = torch.from_numpy(feed[LABELS][b:b + 1]) if LABELS in feed else None
        refs.append(sample(program, den, noise, labels).numpy())
        f32s.append(sample(program, den, noise, labels, dtype=torch.float32).numpy())
    ref, f32 = np.concatenate(refs), np.concatenate(f32s)
    f32_floor = float(np.abs(f32.astype(np.float64) - ref).max())
    scale = max(1.0, float(np.abs(ref).max()))
    if not f32_floor <= FLOAT32_UNSTABLE * scale:
        raise CheckError(f"the sampler is not stable in float32: PyTorch's own float32 run differs from float64 by "
                         f"max abs {f32_floor:.3g} at output scale {scale:.3g} (> {FLOAT32_UNSTABLE:g} of it)")
    tolerance = max(atol, 10 * f32_floor)
    err = np.abs(ref - got.astype(np.float64))
    per_scale = {f"{g:g}": float(err[b].max()) for b, g in enumerate(gs)}
    report = {"backend": ORT_CPU, "batch": len(gs), "max_abs": float(err.max()),
              "max_rel": float((err / np.maximum(np.abs(ref), 1e-3)).max()), "atol": atol,
              "float32_floor": f32_floor, "tolerance": tolerance, "passed": bool(err.max() <= tolerance),
              "output": name, "guidance": per_scale}
    if not report["passed"]:
        worst = max(per_scale, key=per_scale.get)
        raise CheckError(f"ONNX Runtime output differs from the PyTorch sampler with the same interpolated "
                         f"coefficients: max abs {report['max_abs']:.3g} > {tolerance:.3g} (at guidance {worst})")
    if decode:
        stage = denoiser.decode_stage()
        with torch.no_grad():
            want = stage(torch.from_numpy(ref.astype(np.float32))).numpy()
        report["images_uint8_within_1"] = check_decode_agreement(want, results[0][1][0][IMAGES_U8],
                                                                 min_uint8_agreement)
    if golden_dir is not None:
        save_golden(golden_dir, feed, results[0])
    return report
