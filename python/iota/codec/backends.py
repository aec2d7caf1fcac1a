"""Which codec backends this machine can run, and which one a call uses."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from iota import _C
from iota.errors import CodecError


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable() -> bool:
    """Triton runs on a GPU, or on the CPU under TRITON_INTERPRET=1."""
    return triton_installed() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def cuda_usable() -> bool:
    return bool(_C.cuda_compiled) and _C.cuda_device_count() > 0


def backends() -> list[str]:
    """Backends available here, e.g. ["cpu", "triton"] (+ "cuda" with a GPU)."""
    names = ["cpu"]
    if triton_usable():
        names.append("triton")
    if cuda_usable():
        names.append("cuda")
    return names


def info() -> dict:
    """What the codec runs on: backends, the CPU instruction set in use, CUDA and Triton status."""
    triton_version = None
    if triton_installed():
        from importlib.metadata import version

        triton_version = version("triton")
    return {
        "backends": backends(),
        "isa": _C.isa(),
        "isas": _C.isas(),
        "cuda_compiled": bool(_C.cuda_compiled),
        "cuda_devices": _C.cuda_device_count(),
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def resolve(name: str, device: torch.device) -> str:
    """The backend a call uses: `auto` keeps data where it is (CUDA kernels, else
    Triton, for GPU tensors; the C++ core for CPU tensors)."""
    if name == "auto":
        if device.type == "cuda":
            return "cuda" if cuda_usable() else "triton" if triton_usable() else "cpu"
        return "cpu"
    if name not in backends():
        raise CodecError(f"codec backend {name!r} is not available here (available: {backends()})")
    return name
