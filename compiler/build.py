"""`compile_model`: model -> coefficients -> ONE ONNX sampler graph (+ TensorRT engine) in an artifact dir.

The artifact directory is written atomically: everything is built in a temporary sibling directory and
renamed into place at the end, so a failure or Ctrl-C never leaves a half-written DIR.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import onnx

from iia.calibration import artifact
from iia.calibration.fit import GUARD_VERSION, CalibrationOptions, CalibrationResult, calibrate
from iia.calibration.sampling import program_for
from iia.calibration.solvers import Program
from iia.calibration.solvers import DEFINITION_VERSION, SOLVERS, build_program, get_solver
from iia.calibration.solvers import Combine, Denoise
from iia.cli import check_options, flag_of, option, pid_alive, signals_deferred, stage, written
from iia.runtime.contract import (COEFFICIENTS, DECODER_ONNX, DENOISER_ONNX, GOLDEN_INPUTS, GOLDEN_OUTPUTS,
                                  IMAGES_U8, MANIFEST, atomic_open,
                                  MAX_MANIFEST_BYTES, PROGRAM, SAMPLER_ONNX, SAMPLER_ONNX_DATA, SCHEMA,
                                  STATIC_BATCHES, ArtifactError, open_regular, SAMPLER_PLAN, graph_metadata,
                                  io_spec, make_manifest, program_plan, public_mode, sha256_file,
                                  tensorrt_unavailable_reason, write_json_atomic)
from iia.runtime.engine import PRECISIONS, EnginePlan, EngineUnavailable, build_engine, fp32_layer_names, sampler_inputs
from iia.models.base import Denoiser
from iia.models.decode import decode_param_bytes
from iia.models.registry import load as load_model
from iia.models.registry import resolve_model

from .check import check_model, check_parity, check_static_batches, check_weight_sharing
from .emit import DECODE_PREFIX, GRAPH_FORMS, decoded_shape, emit_sampler, emit_sampler_loop, initializer_bytes
from .export import export_decoder, export_denoiser
from .fold import plan_folding
from .rewrite import PROTOBUF_LIMIT as EXTERNAL_DATA_THRESHOLD  # protobuf's 2 GB limit, with headroom


class CompileError(ValueError):
    pass


@dataclass
class CompileOptions:
    """`iia-compile` settings, each declared once with its flag and bounds (see iia.cli.option)."""

    nfe: int = option(9, "denoiser calls of the sampler", lo=1, hi=1000)
    solver: str = option("iia-edm", "auto (iia-compile's default): search solver families x schedule (Karras/learned) "
                                    "x coefficients (base/local IIA/global) by held-out end-to-end error and ship "
                                    "the best; or one of " + ", ".join(sorted(SOLVERS)))
    budget_s: float = option(180.0, "seconds the auto search may take (references included)", flag="--budget",
                             lo=1.0, hi=1e6)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    coefficients: str | None = option(None, "reuse a coefficient JSON instead of calibrating")
    precision: str = option("fp32", "TensorRT engine precision (the ONNX graph is always fp32)", choices=PRECISIONS)
    max_batch: int = option(64, "largest batch the graph and engine accept", lo=1, hi=65536)
    static_batch: str | None = option(None, "comma-separated batch sizes (e.g. 1,8,32) for which ONNX Runtime "
                                      "specialises the graph, shape computations folded; each checked against "
                                      "the dynamic graph")
    graph: str = option("loop", "sampler graph form: 'loop' (one ONNX Loop around ONE denoiser copy; faster on "
                                "ONNX Runtime CPU, docs/performance.md) or 'unrolled' (one denoiser copy per call)",
                        choices=GRAPH_FORMS)
    force: bool = option(False, "replace an existing artifact directory (only an iia artifact: anything else is refused)")
    engine: bool = option(True, "skip the TensorRT engine", flag="--no-engine")
    guide: str | None = option(None, "guide network (a .pkl or diffusers folder, as MODEL; EDM2 guidance / "
                                     "autoguidance): D = D_guide + g (D_net - D_guide) over the noise range both cover")
    guidance: float | None = option(None, "guidance weight g for --guide (default 1: the main net alone); IIA is "
                                          "calibrated at it", lo=-100.0, hi=100.0)
    cfg: float | None = option(None, "classifier-free guidance weight against the null label (models trained with "
                                     "label dropout)", lo=-100.0, hi=100.0)
    vae: str | None = option(None, "local diffusers AutoencoderKL folder: the decoder of a latent EDM2 model")
    parity_atol: float = 1e-4
    cache_dir: str | None = None  # calibrated coefficients are cached here (default ~/.cache/iia)
    weight_limit: float = 1.10
    x0_clipping: str | None = None  # a diffusers folder's clip_sample/thresholding: "ignore" | "clip" (None refuses)
    # option names a command line set (iia.cli.given_options), whatever their values; None (the Python API):
    # an option counts as set where its value differs from the default
    given: frozenset[str] | None = None


def static_batches(opts: CompileOptions) -> list[int]:
    """--static-batch as sorted distinct ints in 1..max_batch (CompileError naming the flag otherwise)."""
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
    return sorted(set(values))


UNGUARDED = "unguarded: the fit was never checked against its base solver on held-out noise"

# What a base solver's compile uses of the calibration flags: only the time steps (nothing is fitted)
BASE_SOLVER_USES = ("schedule",)


def is_set(opts: CompileOptions, name: str) -> bool:
    """Whether option `name` (a CompileOptions or CalibrationOptions field) was set: given on the command line
    (opts.given), else different from its default."""
    if opts.given is not None:
        return name in opts.given
    if name in {f.name for f in fields(CompileOptions)}:
        return getattr(opts, name) != getattr(CompileOptions(), name)
    return getattr(opts.calibration, name) != getattr(CalibrationOptions(), name)


def refuse_unused_options(opts: CompileOptions) -> None:
    """Refuse, by flag, settings the chosen path would ignore (CompileError): calibration flags beside
    --coefficients (the file fixes schedule and coefficients), --schedule with auto (it searches time steps
    itself), the fit's flags with a base solver (it fits nothing), --budget without auto (it bounds the search).
    Set means `is_set`: on the command line a default typed out is refused too."""
    if not opts.engine and opts.precision != "fp32":  # fp32 is what the ONNX graph computes: stating it is fine
        raise CompileError(f"--precision {opts.precision} sets the TensorRT engine's precision; --no-engine builds "
                           f"none (the ONNX graph is always fp32)")
    changed = [f for f in fields(CalibrationOptions) if f.metadata.get("cli", True) is not False and is_set(opts, f.name)]
    budget_changed = is_set(opts, "budget_s")
    if opts.coefficients:
        unused = [flag_of(f) for f in changed] + (["--budget"] if budget_changed else [])
        if unused:
            raise CompileError(f"--coefficients {opts.coefficients} fixes the schedule and coefficients: "
                               f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply (drop them, "
                               f"or calibrate instead)")
        return
    if opts.solver == "auto":
        if any(f.name == "schedule" for f in changed):
            raise CompileError(f"--schedule {opts.calibration.schedule} does not apply to --solver auto, which "
                               f"searches the time steps itself (Karras and learned); choose a solver to use a "
                               f"fixed schedule")
        return
    if budget_changed:
        raise CompileError(f"--budget bounds the --solver auto search; --solver {opts.solver} runs no search "
                           f"(drop --budget)")
    if not get_solver(opts.solver).fitted:
        unused = [flag_of(f) for f in changed if f.name not in BASE_SOLVER_USES]
        if unused:
            raise CompileError(f"--solver {opts.solver} is a base solver and fits nothing: {', '.join(unused)} "
                               f"{'does' if len(unused) == 1 else 'do'} not apply (they set the fit of iia-* "
                               f"solvers and auto)")


def default_cache_dir() -> Path:
    return Path(os.environ.get("IIA_CACHE_DIR") or Path.home() / ".cache" / "iia")


def cache_key(denoiser: Denoiser, solver: str, nfe: int, options: CalibrationOptions, extra: dict | None = None) -> str:
    ident = artifact.model_identity(denoiser)
    payload = {"model": ident, "solver": solver, "solver_definition": DEFINITION_VERSION, "nfe": nfe,
               "options": vars(options), "guard": GUARD_VERSION}
    if extra:
        payload["extra"] = extra
    text = json.dumps(payload, sort_keys=True)
    return f"{solver}-nfe{nfe}-{hashlib.sha256(text.encode()).hexdigest()[:20]}.json"


def obtain_coefficients(denoiser, solver, opts: CompileOptions, log, progress=None) -> tuple[dict, Program, str]:
    """Coefficient artifact data, its checked Program, and where it came from: --coefficients, the cache, the
    base solver, or a fresh calibration."""
    nfe = opts.nfe
    if opts.coefficients:
        data = artifact.read(opts.coefficients)
        program = artifact.program_from_dict(data, denoiser, nfe, None if solver == "auto" else solver,
                                             source=opts.coefficients)
        how = f"from {opts.coefficients}"
        base = build_program(program.solver, program.sigmas, program.r)
        if program.coefficients() != base.coefficients() and not data.get("guard"):
            # iia-calibrate --no-guard: the user's choice, shipped as such, but never silently
            how += f"; {UNGUARDED}"
            log(f"  warning: {opts.coefficients} has no held-out guard record (iia-calibrate --no-guard, or written "
                f"by hand): {UNGUARDED}")
        return data, program, how
    if solver == "auto":
        return _auto_coefficients(denoiser, opts, log)
    spec = get_solver(solver)
    if not spec.fitted:
        base = program_for(denoiser, solver, nfe, opts.calibration.r, opts.calibration.schedule)
        result = CalibrationResult(base, base, base, opts.calibration)
        return artifact.to_dict(result, denoiser, nfe), base, "base solver (nothing to fit)"
    cache = Path(opts.cache_dir) if opts.cache_dir else default_cache_dir()
    cached = cache / "coefficients" / cache_key(denoiser, solver, nfe, opts.calibration.resolved(denoiser))
    if cached.exists() or cached.is_symlink():
        try:
            data = artifact.read(cached)
            return data, artifact.program_from_dict(data, denoiser, nfe, solver, source=str(cached)), (
                f"cached {cached}" + (f"; {guard_summary(data['guard'])}" if data.get("guard") else ""))
        except artifact.ArtifactError as err:
            log(f"  dropping unusable cached coefficients, recalibrating ({err})")
            try:
                cached.unlink()
            except OSError:
                pass
    result = calibrate(denoiser, solver, nfe, opts.calibration, progress=progress)
    data = artifact.to_dict(result, denoiser, nfe)
    try:
        write_json_atomic(cached, data)
    except OSError as err:  # a read-only home must not fail the compile
        log(f"could not cache coefficients at {cached}: {err}")
    return data, result.program, f"calibrated in {result.seconds:.1f} s; {guard_summary(result.guard)}"


def guard_summary(guard: dict) -> str:
    """The held-out guard's verdict in one phrase (compile log)."""
    return f"held-out rmse base {guard['rmse_base']:.4g} -> {guard['rmse_chosen']:.4g} ({guard['decision']})"


