"""`compile_model`: model -> coefficients -> ONE ONNX sampler graph (+ TensorRT engine) in an artifact dir.

The stages live in `compiler/stages.py`, the options and their refusal policy in `compiler/options.py`, the
cache in `compiler/cache.py`, staging and publishing in `compiler/publish.py`, the --out directory in `compiler/out_dir.py`. The artifact directory is
written atomically: everything is built in a work folder beside it and moved into place at the end, so a
failure or Ctrl-C never leaves a half-written DIR.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from iia.calibration.search_timing import busy_machine_threads

from iia.cli import signals_deferred, written
from iia.runtime.contract import PROGRAM, write_json_atomic
from iia.runtime.program import to_json as program_json

from . import stages
from .cache import default_cache_dir, export_cache_key
from .coefficients import UNGUARDED, obtain_coefficients
from .options import CompileError, CompileOptions, refuse_unused_options, validate
from .publish import Staging
from .out_dir import check_out_dir, publish_artifact

# the names other code imports from here (each defined in the module it comes from)
__all__ = ["CompileError", "CompileOptions", "UNGUARDED", "compile_model", "default_cache_dir", "export_cache_key",
           "obtain_coefficients", "publish_artifact", "refuse_unused_options"]


def _inject(fail_after: str | None, name: str) -> None:
    if fail_after == name:
        raise RuntimeError(f"injected failure after {name}")


def compile_model(model, out_dir: str | Path, options: CompileOptions | None = None,
                  log: Callable[[str], None] = print, progress=None,
                  _fail_after: str | None = None) -> dict:
    """Compile `model` (a Denoiser, a path or a built-in name) into `out_dir`; returns the manifest.

    Every check that needs no model runs first (options, the output location); then the stages of
    `compiler.stages`, each logging its time. `_fail_after` injects a failure after the named stage (tests
    use it to prove atomicity). Raises CompileError (a ValueError) naming the option or file; a failure of the
    model itself (its forward call raised, returned NaN/Inf or a wrong shape) is a DenoiserError (also a
    ValueError) naming the sigma it was called at.
    """
    opts = options or CompileOptions()
    out = Path(out_dir)
    check_out_dir(out, opts.force)
    static = validate(opts, model)
    with Staging(out, "--out", CompileError, log) as work, ExitStack() as pytorch:
        job = stages.Job(opts, work, log, progress)
        loaded = stages.load(model, job)
        # the search's and the parity check's PyTorch work (the check is within the search's budget share)
        pytorch.enter_context(busy_machine_threads(loaded.denoiser, log, opts.budget_s))
        coefficients = stages.coefficients(loaded, job)
        scales = coefficients.scales  # a guidance range: the plan with per-node weights
        write_json_atomic(work / PROGRAM, program_json(scales.plan() if scales else coefficients.program.plan()))
        _inject(_fail_after, "coefficients")
        exported = stages.export(loaded, job)
        plan = stages.optimize(loaded, coefficients, exported, job)
        exported = stages.released(exported, plan)  # the plan's rewritten copy is what emit reads
        emitted = stages.emit(loaded, coefficients, exported, plan, job)
        del plan  # the rewritten denoiser graph (a copy of the weights): in sampler.onnx now
        exported = stages.released(exported)
        _inject(_fail_after, "emit")
        verified = stages.verify(loaded, coefficients, exported, static, job)
        engine = stages.engine(loaded, emitted, job)
        manifest = stages.write_manifest(loaded, coefficients, exported, emitted, verified, engine, static, job)
        with signals_deferred():  # published and recorded as one step: an interrupt after it must not deny it
            publish_artifact(work, out, opts.force)
            written(out)
    return manifest

