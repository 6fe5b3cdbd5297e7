"""Triton kernel: count NaN/Inf elements by their exponent bits (one read pass, an atomic add per program)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from alignmerge.ops._backend import triton_interpreted

_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.bfloat16: (torch.int16, 0x7F80),
         torch.float16: (torch.int16, 0x7C00)}


@triton.jit
def _count_nonfinite_kernel(x_ptr, count_ptr, n, EXP_MASK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    bits = tl.load(x_ptr + offs, mask=offs < n, other=0).to(tl.int32) & EXP_MASK
    tl.atomic_add(count_ptr, tl.sum((bits == EXP_MASK).to(tl.int64), axis=0))


def count_nonfinite_triton(x: torch.Tensor) -> int:
    as_int, exp_mask = _BITS[x.dtype]
    flat = x.reshape(-1).view(as_int)
    n = flat.numel()
    block = max(1024, min(1 << 16, triton.next_power_of_2(max(n, 1)))) if triton_interpreted() else 4096
    count = torch.zeros(1, dtype=torch.int64, device=x.device)
    _count_nonfinite_kernel[(triton.cdiv(n, block),)](flat, count, n, EXP_MASK=exp_mask, BLOCK=block)
    return int(count.item())
