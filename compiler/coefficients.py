"""Where a compile's coefficients come from: a coefficient file, the base solver, the cache, a calibration or
the auto search (both cached through `cache.get_or_make`)."""

from __future__ import annotations

import json
from pathlib import Path

from iia.calibration import artifact
from iia.calibration.cache import Outdated
from iia.calibration.fit import CalibrationResult, calibrate, calibration_line
from iia.calibration.schedules import program_for
from iia.calibration.search_timing import machine_idle
from iia.calibration.solvers import Program, build_program, get_solver
from iia.runtime.contract import MAX_COEFFICIENTS_BYTES

from .cache import cache_dir, coefficients_key, get_or_make
from .options import CompileOptions, is_set


class SearchedWhenBusy(Outdated):
    """A cached search made on a busy machine, looked up on an idle one: searched again (what the budget afforded
    there is not what an idle machine affords)."""


UNGUARDED = "unguarded: the fit was never checked against its base solver on held-out noise"


def guard_summary(guard: dict) -> str:
    """The held-out guard's verdict in one phrase (compile log)."""
    return f"held-out rmse base {guard['rmse_base']:.4g} -> {guard['rmse_chosen']:.4g} ({guard['decision']})"


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode()  # as write_json_atomic writes it


def _cached(key: str, make, check, opts: CompileOptions, log, redo: str, made_from: dict, say_guard: bool = True,
            keep=lambda data: True):
    """(data, program, how) from the coefficient cache entry `key` (recorded with `made_from`), else from
    `make()` -> (data, program, how), cached when `keep(data)`; `check(data, path)` rebuilds and checks the cached
    entry's Program."""
    path = cache_dir(opts.cache_dir) / "coefficients" / key

    def load(_, path: Path):
        data = artifact.read(path)  # schema and version (the bytes were verified against their digest)
        how = f"reused the cached coefficients {path}" + (
            f"; {guard_summary(data['guard'])}" if say_guard and data.get("guard") else "")
        return data, check(data, path), how

    return get_or_make(path, make, load, lambda made: _json_bytes(made[0]) if keep(made[0]) else None, log,
                       limit=MAX_COEFFICIENTS_BYTES,
                       what="cached coefficients", redo=redo, made_from=made_from)


def obtain_coefficients(denoiser, solver, opts: CompileOptions, log, progress=None) -> tuple[dict, Program, str]:
    """Coefficient artifact data, its checked Program, and where it came from: --coefficients, the cache, the
    base solver, or a fresh calibration."""
    nfe = opts.nfe
    if opts.coefficients:
        return _from_file(denoiser, solver, opts, log)
    if solver == "auto":
        return _auto_coefficients(denoiser, opts, log)
    if not get_solver(solver).fitted:
        base = program_for(denoiser, solver, nfe, opts.calibration.r, opts.calibration.schedule)
        result = CalibrationResult(base, base, base, opts.calibration)
        return artifact.to_dict(result, denoiser, nfe), base, "base solver (nothing to fit)"

    def make():
        log(f"  {calibration_line(denoiser, solver, nfe, opts.calibration)}")
        result = calibrate(denoiser, solver, nfe, opts.calibration, progress=progress)
        return (artifact.to_dict(result, denoiser, nfe), result.program,
                f"calibrated in {result.seconds:.1f} s; {guard_summary(result.guard)}")

    key = coefficients_key(denoiser, solver, nfe, opts.calibration.resolved(denoiser))
    return _cached(key, make, lambda data, path: artifact.program_from_dict(
        data, denoiser, nfe, solver, source=str(path)), opts, log, "recalibrating",
        {"solver": solver, "nfe": nfe, "model_sha256": denoiser.identity.get("sha256")})


def _from_file(denoiser, solver, opts: CompileOptions, log) -> tuple[dict, Program, str]:
    """--coefficients FILE: read, checked against the model/NFE/solver; an unguarded fit is said so."""
    data = artifact.read(opts.coefficients)
    program = artifact.program_from_dict(data, denoiser, opts.nfe, None if solver == "auto" else solver,
                                         source=opts.coefficients)
    how = f"from {opts.coefficients}"
    base = build_program(program.solver, program.sigmas, program.r)
    if program.coefficients() != base.coefficients() and not data.get("guard"):
        # iia-calibrate --no-guard: the user's choice, shipped as such, but never silently
        how += f"; {UNGUARDED}"
        log(f"  warning: {opts.coefficients} has no held-out guard record (iia-calibrate --no-guard, or written "
            f"by hand): {UNGUARDED}")
    return data, program, how


