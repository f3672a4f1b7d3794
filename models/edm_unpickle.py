"""Read official NVlabs EDM and EDM2 network pickles (`.pkl`) without the EDM repositories installed: the
restricted unpickler and the shims it needs (`read_edm_pickle`); `iia.models.edm_pickle` maps the network.

EDM2 snapshots (`edm2-img64-*.pkl`, `edm2-img512-*.pkl`) have the same persistence format; their dict
(a `dnnlib.util.EasyDict`) holds `ema` (`training.networks_edm2.Precond`, float16 weights), `loss_fn`,
`dataset_kwargs` and `encoder`: `StandardRGBEncoder` (pixel models) or `StabilityVAEEncoder` (latent
models: per-channel scale/bias and the NAME of a diffusers VAE whose weights are not in the pickle). The
encoder becomes the denoiser's decode stage (`iia.models.decode`).

EDM snapshots (`network-snapshot-*.pkl`) are plain pickles of a dict
`{'ema': <preconditioned network>, 'loss_fn': ..., 'augment_pipe': ... | None, 'dataset_kwargs': {...}}`.
Every EDM object in them is stored as a call `torch_utils.persistence._reconstruct_persistent_obj(meta)`,
where `meta` carries the *full Python source* of the file that defined the class, the class name and the
object's `__dict__`. Rebuilding such an object means executing that embedded source.

SECURITY NOTE: loading an EDM pickle therefore executes Python code taken from the file. That is
inherent to the format (EDM's own loader does the same); only load pickles you trust, and record the
file's sha256 (it is in `Denoiser.identity`). The restricted unpickler below refuses every global outside
a small allow-list (torch tensor/parameter rebuilding, `torch.nn` classes, `collections.OrderedDict`,
numpy scalars/dtypes, the EDM persistence hook), so arbitrary *pickle* gadgets are refused, but it is not
a sandbox for the embedded source.

While a pickle loads, small shim modules stand in for `torch_utils`, `torch_utils.persistence`,
`torch_utils.misc`, `dnnlib` and `dnnlib.util` in `sys.modules` (under a lock); whatever was there before
(including a real EDM checkout's `torch_utils`) is put back exactly afterwards. The embedded sources are
executed in fresh module objects that are not left in `sys.modules`: the loaded network works, deep-copies
and exports, but cannot be re-pickled as a whole object (save its `state_dict()` instead).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import linecache
import pickle
import stat
import sys
import threading
import types
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from iia.runtime.contract import file_kind

from .base import weights_only_refusal

__all__ = ["EDMPickleError", "EDMShimError", "read_edm_pickle"]

_ZIP_MAGIC = b"PK\x03\x04"


class EDMPickleError(ValueError):
    """The file is not an EDM network pickle iia can load (message says why)."""


class EDMShimError(NotImplementedError):
    """Code from an EDM pickle used a part of EDM's `torch_utils` that iia does not provide."""


# --------------------------------------------------------------------------------------------------
# Shim modules (created once, installed in sys.modules only while a pickle loads)


