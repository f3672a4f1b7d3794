"""`iia-export-triton ARTIFACT_DIR --repo REPO`: a Triton Inference Server model repository from an artifact.

The whole fixed-NFE sampler is ONE model with inputs `noise` (+ `class_labels`) (+ `guidance`) and outputs `images`,
`images_uint8`, so Triton serves it with its standard backends and its own dynamic batching:

    REPO/<name>_tensorrt/config.pbtxt      platform "tensorrt_plan"     1/model.plan (or one plan per compute
                                                                          capability, through cc_model_filenames)
    REPO/<name>_onnxruntime/config.pbtxt   platform "onnxruntime_onnx"  1/model.onnx (+ sampler.onnx.data)
    REPO/<name>_python/config.pbtxt        backend "python"             1/model.py + 1/artifact/ (iia.runtime)

The python-backend model runs the artifact with `iia.runtime` (for hosts without those backends) and also
accepts a `seed` per image instead of raw noise: server-side noise drawn by `iia.runtime.draw_noise`, the
project's one noise convention. Config format: Triton's `model_config.proto` (dims exclude the batch axis when
`max_batch_size > 0`; `class_labels` and `guidance` (one scale per image, artifacts compiled for a guidance range;
optional for the python backend, which then uses the manifest's default), [B] in the graph, are [B, 1] on the wire
with `reshape { shape: [] }`).

Every config is built as a `tritonclient` `ModelConfig` protobuf, written as text, parsed back with
`google.protobuf.text_format` and checked against the artifact's manifest (names, dtypes, dims, batch) before
anything is published; the models appear in REPO by directory renames, so a failure leaves REPO as it was.
torch-free: the standard library, tritonclient[grpc] (its protobuf definitions) and iia.runtime.contract.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from iia.cli import (add_options, check_options, cli_parser, int_list, options_from, repeated, run_cli, str_list,
                     written)
from iia.runtime.contract import (MANIFEST, SAMPLER_ONNX, SAMPLER_ONNX_DATA, SAMPLER_PLAN, artifact_root,
                                  read_manifest, verify_all)

from .out_dir import check_container_dir
from .publish import Staging, copy_public, publish
# the configs and the export's options and error (imported from here by the export's callers)
from .triton_config import (BACKENDS, TritonExportError, TritonOptions, check_config,  # noqa: F401
                            config_summary, config_text, parse_config, python_config, standard_config)

PYTHON_MODEL_TEMPLATE = Path(__file__).with_name("triton_python_model.py")
NAME_MAX = 200  # + "_onnxruntime" stays within a file name's 255 bytes
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,%d}" % (NAME_MAX - 1))
EXPORT_MARKER = "iia-export.json"  # in every model dir an export writes: what --force may replace


# ---- artifacts --------------------------------------------------------------------------------------------
@dataclass
class _Artifact:
    root: Path
    manifest: dict

    @property
    def has_plan(self) -> bool:
        return bool((self.manifest.get("engine") or {}).get("built")) and SAMPLER_PLAN in self.manifest["files"]

    @property
    def capability(self) -> str | None:
        return (self.manifest.get("engine") or {}).get("compute_capability")


def _read_artifacts(paths: list[str | Path]) -> list[_Artifact]:
    """Verified artifacts; extra ones may only add TensorRT plans of the SAME sampler graph."""
    arts = []
    for path in paths:
        root = artifact_root(path)
        manifest = read_manifest(root)
        verify_all(root, manifest)
        arts.append(_Artifact(root, manifest))
    first = arts[0]
    for art in arts[1:]:
        if art.manifest["files"].get(SAMPLER_ONNX) != first.manifest["files"].get(SAMPLER_ONNX):
            raise TritonExportError(f"{art.root}: its {SAMPLER_ONNX} differs from {first.root}'s; several artifact "
                                    f"directories are only for TensorRT plans of ONE sampler built on different GPUs")
        if not art.has_plan:
            raise TritonExportError(f"{art.root} has no TensorRT plan; extra artifact directories only add plans")
    return arts


def _plans(arts: list[_Artifact]) -> dict[str, _Artifact]:
    """{compute capability: artifact} over the artifacts that have a plan (one per capability)."""
    plans: dict[str, _Artifact] = {}
    for art in arts:
        if not art.has_plan:
            continue
        cc = art.capability
        if not cc:
            raise TritonExportError(f"{art.root / 'manifest.json'}: engine.compute_capability is missing; cannot "
                                    f"place its plan")
        if cc in plans:
            raise TritonExportError(f"{plans[cc].root} and {art.root} both hold a plan for compute capability {cc}")
        plans[cc] = art
    return plans


def default_name(root: Path) -> str:
    """A Triton-safe model name from the artifact directory's name."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", root.resolve().name).strip("_")[:NAME_MAX].strip("_")
    return name or "iia_sampler"


