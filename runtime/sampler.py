"""`Sampler`: the backend-independent front of a compiled sampler. All input validation lives here, once.

Contract of `sampler(noise=None, *, seed=None, batch_size=None, class_labels=None, guidance=None)`:

* noise: [B, *sample_shape] standard normal. float32 is used as is; other float dtypes (float64, float16)
  are converted to float32 explicitly (the graph computes in float32). Integer, bool or complex noise, a
  missing batch axis, a wrong sample shape, NaN/Inf, B < 1 or B > the built `max_batch` raise ValueError.
  With noise None, it is drawn by the contract's `draw_noise(seed, batch_size, shape)`: image k from
  `numpy.random.default_rng(seed + k)` (EDM's per-image seeds), standard normal in float32. `batch_size` defaults to the number of labels given, else 1; seed None draws
  fresh entropy. Passing `seed` together with `noise` is refused (it would be silently ignored).
* class_labels: required for a conditional model (no silent default: a service must choose its classes),
  refused for an unconditional one. Either ids (ints: list, int array [B], or one int for the whole batch)
  or one-hot [B, label_dim] (exactly one 1 per row). Ids outside [0, label_dim - 1] raise ValueError.
* guidance: artifacts compiled for a guidance range (`iia-compile --guidance LO:HI`, manifest input `guidance`)
  only: one scale per image ([B] real numbers) or one for all (a scalar), converted to float32 and then checked:
  finite and inside the manifest's range [lo, hi] (inclusive). None gives every image the manifest's default.
  An artifact compiled for one scale refuses any guidance. Every refusal is a ValueError naming `guidance`.
* returns float32 [B, *sample_shape] (`images()`: uint8 [B, H, W, C], EDM's clip(x * 127.5 + 128)).

Same noise, labels and guidance give the same output. Backends implement only `_run`; they are safe to call from
several threads at once (see each backend for how).
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import numpy as np

from .contract import GUIDANCE, IMAGES, IMAGES_U8, LABELS, LATENTS, NOISE
from .noise import draw_noise


class BackendUnavailable(RuntimeError):
    """A backend that cannot run here (not installed, no GPU, plan built elsewhere); the message says why."""


class Samples(NamedTuple):
    images: np.ndarray  # float32 [B, *sample_shape]
    images_uint8: np.ndarray | None  # uint8 [B, H, W, C] for image models, else None
    noise: np.ndarray  # float32, the noise actually used
    class_labels: np.ndarray | None  # int64 ids actually used (None for unconditional models)
    guidance: np.ndarray | None = None  # float32 [B] scales actually used (None: compiled for one scale)


def _as_int(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


class Sampler:
    """Base class: the manifest's interface plus validation. Subclasses implement `_run(feeds, outputs)`."""

    backend = "base"

    def __init__(self, manifest: dict, root=None):
        self.manifest = manifest
        self.root = root
        self.sample_shape = tuple(int(s) for s in manifest["sample_shape"])
        self.label_dim = int(manifest["label_dim"])
        self.max_batch = int(manifest["max_batch"])
        self.nfe = int(manifest["nfe"])
        self.solver = manifest.get("solver")
        self.output_names = [o["name"] for o in manifest["outputs"]]
        self.input_names = [i["name"] for i in manifest["inputs"]]
        # pixel models output `images`; latent models `latents` (the graph decodes them into images_uint8)
        self.samples_name = LATENTS if LATENTS in self.output_names else IMAGES
        # (lo, hi, default) of the manifest's guidance input (an artifact compiled for a guidance range), else None
        entry = next((t for t in manifest["inputs"] if t["name"] == GUIDANCE), None)
        self.guidance_range = None if entry is None else (*map(float, entry["range"]), float(entry["default"]))
        want = [NOISE, LABELS] if self.conditional else [NOISE]
        if self.input_names != want + ([GUIDANCE] if self.guided else []) or \
                self.samples_name not in self.output_names:
            raise ValueError(f"manifest inputs {self.input_names} / outputs {self.output_names} do not match "
                             f"this runtime's interface (noise[, class_labels][, guidance] -> images|latents"
                             f"[, images_uint8])")
        self.fallbacks: list[tuple[str, str]] = []  # backends `load(backend="auto")` skipped, with why

    # ---- properties -------------------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        return self.label_dim > 0

    @property
    def guided(self) -> bool:
        """Compiled for a guidance range: the graph takes one guidance scale per image."""
        return self.guidance_range is not None

    @property
    def is_image(self) -> bool:
        return IMAGES_U8 in self.output_names

    @property
    def model_name(self) -> str:
        return str(self.manifest.get("model", {}).get("name", "?"))

    def __repr__(self) -> str:
        labels = f"label_dim={self.label_dim}" if self.conditional else "unconditional"
        return (f"{type(self).__name__}(backend={self.backend!r}, model={self.model_name!r}, solver={self.solver!r}, "
                f"nfe={self.nfe}, sample_shape={self.sample_shape}, {labels}, max_batch={self.max_batch})")

    # ---- validation -------------------------------------------------------------------------------
    def _check_batch(self, batch: int, what: str) -> int:
        batch = _as_int(batch, what)
        if batch < 1:
            raise ValueError(f"{what} must be >= 1, got {batch}")
        if batch > self.max_batch:
            raise ValueError(f"{what} {batch} exceeds the artifact's maximum batch {self.max_batch} "
                             f"(split the request, or recompile with --max-batch)")
        return batch

    def check_noise(self, noise) -> np.ndarray:
        """float32 C-contiguous [B, *sample_shape] noise, or ValueError saying what was expected."""
        arr = np.asarray(noise)
        expected = f"[B, {', '.join(map(str, self.sample_shape))}]"
        if arr.dtype.kind != "f":
            raise ValueError(f"noise must be a float array (float32 expected), got dtype {arr.dtype}")
        if arr.ndim != len(self.sample_shape) + 1 or tuple(arr.shape[1:]) != self.sample_shape:
            hint = " (add a batch axis: noise[None])" if tuple(arr.shape) == self.sample_shape else ""
            raise ValueError(f"noise must have shape {expected}, got {list(arr.shape)}{hint}")
        self._check_batch(arr.shape[0], "noise batch")
        arr = np.ascontiguousarray(arr, dtype=np.float32)  # float64/float16 -> float32, explicitly
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(f"noise contains {bad} NaN/Inf value(s) (after conversion to float32); expected "
                             f"finite standard-normal values")
        return arr

    def _label_out_of_range(self, label) -> ValueError:
        """The one message for a class label id outside [0, label_dim - 1] (the C++ runtime gives the same)."""
        return ValueError(f"class label {int(label)} out of range: this model has label_dim {self.label_dim}, "
                          f"expected ids in [0, {self.label_dim - 1}]")

    def check_labels(self, class_labels, batch: int) -> np.ndarray | None:
        """int64 ids [batch] (None for an unconditional model), or ValueError saying what was expected."""
        if not self.conditional:
            if class_labels is not None:
                raise ValueError("this model is unconditional (label_dim 0): class_labels must be None")
            return None
        hi = self.label_dim - 1
        if class_labels is None:
            raise ValueError(f"this model is class-conditional (label_dim {self.label_dim}): pass class_labels, "
                             f"ids in [0, {hi}] or one-hot [B, {self.label_dim}]")
        arr = np.asarray(class_labels)
        if arr.ndim == 0:  # one id for the whole batch
            if arr.dtype.kind not in "iu":
                raise ValueError(f"class label ids must be integers, got {class_labels!r}")
            if not 0 <= int(arr) <= hi:  # before the int64 cast: a uint64 id past 2**63 would overflow there
                raise self._label_out_of_range(arr)
            arr = np.full(batch, int(arr), dtype=np.int64)
        if arr.ndim == 2:  # one-hot
            if arr.shape != (batch, self.label_dim):
                raise ValueError(f"one-hot class_labels must have shape [{batch}, {self.label_dim}], got {list(arr.shape)}")
            if arr.dtype.kind not in "biuf" or not (((arr == 0) | (arr == 1)).all() and (arr.sum(1) == 1).all()):
                raise ValueError("one-hot class_labels must hold exactly one 1 (and zeros elsewhere) per row")
            return np.ascontiguousarray(arr.argmax(1), dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"class_labels must be ids [B] or one-hot [B, {self.label_dim}], got shape {list(arr.shape)}")
        if arr.shape[0] != batch and (arr.size == 0 or arr.dtype.kind in "iu"):  # [] is float64 to numpy
            raise ValueError(f"expected {batch} class labels (one per sample), got {arr.shape[0]}")
        if arr.dtype == object and all(isinstance(v, (int, np.integer)) for v in arr):  # ints past 64 bits
            bad = next((v for v in arr if not 0 <= v <= hi), None)
            if bad is not None:  # else refused just below: ids come as an integer array, not Python objects
                raise self._label_out_of_range(bad)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"class label ids must be integers, got dtype {arr.dtype}")
        if arr.shape[0] != batch:
            raise ValueError(f"expected {batch} class labels (one per sample), got {arr.shape[0]}")
        if arr.size and (arr.min() < 0 or arr.max() > hi):
            bad = arr[(arr < 0) | (arr > hi)][0]
            raise self._label_out_of_range(bad)
        return np.ascontiguousarray(arr, dtype=np.int64)

    def check_guidance(self, guidance, batch: int) -> np.ndarray | None:
        """float32 scales [batch] (the manifest's default for None; None for an artifact compiled for one scale), or
        ValueError naming guidance. Values are converted to float32 first, then checked against the range's float32
        bounds (runtime/native/src/validate.cpp applies the same rule, with the same messages)."""
        if not self.guided:
            if guidance is not None:
                raise ValueError("this artifact was compiled for one guidance scale: guidance must be None (recompile "
                                 "with iia-compile --guidance LO:HI or --cfg LO:HI for a scale per request)")
            return None
        lo, hi, default = self.guidance_range
        if guidance is None:
            return np.full(batch, default, dtype=np.float32)
        arr = np.asarray(guidance)
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"guidance must be real numbers (float32 expected), got dtype {arr.dtype}")
        if arr.ndim == 0:  # one scale for the whole batch
            arr = np.full(batch, arr, dtype=arr.dtype)
        if arr.ndim != 1 or arr.shape[0] != batch:
            raise ValueError(f"guidance must be one scale per image (shape [{batch}]) or one for all (a scalar), "
                             f"got shape {list(arr.shape)}")
        with np.errstate(over="ignore"):  # a float64 past float32's range becomes inf, refused just below
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        bad = ~np.isfinite(arr)
        if bad.any():
            raise ValueError(f"guidance must be finite, got {float(arr[bad][0])!r}")
        outside = (arr < np.float32(lo)) | (arr > np.float32(hi))
        if outside.any():
            raise ValueError(f"guidance {float(arr[outside][0])!r} out of range: this artifact was compiled for "
                             f"guidance in [{lo!r}, {hi!r}]")
        return arr

    def prepare(self, noise=None, *, seed=None, batch_size=None, class_labels=None, guidance=None):
        """Validated (noise float32, labels int64 | None, guidance float32 [B] | None): the feeds every backend gets."""
        if noise is None:
            if batch_size is None:
                labels = None if class_labels is None else np.asarray(class_labels)
                batch_size = labels.shape[0] if labels is not None and labels.ndim >= 1 else 1
            batch_size = self._check_batch(batch_size, "batch_size")
            if seed is not None:
                seed = _as_int(seed, "seed")
            arr = draw_noise(seed, batch_size, self.sample_shape)
        else:
            if seed is not None:
                raise ValueError("seed applies only when noise is None: pass either noise or seed")
            arr = self.check_noise(noise)
            if batch_size is not None and _as_int(batch_size, "batch_size") != arr.shape[0]:
                raise ValueError(f"batch_size {batch_size} does not match the noise batch {arr.shape[0]}")
        return arr, self.check_labels(class_labels, arr.shape[0]), self.check_guidance(guidance, arr.shape[0])

    def _feeds(self, noise: np.ndarray, labels: np.ndarray | None, guidance: np.ndarray | None = None
               ) -> dict[str, np.ndarray]:
        feeds = {NOISE: noise}
        if labels is not None:
            feeds[LABELS] = labels
        if guidance is not None:
            feeds[GUIDANCE] = guidance
        return feeds

    # ---- calls -----------------------------------------------------------------------------------
    def __call__(self, noise=None, *, seed=None, batch_size=None, class_labels=None, guidance=None) -> np.ndarray:
        """float32 samples [B, *sample_shape] (latents, for a latent model)."""
        feeds = self.prepare(noise, seed=seed, batch_size=batch_size, class_labels=class_labels, guidance=guidance)
        return self._run(self._feeds(*feeds), [self.samples_name])[0]

    def images(self, noise=None, *, seed=None, batch_size=None, class_labels=None, guidance=None) -> np.ndarray:
        """uint8 images [B, H, W, C] (image models only)."""
        if not self.is_image:
            raise ValueError(f"images() needs an image model ([C, H, W] samples); this one has sample shape "
                             f"{list(self.sample_shape)}: call the sampler for float32 outputs")
        feeds = self.prepare(noise, seed=seed, batch_size=batch_size, class_labels=class_labels, guidance=guidance)
        return self._run(self._feeds(*feeds), [IMAGES_U8])[0]

    def sample(self, noise=None, *, seed=None, batch_size=None, class_labels=None, guidance=None) -> Samples:
        """Both outputs from one run, plus the noise, labels and guidance used (what `iia-sample` saves)."""
        x, labels, scales = self.prepare(noise, seed=seed, batch_size=batch_size, class_labels=class_labels,
                                         guidance=guidance)
        names = [self.samples_name, IMAGES_U8] if self.is_image else [self.samples_name]
        out = self._run(self._feeds(x, labels, scales), names)
        return Samples(out[0], out[1] if self.is_image else None, x, labels, scales)

    # ---- backend hooks ---------------------------------------------------------------------------
    def _run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release backend resources (GPU memory); the sampler is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