def _auto_coefficients(denoiser, opts: CompileOptions, log) -> tuple[dict, Program, str]:
    from iia.calibration.search import SearchOptions, auto_search, format_table, to_calibration_result

    # the search's own default (calibration batch 512 analytic / 128 networks) unless --calib-batch is set
    batch = opts.calibration.batch if is_set(opts, "batch") else None
    search = SearchOptions(budget_s=opts.budget_s, r=opts.calibration.r, batch=batch)
    cache = Path(opts.cache_dir) if opts.cache_dir else default_cache_dir()
    cached = cache / "coefficients" / cache_key(denoiser, "auto", opts.nfe, opts.calibration.resolved(denoiser),
                                                {"search": repr(vars(search))})
    if cached.exists():
        try:
            data = artifact.read(cached)
            return data, artifact.program_from_dict(data, denoiser, opts.nfe, source=str(cached)), f"cached {cached}"
        except artifact.ArtifactError as err:
            log(f"ignoring unusable cached coefficients ({err})")
    result = auto_search(denoiser, opts.nfe, search, opts.calibration, log=log)
    log(format_table(result.table))
    data = artifact.to_dict(to_calibration_result(result, opts.calibration, search, denoiser), denoiser, opts.nfe)
    try:
        write_json_atomic(cached, data)
    except OSError as err:
        log(f"could not cache coefficients at {cached}: {err}")
    g = data["guard"]
    return data, result.program, (
        f"auto search in {result.seconds:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in result.timings.items())}); "
        f"shipped {result.chosen.label}: held-out rmse {g['rmse_chosen']:.4g} (its Karras base {g['rmse_base']:.4g}), "
        f"median {g['median_chosen']:.4g} (base {g['median_base']:.4g})")


