"""Where PyTorch work runs: `--device auto|cpu|cuda[:N]`, declared once (`device_option`) and resolved once
(`resolve_device`).

Every PyTorch stage (references, fits, schedule learning, global fits, scoring, the parity check's PyTorch side)
runs where the denoiser's network is (`Denoiser.to(device)`, `Denoiser.device`): tensors are created on
`denoiser.device` where noises, references and steps are made, so the rest of the code is device-agnostic. The
ONNX export stays on the CPU (compiler/stages.py says why).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

import torch

from iia.cli import option

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceError(ValueError):
    """A --device value that is malformed or names a device torch cannot see."""


def device_option():
    """The one declaration of --device (a dataclass field for CompileOptions, iia-calibrate and iia-accuracy)."""
    return option("auto", "where PyTorch work runs (the calibration's references, fits and scoring; iia-compile's parity check): "
                          "auto (CUDA when torch sees a device, else the CPU), cpu, cuda or cuda:N",
                  role="device")


def parse_device(text: str, flag: str = "--device") -> tuple[str, int | None]:
    """("auto" | "cpu" | "cuda", index or None) from `text`; DeviceError naming `flag` for anything else
    (an index only after cuda). Needs no CUDA."""
    m = _PATTERN.match(text) if isinstance(text, str) else None
    if m is None or m.group(2) is not None and m.group(1) != "cuda":
        raise DeviceError(f"{flag} {text!r}: expected {DEVICE_CHOICES}")
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def resolve_device(text: str, flag: str = "--device") -> torch.device:
    """The torch.device `text` names: auto -> cuda:0 when torch sees a CUDA device, else cpu; cuda[:N] refused
    (DeviceError, one line naming `flag`) when torch sees no CUDA device or fewer than N + 1 of them."""
    kind, index = parse_device(text, flag)
    if kind == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "auto":
        return torch.device("cuda", 0) if count else torch.device("cpu")
    if count == 0:
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"{flag} {text}: torch sees no CUDA device (torch {torch.__version__}, {built}); "
                          f"use --device cpu or auto")
    index = 0 if index is None else index
    if index >= count:
        raise DeviceError(f"{flag} {text}: torch sees {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def ieee_float32_on_cuda() -> None:
    """Convolutions and matmuls on CUDA in IEEE float32, not TF32 (cuDNN's default for convolutions keeps 10
    mantissa bits, ~1e-3 relative per call): calibration judges the network as the float32 graph computes it, as
    on the CPU. Process-wide (torch.backends), set when a Denoiser moves to a CUDA device."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def describe_device(device: torch.device) -> str:
    """'cpu' or 'cuda:0 (NVIDIA H100 80GB HBM3)': what the log and the coefficient file record."""
    if device.type != "cuda":
        return device.type
    return f"{device} ({torch.cuda.get_device_name(device)})"


@contextmanager
def on_device(denoiser, device: torch.device | str):
    """The denoiser's network on `device` for the block, back where it was after (a no-op where it is there
    already): a stage's PyTorch work runs there without moving the caller's Denoiser for good."""
    before = denoiser.device
    denoiser.to(device)
    try:
        yield denoiser
    finally:
        denoiser.to(before)


def resident_bytes() -> int | None:
    """This process's resident set size now, in bytes (Linux /proc/self/statm); None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc malloc_trim; a no-op elsewhere). PyTorch's CPU
    tensors come from malloc, and glibc keeps freed blocks below its (self-raising) mmap threshold: without
    this, activations freed seconds ago still count in the resident set that a memory budget reads."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
