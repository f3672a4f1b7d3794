"""The stages of `compile_model`, in order: load -> coefficients -> export -> optimize -> emit -> verify ->
engine -> manifest -> publish. Each is a function of the records before it, logs its own time (`iia.cli.stage`)
and returns a small frozen record; nothing else passes between stages."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import onnx
import torch

from iia.calibration import artifact
from iia.calibration.solvers import Denoise, Program
from iia.cli import stage
from iia.models.base import Denoiser
from iia.models.decode import decode_param_bytes
from iia.models.device import describe_device, on_device, resolve_device
from iia.models.registry import load as load_model
from iia.models.registry import resolve_model
from iia.runtime.contract import (COEFFICIENTS, DECODER_ONNX, DENOISER_ONNX, GOLDEN_INPUTS, GOLDEN_OUTPUTS,
                                  IMAGES_U8, MANIFEST, PROGRAM, SAMPLER_ONNX, SAMPLER_ONNX_DATA, SAMPLER_PLAN,
                                  STATIC_BATCHES, graph_metadata, io_spec, make_manifest, sha256_file,
                                  tensorrt_unavailable_reason, write_json_atomic)
from iia.runtime.engine import EnginePlan, EngineUnavailable, build_engine, fp32_layer_names, sampler_inputs

from .cache import cache_dir, default_cache_dir, export_cache_key, get_or_make
from .check import check_model_file, check_parity, check_range_parity, check_static_batches, check_weight_sharing
from .coefficients import UNGUARDED, obtain_coefficients
from .emit import DECODE_PREFIX, emit_sampler, initializer_bytes, unrolled_size_error
from .emit_loop import emit_sampler_loop
from .guidance_graph import scale_inputs
from .export import decoded_shape, export_decoder, export_denoiser
from .fold import plan_folding
from .options import CompileError, CompileOptions, guidance_range
from .graph import EXTERNAL_DATA_BYTES, release_memory, stored_bytes
from .scales import range_coefficients


@dataclass(frozen=True)
class Job:
    """What every stage may read: the options, the work folder, the log, the stage timings (filled in)."""

    opts: CompileOptions
    work: Path
    log: Callable[[str], None]
    progress: Callable | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Loaded:
    denoiser: Denoiser
    decode: object | None  # the decode stage (iia.models.decode), None for none
    engine_skipped: str | None  # why no TensorRT engine is built; None: one is
    cacheable: bool  # loaded here from a path: a Denoiser passed in may change under the same identity
    device: torch.device = torch.device("cpu")  # where the stages' PyTorch work runs (--device)


@dataclass(frozen=True)
class Coefficients:
    data: dict  # coefficients.json
    program: Program
    how: str  # where they came from (the manifest's coefficients_source)
    sha256: str  # of coefficients.json as written
    scales: object | None = None  # a guidance range's ScaleTable (compiler.scales); None: one scale


@dataclass(frozen=True)
class Exported:
    denoiser: onnx.ModelProto | None  # None once emitted; its tensors dropped once a folding plan has its own (`released`)
    decoder: onnx.ModelProto | None
    files: tuple[str, ...]
    weight_bytes: int  # the denoiser's stored tensor bytes (what weight sharing is measured against)


@dataclass(frozen=True)
class Emitted:
    files: tuple[str, ...]  # sampler.onnx (and its external data file); the graph itself is not kept
    weights: dict  # check_weight_sharing's record


@dataclass(frozen=True)
class Verified:
    parity: dict
    static_parity: dict[int, float]


@dataclass(frozen=True)
class Engine:
    record: dict  # the manifest's "engine"
    files: tuple[str, ...]


# ---- load -----------------------------------------------------------------------------------------------
def load_for_compile(model, opts: CompileOptions) -> Denoiser:
    """The model with the options' guidance and VAE applied."""
    for name in ("guidance", "cfg"):
        value = getattr(opts, name)
        if value is not None and not all(math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))):
            raise CompileError(f"--{name} must be a finite number, got {value}")
    if guidance_range(opts) is not None or opts.guidance_default is not None:  # a range: guided() checks it
        from iia.models.guidance import guided

        net = model if isinstance(model, Denoiser) else load_model(model, opts.x0_clipping, vae=opts.vae)
        guide = None if opts.guide is None else resolve_model(opts.guide, opts.x0_clipping)
        return guided(net, guide, opts.guidance, opts.cfg, default=opts.guidance_default)
    if isinstance(model, Denoiser):
        if opts.vae is not None:
            raise CompileError("--vae applies when the model is given as a path, not as a Denoiser object")
        if opts.guide is None and opts.guidance is None and opts.cfg is None:
            return model
        from iia.models.guidance import guided

        guide = None if opts.guide is None else resolve_model(opts.guide, opts.x0_clipping)
        return guided(model, guide, opts.guidance, opts.cfg)
    return load_model(model, opts.x0_clipping, guide=opts.guide, guidance=opts.guidance, cfg=opts.cfg, vae=opts.vae)


