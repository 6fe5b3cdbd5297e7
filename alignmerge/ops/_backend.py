"""Backend discovery and the one place where ops choose torch, C++ or Triton.

Rules (``choose_backend``): an explicit ``backend=`` argument wins, then the environment
variable ``ALIGNMERGE_BACKEND``; otherwise CUDA tensors use Triton, CPU tensors use the C++
extension, and anything else (or a missing fast path) uses the torch reference.
Under ``TRITON_INTERPRET=1`` the Triton kernels also accept CPU tensors, which is how the
test-suite runs them on machines without a GPU.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("torch", "cpp", "triton")

# Storage dtype codes shared with csrc/alignmerge.h (enum DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@functools.lru_cache(maxsize=None)
def cpp_extension():
    """The compiled ``alignmerge._C`` module, or None (warned once) if it was not built."""
    try:
        return importlib.import_module("alignmerge._C")
    except ImportError as exc:
        warnings.warn(
            f"alignmerge._C is not available ({exc}); using the torch reference on CPU. "
            "Rebuild with `pip install -e .` to get the C++ kernels.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True if triton imports (kernels then run on CUDA, or on CPU under TRITON_INTERPRET=1)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run ops on tensors of ``device``."""
    device = torch.device(device)
    out = ["torch"]
    if device.type == "cpu" and cpp_extension() is not None:
        out.append("cpp")
    if triton_available() and (device.type == "cuda" or triton_interpreted()):
        out.append("triton")
    return out


def choose_backend(tensor: torch.Tensor, backend: str | None = None) -> str:
    """Pick the backend for an op whose inputs live where ``tensor`` lives."""
    requested = backend or os.environ.get("ALIGNMERGE_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
        if requested not in available_backends(tensor.device):
            raise RuntimeError(
                f"backend {requested!r} is not available for {tensor.device.type} tensors "
                f"(available: {', '.join(available_backends(tensor.device))})"
            )
        return requested
    if tensor.device.type == "cuda" and triton_available():
        return "triton"
    if tensor.device.type == "cpu" and cpp_extension() is not None:
        return "cpp"
    return "torch"


def dtype_code(tensor: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[tensor.dtype]
    except KeyError:
        raise TypeError(f"unsupported storage dtype {tensor.dtype}; use float32, bfloat16 or float16") from None
