"""Write EDM-format network pickles from iia's own tiny networks (tests/fixtures/edm_like/).

The pickles have exactly the structure of NVlabs EDM snapshots: a plain dict
`{'ema': net, 'loss_fn': obj, 'augment_pipe': None, 'dataset_kwargs': {...}}` in which every network/loss
object is stored as `torch_utils.persistence._reconstruct_persistent_obj(meta)` with
`meta = {type: 'class', version: 6, module_src, class_name, state}`. To write them, fake `torch_utils`
modules are put in `sys.modules` only for the duration of the build + dump, then removed again.

    from edm_fixtures import make_edm_pickle
    original = make_edm_pickle(tmp_path / "net.pkl", kind="edm-cond")
"""

from __future__ import annotations

import copy
import pickle
import pickletools
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "edm_like"
KINDS = ("edm-cond", "vp-uncond", "vp-cond")
EDM2_FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "edm2_like"
_NAMES = ("torch_utils", "torch_utils.persistence", "torch_utils.misc", "dnnlib", "dnnlib.util")
_MISSING = object()


def _reconstruct_persistent_obj(meta):  # pickled by reference as torch_utils.persistence._reconstruct_persistent_obj
    raise RuntimeError("edm_fixtures: this fake is only for writing pickles; load them with iia")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
_reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"


def _persistent_class(cls):
    """Fake EDM decorator: remembers the defining source; objects pickle as the EDM persistence call."""
    src = _FAKE_PERSISTENCE.current_src
    class_name = cls.__name__
    orig_init = cls.__init__

    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        if type(self) is cls:  # EDM records the constructor arguments too
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=src, class_name=class_name, state=dict(self.__dict__))
        return (_reconstruct_persistent_obj, (meta,))

    cls.__init__ = __init__
    cls.__reduce__ = __reduce__
    return cls


_FAKE_PERSISTENCE = types.ModuleType("torch_utils.persistence")
_FAKE_PERSISTENCE.persistent_class = _persistent_class
_FAKE_PERSISTENCE._reconstruct_persistent_obj = _reconstruct_persistent_obj
_FAKE_PERSISTENCE.current_src = None
_FAKE_MISC = types.ModuleType("torch_utils.misc")


def _fake_const_like(ref, value, shape=None, dtype=None, device=None, memory_format=None):
    """The fixtures' own stand-in for EDM2's misc.const_like (value as a tensor with ref's dtype/device)."""
    tensor = torch.as_tensor(np.array(value), dtype=dtype or ref.dtype, device=device or ref.device)
    return tensor if shape is None else tensor.expand(shape).contiguous()


_FAKE_MISC.const_like = _fake_const_like


class FakeEasyDict(dict):
    """Pickles as `dnnlib.util.EasyDict`, the top-level type of EDM2 snapshots."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


FakeEasyDict.__module__ = "dnnlib.util"
FakeEasyDict.__qualname__ = FakeEasyDict.__name__ = "EasyDict"
_FAKE_UTIL = types.ModuleType("dnnlib.util")
_FAKE_UTIL.EasyDict = FakeEasyDict
_FAKE_DNNLIB = types.ModuleType("dnnlib")
_FAKE_DNNLIB.util = _FAKE_UTIL
_FAKE_DNNLIB.EasyDict = FakeEasyDict
_FAKE_TORCH_UTILS = types.ModuleType("torch_utils")
_FAKE_TORCH_UTILS.persistence = _FAKE_PERSISTENCE
_FAKE_TORCH_UTILS.misc = _FAKE_MISC


@contextmanager
def fake_edm_modules():
    """Fake `torch_utils` (+ persistence, misc) and `dnnlib` in sys.modules for the block; previous entries restored."""
    saved = {name: sys.modules.get(name, _MISSING) for name in _NAMES}
    sys.modules.update({"torch_utils": _FAKE_TORCH_UTILS, "torch_utils.persistence": _FAKE_PERSISTENCE,
                        "torch_utils.misc": _FAKE_MISC, "dnnlib": _FAKE_DNNLIB, "dnnlib.util": _FAKE_UTIL})
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is _MISSING:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def exec_fixture_source(src: str, module_name: str) -> types.ModuleType:
    """Execute EDM-style source text under the fake persistence (call inside `fake_edm_modules()`)."""
    module = types.ModuleType(module_name)
    _FAKE_PERSISTENCE.current_src = src
    try:
        exec(compile(src, f"<{module_name}>", "exec"), module.__dict__)
    finally:
        _FAKE_PERSISTENCE.current_src = None
    return module


class PersistentStub:
    """An object that pickles as an arbitrary EDM persistence call (for malformed-pickle tests)."""

    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return (_reconstruct_persistent_obj, (self.meta,))


def rewrite_numpy_core(data: bytes, numpy2_names: bool) -> bytes:
    """Rename `numpy(._)core.*` globals in a pickle: to `numpy._core` (numpy 2 writers) or `numpy.core`
    (numpy 1 writers, as in the official EDM snapshots). Re-emits the ops without FRAMEs (still valid)."""
    old, new = ("numpy.core.", "numpy._core.") if numpy2_names else ("numpy._core.", "numpy.core.")
    ops = list(pickletools.genops(data))
    out = bytearray()
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        raw = data[pos:end]
        if op.name == "FRAME":
            continue
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE") and isinstance(arg, str) and arg.startswith(old):
            text = (new + arg[len(old):]).encode("utf-8")
            raw = (b"\x8c" + bytes([len(text)]) if len(text) < 256 else b"X" + len(text).to_bytes(4, "little")) + text
        elif op.name == "GLOBAL" and arg.startswith(old):
            module, name = arg.split(" ", 1)
            raw = b"c" + (new + module[len(old):]).encode() + b"\n" + name.encode() + b"\n"
        out += raw
    return bytes(out)


def dump_edm_style(path: str | Path, data, numpy2_names: bool = False, protocol: int = 4) -> Path:
    """pickle.dump `data` (which may hold fixture objects / PersistentStubs) in EDM's format."""
    path = Path(path)
    with fake_edm_modules():
        raw = pickle.dumps(data, protocol=protocol)
    path.write_bytes(rewrite_numpy_core(raw, numpy2_names))
    return path