def load(model, job: Job) -> Loaded:
    """The model, its decode stage (a latent model's VAE checked before any export) and the engine decision."""
    opts, log = job.opts, job.log
    with stage("load model", job.timings, log):
        denoiser = load_for_compile(model, opts)
    log(f"  {denoiser.describe()}")
    for line in denoiser.report:
        log(f"  {line}")
    decode = denoiser.decode_stage()
    if decode is not None and denoiser.is_latent and not decode.has_vae:
        raise CompileError(decode.missing_vae_message())
    vae = getattr(decode, "vae", None)
    if vae is not None and int(vae.config.latent_channels) != denoiser.shape[0]:  # before an export that would fail
        raise CompileError(f"VAE {getattr(decode, 'vae_path', None) or getattr(decode, 'vae_name', '')}: "
                           f"latent_channels {int(vae.config.latent_channels)}, but the model's latents have "
                           f"{denoiser.shape[0]} channels")
    if decode is not None:
        log(f"  decode stage ({decode.kind}): {decode.describe()['formula']}")
    if getattr(denoiser, "guidance_range", None) is not None:
        scales = denoiser.guidance_range
        log(f"  guidance: {denoiser.identity['guidance']['formula']}, per image in [{scales.lo:g}, {scales.hi:g}] "
            f"(default {scales.default:g}); the sampler is calibrated at several scales and interpolated")
    elif denoiser.identity.get("guidance"):
        log(f"  guidance: {denoiser.identity['guidance']['formula']}; IIA is calibrated at this value")
    if denoiser.identity.get("sha256"):
        log(f"  sha256 {denoiser.identity['sha256']}")
    reason = tensorrt_unavailable_reason() if opts.engine else "--no-engine given"
    if opts.precision != "fp32" and reason:
        log(f"  --precision {opts.precision} applies to the TensorRT engine, which is skipped ({reason}); "
            f"the ONNX graph is fp32")
    device = resolve_device(opts.device)
    log(f"  PyTorch work (references, fits, scoring, parity) on {describe_device(device)} (--device {opts.device})")
    return Loaded(denoiser, decode, reason, cacheable=not isinstance(model, Denoiser), device=device)


# ---- coefficients ---------------------------------------------------------------------------------------
def coefficients(loaded: Loaded, job: Job) -> Coefficients:
    """The sampler's coefficients (see compiler.coefficients), written to coefficients.json."""
    denoiser = loaded.denoiser
    with stage("coefficients", job.timings, job.log), on_device(denoiser, loaded.device):
        scales = None
        if getattr(denoiser, "guidance_range", None) is not None:
            data, program, how, scales = range_coefficients(denoiser, job.opts, job.log, job.progress)
        else:
            data, program, how = obtain_coefficients(denoiser, job.opts.solver, job.opts, job.log, job.progress)
        job.log(f"  {how}")
        if float(program.sigmas[0]) < denoiser.sigma_max * (1 - 1e-9):
            job.log(f"  starts at sigma_0 = {float(program.sigmas[0]):.4g} * noise, below the model's sigma_max "
                    f"{denoiser.sigma_max:.4g}: the schedule's first time step")
        sha = write_json_atomic(job.work / COEFFICIENTS, data)
    return Coefficients(data, program, how, sha, scales)