def stamp_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Set ONNX metadata_props entries (others kept): what load() compares with the manifest."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        entry = existing.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, value


def program_document(program: Program) -> dict:
    """program.json (see iia.runtime.contract): the ops the graph is emitted from, for a loop around denoiser.onnx."""
    ops = []
    for op in program.ops():
        if isinstance(op, Denoise):
            ops.append({"op": "denoise", "out": op.out, "state": op.state, "sigma": float(op.sigma)})
        elif isinstance(op, Combine):
            ops.append({"op": "combine", "out": op.out, "terms": [[name, float(w)] for name, w in op.terms]})
        else:
            raise CompileError(f"program op {op!r} has no program.json form")
    return program_plan(ops, program.output)


EXPORT_CODE = ("export.py", "fold.py")  # the code an exported graph depends on (besides the libraries)


def export_cache_key(denoiser: Denoiser, what: str, max_batch: int) -> str | None:
    """Cache file name of an exported graph ("denoiser" or "decoder"), or None when the model has no content
    hash to key on. The key covers the model identity (weights' sha256, guidance, options), the decode stage
    (its VAE folder's sha256), max_batch, the export code and the library versions."""
    ident = artifact.model_identity(denoiser)
    if not ident.get("sha256"):
        return None
    stage_module = denoiser.decode_stage() if what == "decoder" else None
    here = Path(__file__).resolve().parent
    payload = {"what": what, "model": ident, "max_batch": max_batch,
               "decode": None if stage_module is None else stage_module.describe(),
               "code": [hashlib.sha256((here / name).read_bytes()).hexdigest() for name in EXPORT_CODE],
               "versions": {k: v for k, v in artifact.library_versions().items() if k != "tensorrt"}}
    if getattr(stage_module, "kind", None) == "latent" and not payload["decode"].get("vae_sha256"):
        return None
    return f"{what}-{hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]}.onnx"