# ---- the repository -------------------------------------------------------------------------------------
def _write_model(work: Path, name: str, config, manifest: dict, opts: TritonOptions) -> Path:
    """work/<name>/config.pbtxt, parsed back and checked; returns the model dir (its version dir is empty)."""
    model_dir = work / name
    (model_dir / str(opts.version)).mkdir(parents=True)
    model = manifest.get("model", {})
    sha = manifest["files"].get(SAMPLER_ONNX, {}).get("sha256", "?")
    text = (f"# {name}: written by iia-export-triton from {model.get('name', '?')} ({manifest.get('solver')}, NFE "
            f"{manifest['nfe']}; {SAMPLER_ONNX} sha256 {sha[:16]})\n" + config_text(config))
    check_config(parse_config(text, f"{name}/config.pbtxt"), manifest, f"{name}/config.pbtxt")
    (model_dir / "config.pbtxt").write_text(text)
    (model_dir / EXPORT_MARKER).write_text(json.dumps({"written_by": "iia-export-triton", "model": name}) + "\n")
    return model_dir


def export_repository(artifacts: list[str | Path] | str | Path, repo: str | Path,
                      opts: TritonOptions | None = None, log=None) -> dict[str, Path]:
    """Write the models for `artifacts` into the Triton model repository `repo`; returns {model name: dir}.

    Nothing appears in `repo` until every model is written, parsed back and checked; an existing model of
    the same name is refused unless `opts.force` (then replaced). Raises TritonExportError / ArtifactError.
    """
    opts = opts or TritonOptions()
    log = log or (lambda text: None)
    paths = [artifacts] if isinstance(artifacts, (str, Path)) else list(artifacts)
    if not paths:
        raise TritonExportError("give at least one artifact directory")
    _check_options(opts)
    repo = check_container_dir(repo, "--repo", TritonExportError)  # before the artifacts' hashes are read
    arts = _read_artifacts(paths)
    first = arts[0]
    manifest = first.manifest
    _check_preferred(opts, int(manifest["max_batch"]))
    plans = _plans(arts)
    backends = opts.backends or ([*(["tensorrt"] if plans and opts.kind == "gpu" else []), "onnxruntime", "python"])
    if "tensorrt" in backends and not plans:
        reason = (manifest.get("engine") or {}).get("reason") or "not built"
        raise TritonExportError(f"--backend tensorrt: {first.root} has no TensorRT plan ({reason}); compile it on a "
                                f"GPU machine with TensorRT, or choose --backend onnxruntime,python")
    if "tensorrt" in backends and opts.kind != "gpu":
        raise TritonExportError("--kind cpu cannot serve a TensorRT plan (tensorrt_plan runs on GPUs only)")
    base = default_name(first.root) if opts.name is None else opts.name
    names = {backend: f"{base}_{backend}" for backend in backends}
    existing = [n for n in names.values() if (repo / n).exists() or (repo / n).is_symlink()]
    if existing and not opts.force:
        raise TritonExportError(f"{repo} already holds model(s) {', '.join(existing)} (pass --force to replace)")
    foreign = [n for n in existing if not (repo / n).is_symlink() and not (repo / n / EXPORT_MARKER).is_file()]
    if foreign:  # --force replaces what an export wrote, never a directory of the user's
        raise TritonExportError(f"{repo / foreign[0]} was not written by iia-export-triton (it has no "
                                f"{EXPORT_MARKER}): refusing to replace it even with --force; move it away first")
    with Staging(repo, "--repo", TritonExportError, container=True) as work:
        built = [_write_backend(work, names[backend], backend, arts, plans, opts, log) for backend in backends]

        def may_replace(dst: Path) -> None:
            if not opts.force:
                raise TritonExportError(f"{dst} appeared while exporting (pass --force to replace)")

        publish([(work / name, repo / name) for name in built], may_replace, repo)
    return {name: repo / name for name in built}


def _write_backend(work: Path, name: str, backend: str, arts: list[_Artifact], plans: dict[str, _Artifact],
                   opts: TritonOptions, log) -> str:
    """work/<name>: the model folder of one backend (config checked, files copied); returns name."""
    first = arts[0]
    manifest = first.manifest
    if backend == "python":
        model_dir = _write_model(work, name, python_config(manifest, name, opts), manifest, opts)
        _python_files(first, model_dir / str(opts.version))
    else:
        files = {cc: f"model_{cc}.plan" for cc in plans} if len(plans) > 1 else {}
        model_dir = _write_model(work, name, standard_config(manifest, name, backend, opts, files), manifest, opts)
        version_dir = model_dir / str(opts.version)
        if backend == "tensorrt":
            for cc, art in plans.items():
                copy_public(art.root / SAMPLER_PLAN, version_dir / (files.get(cc) or "model.plan"))
        else:
            copy_public(first.root / SAMPLER_ONNX, version_dir / "model.onnx")
            if SAMPLER_ONNX_DATA in manifest["files"]:  # keeps the name the graph refers to
                copy_public(first.root / SAMPLER_ONNX_DATA, version_dir / SAMPLER_ONNX_DATA)
    log(f"  {name}: {config_summary(model_dir / 'config.pbtxt')}")
    return name


