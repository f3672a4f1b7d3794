"""The compiler's cache keys: calibrated coefficients and exported graphs, kept through the one cache
(`iia.calibration.cache`: its mechanism, re-exported here for the compiler's stages).

A key is the entry's file name: a hash of everything the entry was made from.
"""

from __future__ import annotations

import hashlib
import json

from iia.calibration import artifact
from iia.calibration.cache import (SIDECAR, cache_dir, default_cache_dir, get_or_make, lookup, seal,  # noqa: F401
                                   store)
from iia.calibration.fit import GUARD_VERSION, CalibrationOptions
from iia.calibration.solvers import DEFINITION_VERSION
from iia.models.base import Denoiser

# The export code's version in every export cache key: bump it whenever export.py (or the weight
# preprocessing it applies) would write a different graph for the same model, max_batch and libraries.
EXPORT_VERSION = 1


# ---- keys ----------------------------------------------------------------------------------------------
def coefficients_key(denoiser: Denoiser, solver: str, nfe: int, options: CalibrationOptions,
                     extra: dict | None = None) -> str:
    """Cache file name of a calibration: model identity, solver and its definition version, NFE, the resolved
    calibration options, the guard's version (+ `extra`: the auto search's settings)."""
    ident = artifact.model_identity(denoiser)
    payload = {"model": ident, "solver": solver, "solver_definition": DEFINITION_VERSION, "nfe": nfe,
               "options": vars(options), "guard": GUARD_VERSION}
    if extra:
        payload["extra"] = extra
    text = json.dumps(payload, sort_keys=True)
    return f"{solver}-nfe{nfe}-{hashlib.sha256(text.encode()).hexdigest()[:20]}.json"


def export_cache_key(denoiser: Denoiser, what: str, max_batch: int) -> str | None:
    """Cache file name of an exported graph ("denoiser" or "decoder"), or None when the model has no content
    hash to key on. The key covers the model identity (weights' sha256, guidance, options), the decode stage
    (its VAE folder's sha256), max_batch, EXPORT_VERSION and the library versions."""
    ident = artifact.model_identity(denoiser)
    if not ident.get("sha256"):
        return None
    stage_module = denoiser.decode_stage() if what == "decoder" else None
    payload = {"what": what, "model": ident, "max_batch": max_batch,
               "decode": None if stage_module is None else stage_module.describe(),
               "export_version": EXPORT_VERSION,
               "versions": {k: v for k, v in artifact.library_versions().items() if k != "tensorrt"}}
    if getattr(stage_module, "kind", None) == "latent" and not payload["decode"].get("vae_sha256"):
        return None
    return f"{what}-{hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]}.onnx"