# ---- export ---------------------------------------------------------------------------------------------
def cached_export(export: Callable[[], onnx.ModelProto | None], key: str | None, cache: Path, log,
                  made_from: dict | None = None) -> onnx.ModelProto | None:
    """`export()` (an ONNX model or None) through the cache entry `cache/exports/key` (`get_or_make`: checked
    against the digest and key recorded with `made_from`, then parsed and checked by onnx); models over
    EXTERNAL_DATA_BYTES are not cached (serialising them would take GBs). The key is bound in the sidecar, not in the ONNX: the graph is copied into
    the artifact as it is."""

    def read(data: bytes, path: Path) -> onnx.ModelProto:
        onnx.checker.check_model(data)  # the bytes: checking the parsed model would serialise it once more
        model = onnx.load_from_string(data)
        log(f"  reused the cached export {path}")
        return model

    def write(model: onnx.ModelProto | None) -> bytes | None:
        if model is None or stored_bytes(model) > EXTERNAL_DATA_BYTES:  # see EXTERNAL_DATA_BYTES: GBs to serialise
            return None
        return model.SerializeToString()

    return get_or_make(cache / "exports" / key if key else None, export, read, write, log,
                       limit=EXTERNAL_DATA_BYTES, what="cached export", redo="exporting again", made_from=made_from)


def export(loaded: Loaded, job: Job) -> Exported:
    """The denoiser's ONNX (written as denoiser.onnx only with --with-denoiser: the sampler holds its weights) and,
    for a model with a decode stage, decoder.onnx (both through the export cache)."""
    denoiser, max_batch, cache = loaded.denoiser, job.opts.max_batch, cache_dir(job.opts.cache_dir)

    def key(what: str) -> str | None:
        return export_cache_key(denoiser, what, max_batch) if loaded.cacheable else None

    def made_from(what: str) -> dict:
        return {"what": what, "model_sha256": denoiser.identity.get("sha256"), "max_batch": max_batch}

    # on the CPU whatever --device: the traced graph (and the export cache entry, whose key names no device) is then
    # the same for every device, and the export is a one-off trace whose graph runs on ONNX Runtime / TensorRT
    with stage("export denoiser", job.timings, job.log), on_device(denoiser, "cpu"):
        model = cached_export(lambda: export_denoiser(denoiser, max_batch), key("denoiser"), cache, job.log,
                              made_from("denoiser"))
        if job.opts.with_denoiser:
            onnx.save_model(model, str(job.work / DENOISER_ONNX))
        decoder = cached_export(lambda: export_decoder(denoiser, max_batch), key("decoder"), cache, job.log,
                                made_from("decoder"))
        if decoder is not None:
            onnx.save_model(decoder, str(job.work / DECODER_ONNX))
        release_memory()  # the exporter's and the cache's copies
    files = ((DENOISER_ONNX,) if job.opts.with_denoiser else ()) + ((DECODER_ONNX,) if decoder is not None else ())
    return Exported(model, decoder, files, initializer_bytes(model))


def released(exported: Exported, plan=None) -> Exported:
    """`exported` less what the later stages no longer read (GBs at full size). Given the folding `plan`: when it
    carries its own rewritten copy of the denoiser (`plan.model`, what emit copies), the exported graph's tensors
    (emit then reads its header only; dropped in place: the graph is this compile's own, its files written).
    Without: the denoiser graph itself, once sampler.onnx holds the weights (the later stages read files and
    the decode stage)."""
    lean = exported
    if plan is None:
        lean = replace(exported, denoiser=None)
    elif plan.model is not None and exported.denoiser is not None:
        del exported.denoiser.graph.initializer[:]
    release_memory()
    return lean


