"""The coefficient artifact: versioned JSON with the fitted coefficients and full provenance."""

from __future__ import annotations

import dataclasses
import math
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from iia.runtime.contract import MAX_COEFFICIENTS_BYTES, ArtifactError, parse_json, read_regular, write_json_atomic
from iia.models.base import Denoiser
from iia.models.device import describe_device

from .fit import CalibrationResult
from .solvers import DEFINITION_VERSION, Program, build_program, get_solver

SCHEMA = "iia.coefficients"
SCHEMA_VERSION = 1


def library_versions() -> dict:
    import numpy
    import torch

    import iia

    versions = {"iia": iia.__version__, "python": platform.python_version(), "torch": torch.__version__,
                "numpy": numpy.__version__}
    for name in ("onnx", "onnxruntime", "polygraphy", "tensorrt"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # not installed: simply not recorded
            pass
    return versions


def model_identity(denoiser: Denoiser) -> dict:
    ident = {k: v for k, v in denoiser.identity.items()
             if k in ("kind", "name", "sha256", "config", "class_name", "path", "time_mapping", "net", "guidance", "vae")}
    ident.update(shape=list(denoiser.shape), label_dim=denoiser.label_dim,
                 sigma_min=denoiser.sigma_min, sigma_max=denoiser.sigma_max)
    return ident


def same_model(a: dict, b: dict) -> bool:
    if a.get("sha256") or b.get("sha256"):
        return a.get("sha256") == b.get("sha256")
    return a.get("name") == b.get("name") and a.get("config") == b.get("config")


def model_difference(recorded: dict, given: dict) -> str:
    """What tells two model identities apart, for a one-line refusal: different names; else the first differing
    configuration fields (same name, other settings: a copied folder with an edited scheduler config); else the
    sha256s (same settings, other weights)."""
    if recorded.get("name") != given.get("name"):
        if not recorded.get("sha256"):
            return f"{recorded.get('name')}, not {given.get('name')}"
        other = f", not {given['sha256']}" if given.get("sha256") else ""  # a bundled model has none
        return f"{recorded.get('name')}, not {given.get('name')} (sha256 {recorded['sha256']}{other})"
    a, b = recorded.get("config") or {}, given.get("config") or {}
    fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if len(fields) > 1:  # "changed" (the loader's notes) follows from the settings: name those
        fields = [k for k in fields if k != "changed"]

    def short(value) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    if fields:
        return f"{given.get('name')} with " + "; ".join(f"{k} {short(a.get(k))}, not {short(b.get(k))}"
                                                        for k in fields[:3])
    return f"{given.get('name')} of sha256 {recorded.get('sha256')}, not {given.get('sha256')} (other weights)"


def to_dict(result: CalibrationResult, denoiser: Denoiser, nfe: int) -> dict:
    program = result.program
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "solver": program.solver,
        "solver_definition": DEFINITION_VERSION,
        "nfe": nfe,
        "r": program.r,
        "sigmas": list(program.sigmas),
        "model": model_identity(denoiser),
        "options": dataclasses.asdict(result.options),
        "steps": [
            {"index": s.index, "sigma_from": s.sigma_from, "sigma_to": s.sigma_to,
             "basis": [label for label, _ in s.basis], "coefficients": list(s.coefficients),
             "base_coefficients": list(b.coefficients), "fitted_coefficients": list(f.coefficients)}
            for s, b, f in zip(program.steps, result.base_program.steps, result.fitted_program.steps)
        ],
        "local_residuals": result.steps,
        "guard": result.guard,
        **({"search": result.search} if result.search else {}),
        # the device of the calibration when not the CPU (coefficients depend on it only by float rounding)
        **({"device": describe_device(denoiser.device)} if denoiser.device.type != "cpu" else {}),
        "seconds": round(result.seconds, 3),
        "versions": library_versions(),
    }


def save(result: CalibrationResult, denoiser: Denoiser, nfe: int, path: str | Path) -> dict:
    data = to_dict(result, denoiser, nfe)
    write_json_atomic(Path(path), data)
    return data


def read(path: str | Path) -> dict:
    """A coefficient file's data (a regular file of at most MAX_COEFFICIENTS_BYTES, schema and version
    checked; the rest is checked by `program_from_dict`). ArtifactError naming the file otherwise."""
    try:
        data = parse_json(read_regular(path, MAX_COEFFICIENTS_BYTES), f"coefficient file {path}")
    except FileNotFoundError:
        raise ArtifactError(f"coefficient file {path} not found") from None
    except ArtifactError as err:
        raise ArtifactError(f"coefficient file {err}" if not str(err).startswith("coefficient") else str(err)) from None
    except OSError as err:
        raise ArtifactError(f"coefficient file {path} is not readable ({err.strerror or err})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ArtifactError(f"{path} is not an iia coefficient file (schema {SCHEMA!r} expected)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {data.get('schema_version')}, this iia reads version {SCHEMA_VERSION}"
        )
    return data


def load_program(path: str | Path, denoiser: Denoiser | None = None, nfe: int | None = None,
                 solver: str | None = None) -> Program:
    """Read a coefficient file and rebuild its Program; validate it against the model, NFE and solver."""
    return program_from_dict(read(path), denoiser, nfe, solver, source=str(path))


def target_mismatch(data: dict, nfe: int | None, solver: str | None) -> tuple[str, object, object] | None:
    """("NFE" or "solver", what the coefficient data holds, what was asked) for the first that differs (None: not
    asked, or not in the data), else None: one check for the file's loader and iia-compile's before the model."""
    for what, key, asked in (("NFE", "nfe", nfe), ("solver", "solver", solver)):
        if asked is not None and key in data and data[key] != asked:
            return what, data[key], asked
    return None