def cached_export(export, key: str | None, cache: Path, log) -> onnx.ModelProto | None:
    """`export()` (an ONNX model or None), reusing `cache/exports/key` when present and valid; written atomically.
    Models over protobuf's 2 GB limit are not cached."""
    path = cache / "exports" / key if key else None
    if path is not None and path.exists():
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model)
            log(f"  reused the cached export {path}")
            return model
        except Exception as err:  # a corrupt cache entry must not fail the compile
            log(f"  ignoring unusable cached export {path} ({type(err).__name__}: {err})")
    model = export()
    if path is not None and model is not None and model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        try:
            with atomic_open(path) as f:
                f.write(model.SerializeToString())
        except OSError as err:  # a read-only cache must not fail the compile
            log(f"  could not cache the export at {path}: {err}")
    return model


def load_for_compile(model, opts: CompileOptions) -> Denoiser:
    """The model with the options' guidance and VAE applied."""
    for name in ("guidance", "cfg"):
        value = getattr(opts, name)
        if value is not None and not math.isfinite(value):
            raise CompileError(f"--{name} must be a finite number, got {value}")
    if isinstance(model, Denoiser):
        if opts.vae is not None:
            raise CompileError("--vae applies when the model is given as a path, not as a Denoiser object")
        if opts.guide is None and opts.guidance is None and opts.cfg is None:
            return model
        from iia.models.guidance import guided

        guide = None if opts.guide is None else resolve_model(opts.guide, opts.x0_clipping)
        return guided(model, guide, opts.guidance, opts.cfg)
    return load_model(model, opts.x0_clipping, guide=opts.guide, guidance=opts.guidance, cfg=opts.cfg, vae=opts.vae)