# EDM's published CIFAR-10 DDPM++ configuration (edm-cifar10-32x32-cond-vp.pkl's size: ~55.7 M parameters) as
# build_fixture_objects/make_edm_pickle keywords, on the fixtures' own UNet
CIFAR10_DDPMPP = dict(kind="vp-cond", resolution=32, channels=128, num_blocks=4, label_dim=10, model_type="UNet",
                      channel_mult=(2, 2, 2), attn_resolutions=(16,))


def build_fixture_objects(kind: str = "edm-cond", *, resolution: int = 8, channels: int = 16, num_blocks: int = 2,
                          label_dim: int = 10, seed: int = 0, label_dropout: float = 0.0, model_type: str = "TinyNet",
                          channel_mult: tuple[int, ...] = (2, 2, 2), attn_resolutions: tuple[int, ...] = (16,)):
    """In-memory (precond, loss) built from the fixture sources; returns them (eval, no grad).

    model_type "TinyNet" (default: a flat residual net, channel_mult/attn_resolutions unused) or "UNet" (the
    full-size encoder-decoder, sized by channels, channel_mult, num_blocks, attn_resolutions)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    net_src = (FIXTURE_DIR / "networks.py").read_text()
    loss_src = (FIXTURE_DIR / "loss.py").read_text()
    with fake_edm_modules(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        networks = exec_fixture_source(net_src, "edm_fixture_networks")
        losses = exec_fixture_source(loss_src, "edm_fixture_loss")
        kwargs = dict(img_resolution=resolution, img_channels=3, model_channels=channels, num_blocks=num_blocks,
                      label_dropout=label_dropout)
        if model_type != "TinyNet":  # the default's constructor arguments (recorded in the pickle) stay as they were
            kwargs.update(model_type=model_type, channel_mult=tuple(channel_mult),
                          attn_resolutions=tuple(attn_resolutions))
        if kind == "edm-cond":
            net = networks.EDMPrecond(label_dim=label_dim, use_fp16=True, **kwargs)
        else:
            net = networks.VPPrecond(label_dim=label_dim if kind == "vp-cond" else 0, **kwargs)
        loss = losses.EDMLoss()
    net = net.eval().requires_grad_(False)
    return net, loss


def make_edm_pickle(path: str | Path, kind: str = "edm-cond", numpy2_names: bool = False, *, resolution: int = 8,
                    channels: int = 16, num_blocks: int = 2, label_dim: int = 10, seed: int = 0,
                    label_dropout: float = 0.0, model_type: str = "TinyNet", channel_mult: tuple[int, ...] = (2, 2, 2),
                    attn_resolutions: tuple[int, ...] = (16,)) -> torch.nn.Module:
    """Write an EDM-format network pickle to `path` and return the original in-memory precond network.

    kind: "edm-cond" (EDMPrecond, `label_dim` classes, sigma range [0, inf), use_fp16=True),
          "vp-uncond" (VPPrecond, unconditional) or "vp-cond" (VPPrecond, `label_dim` classes). Images are
          3 x resolution x resolution.
    numpy2_names: numpy scalar globals written as `numpy._core.multiarray` (numpy 2) instead of
          `numpy.core.multiarray` (numpy 1, like the official snapshots).
    channels/num_blocks set the size (defaults: ~12k parameters; channels=96 gives ~1.4 MB); model_type "UNet"
    with channel_mult/attn_resolutions the full-size network (`make_edm_pickle(path, **CIFAR10_DDPMPP)`: EDM's
    CIFAR-10 DDPM++ configuration, ~55.7 M parameters).
    """
    net, loss = build_fixture_objects(kind, resolution=resolution, channels=channels, num_blocks=num_blocks,
                                      label_dim=label_dim, seed=seed, label_dropout=label_dropout,
                                      model_type=model_type, channel_mult=channel_mult,
                                      attn_resolutions=attn_resolutions)
    data = {
        "ema": net,
        "loss_fn": loss,
        "augment_pipe": None,
        "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "datasets/tiny.zip",
                           "use_labels": kind == "edm-cond", "xflip": False, "cache": True,
                           "resolution": resolution, "max_size": 1000},
    }
    dump_edm_style(path, data, numpy2_names=numpy2_names)
    return net


EDM2_ENCODERS = ("pixel", "latent")


# EDM2-img64-S's size (~280 M parameters, 64x64x3, 1000 classes) as build_edm2_objects/make_edm2_pickle keywords
EDM2_IMG64_S = dict(resolution=64, channels=3, label_dim=1000, model_channels=192,
                    unet=dict(channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8), channels_per_head=64))


def build_edm2_objects(*, resolution: int = 8, channels: int = 3, label_dim: int = 10, model_channels: int = 8,
                       encoder: str = "pixel", vae_name: str = "stabilityai/sd-vae-ft-mse", seed: int = 0,
                       unet: dict | None = None):
    """In-memory (precond, encoder, loss) from the EDM2-style fixture sources (precond in float32, eval).
    `unet`: more TinyMPUNet keywords (channel_mult, num_blocks, attn_resolutions, channels_per_head)."""
    if encoder not in EDM2_ENCODERS:
        raise ValueError(f"encoder must be one of {EDM2_ENCODERS}, got {encoder!r}")
    sources = {name: (EDM2_FIXTURE_DIR / f"{name}.py").read_text() for name in ("networks", "encoders", "loss")}
    with fake_edm_modules(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        networks = exec_fixture_source(sources["networks"], "edm2_fixture_networks")
        encoders = exec_fixture_source(sources["encoders"], "edm2_fixture_encoders")
        losses = exec_fixture_source(sources["loss"], "edm2_fixture_loss")
        net = networks.Precond(resolution, channels, label_dim, model_channels=model_channels, **(unet or {}))
        enc = encoders.StandardRGBEncoder() if encoder == "pixel" else encoders.StabilityVAEEncoder(vae_name=vae_name)
        loss = losses.EDM2Loss()
    return net.eval().requires_grad_(False), enc, loss


def make_edm2_pickle(path: str | Path, *, resolution: int = 8, channels: int = 3, label_dim: int = 10,
                     model_channels: int = 8, encoder: str = "pixel", vae_name: str = "stabilityai/sd-vae-ft-mse",
                     seed: int = 0, unet: dict | None = None) -> torch.nn.Module:
    """Write a pickle with EDM2's snapshot structure and return the network as it was stored (float16).

    The pickle is a `dnnlib.util.EasyDict(encoder=..., dataset_kwargs=..., loss_fn=..., ema=...)` with the
    network in float16, as EDM2's training loop writes snapshots. encoder "pixel" stores a
    StandardRGBEncoder, "latent" a StabilityVAEEncoder (channels should then be 4). `unet`: the network's
    layout beyond model_channels (`make_edm2_pickle(path, **EDM2_IMG64_S)`: EDM2-img64-S's size).
    """
    net, enc, loss = build_edm2_objects(resolution=resolution, channels=channels, label_dim=label_dim,
                                        model_channels=model_channels, encoder=encoder, vae_name=vae_name, seed=seed,
                                        unet=unet)
    net = net.to(torch.float16)
    data = FakeEasyDict(encoder=enc, loss_fn=loss,
                        dataset_kwargs={"class_name": "training.dataset.ImageFolderDataset", "path": "tiny.zip",
                                        "use_labels": label_dim > 0, "xflip": False, "cache": True})
    data.ema = net
    dump_edm_style(path, data)
    return net