def program_from_dict(data: dict, denoiser: Denoiser | None = None, nfe: int | None = None,
                      solver: str | None = None, source: str = "coefficient data") -> Program:
    """The Program a coefficient file's data describes, checked against this iia's solver definition (version
    and each step's basis labels: a reordered basis must never load with the wrong meaning), its own schedule
    (sigmas finite, decreasing, within the model's range; each step's index and sigmas), the model, NFE and
    solver. ArtifactError naming `source` and the mismatch otherwise (never a KeyError/TypeError)."""
    path = source
    try:
        return _program_from_dict(data, denoiser, nfe, solver, path)
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, ZeroDivisionError) as err:
        what = f"lacks field {err}" if isinstance(err, KeyError) else f"is inconsistent: {err}"
        raise ArtifactError(f"{path} {what}") from None


MAX_COEFFICIENT = 1e8  # far beyond any fitted value (those run to ~1e2 with the ridge); larger means corruption


def _program_from_dict(data, denoiser, nfe, solver, path) -> Program:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    for key, kinds in (("model", dict), ("nfe", int), ("solver", str), ("r", int), ("sigmas", list), ("steps", list)):
        if key not in data:
            raise ArtifactError(f"{path} lacks field '{key}'")
        value = data[key]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ArtifactError(f"{path} is inconsistent: field '{key}' must be {'an int' if kinds is int else 'a ' + kinds.__name__}, "
                                f"got {type(value).__name__}")
    if not 1 <= data["nfe"] <= 10_000 or not 0 <= data["r"] <= 64 or len(data["sigmas"]) > 10_001:
        raise ArtifactError(f"{path} is inconsistent: nfe {data['nfe']}, r {data['r']} or {len(data['sigmas'])} sigmas out of range")
    if denoiser is not None and not same_model(data["model"], model_identity(denoiser)):
        raise ArtifactError(f"{path} was calibrated for model {model_difference(data['model'], model_identity(denoiser))}")
    mismatch = target_mismatch(data, nfe, solver)
    if mismatch:
        what, held, asked = mismatch
        raise ArtifactError(f"{path} holds coefficients for {what} {held}, not {asked}")
    version = data.get("solver_definition")
    if version != DEFINITION_VERSION:
        raise ArtifactError(f"{path} was written under solver definition {version!r}, this iia uses definition "
                            f"{DEFINITION_VERSION}: recalibrate (the basis terms may differ)")
    sigmas = [float(s) for s in data["sigmas"]]
    if len(sigmas) < 2 or not all(math.isfinite(s) and s >= 0 for s in sigmas) or any(
            a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ArtifactError(f"{path}: sigmas must be finite, >= 0 and strictly decreasing, got {data['sigmas']}")
    # a model that rounds its sigmas (iDDPM's table) starts its own Karras base at sigma_max rounded (80.2037)
    top = None if denoiser is None else max(denoiser.sigma_max, float(denoiser.round_sigma(
        torch.tensor(denoiser.sigma_max, dtype=torch.float64))))
    if top is not None and sigmas[0] > top * (1 + 1e-6):
        raise ArtifactError(f"{path}: schedule starts at sigma {sigmas[0]:g}, above the model's sigma_max "
                            f"{top:g}")
    spec = get_solver(data["solver"])
    search = data.get("search")
    chosen = search.get("chosen") if isinstance(search, dict) else None
    if isinstance(chosen, str) and chosen.split("/")[0] != spec.base:  # linear forms share their basis labels
        raise ArtifactError(f"{path}: solver {data['solver']} is not the family of the search's choice {chosen} "
                            f"(edited?)")
    program = build_program(data["solver"], sigmas, data["r"])
    steps = data["steps"]
    if len(steps) != len(program.steps):
        raise ValueError(f"{len(steps)} steps listed, the schedule has {len(program.steps)}")
    for step, entry in zip(program.steps, steps):
        if (entry["index"] != step.index or not math.isclose(entry["sigma_from"], step.sigma_from, rel_tol=1e-9)
                or not math.isclose(entry["sigma_to"], step.sigma_to, rel_tol=1e-9, abs_tol=1e-12)):
            raise ArtifactError(f"{path}: step entry {entry['index']} (sigma {entry['sigma_from']:g} -> "
                                f"{entry['sigma_to']:g}) stands where the schedule has step {step.index} "
                                f"(sigma {step.sigma_from:g} -> {step.sigma_to:g}): steps reordered or edited")
        labels = [label for label, _ in step.basis]
        if list(entry["basis"]) != labels:
            raise ArtifactError(f"{path}: step {step.index} has basis {list(entry['basis'])}, solver "
                                f"{data['solver']} defines {labels} (recalibrate)")
        if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
                   and abs(c) <= MAX_COEFFICIENT for c in entry["coefficients"]):
            raise ArtifactError(f"{path}: step {step.index} has a non-finite, non-numeric or absurd (> "
                                f"{MAX_COEFFICIENT:g}) coefficient: {entry['coefficients']}")
    base_coefficients = program.coefficients()
    program = program.with_coefficients([s["coefficients"] for s in steps])
    if not get_solver(data["solver"]).fitted:  # a base solver's coefficients are its definition, not data
        for step, want in zip(program.steps, base_coefficients):
            if not all(math.isclose(c, w, rel_tol=1e-9, abs_tol=1e-12) for c, w in zip(step.coefficients, want)):
                raise ArtifactError(f"{path}: solver {data['solver']} fits nothing, but step {step.index} holds "
                                    f"coefficients {list(step.coefficients)} instead of its own {want}")
    if program.nfe != data["nfe"]:
        raise ArtifactError(f"{path} is inconsistent: its schedule gives NFE {program.nfe}, file says {data['nfe']}")
    return program