def guidance_record(denoiser: Denoiser) -> dict | None:
    """What the manifest says about guidance: the settings, and that the coefficients were fitted with them."""
    settings = denoiser.identity.get("guidance")
    if not settings:
        return None
    return dict(settings, note="the sampler's coefficients were calibrated on this guided denoiser; they hold "
                               "for this guidance value (recompile to change it)")


def save_onnx(model: onnx.ModelProto, path: Path) -> list[str]:
    """Save; graphs over 2 GB keep their tensors in `<name>.data` beside the model. Returns file names."""
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        location = SAMPLER_ONNX_DATA if path.name == SAMPLER_ONNX else path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
        return [path.name, location]
    onnx.save_model(model, str(path))
    return [path.name]


BUILDING, OLD = "building", "old"  # .DIR.building-PID-xxxx (work in progress), .DIR.old-PID-xxxx (replaced)


def clean_stale(out: Path, log=None) -> list[Path]:
    """Remove `.DIR.building-PID-*` / `.DIR.old-PID-*` siblings of `out` left by processes that no longer
    run (SIGKILL, power loss); those of live processes (a concurrent compile) are kept. Returns what went."""
    removed = []
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return removed
    for kind in (BUILDING, OLD):
        for path in parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)) and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                if log:
                    log(f"  removed {path} (left by process {pid}, which no longer runs)")
    return removed


def is_artifact_dir(path: Path) -> bool:
    """True for a directory holding an iia artifact manifest (its schema field), or an empty directory."""
    if not path.is_dir() or path.is_symlink():
        return False
    try:
        if not any(path.iterdir()):
            return True
        with open_regular(path / MANIFEST, MAX_MANIFEST_BYTES) as f:
            data = json.loads(f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"))
    except (OSError, ValueError, RecursionError, ArtifactError):
        return False
    return isinstance(data, dict) and data.get("schema") == SCHEMA


def check_out_dir(out: Path, force: bool) -> None:
    """Before any work: `out` must be a new path, or (with --force) an existing iia artifact directory.
    '.', '..', the working directory or one of its parents, a file, a symlink, or a directory of anything
    else is refused (CompileError naming it)."""
    if out.name in ("", ".", ".."):
        raise CompileError(f"--out {out}: name a new artifact directory, not '.' or '..'")
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise CompileError(f"--out {out}: is the working directory or one of its parents")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise CompileError(f"output directory {out} exists: pass --force to replace it")
    if not is_artifact_dir(out):
        what = "a symlink" if out.is_symlink() else "a file" if not out.is_dir() else "a directory that is not an iia artifact"
        raise CompileError(f"--force refuses to replace {out}: it is {what} (no manifest.json of schema {SCHEMA}); "
                           f"remove it yourself or choose another --out")


def _fresh_workdir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{BUILDING}-{os.getpid()}-", dir=out.parent))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) (Linux >= 3.15, glibc >= 2.28, a filesystem
    that supports it); False where unavailable."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _publish(work: Path, out: Path, force: bool) -> None:
    """Move the finished `work` dir to `out`. A replaced artifact is swapped out atomically where the
    filesystem allows (no instant without DIR), else by two renames with Ctrl-C/SIGTERM held in between
    and the old artifact restored if the second fails."""
    public_mode(work, directory=True)
    with signals_deferred():
        if not (out.exists() or out.is_symlink()):
            os.replace(work, out)
            return
        if not force:
            raise CompileError(f"{out} appeared while compiling; pass --force to replace it")
        if not is_artifact_dir(out):
            raise CompileError(f"--force refuses to replace {out}: it is not an iia artifact (it appeared while compiling)")
        if _exchange(work, out):
            shutil.rmtree(work, ignore_errors=True)  # now holds the old artifact
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.{OLD}-{os.getpid()}-", dir=out.parent))
        os.replace(out, old)  # onto the empty placeholder directory
        try:
            os.replace(work, out)
        except BaseException:
            os.replace(old, out)  # put the old artifact back
            raise
        shutil.rmtree(old, ignore_errors=True)


