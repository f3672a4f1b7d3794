"""Export the denoiser ONCE with torch.onnx (dynamo): inputs x [B,*shape], sigma [B], class_labels [B]."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import sys
import threading
import warnings

import onnx
import torch

from iia.cli import heartbeat
from iia.models.base import Denoiser

from iia.runtime.contract import (DECODER_SAMPLES, DENOISED, DENOISER_LABELS, DENOISER_SIGMA, DENOISER_X, GUIDANCE,
                                  IMAGES_U8)

from .graph import check_model_proto, release_memory
from .passes.weight_preprocessing import fold_weight_preprocessing

DENOISER_INPUTS = (DENOISER_X, DENOISER_SIGMA, DENOISER_LABELS)
# a rough export time for the heartbeat: 13-17 s for the CIFAR-10-size fixture (57.4 M parameters) on the 2-core
# CPU with torch 2.13 (tester-42: estimated ~148 s from the 97-158 s measured under earlier versions)
EXPORT_S_PER_MPARAM, EXPORT_S_FIXED = 0.3, 10.0


class ExportError(RuntimeError):
    pass


def example_inputs(denoiser: Denoiser, batch: int = 2) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *denoiser.shape, generator=gen)
    sigma = torch.full((batch,), 2.0)
    if denoiser.conditional:
        return x, sigma, torch.arange(batch, dtype=torch.int64) % denoiser.label_dim
    return x, sigma


def static_size_value(value) -> float | None:
    """The number a symbolic size expression (torch.SymInt / SymFloat under torch.export) stands for when
    it does not depend on the symbols (e.g. `norm.numel() / x.numel()` = (B*H*W) / (B*C*H*W) = 1/C); None
    when it does. Proved by cancelling the sympy expression, not by sampling values."""
    import sympy

    node = getattr(value, "node", None)
    expr = getattr(node, "expr", None)
    if expr is None:
        return None
    # torch's size arithmetic wraps true division in its own sympy functions (IntTrueDiv, FloatTrueDiv)
    plain = expr.replace(lambda e: isinstance(e, sympy.Function) and type(e).__name__.endswith("TrueDiv"),
                         lambda e: e.args[0] / e.args[1])
    plain = sympy.cancel(sympy.simplify(plain))
    if plain.free_symbols or not plain.is_number:
        return None
    return float(plain)


def _symbolic_sqrt(self):
    static = static_size_value(self)
    if static is None:
        raise ExportError(f"the network computes numpy.sqrt of a size that depends on the batch ({self}); "
                          f"it cannot be exported at dynamic batch")
    return math.sqrt(static)


_SQRT_LOCK = threading.RLock()


@contextlib.contextmanager
def numpy_sqrt_of_sizes():
    """Let `numpy.sqrt(size expression)` work while torch.export traces at a symbolic batch.

    Networks written for eager PyTorch take `np.sqrt` of Python numbers derived from tensor sizes (EDM2's
    magnitude-preserving normalisation: `np.sqrt(norm.numel() / x.numel())`). Under a symbolic batch those
    numbers are SymInt/SymFloat, and numpy's object loop calls their `.sqrt()` method, which torch does not
    define. For the duration of the export this gives them one that returns the constant value when the
    expression cancels to a number (the batch drops out of such ratios) and raises ExportError otherwise.
    """
    with _SQRT_LOCK:  # the classes are process-wide: one export at a time patches them
        added = [cls for cls in (torch.SymInt, torch.SymFloat) if not hasattr(cls, "sqrt")]
        for cls in added:
            cls.sqrt = _symbolic_sqrt
        try:
            yield
        finally:
            for cls in added:
                del cls.sqrt


class _OtherThreads(io.TextIOBase):
    """stderr as seen while exporting: what the exporting thread writes is dropped (torch.export prints a
    failing model's partial FX graph there), what other threads write passes (the heartbeat's progress)."""

    def __init__(self, stream):
        self.stream, self.exporting = stream, threading.get_ident()

    def write(self, text: str) -> int:
        return len(text) if threading.get_ident() == self.exporting else self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's dynamo path logs pages of diagnostics; keep the compiler's output readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript",
                                              "torch.fx")]  # torch.fx: a failing guard's warning dumps graphs
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(_OtherThreads(sys.stderr)):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def repair_conv_pads(model: onnx.ModelProto) -> int:
    """Fix Conv/ConvTranspose `pads` written with one value per spatial axis (k values) instead of ONNX's
    begin/end pairs (2k): torch.onnx's dynamo exporter does that for PyTorch's one-element padding tuple
    `conv2d(x, w, padding=(p,))` (which PyTorch applies to every axis, both sides), and ONNX Runtime then
    refuses the graph ("Attribute pads has incorrect size"). Returns how many nodes were repaired."""
    repaired = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        attrs = {a.name: a for a in node.attribute}
        pads, kernel = attrs.get("pads"), attrs.get("kernel_shape")
        if pads is None or kernel is None or len(pads.ints) != len(kernel.ints):
            continue
        values = list(pads.ints)
        del pads.ints[:]
        pads.ints.extend(values + values)  # symmetric: begin values, then the same end values
        repaired += 1
    return repaired


def _root_cause(err: BaseException) -> BaseException:
    seen = set()
    while (err.__cause__ or err.__context__) is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return err


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_USER_FRAME = re.compile(r"The following call raised this error:\s*File \"([^\"]+)\", line (\d+), in (\S+)[ \t]*"
                         r"(?:\n[ \t]*([^\n]*))?")


def export_failure(err: BaseException) -> str:
    """The exporter's failure in one line: the root cause's type and first sentence, and the model's own line
    that raised it where torch.export names one (its report runs to pages of advice and ANSI colours;
    IIA_DEBUG=1 keeps the whole chain)."""
    cause = _root_cause(err)
    if isinstance(cause, ExportError):
        return str(cause)
    text = _ANSI.sub("", str(cause)).strip()
    first = text.split("\n\n")[0].replace("\n", " ")
    summary = f"{type(cause).__name__}: {first[:300]}{'...' if len(first) > 300 else ''}"
    frame = _USER_FRAME.search(_ANSI.sub("", "\n".join(str(e) for e in (err, cause))))
    if frame:
        path, line, fn, code = frame.groups()
        summary += f" (at {path}:{line} in {fn}{': ' + code.strip() if code and code.strip() else ''})"
    return summary + " (IIA_DEBUG=1 shows the exporter's full report)"


def export_module(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
                  max_batch: int = 64, opset: int = 20, what: str = "the denoiser") -> onnx.ModelProto:
    """`module(*args)` as ONNX with a dynamic batch 1..max_batch on every input, through
    `torch.onnx.export(dynamo=True)`; then local functions inlined, Conv pads repaired, weight-only
    preprocessing folded into the stored weights; checked by onnx.checker. Raises ExportError naming `what`."""
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    dynamic = tuple({0: batch} for _ in args)
    try:
        mparams = sum(p.numel() for p in module.parameters()) / 1e6
        with heartbeat(f"exporting {what} ({mparams:.3g} M parameters)",
                       estimate_s=EXPORT_S_FIXED + EXPORT_S_PER_MPARAM * mparams), \
                _quiet_exporter(), numpy_sqrt_of_sizes(), torch.no_grad():
            program = torch.onnx.export(module.eval(), args, dynamo=True, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=dynamic, opset_version=opset,
                                        optimize=True, verbose=False)
    except Exception as err:  # the exporter raises many types; name the stage and the cause
        cause = err
        while cause is not None:  # torch.export wraps a Ctrl-C in its own error: it is still an interrupt
            if isinstance(cause, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            cause = cause.__cause__ or cause.__context__
        raise ExportError(f"torch.onnx.export (dynamo) failed for {what}: {export_failure(err)}") from err
    model = program.model_proto
    del program  # the exporter's own graph and program: the proto holds what is needed
    release_memory()
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    repair_conv_pads(model)
    fold_weight_preprocessing(model)
    release_memory()
    check_model_proto(model)
    return model


def export_denoiser(denoiser: Denoiser, max_batch: int = 64, opset: int = 20) -> onnx.ModelProto:
    """One denoiser call as ONNX (x [B,*shape], sigma [B][, class_labels [B]] -> denoised), dynamic batch."""
    args = example_inputs(denoiser)
    names = list(DENOISER_INPUTS[: len(args)])
    module = denoiser.net
    scales = getattr(denoiser, "guidance_range", None)
    if scales is not None:  # a guidance range: the scale is the last input, one per image
        from iia.models.guidance import ScaleInput

        module = ScaleInput(denoiser.net, denoiser.conditional)
        args, names = (*args, torch.full((args[0].shape[0],), scales.default)), [*names, GUIDANCE]
    return export_module(module, args, names, [DENOISED], max_batch, opset, "the denoiser")


def export_decoder(denoiser: Denoiser, max_batch: int = 64, opset: int = 20) -> onnx.ModelProto | None:
    """The model's decode stage as ONNX (DECODER_SAMPLES float32 [B,*shape] -> IMAGES_U8 uint8 [B,H,W,C]);
    None for models without one (non-image samples)."""
    stage = denoiser.decode_stage()
    if stage is None:
        return None
    if getattr(stage, "kind", None) == "latent" and not stage.has_vae:
        raise ExportError(stage.missing_vae_message())
    x = torch.randn(2, *denoiser.shape, generator=torch.Generator().manual_seed(0))
    return export_module(stage, (x,), [DECODER_SAMPLES], [IMAGES_U8], max_batch, opset, "the decode stage")


def decoded_shape(decoder_model: onnx.ModelProto) -> tuple[int, int, int]:
    """(H, W, C) of the decode stage's uint8 output (static after export)."""
    dims = decoder_model.graph.output[0].type.tensor_type.shape.dim
    values = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(values) != 4 or any(v is None for v in values[1:]):
        raise ValueError(f"the decode stage's output must be uint8 [B, H, W, C] with static H, W, C, got {values}")
    return values[1], values[2], values[3]