# ---- optimize -------------------------------------------------------------------------------------------
def optimize(loaded: Loaded, coefs: Coefficients, exported: Exported, job: Job):
    """The folding plan (conditioning values from sigma and class labels, the denoiser rewrites)."""
    with stage("optimize", job.timings, job.log):
        plan = plan_folding(exported.denoiser, [op.sigma for op in coefs.program.ops() if isinstance(op, Denoise)],
                            loaded.denoiser.label_dim)
        job.log(f"  conditioning (sigma, class labels) folded {plan.summary}")
        job.log(f"  denoiser rewrites (in the sampler graph): {plan.rewrites}")
        release_memory()  # the probes' sessions and the copies the passes dropped
    return plan


# ---- emit -----------------------------------------------------------------------------------------------
def stamp_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Set ONNX metadata_props entries (others kept): what load() compares with the manifest."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        entry = existing.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, value


def save_onnx(model: onnx.ModelProto, path: Path, threshold: int = EXTERNAL_DATA_BYTES) -> list[str]:
    """Save; a graph storing over `threshold` bytes of tensors (a Loop body's included) keeps them in ONE file
    `<name>.data` beside the model (protobuf cannot hold 2 GB; ONNX Runtime reads the file from the model's
    directory). Returns the file names (the manifest lists both, so both are digest-checked)."""
    if initializer_bytes(model) > threshold:
        location = SAMPLER_ONNX_DATA if path.name == SAMPLER_ONNX else path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
        return [path.name, location]
    onnx.save_model(model, str(path))
    return [path.name]


def emit(loaded: Loaded, coefs: Coefficients, exported: Exported, plan, job: Job) -> Emitted:
    """sampler.onnx: the whole sampler around the exported denoiser (and decode stage), checked, stamped with
    the metadata load() compares, its weight sharing checked."""
    denoiser, decoder, opts, log = loaded.denoiser, exported.decoder, job.opts, job.log
    program = coefs.program
    with stage("emit sampler graph", job.timings, log):
        too_big = opts.graph == "unrolled" and unrolled_size_error(program.nfe, len(exported.denoiser.graph.node))
        if too_big:
            raise CompileError(too_big)
        emit_graph = emit_sampler_loop if opts.graph == "loop" else emit_sampler
        extra = {} if coefs.scales is None else {"scales": scale_inputs(coefs.scales, denoiser.guidance_range)}
        sampler = emit_graph(program, exported.denoiser, denoiser.shape, denoiser.conditional, decoder_model=decoder,
                             latent=denoiser.is_latent, label_dim=denoiser.label_dim, plan=plan, **extra)
        if decoder is not None:  # emit rewrote the decode stage's small convolutions too
            emitted = sum(n.op_type == "ConvTranspose" and n.name.startswith(DECODE_PREFIX) for n in sampler.graph.node)
            transposed = emitted - sum(n.op_type == "ConvTranspose" for n in decoder.graph.node)
            if transposed:
                log(f"  decode stage rewrites: {transposed} small convolutions as ConvTranspose")
        stamp_metadata(sampler, graph_metadata({"nfe": program.nfe, "label_dim": denoiser.label_dim,
                                                "sample_shape": list(denoiser.shape)}))
        decoder_bytes = 0 if decoder is None else initializer_bytes(decoder)
        weights = check_weight_sharing(sampler, exported.weight_bytes + decoder_bytes,
                                       denoiser.param_bytes() + decode_param_bytes(loaded.decode), opts.weight_limit)
        top_level = len(sampler.graph.node)
        files = save_onnx(sampler, job.work / SAMPLER_ONNX, opts.external_data_bytes)
        del sampler  # checked from the file: the checker would otherwise serialise the in-memory graph again
        release_memory()
        check_model_file(job.work / SAMPLER_ONNX)
        log(f"  {opts.graph} graph, {program.nfe} denoiser calls, {top_level} top-level nodes, stored "
            f"tensors {weights['ratio']:.4f}x one denoiser call, {weights['ratio_vs_params']:.4f}x its parameters "
            f"(+{weights['sampler_constants']} bytes of baked schedule/coefficients)"
            + (f"; tensors in {files[1]} (over {opts.external_data_bytes} bytes)" if len(files) > 1 else ""))
    return Emitted(tuple(files), weights)