def _python_files(art: _Artifact, version_dir: Path) -> None:
    """model.py (the template) + artifact/ (manifest.json and every file it lists, hashes re-checked at load)."""
    copy_public(PYTHON_MODEL_TEMPLATE, version_dir / "model.py")
    target = version_dir / "artifact"
    target.mkdir()
    for name in [MANIFEST, *art.manifest["files"]]:
        copy_public(art.root / name, target / name)


def _check_options(opts: TritonOptions) -> None:
    check_options(opts, TritonExportError)
    unknown = [b for b in (opts.backends or []) if b not in BACKENDS]
    if unknown:
        raise TritonExportError(f"--backend {','.join(unknown)}: expected any of {', '.join(BACKENDS)}")
    if opts.backends is not None and not opts.backends:
        raise TritonExportError("--backend needs at least one of " + ", ".join(BACKENDS))
    twice = repeated(opts.backends or [])
    if twice:
        raise TritonExportError(f"--backend {','.join(opts.backends)}: {', '.join(twice)} given more than once")
    if any(b < 1 for b in opts.preferred_batch):
        raise TritonExportError(f"--preferred-batch sizes must be >= 1, got {opts.preferred_batch}")
    twice = repeated(opts.preferred_batch)
    if twice:
        raise TritonExportError(f"--preferred-batch {','.join(map(str, opts.preferred_batch))}: "
                                f"{', '.join(map(str, twice))} given more than once")
    if opts.name is not None and not NAME.fullmatch(opts.name):
        raise TritonExportError(f"--name {opts.name!r}: a model name here is 1-{NAME_MAX} characters from "
                                f"[A-Za-z0-9_-] starting with a letter or digit (it names folders Triton loads; "
                                f"'.', '..' and hidden names are not models)")


def _check_preferred(opts: TritonOptions, max_batch: int) -> None:
    too_big = [b for b in opts.preferred_batch if b > max_batch]
    if too_big:
        raise TritonExportError(f"--preferred-batch {too_big} exceeds the artifact's max batch {max_batch}")


# ---- CLI ----------------------------------------------------------------------------------------------
def _main(argv=None) -> int:
    parser = cli_parser(
        prog="iia-export-triton",
        description="Write a Triton Inference Server model repository for a compiled artifact: tensorrt_plan "
                    "(when the artifact has a plan), onnxruntime_onnx, and a python-backend model around "
                    "iia.runtime that also accepts per-image seeds. Configs are parsed back with tritonclient's "
                    "ModelConfig and checked against the manifest before the repository is touched.")
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT_DIR",
                        help="artifact directory from iia-compile; more directories add TensorRT plans of the same "
                             "sampler for other GPUs (cc_model_filenames)")
    parser.add_argument("--repo", required=True, help="model repository directory (created if missing)")
    add_options(parser, TritonOptions)
    parser.add_argument("--preferred-batch", dest="preferred_batch", type=int_list, default=[],
                        help="dynamic batching: preferred batch sizes, e.g. 4,8 (default: none)")
    parser.add_argument("--backend", dest="backends", type=str_list, default=None,
                        help=f"comma-separated subset of {','.join(BACKENDS)} (default: tensorrt when the artifact "
                             f"has a plan and --kind is gpu, onnxruntime, python)")
    args = parser.parse_args(argv)
    opts = options_from(TritonOptions, args)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    models = export_repository(args.artifacts, args.repo, opts, log=log)
    for path in models.values():
        written(path)
    print(f"wrote {', '.join(models)} into {args.repo}/")
    print(serve_hint([name.rsplit("_", 1)[1] for name in models], opts.kind, Path(args.repo).resolve()))
    return 0


def serve_hint(backends: list[str], kind: str, repo: Path) -> str:
    """How to serve what was just exported (printed by the CLI): the local CPU server of the nvidia-pytriton wheel
    serves KIND_CPU python models only; everything else needs a Triton build with those backends."""
    if kind == "cpu" and set(backends) == {"python"}:
        return (f"serve here (CPU, 127.0.0.1): python -m iia.evaluation.triton_server {repo}\n"
                f"  (or any tritonserver --model-repository {repo} whose Python has numpy<2, onnxruntime and iia)")
    where = "a GPU host" if kind == "gpu" else "a host"
    needs = [n for b, n in (("tensorrt", "TensorRT"), ("onnxruntime", "ONNX Runtime"), ("python", "Python"))
             if b in backends]
    return (f"serve on {where} with Triton's {', '.join(needs)} backend(s) (NVIDIA's Triton container, README "
            f"\"Serving\"): tritonserver --model-repository {repo}\n"
            f"  (a CPU-only host: export with --kind cpu --backend python and run python -m "
            f"iia.evaluation.triton_server REPO)")


def main(argv=None) -> int:
    return run_cli(_main, argv)


__all__ = ["BACKENDS", "TritonExportError", "TritonOptions", "check_config", "export_repository", "parse_config",
           "python_config", "standard_config"]

if __name__ == "__main__":
    sys.exit(main())
