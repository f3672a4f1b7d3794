"""The PyTorch eager baseline `iia-bench` times beside a compiled sampler: `iia.calibration.sampling.sample`
with the artifact's solver and coefficients (float32 states by default, as a service would run), the denoiser
rebuilt from the manifest's model identity (or --model), on the sampler's device with `threads` torch threads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iia.runtime.contract import COEFFICIENTS, DECODER_ONNX

from .runners import Unavailable


class EagerUnavailable(Unavailable):
    """The eager reference cannot run (model not rebuildable, torch without CUDA...); the message says why."""


def rebuild_denoiser(manifest: dict, spec: str | None):
    """The model behind the artifact (EagerUnavailable if it cannot be had safely).

    Security: an artifact is data and must never make this process load code. A model FILE (an EDM .pkl
    runs code when unpickled) is loaded only when the user names it (`spec`, from --model), and only after
    its sha256 matches the manifest's model.sha256 (computed without loading it). The manifest's own
    model.path is never opened. Without `spec`, only models that hold no code are rebuilt: the analytic
    Gaussian mixture from its (bounds-checked) config, and the bundled digits model (a weights-only file
    inside the installed package).
    """
    from iia.models import load as load_model
    from iia.models.registry import gmm_from_options, source_sha256

    ident = manifest.get("model") or {}
    kind, name = ident.get("kind"), ident.get("name")
    if kind == "guided":  # two networks (and their paths) the artifact must not make this process load
        raise EagerUnavailable(f"the eager reference does not rebuild guided models ('{name}'): the sampler, "
                               f"denoiser and decoder timings (overhead ratio) are still measured")
    if spec is not None:
        want = ident.get("sha256")
        found = source_sha256(spec)  # hashes the file(s); unpickles nothing
        if found is not None and found != want:
            raise ValueError(f"--model {spec}: sha256 {found[:16]}... does not match the artifact's model "
                             f"({str(want)[:16] + '...' if want else 'no sha256 recorded'}); not loading it")
        return load_model(spec)
    if kind == "gmm" and isinstance(ident.get("config"), dict):
        return gmm_from_options(ident["config"], "the manifest's gmm config")
    if kind == "bundled":
        return load_model("digits")
    raise EagerUnavailable(f"the eager reference needs model {kind} '{name}': pass --model PATH (iia-bench never "
                           f"loads a model file named by the artifact; --model is loaded only if its sha256 matches "
                           f"the manifest's)")


class EagerReference:
    """`iia.calibration.sampling.sample` with the artifact's program, on `device` with `threads` threads."""

    def __init__(self, root: Path, manifest: dict, spec: str | None, dtype: str, threads: int, device: str):
        try:
            import torch
        except ImportError as err:
            raise EagerUnavailable(f"torch is not installed ({err}): the PyTorch eager reference is skipped") from None

        from iia.calibration.artifact import ArtifactError, load_program
        from iia.calibration.sampling import sample

        try:
            denoiser = rebuild_denoiser(manifest, spec)
            program = load_program(root / COEFFICIENTS, denoiser, manifest["nfe"], manifest.get("solver"))
        except ArtifactError as err:
            if spec is not None:
                raise ValueError(f"--model {spec} does not fit this artifact: {err}") from None
            raise EagerUnavailable(f"the rebuilt model does not match the artifact ({err})") from None
        except (ValueError, OSError, ImportError) as err:
            if spec is not None:
                raise
            raise EagerUnavailable(f"could not rebuild the model ({type(err).__name__}: {err})") from None
        if device == "cuda":
            if not torch.cuda.is_available():
                raise EagerUnavailable("this torch build has no CUDA, so eager cannot run on the sampler's device")
            denoiser.net.to("cuda")
        self.torch, self.sample, self.program, self.denoiser = torch, sample, program, denoiser
        # the graph decodes: so does the timed eager loop (the model's decode stage on the float32 samples)
        self.decode = denoiser.decode_stage() if DECODER_ONNX in manifest["files"] else None
        if self.decode is not None and denoiser.is_latent and not self.decode.has_vae:
            raise EagerUnavailable("the eager reference of a latent model decodes with its VAE, and iia-bench loads "
                                   "no VAE: the eager columns are skipped")
        if self.decode is not None and device == "cuda":
            self.decode.to("cuda")
        self.dtype = getattr(torch, dtype)
        self.dtype_name, self.device, self.threads = dtype, device, threads
        self.saved_threads = torch.get_num_threads()
        torch.set_num_threads(threads)  # process-wide: given back by close()

    def __call__(self, noise: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(noise).to(self.device)
            y = None if labels is None else torch.from_numpy(labels).to(self.device)
            out = self.sample(self.program, self.denoiser, x, y, dtype=self.dtype)
            return out.cpu().numpy()  # a host array, as the runtime's backends return

    def decoded(self, noise: np.ndarray, labels: np.ndarray | None):
        """The samples, then the decode stage when the artifact decodes (what the compiled graph computes)."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(noise).to(self.device)
            y = None if labels is None else torch.from_numpy(labels).to(self.device)
            out = self.sample(self.program, self.denoiser, x, y, dtype=self.dtype)
            if self.decode is not None:
                out = self.decode(out.to(torch.float32))
            return out.cpu().numpy()

    def check(self, noise, labels) -> None:
        """Run once; a failure (e.g. a model that cannot run on CUDA) becomes EagerUnavailable."""
        try:
            self.decoded(noise, labels)
        except Exception as err:
            raise EagerUnavailable(f"eager run failed on {self.device} ({type(err).__name__}: {err})") from None

    def close(self) -> None:
        self.torch.set_num_threads(self.saved_threads)