# ---- verify ---------------------------------------------------------------------------------------------
def _rule(parity: dict) -> str:
    """The parity tolerance that applied and why: the absolute bound (CompileOptions.parity_atol, 1e-4), or 10x
    the sampler's own float32 floor where that is larger (compiler/check.py)."""
    if parity["tolerance"] > parity["atol"]:
        return f"{parity['tolerance']:.3g}: 10x this sampler's float32 floor {parity['float32_floor']:.3g}"
    return f"{parity['tolerance']:.3g}: the absolute bound"


def verify(loaded: Loaded, coefs: Coefficients, exported: Exported, static: list[int], job: Job) -> Verified:
    """Parity of sampler.onnx (ONNX Runtime CPU) with the PyTorch interpreter (writing the golden files), then
    each static batch size against the dynamic graph."""
    work, log = job.work, job.log
    with stage("parity vs PyTorch", job.timings, log), on_device(loaded.denoiser, loaded.device):
        if coefs.scales is not None:  # at the range's ends and scales between, some of them not nodes
            parity = check_range_parity(str(work / SAMPLER_ONNX), coefs.scales, loaded.denoiser.guidance_range,
                                        loaded.denoiser, atol=job.opts.parity_atol, golden_dir=work,
                                        decode=exported.decoder is not None)
        else:
            parity = check_parity(str(work / SAMPLER_ONNX), coefs.program, loaded.denoiser, atol=job.opts.parity_atol,
                                  golden_dir=work, decode=exported.decoder is not None, log=log)
        decoded_note = (f", images_uint8 within +-1 level: {parity['images_uint8_within_1']:.4%}"
                        if "images_uint8_within_1" in parity else "")
        log(f"  ONNX Runtime CPU vs PyTorch: max abs {parity['max_abs']:.3g} (tolerance {_rule(parity)}), "
            f"max rel {parity['max_rel']:.3g}{decoded_note}")
    static_parity = {}
    if static:
        with stage("static batches", job.timings, log):
            static_parity = check_static_batches(str(work / SAMPLER_ONNX), static, loaded.denoiser, parity["tolerance"])
            log("  specialised for batch " + ", ".join(f"{b} (max abs vs dynamic {d:.3g})"
                                                      for b, d in static_parity.items()))
    return Verified(parity, static_parity)


# ---- engine ---------------------------------------------------------------------------------------------
def engine(loaded: Loaded, emitted: Emitted, job: Job) -> Engine:
    """The TensorRT plan of sampler.onnx where TensorRT and a GPU exist (else the reason it was skipped)."""
    opts, denoiser = job.opts, loaded.denoiser
    record = {"built": False, "reason": loaded.engine_skipped, "precision": opts.precision}
    files: tuple[str, ...] = ()
    if loaded.engine_skipped is None:
        with stage("tensorrt engine", job.timings, job.log):
            guided = getattr(denoiser, "guidance_range", None) is not None
            plan = EnginePlan(sampler_inputs(denoiser.shape, denoiser.conditional, guided), precision=opts.precision,
                              max_batch=opts.max_batch, opt_batch=min(8, opts.max_batch),
                              fp32_layers=(fp32_layer_names(str(job.work / SAMPLER_ONNX)) if opts.precision != "fp32"
                                           else []),
                              timing_cache=str(default_cache_dir() / "timing.cache"))
            try:
                _, built = build_engine(str(job.work / SAMPLER_ONNX), plan, str(job.work / SAMPLER_PLAN))
                record.update(built, built=True, reason=None)
                files = (SAMPLER_PLAN,)
            except EngineUnavailable as err:
                record["reason"] = str(err)
            except Exception as err:  # TensorRT's parser/builder errors: name the graph form, which is a choice
                if opts.graph != "loop":
                    raise
                raise CompileError(f"TensorRT could not build the loop-form graph ({type(err).__name__}: {err}); "
                                   f"compile with --graph unrolled") from None
    if not record["built"]:
        job.log(f"  TensorRT engine skipped: {record['reason']}")
    return Engine(record, files)