class EasyDict(dict):
    """dnnlib.EasyDict: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


def _persistent_class(orig_class):
    """Shim for `torch_utils.persistence.persistent_class`: returns the class itself, tagged."""
    if not isinstance(orig_class, type):
        raise TypeError("persistent_class() expects a class")
    orig_class._iia_edm_persistent = True
    return orig_class


def _is_persistent(obj) -> bool:
    cls = obj if isinstance(obj, type) else type(obj)
    return bool(getattr(cls, "_iia_edm_persistent", False))


def _import_hook(hook):
    return hook


def _shim_reconstruct_outside_load(meta):
    raise EDMShimError("torch_utils.persistence shim of iia: objects can only be rebuilt inside load_edm_pickle()")


def _missing_attr_module(name: str, provided: tuple[str, ...]) -> types.ModuleType:
    module = types.ModuleType(name, f"iia shim for EDM's {name}")
    offered = ", ".join(provided) if provided else "nothing"

    def __getattr__(attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        raise EDMShimError(
            f"{name}.{attr} is not available: the network's source uses it, and iia's stand-in for EDM's {name} "
            f"(iia loads EDM pickles without the EDM repository) provides only: {offered}"
        )

    module.__getattr__ = __getattr__
    return module


def _constant(value, shape=None, dtype=None, device=None, memory_format=None) -> torch.Tensor:
    """`torch_utils.misc.constant` (EDM/EDM2): `value` (anything numpy.asarray takes) as a tensor of `dtype`
    (default torch's default dtype) on `device` (default CPU), broadcast to `shape` if given. EDM caches these
    tensors to avoid host-to-device copies; this stand-in builds a fresh one each call (same values)."""
    import numpy

    tensor = torch.as_tensor(numpy.array(value), dtype=dtype or torch.get_default_dtype(),
                             device=device or torch.device("cpu"))
    if shape is not None:
        tensor = tensor.expand(tuple(shape))
    return tensor.contiguous(memory_format=memory_format or torch.contiguous_format)


def _const_like(ref: torch.Tensor, value, shape=None, dtype=None, device=None, memory_format=None) -> torch.Tensor:
    """`torch_utils.misc.const_like`: `constant(value)` with `ref`'s dtype and device unless given."""
    return _constant(value, shape=shape, dtype=dtype or ref.dtype, device=device or ref.device,
                     memory_format=memory_format)


def _build_shims() -> dict[str, types.ModuleType]:
    persistence = types.ModuleType("torch_utils.persistence", "iia shim for EDM's torch_utils.persistence")
    persistence.persistent_class = _persistent_class
    persistence.is_persistent = _is_persistent
    persistence.import_hook = _import_hook
    persistence._reconstruct_persistent_obj = _shim_reconstruct_outside_load
    persistence._version = 6

    misc = _missing_attr_module("torch_utils.misc", ("constant", "const_like"))
    misc.constant = _constant
    misc.const_like = _const_like

    torch_utils = types.ModuleType("torch_utils", "iia shim for EDM's torch_utils package")
    torch_utils.persistence = persistence
    torch_utils.misc = misc

    util = types.ModuleType("dnnlib.util", "iia shim for EDM's dnnlib.util")
    util.EasyDict = EasyDict
    dnnlib = types.ModuleType("dnnlib", "iia shim for EDM's dnnlib")
    dnnlib.EasyDict = EasyDict
    dnnlib.util = util
    return {
        "torch_utils": torch_utils,
        "torch_utils.persistence": persistence,
        "torch_utils.misc": misc,
        "dnnlib": dnnlib,
        "dnnlib.util": util,
    }


_SHIMS = _build_shims()
_LOAD_LOCK = threading.RLock()
_MISSING = object()
_module_counter = 0


# --------------------------------------------------------------------------------------------------
# Restricted unpickler


def _load_storage_from_bytes(data: bytes):
    """Replacement for `torch.storage._load_from_bytes`: the legacy torch.save bytes of one storage,
    read with torch's own weights-only unpickler (storages and nothing else)."""
    if not isinstance(data, (bytes, bytearray)):
        raise EDMPickleError("malformed tensor storage in pickle (expected bytes)")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _numpy_attr(submodule: str, name: str):
    """numpy.core.X / numpy._core.X, whichever the installed numpy has (numpy 1 vs 2 pickles)."""
    for prefix in ("numpy._core.", "numpy.core."):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = importlib.import_module(prefix + submodule)
            return getattr(module, name)
        except (ImportError, AttributeError):
            continue
    raise EDMPickleError(f"the installed numpy has no {submodule}.{name}")


_NUMPY_CORE_FUNCS = {
    ("multiarray", "scalar"),
    ("multiarray", "_reconstruct"),
    ("numeric", "_frombuffer"),
}

_TORCH_FUNCS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch", "device"),
}

_SAFE_BUILTINS = {"object", "set", "frozenset", "slice", "range", "complex", "bytearray", "tuple", "list", "dict"}


