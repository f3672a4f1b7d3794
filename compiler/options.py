"""`iia-compile`'s options, each declared once with its role, and the policy that refuses what a path ignores."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from iia.calibration.fit import CalibrationOptions, check_reference_steps
from iia.calibration.search_space import FAMILIES
from iia.calibration.solvers import check_history, get_solver, user_solver, user_solvers, valid_nfe
from iia.cli import check_options, flag_of, option, repeated
from iia.models.device import DeviceError, device_option, resolve_device
from iia.runtime.contract import DENOISER_ONNX, MAX_STATIC_BATCHES
from iia.runtime.engine import PRECISIONS

from .emit import GRAPH_FORMS
from .graph import EXTERNAL_DATA_BYTES


class CompileError(ValueError):
    pass


def scale_or_range(text: str, flag: str) -> float | tuple[float, float]:
    """A guidance scale "1.4" -> 1.4, or a range "1.0:3.0" -> (1.0, 3.0) (argparse type of --guidance/--cfg;
    bounds are checked by check_options, LO < HI by the guided model). ArgumentTypeError naming `flag`."""
    import argparse

    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{flag} takes a scale (1.4) or a range LO:HI (1.0:3.0), got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def guidance_range(opts: "CompileOptions") -> tuple[float, float] | None:
    """The (lo, hi) scale range of --guidance or --cfg, None for a single scale or no guidance."""
    for value in (opts.guidance, opts.cfg):
        if isinstance(value, (tuple, list)):
            return float(value[0]), float(value[1])
    return None


@dataclass
class CompileOptions:
    """`iia-compile` settings, each declared once with its flag, bounds and role (see iia.cli.option). Roles:
    "target" (what is compiled), "search" (the auto search), "source" (a coefficient file instead of a fit),
    "graph" (the ONNX graph), "engine" (the TensorRT engine), "model" (guidance, VAE), "output" (the
    artifact directory), "device" (where PyTorch work runs: every path reads it, the parity check at least);
    the calibration options carry their own (CalibrationOptions)."""

    nfe: int = option(9, "denoiser calls of the sampler", lo=1, hi=1000, role="target")
    solver: str = option("auto", "auto: search solver families x schedule (Karras/learned) x coefficients "
                                 "(base/local IIA/global) by held-out end-to-end error and ship the best; or one "
                                 "of " + ", ".join(sorted(user_solvers())), role="target")
    device: str = device_option()
    budget_s: float = option(180.0, "seconds the auto search may take (references included)", flag="--budget",
                             lo=1.0, hi=1e6, role="search")
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    coefficients: str | None = option(None, "reuse a coefficient JSON instead of calibrating", role="source")
    precision: str = option("fp32", "TensorRT engine precision (the ONNX graph is always fp32)", choices=PRECISIONS,
                            role="engine")
    max_batch: int = option(64, "largest batch the graph and engine accept", lo=1, hi=65536, role="graph")
    static_batch: str | None = option(None, "comma-separated batch sizes (e.g. 1,8,32) for which ONNX Runtime "
                                      "specialises the graph, shape computations folded; each checked against "
                                      f"the dynamic graph (at most {MAX_STATIC_BATCHES})", role="graph")
    graph: str = option("loop", "sampler graph form: 'loop' (one ONNX Loop around ONE denoiser copy; faster on "
                                "ONNX Runtime CPU, docs/performance.md) or 'unrolled' (one denoiser copy per call)",
                        choices=GRAPH_FORMS, role="graph")
    with_denoiser: bool = option(False, f"also write {DENOISER_ONNX} (one denoiser call, for iia-bench's one-call and "
                                        f"numpy-loop baselines and runtime/loop.py); it stores the model's weights a "
                                        f"second time", role="output")
    force: bool = option(False, "replace an existing artifact directory (only an iia artifact: anything else is "
                                "refused)", role="output")
    engine: bool = option(True, "skip the TensorRT engine", flag="--no-engine", role="engine")
    guide: str | None = option(None, "guide network (a .pkl or diffusers folder, as MODEL; EDM2 guidance / "
                                     "autoguidance): D = D_guide + g (D_net - D_guide) over the noise range both "
                                     "cover", role="model")
    guidance: float | tuple[float, float] | None = option(
        None, "guidance weight g for --guide; IIA is calibrated at it. LO:HI (e.g. 1.0:3.0): a range, the scale "
              "then a graph input per image and the sampler's coefficients interpolated in it", lo=-100.0, hi=100.0,
        parse=lambda text: scale_or_range(text, "--guidance"), role="model")
    cfg: float | tuple[float, float] | None = option(
        None, "classifier-free guidance weight against the null label (models trained with label dropout); LO:HI "
              "a range, as for --guidance", lo=-100.0, hi=100.0, parse=lambda text: scale_or_range(text, "--cfg"),
        role="model")
    guidance_default: float | None = option(None, "the scale a request without one gets (a --guidance/--cfg range "
                                                  "only; default its midpoint)", lo=-100.0, hi=100.0, role="model")
    vae: str | None = option(None, "local diffusers AutoencoderKL folder: the decoder of a latent EDM2 model",
                             role="model")
    parity_atol: float = 1e-4
    cache_dir: str | None = None  # calibrated coefficients and exports are cached here (default ~/.cache/iia)
    weight_limit: float = 1.10
    external_data_bytes: int = EXTERNAL_DATA_BYTES  # sampler.onnx's tensors over this go to sampler.onnx.data
    x0_clipping: str | None = None  # a diffusers folder's clip_sample/thresholding: "ignore" | "clip" (None refuses)
    # option names a command line set (iia.cli.given_options), whatever their values; None (the Python API):
    # an option counts as set where its value differs from the default
    given: frozenset[str] | None = None


# What each path reads of the options' roles; a set option of another role is refused by flag (the paths:
# a coefficient file fixes schedule and coefficients; auto searches the time steps itself; a base solver
# fits nothing and uses only the time steps; a fitted solver runs no search).
READ_BY_AUTO = ("fit", "seed", "guard", "reference", "research", "search")
READ_BY_BASE_SOLVER = ("steps",)
READ_BY_FITTED_SOLVER = ("steps", "fit", "seed", "guard", "reference", "research")


def static_batches(opts: CompileOptions) -> list[int]:
    """--static-batch as sorted distinct ints in 1..max_batch (each given once), at most MAX_STATIC_BATCHES of them
    (the runtimes' bound); CompileError naming the flag otherwise."""
    text = opts.static_batch
    if text is None:
        return []
    if isinstance(text, str) and not text.strip():  # given, yet empty: a script's unset variable, not "none"
        raise CompileError(f"--static-batch {text!r} gives no batch sizes (omit the flag for none)")
    try:
        # an empty item ("1,,3", ",") is a typo, not nothing (as iia.cli.int_list)
        values = [int(v) for v in text.split(",")] if isinstance(text, str) else [int(v) for v in text]
    except (TypeError, ValueError):
        raise CompileError(f"--static-batch must be comma-separated batch sizes, got {text!r}") from None
    bad = [v for v in values if not 1 <= v <= opts.max_batch]
    if bad:
        raise CompileError(f"--static-batch {bad[0]} is outside 1..--max-batch {opts.max_batch}")
    twice = repeated(values)
    if twice:  # a typo as "1,,3" is: refused, not merged
        raise CompileError(f"--static-batch gives {twice[0]} more than once ({text!r}); give each batch size once")
    sizes = sorted(values)
    if len(sizes) > MAX_STATIC_BATCHES:
        raise CompileError(f"--static-batch gives {len(sizes)} batch sizes; the runtimes load at most "
                           f"{MAX_STATIC_BATCHES} (manifest static_batches)")
    return sizes


def is_set(opts: CompileOptions, name: str) -> bool:
    """Whether option `name` (a CompileOptions or CalibrationOptions field) was set: given on the command line
    (opts.given), else different from its default."""
    if opts.given is not None:
        return name in opts.given
    if name in {f.name for f in fields(CompileOptions)}:
        return getattr(opts, name) != getattr(CompileOptions(), name)
    return getattr(opts.calibration, name) != getattr(CalibrationOptions(), name)


def _listed(flags: list[str]) -> str:
    return f"{', '.join(flags)} {'does' if len(flags) == 1 else 'do'} not apply"


def refuse_unused_options(opts: CompileOptions) -> None:
    """Refuse, by flag, settings the chosen path would ignore (CompileError), reading each option's role:
    calibration flags and --budget beside --coefficients, --schedule with auto, --budget without auto, the
    fit's flags with a base solver. Set means `is_set`: on the command line a default typed out is refused too."""
    if not opts.engine and opts.precision != "fp32":  # fp32 is what the ONNX graph computes: stating it is fine
        raise CompileError(f"--precision {opts.precision} sets the TensorRT engine's precision; --no-engine builds "
                           f"none (the ONNX graph is always fp32)")
    changed = [f for f in fields(CalibrationOptions) if f.metadata.get("cli", True) is not False and is_set(opts, f.name)]
    search = [flag_of(f) for f in fields(CompileOptions) if f.metadata.get("role") == "search" and is_set(opts, f.name)]
    if opts.coefficients:
        unused = [flag_of(f) for f in changed] + search
        if unused:
            raise CompileError(f"--coefficients {opts.coefficients} fixes the schedule and coefficients: "
                               f"{_listed(unused)} (drop them, or calibrate instead)")
        return
    if opts.solver == "auto":
        if any(f.metadata.get("role") not in READ_BY_AUTO for f in changed):  # the time steps: it searches them
            raise CompileError(f"--schedule {opts.calibration.schedule} does not apply to --solver auto, which "
                               f"searches the time steps itself (Karras and learned); choose a solver to use a "
                               f"fixed schedule")
        return
    if search:
        raise CompileError(f"--budget bounds the --solver auto search; --solver {opts.solver} runs no search "
                           f"(drop --budget)")
    reads = READ_BY_FITTED_SOLVER if get_solver(opts.solver).fitted else READ_BY_BASE_SOLVER
    unused = [flag_of(f) for f in changed if f.metadata.get("role") not in reads]
    if unused:
        raise CompileError(f"--solver {opts.solver} is a base solver and fits nothing: {_listed(unused)} (they "
                           f"set the fit of iia-* solvers and auto)")


def _check_files_and_guidance(opts: CompileOptions, model=None) -> None:
    """What `validate` can refuse before the model loads: a model or --guide path that is not there, a
    --coefficients file that is missing or unreadable (not a coefficient file, bad JSON), and the guidance
    settings (`models.guidance.check_guidance_settings`)."""
    from iia.calibration.artifact import ArtifactError, read, target_mismatch
    from iia.models.guidance import GuidanceError, check_guidance_settings
    from iia.models.registry import ModelLoadError, check_source

    for flag, spec in ((None, model), ("--guide", opts.guide)):
        try:
            if isinstance(spec, (str, Path)):
                check_source(spec)
        except ModelLoadError as err:
            raise CompileError(str(err) if flag is None else f"{flag} {spec}: {err}") from None
    if opts.coefficients and not Path(opts.coefficients).is_file():
        raise CompileError(f"--coefficients {opts.coefficients}: "
                           f"{'not a file' if Path(opts.coefficients).exists() else 'no such file'}")
    if opts.coefficients:
        try:
            data = read(opts.coefficients)
        except ArtifactError as err:
            raise CompileError(f"--coefficients: {err}") from None
        mismatch = target_mismatch(data, opts.nfe, None if opts.solver == "auto" else opts.solver)
        if mismatch:  # as the loader after the model would, with the flag to give
            what, held, asked = mismatch
            flag = "--nfe" if what == "NFE" else "--solver"
            raise CompileError(f"--coefficients {opts.coefficients} holds coefficients for {what} {held}, not "
                               f"{flag} {asked}: give {flag} {held}")
    try:
        check_guidance_settings(opts.guide is not None, opts.guidance, opts.cfg, opts.guidance_default)
    except GuidanceError as err:
        raise CompileError(str(err)) from None


def validate(opts: CompileOptions, model=None) -> list[int]:
    """Every check of the options that needs no model (CompileError / CalibrationError naming the flag), before
    any work, and of `model` (a path or name; a Denoiser passes) what needs no reading; returns the static
    batch sizes."""
    check_options(opts, CompileError)
    try:
        resolve_device(opts.device)  # before any work: a device torch cannot see is refused by name
    except DeviceError as err:
        raise CompileError(str(err)) from None
    static = static_batches(opts)
    if opts.solver != "auto":
        try:
            solver = user_solver(opts.solver)
        except ValueError as err:  # "unknown solver ...": name the flag, and auto, the default
            raise CompileError(f"--solver {opts.solver}: {err}, or auto (the default: search)") from None
        try:
            solver.steps_for_nfe(opts.nfe)
        except ValueError as err:
            raise CompileError(f"--nfe {opts.nfe}: {err}") from None
        if is_set(opts, "r"):
            try:
                check_history(opts.solver, opts.nfe, opts.calibration.r)
            except ValueError as err:
                raise CompileError(str(err)) from None
    elif not opts.coefficients and not any(valid_nfe(f, opts.nfe) for f in FAMILIES):  # before loading the model
        least = min(n for n in range(1, 8) for f in FAMILIES if valid_nfe(f, n))
        raise CompileError(f"--nfe {opts.nfe}: no solver family of --solver auto can spend exactly {opts.nfe} denoiser "
                           f"call{'s' * (opts.nfe != 1)} (the fewest any spends: {least})")
    opts.calibration.validate()
    refuse_unused_options(opts)
    if opts.given is not None and "reference_steps" in opts.given:  # typed: the Python API keeps small ones for tests
        check_reference_steps(opts.calibration.reference_steps, opts.nfe)
    if guidance_range(opts) is not None:
        from .scales import ScaleError, check_range_options

        try:
            check_range_options(opts.coefficients)
        except ScaleError as err:
            raise CompileError(str(err)) from None
    elif opts.guidance_default is not None:
        raise CompileError("--guidance-default applies to a range (--guidance LO:HI or --cfg LO:HI)")
    _check_files_and_guidance(opts, model)
    return static
