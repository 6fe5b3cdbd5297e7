"""count_nonfinite(x): how many NaN/Inf elements a tensor holds (input and output checks of a merge)."""
from __future__ import annotations

import importlib

import torch

from alignmerge.ops import reference as ref
from alignmerge.ops._backend import DTYPE_CODES, choose_backend, cpp_extension, dtype_code


def count_nonfinite(x: torch.Tensor, *, backend: str | None = None) -> int:
    """Number of elements of ``x`` that are NaN or +-Inf (0 for non-float tensors)."""
    if not x.is_floating_point() or x.numel() == 0:
        return 0
    chosen = choose_backend(x, backend) if x.dtype in DTYPE_CODES else "torch"
    if chosen == "torch" or not x.is_contiguous():
        return ref.count_nonfinite_reference(x)
    if chosen == "cpp":
        return int(cpp_extension().count_nonfinite(x.data_ptr(), dtype_code(x), x.numel()))
    return importlib.import_module("alignmerge.kernels.checks").count_nonfinite_triton(x)