class _EDMUnpickler(pickle.Unpickler):
    """Unpickler with an allow-list `find_class`; rebuilds EDM persistent objects itself."""

    def __init__(self, file, loader: "_Loader"):
        super().__init__(file)
        self._loader = loader

    def find_class(self, module: str, name: str):  # noqa: C901 - one flat allow-list
        full = f"{module}.{name}"
        if module == "torch_utils.persistence" and name == "_reconstruct_persistent_obj":
            return self._loader.reconstruct
        if module in ("dnnlib", "dnnlib.util") and name == "EasyDict":
            return EasyDict
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if (module, name) in (("_codecs", "encode"), ("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor")):
            return getattr(importlib.import_module(module.replace("copy_reg", "copyreg")), name)  # protocols 0-2
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(__import__("builtins"), name)
        if module == "torch.storage" and name == "_load_from_bytes":
            return _load_storage_from_bytes
        if (module, name) in _TORCH_FUNCS:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
            obj = getattr(torch, name, None)
            if obj is not None:
                return obj
        if module == "torch.nn" or module.startswith("torch.nn."):
            try:
                obj = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                obj = None
            if isinstance(obj, type):
                return obj
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric"):
            sub = module.rsplit(".", 1)[1]
            if (sub, name) in _NUMPY_CORE_FUNCS:
                return _numpy_attr(sub, name)
        if module == "numpy" and name in ("dtype", "ndarray"):
            import numpy

            return getattr(numpy, name)
        if module == "numpy.dtypes":
            import numpy

            obj = getattr(importlib.import_module("numpy.dtypes"), name, None)
            if isinstance(obj, type) and issubclass(obj, numpy.dtype):
                return obj
        raise EDMPickleError(
            f"refusing to unpickle global '{full}': it is not on the allow-list for EDM network pickles "
            "(torch tensors/nn classes, OrderedDict, numpy scalars, EDM persistent objects)"
        )


class _Loader:
    """State of one load: compiled embedded sources (by hash) and rebuilt class names."""

    def __init__(self, file_label: str):
        self.file_label = file_label
        self.modules: dict[str, types.ModuleType] = {}
        self.temp_module_names: list[str] = []
        self.class_names: list[str] = []

    def module_for(self, src: str, class_name: str) -> types.ModuleType:
        global _module_counter
        digest = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest()
        module = self.modules.get(digest)
        if module is not None:
            return module
        _module_counter += 1
        name = f"_iia_edm_pickle_{digest[:12]}_{_module_counter}"
        module = types.ModuleType(name, f"embedded source from EDM pickle {self.file_label}")
        filename = f"<edm-pickle {self.file_label} src:{digest[:12]}>"
        module.__file__ = filename
        # Tracebacks and torch.export diagnostics can show the embedded source lines.
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
        # Registered only during the load (some class machinery looks modules up by name).
        sys.modules[name] = module
        self.temp_module_names.append(name)
        try:
            code = compile(src, filename, "exec")
            exec(code, module.__dict__)
        except EDMPickleError:
            raise
        except SystemExit as exc:  # foreign code must not end the process silently
            raise EDMPickleError(f"the embedded source of EDM class '{class_name}' called sys.exit({exc.code!r}) "
                                 f"while loading") from None
        except BaseException as exc:  # noqa: BLE001 - report any failure of foreign code clearly
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise EDMPickleError(
                f"executing the embedded source of EDM class '{class_name}' failed: {type(exc).__name__}: {exc}"
            ) from exc
        self.modules[digest] = module
        return module

    def reconstruct(self, meta):
        if not isinstance(meta, dict):
            raise EDMPickleError(f"malformed EDM persistent object: meta is {type(meta).__name__}, not a dict")
        if meta.get("type") != "class":
            raise EDMPickleError(f"unsupported EDM persistent object type {meta.get('type')!r} (expected 'class')")
        src, class_name = meta.get("module_src"), meta.get("class_name")
        if not isinstance(src, str) or not isinstance(class_name, str):
            raise EDMPickleError("malformed EDM persistent object: module_src/class_name missing")
        module = self.module_for(src, class_name)
        cls = module.__dict__.get(class_name)
        if not isinstance(cls, type):
            raise EDMPickleError(f"the embedded source does not define class '{class_name}'")
        state = meta.get("state")
        try:
            obj = cls.__new__(cls)
            if state is not None:
                setstate = getattr(obj, "__setstate__", None)
                if callable(setstate):
                    setstate(state)
                else:
                    obj.__dict__.update(state)
        except EDMPickleError:
            raise
        except SystemExit as exc:
            raise EDMPickleError(f"rebuilding EDM object '{class_name}' called sys.exit({exc.code!r})") from None
        except Exception as exc:
            raise EDMPickleError(f"rebuilding EDM object '{class_name}' failed: {type(exc).__name__}: {exc}") from exc
        self.class_names.append(class_name)
        return obj

    def cleanup(self) -> None:
        for name in self.temp_module_names:
            sys.modules.pop(name, None)
        self.temp_module_names.clear()