# ---- manifest -------------------------------------------------------------------------------------------
def guidance_record(denoiser: Denoiser, coefs: Coefficients | None = None) -> dict | None:
    """What the manifest says about guidance: the settings, and that the coefficients were fitted with them
    (a range: its nodes, default, interpolation and the guard's table of held-out scales)."""
    settings = denoiser.identity.get("guidance")
    if not settings:
        return None
    if coefs is not None and coefs.scales is not None:
        ranged = coefs.data["guidance"]
        return {**settings, **ranged, "note": ranged.get("note", "the sampler's coefficients were calibrated at the "
                                          "nodes and are interpolated in g between them; a request's g must lie in "
                                          "the range")}
    return dict(settings, note="the sampler's coefficients were calibrated on this guided denoiser; they hold "
                               "for this guidance value (recompile to change it)")


def write_manifest(loaded: Loaded, coefs: Coefficients, exported: Exported, emitted: Emitted, verified: Verified,
                   built: Engine, static: list[int], job: Job) -> dict:
    """manifest.json (iia.runtime.contract.make_manifest) over every file in the work folder; returns it."""
    denoiser, program, work, opts = loaded.denoiser, coefs.program, job.work, job.opts
    inputs, outputs = io_spec(denoiser.shape, denoiser.label_dim,
                              None if exported.decoder is None else decoded_shape(exported.decoder), denoiser.is_latent,
                              **scale_spec(denoiser))
    names = [*emitted.files, *built.files, *exported.files, COEFFICIENTS, PROGRAM, GOLDEN_INPUTS, GOLDEN_OUTPUTS]
    search = coefs.data.get("search")
    manifest = make_manifest(
        model=artifact.model_identity(denoiser), solver=program.solver, nfe=program.nfe, r=program.r,
        sigmas=list(program.sigmas), sample_shape=list(denoiser.shape), graph=opts.graph,
        label_dim=denoiser.label_dim, max_batch=opts.max_batch,
        **({STATIC_BATCHES: static, "static_parity": {str(b): d for b, d in verified.static_parity.items()}}
           if static else {}),
        guidance=guidance_record(denoiser, coefs),
        decode=None if loaded.decode is None else loaded.decode.describe(),
        inputs=inputs, outputs=outputs,
        files={name: {"sha256": sha256_file(work / name), "bytes": (work / name).stat().st_size} for name in names},
        coefficients_sha256=coefs.sha256, coefficients_source=coefs.how,
        guard=coefs.data.get("guard") or ({"decision": UNGUARDED} if UNGUARDED in coefs.how else {}),
        **({"search": {k: search[k] for k in ("chosen", "seconds", "timings_s", "candidates")}} if search else {}),
        parity=verified.parity, weights=emitted.weights, engine=built.record, timings_s=job.timings,
        versions=artifact.library_versions(),
        golden={"inputs": GOLDEN_INPUTS, "outputs": GOLDEN_OUTPUTS,
                "check": f"polygraphy run {SAMPLER_ONNX} --trt --load-inputs {GOLDEN_INPUTS} "
                         f"--load-outputs {GOLDEN_OUTPUTS} --atol 1e-3 {IMAGES_U8}:1 --rtol 0"},
    )
    write_json_atomic(work / MANIFEST, manifest)
    return manifest


def scale_spec(denoiser: Denoiser) -> dict:
    """io_spec's `guidance` argument: (lo, hi, default) of a range compile, nothing for one scale."""
    scales = getattr(denoiser, "guidance_range", None)
    return {} if scales is None else {"guidance": (scales.lo, scales.hi, scales.default)}
