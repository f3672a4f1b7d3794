"""Export the denoiser ONCE with torch.onnx (dynamo): inputs x [B,*shape], sigma [B], class_labels [B]."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx
import torch

from iia.models.base import Denoiser

from iia.runtime.contract import DENOISED

from .emit import DENOISER_INPUTS


class ExportError(RuntimeError):
    pass


def example_inputs(denoiser: Denoiser, batch: int = 2) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *denoiser.shape, generator=gen)
    sigma = torch.full((batch,), 2.0)
    if denoiser.conditional:
        return x, sigma, torch.arange(batch, dtype=torch.int64) % denoiser.label_dim
    return x, sigma


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's dynamo path logs pages of diagnostics; keep the compiler's output readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_denoiser(denoiser: Denoiser, max_batch: int = 64, opset: int = 20) -> onnx.ModelProto:
    """One denoiser call as ONNX, dynamic batch 1..max_batch; checked by onnx.checker."""
    args = example_inputs(denoiser)
    names = list(DENOISER_INPUTS[: len(args)])
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    dynamic = tuple({0: batch} for _ in args)
    net = denoiser.net.eval()
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(net, args, dynamo=True, input_names=names, output_names=[DENOISED],
                                        dynamic_shapes=dynamic, opset_version=opset, optimize=True, verbose=False)
    except Exception as err:  # the exporter raises many types; name the stage and the cause
        cause = err
        while cause is not None:  # torch.export wraps a Ctrl-C in its own error: it is still an interrupt
            if isinstance(cause, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            cause = cause.__cause__ or cause.__context__
        raise ExportError(f"torch.onnx.export (dynamo) failed for the denoiser: {type(err).__name__}: {err}") from err
    model = program.model_proto
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    onnx.checker.check_model(model)
    return model