def _unpickle(data: bytes, file_label: str):
    """Unpickle `data` with the shims installed; sys.modules is restored exactly afterwards."""
    loader = _Loader(file_label)
    with _LOAD_LOCK:
        saved = {name: sys.modules.get(name, _MISSING) for name in _SHIMS}
        try:
            sys.modules.update(_SHIMS)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
                warnings.filterwarnings("ignore", category=DeprecationWarning, module="numpy.*")
                return _EDMUnpickler(io.BytesIO(data), loader).load(), loader
        except EDMPickleError as err:  # the allow-list's or a rebuilt class's refusal: name the file
            err.args = (f"{file_label}: {err}",)
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, ImportError, RuntimeError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
            raise EDMPickleError(f"{file_label}: not a readable EDM network pickle ({type(exc).__name__}: "
                                 f"{weights_only_refusal(exc)})") from exc
        finally:
            for name, previous in saved.items():
                if previous is _MISSING:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = previous
            loader.cleanup()


def _looks_like_state_dict(obj: dict) -> bool:
    if not obj:
        return False
    tensors = 0
    for value in obj.values():
        if isinstance(value, torch.Tensor):
            tensors += 1
        elif not (isinstance(value, (int, float)) or value is None):
            return False
    return tensors > 0


def read_edm_pickle(path: str | Path) -> tuple[dict, dict]:
    """Unpickle an EDM snapshot into its top-level dict. Returns `(data, info)` with
    `info = {"sha256", "size", "class_names"}`. Raises EDMPickleError for anything else."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):  # a FIFO would block forever, /dev/zero would fill memory
            raise EDMPickleError(f"{path} is {file_kind(mode)}, not an EDM network pickle (a regular file)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise EDMPickleError(f"EDM pickle not found: {path}") from None
    except OSError as exc:
        raise EDMPickleError(f"cannot read EDM pickle {path}: {exc.strerror or exc}") from None
    label = str(path)  # the path as given: a name alone hides which file (/dev/null -> "null")
    if data.startswith(_ZIP_MAGIC):
        raise EDMPickleError(
            f"{label}: this is a torch.save/zip checkpoint, not an EDM network pickle "
            "(EDM snapshots are plain pickles, e.g. network-snapshot-*.pkl)"
        )
    if not data:
        raise EDMPickleError(f"{label}: empty file, not an EDM network pickle")
    obj, loader = _unpickle(data, label)
    legacy_magic = getattr(torch.serialization, "MAGIC_NUMBER", None)
    if isinstance(obj, int) and legacy_magic is not None and obj == legacy_magic:
        raise EDMPickleError(f"{label}: this is a legacy (non-zip) torch.save checkpoint, not an EDM network pickle")
    if not isinstance(obj, dict):
        raise EDMPickleError(
            f"{label}: top level of the pickle is a {type(obj).__name__}, expected a dict with key 'ema' "
            "(an EDM network pickle)"
        )
    if "ema" not in obj:
        if _looks_like_state_dict(obj):
            raise EDMPickleError(
                f"{label}: this is a plain state dict ({len(obj)} entries of tensors), not an EDM network pickle: "
                "it holds weights only, not the network with its source"
            )
        keys = sorted(str(k) for k in obj)
        shown = ", ".join(repr(k) for k in keys[:20]) + (", ..." if len(keys) > 20 else "")
        raise EDMPickleError(f"{label}: no 'ema' network in the pickle; keys found: [{shown}]")
    info = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "class_names": list(loader.class_names)}
    return obj, info