def _choice(label: str, guard: dict) -> str:
    """An auto choice in words from its coefficients.json `guard` record (a fresh search's and a cached one's)."""
    text = (f"{label}: held-out rmse {guard['rmse_chosen']:.4g} (its Karras base {guard['rmse_base']:.4g}), "
            f"median {guard['median_chosen']:.4g} (base {guard['median_base']:.4g})")
    # the references' own error over 0.1x of it, or not measured (calibration/references.py reference_check)
    if "rmse_chosen_upper" in guard:
        text += (f"; within the references' error {guard['reference_error']:.2g}: its true rmse is at most "
                 f"~{guard['rmse_chosen_upper']:.4g}")
    elif "reference_error" in guard:
        text += "; against references of unmeasured accuracy"
    return text


def _auto_coefficients(denoiser, opts: CompileOptions, log) -> tuple[dict, Program, str]:
    from iia.calibration.search import SEARCH_VERSION, SearchOptions, auto_search, format_table, to_calibration_result

    # the search's own default (calibration batch 512 analytic / 128 networks) unless --calib-batch is set
    batch = opts.calibration.batch if is_set(opts, "batch") else None
    # the search's own global fits (both bases) and history length unless --r: then the family's basis at r only
    given = is_set(opts, "r")
    if given:
        log(f"  --r {opts.calibration.r}: global fits in each family's basis with {opts.calibration.r} history terms, no "
            f"linear-form fit (docs/calibration.md)")
    search = SearchOptions(budget_s=opts.budget_s, batch=batch, basis="family" if given else SearchOptions.basis,
                           r=opts.calibration.r if given else SearchOptions.r)

    def make():
        result = auto_search(denoiser, opts.nfe, search, opts.calibration, log=log,
                             reference_cache=cache_dir(opts.cache_dir) / "references")
        log(format_table(result.table))
        data = artifact.to_dict(to_calibration_result(result, opts.calibration, search, denoiser), denoiser, opts.nfe)
        g = data["guard"]
        if not g:  # no references fit --budget: the prior base, unscored (the search logged why); not cached
            return data, result.program, (f"auto: {result.chosen.label} by the prior, unsearched ({result.seconds:.1f} "
                                          f"s; not cached: the next compile plans again, on a machine maybe less busy)")
        busy = (f"; searched on a busy machine ({result.busy}): a compile on an idle machine searches again"
                if result.busy else "")
        return data, result.program, (
            f"auto search in {result.seconds:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in result.timings.items())}); "
            f"shipped {_choice(result.chosen.label, g)}{busy}")

    def check(data, path):  # a cached search: its table and choice said as a fresh one's are
        record, g = data.get("search") or {}, data.get("guard") or {}
        if record.get("busy_machine") and machine_idle():  # what the budget afforded there, an idle one beats
            raise SearchedWhenBusy(f"searched on a busy machine ({record['busy_machine']}); this one is idle now")
        if record.get("candidates"):
            log(format_table(record["candidates"]))
        if g:
            log(f"  cached auto choice {_choice(record.get('chosen'), g)}")
        return artifact.program_from_dict(data, denoiser, opts.nfe, source=str(path))

    key = coefficients_key(denoiser, "auto", opts.nfe, opts.calibration.resolved(denoiser),
                           {"search": repr(vars(search)), "search_version": SEARCH_VERSION})
    # the unsearched prior is not kept: whether references fit the budget depends on how busy the machine was (a
    # search on a busy machine is kept for the next compile on a busy one: `check`)
    return _cached(key, make, check, opts, log, "searching again",
        {"solver": "auto", "nfe": opts.nfe, "model_sha256": denoiser.identity.get("sha256")}, say_guard=False,
        keep=lambda data: bool(data["guard"]))