def compile_model(model, out_dir: str | Path, options: CompileOptions | None = None,
                  log: Callable[[str], None] = print, progress=None,
                  _fail_after: str | None = None) -> dict:
    """Compile `model` (a Denoiser, a path or a built-in name) into `out_dir`; returns the manifest.

    `_fail_after` injects a failure after the named stage (tests use it to prove atomicity).
    """
    opts = options or CompileOptions()
    out = Path(out_dir)
    check_out_dir(out, opts.force)
    check_options(opts, CompileError)
    static = static_batches(opts)
    solver = opts.solver
    if solver != "auto":
        get_solver(solver).steps_for_nfe(opts.nfe)
    opts.calibration.validate()
    refuse_unused_options(opts)
    timings: dict[str, float] = {}
    with stage("load model", timings, log):
        denoiser = load_for_compile(model, opts)
    log(f"  {denoiser.describe()}")
    for line in denoiser.report:
        log(f"  {line}")
    stage_module = denoiser.decode_stage()
    if stage_module is not None and denoiser.is_latent and not stage_module.has_vae:
        raise CompileError(stage_module.missing_vae_message())
    vae = getattr(stage_module, "vae", None)
    if vae is not None and int(vae.config.latent_channels) != denoiser.shape[0]:  # before an export that would fail
        raise CompileError(f"VAE {getattr(stage_module, 'vae_path', None) or getattr(stage_module, 'vae_name', '')}: "
                           f"latent_channels {int(vae.config.latent_channels)}, but the model's latents have "
                           f"{denoiser.shape[0]} channels")
    if stage_module is not None:
        log(f"  decode stage ({stage_module.kind}): {stage_module.describe()['formula']}")
    if denoiser.identity.get("guidance"):
        log(f"  guidance: {denoiser.identity['guidance']['formula']}; IIA is calibrated at this value")
    if denoiser.identity.get("sha256"):
        log(f"  sha256 {denoiser.identity['sha256']}")
    reason = tensorrt_unavailable_reason() if opts.engine else "--no-engine given"
    if opts.precision != "fp32" and reason:
        log(f"  --precision {opts.precision} applies to the TensorRT engine, which is skipped ({reason}); "
            f"the ONNX graph is fp32")

    clean_stale(out, log)
    work = None
    try:
        with signals_deferred():  # no Ctrl-C/SIGTERM between creating the build dir and owning its cleanup
            work = _fresh_workdir(out)
        with stage("coefficients", timings, log):
            coef_data, program, how = obtain_coefficients(denoiser, solver, opts, log, progress)
            solver = program.solver  # auto: the solver the search chose
            log(f"  {how}")
            if float(program.sigmas[0]) < denoiser.sigma_max * (1 - 1e-9):
                log(f"  starts at sigma_0 = {float(program.sigmas[0]):.4g} * noise, below the model's sigma_max "
                    f"{denoiser.sigma_max:.4g}: the schedule's first time step")
            coef_sha = write_json_atomic(work / COEFFICIENTS, coef_data)
            write_json_atomic(work / PROGRAM, program_document(program))
        if _fail_after == "coefficients":
            raise RuntimeError("injected failure after coefficients")
        with stage("export denoiser", timings, log):
            cache = Path(opts.cache_dir) if opts.cache_dir else default_cache_dir()
            # Exports are cached only for models loaded here from a path: a Denoiser object passed in may
            # have been changed after loading, under the same identity.
            loaded_here = not isinstance(model, Denoiser)
            denoiser_model = cached_export(
                lambda: export_denoiser(denoiser, opts.max_batch),
                export_cache_key(denoiser, "denoiser", opts.max_batch) if loaded_here else None, cache, log)
            onnx.save_model(denoiser_model, str(work / DENOISER_ONNX))
            decoder_model = cached_export(
                lambda: export_decoder(denoiser, opts.max_batch),
                export_cache_key(denoiser, "decoder", opts.max_batch) if loaded_here else None, cache, log)
            decoder_files = []
            if decoder_model is not None:
                onnx.save_model(decoder_model, str(work / DECODER_ONNX))
                decoder_files = [DECODER_ONNX]
        with stage("emit sampler graph", timings, log):
            emit = emit_sampler_loop if opts.graph == "loop" else emit_sampler
            plan = plan_folding(denoiser_model, [op.sigma for op in program.ops() if isinstance(op, Denoise)],
                                denoiser.label_dim)
            log(f"  conditioning (sigma, class labels) folded {plan.summary}")
            log(f"  denoiser rewrites (in the sampler graph): {plan.rewrites}")
            sampler = emit(program, denoiser_model, denoiser.shape, denoiser.conditional, decoder_model=decoder_model,
                           latent=denoiser.is_latent, label_dim=denoiser.label_dim, plan=plan)
            check_model(sampler)
            if decoder_model is not None:  # emit rewrote the decode stage's small convolutions too
                emitted = sum(n.op_type == "ConvTranspose" and n.name.startswith(DECODE_PREFIX)
                              for n in sampler.graph.node)
                transposed = emitted - sum(n.op_type == "ConvTranspose" for n in decoder_model.graph.node)
                if transposed:
                    log(f"  decode stage rewrites: {transposed} small convolutions as ConvTranspose")
            stamp_metadata(sampler, graph_metadata({"nfe": program.nfe, "label_dim": denoiser.label_dim,
                                                    "sample_shape": list(denoiser.shape)}))
            decoder_bytes = 0 if decoder_model is None else initializer_bytes(decoder_model)
            weights = check_weight_sharing(sampler, initializer_bytes(denoiser_model) + decoder_bytes,
                                           denoiser.param_bytes() + decode_param_bytes(stage_module), opts.weight_limit)
            files = save_onnx(sampler, work / SAMPLER_ONNX)
            log(f"  {opts.graph} graph, {program.nfe} denoiser calls, {len(sampler.graph.node)} top-level nodes, stored tensors {weights['ratio']:.4f}x one "
                f"denoiser call, {weights['ratio_vs_params']:.4f}x its parameters (+{weights['sampler_constants']} bytes of baked schedule/coefficients)")
        if _fail_after == "emit":
            raise RuntimeError("injected failure after emit")
        with stage("parity vs PyTorch", timings, log):
            parity = check_parity(str(work / SAMPLER_ONNX), program, denoiser, atol=opts.parity_atol,
                                  golden_dir=work, decode=decoder_model is not None)
            decoded_note = (f", images_uint8 within +-1 level: {parity['images_uint8_within_1']:.4%}"
                            if "images_uint8_within_1" in parity else "")
            log(f"  ONNX Runtime CPU vs PyTorch: max abs {parity['max_abs']:.3g}, max rel {parity['max_rel']:.3g}"
                f"{decoded_note}")
        static_parity = {}
        if static:
            with stage("static batches", timings, log):
                static_parity = check_static_batches(str(work / SAMPLER_ONNX), static, denoiser, parity["tolerance"])
                log("  specialised for batch " + ", ".join(f"{b} (max abs vs dynamic {d:.3g})"
                                                          for b, d in static_parity.items()))
        engine = {"built": False, "reason": reason, "precision": opts.precision}
        if reason is None:
            with stage("tensorrt engine", timings, log):
                plan = EnginePlan(sampler_inputs(denoiser.shape, denoiser.conditional), precision=opts.precision,
                                  max_batch=opts.max_batch, opt_batch=min(8, opts.max_batch),
                                  fp32_layers=fp32_layer_names(sampler) if opts.precision != "fp32" else [],
                                  timing_cache=str(default_cache_dir() / "timing.cache"))
                try:
                    _, built = build_engine(str(work / SAMPLER_ONNX), plan, str(work / SAMPLER_PLAN))
                    engine.update(built, built=True, reason=None)
                    files.append(SAMPLER_PLAN)
                except EngineUnavailable as err:
                    engine["reason"] = str(err)
                except Exception as err:  # TensorRT's parser/builder errors: name the graph form, which is a choice
                    if opts.graph != "loop":
                        raise
                    raise CompileError(f"TensorRT could not build the loop-form graph ({type(err).__name__}: {err}); "
                                       f"compile with --graph unrolled") from None
        if not engine["built"]:
            log(f"  TensorRT engine skipped: {engine['reason']}")
        inputs, outputs = io_spec(denoiser.shape, denoiser.label_dim,
                                  None if decoder_model is None else decoded_shape(decoder_model), denoiser.is_latent)
        all_files = files + [DENOISER_ONNX, *decoder_files, COEFFICIENTS, PROGRAM, GOLDEN_INPUTS, GOLDEN_OUTPUTS]
        manifest = make_manifest(
            model=artifact.model_identity(denoiser),
            solver=solver,
            nfe=program.nfe,
            r=program.r,
            sigmas=list(program.sigmas),
            sample_shape=list(denoiser.shape),
            graph=opts.graph,
            label_dim=denoiser.label_dim,
            max_batch=opts.max_batch,
            **({STATIC_BATCHES: static, "static_parity": {str(b): d for b, d in static_parity.items()}} if static else {}),
            guidance=guidance_record(denoiser),
            decode=None if stage_module is None else stage_module.describe(),
            inputs=inputs,
            outputs=outputs,
            files={name: {"sha256": sha256_file(work / name), "bytes": (work / name).stat().st_size}
                   for name in all_files},
            coefficients_sha256=coef_sha,
            coefficients_source=how,
            guard=coef_data.get("guard") or ({"decision": UNGUARDED} if UNGUARDED in how else {}),
            **({"search": {k: coef_data["search"][k] for k in ("chosen", "seconds", "timings_s", "candidates")}}
               if "search" in coef_data else {}),
            parity=parity,
            weights=weights,
            engine=engine,
            timings_s=timings,
            versions=artifact.library_versions(),
            golden={"inputs": GOLDEN_INPUTS, "outputs": GOLDEN_OUTPUTS,
                    "check": f"polygraphy run {SAMPLER_ONNX} --trt --load-inputs {GOLDEN_INPUTS} "
                             f"--load-outputs {GOLDEN_OUTPUTS} --atol 1e-3 {IMAGES_U8}:1 --rtol 0"},
        )
        write_json_atomic(work / MANIFEST, manifest)
        with signals_deferred():  # published and recorded as one step: an interrupt after it must not deny it
            _publish(work, out, opts.force)
            work = None
            written(out)
    except BaseException:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest
