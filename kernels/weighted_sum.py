"""Triton kernel: fused weighted sum of K same-shaped tensors, out = sum_k w_k x_k [/ divisor].

acc = fma(x_k, w_k, acc) in input order, like torch.addcmul_ in mergekit's linear merge.

The K inputs are passed as one base pointer plus per-input element offsets (x_k = x0_ptr + off_k),
so K is free; storage is bf16/fp16/fp32, arithmetic fp32 (FMA contraction off, like the C++ path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from alignmerge.ops._backend import triton_interpreted


def block_size(n: int) -> int:
    """Elements per program: 1024 on a GPU; large blocks under the (per-program slow) interpreter."""
    if triton_interpreted():
        return max(256, min(1 << 16, triton.next_power_of_2(max(n, 1))))
    return 1024


def pointer_offsets(tensors, ref: torch.Tensor) -> torch.Tensor:
    """Element offsets of each tensor's data from ``ref``'s (one int64 per tensor, on ref's device)."""
    size = ref.element_size()
    offsets = []
    for t in tensors:
        delta = t.data_ptr() - ref.data_ptr()
        if delta % size:
            raise ValueError("tensors must be aligned to their element size")
        offsets.append(delta // size)
    return torch.tensor(offsets, dtype=torch.int64, device=ref.device)


def launch_options() -> dict:
    """No implicit FMA contraction on GPU (explicit tl.fma only), so results round like the C++ and torch paths."""
    return {} if triton_interpreted() else {"enable_fp_fusion": False}


@triton.jit
def to_storage(x, out_ptr):
    """fp32 -> out_ptr's element type; bf16 by explicit round-to-nearest-even (the interpreter truncates)."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_ptr.dtype.element_ty)


@triton.jit
def _weighted_sum_kernel(x0_ptr, x_offsets_ptr, w_ptr, out_ptr, n, divisor,
                         K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        xo = tl.load(x_offsets_ptr + k)
        w = tl.load(w_ptr + k)
        x = tl.load(x0_ptr + xo + offs, mask=mask, other=0.0).to(tl.float32)
        acc = tl.fma(x, w, acc)
    if NORMALIZE:
        acc = acc / divisor
    tl.store(out_ptr + offs, to_storage(acc, out_ptr), mask=mask)


def weighted_sum_triton(tensors, weights, out: torch.Tensor, *, normalize: bool, divisor: float) -> torch.Tensor:
    """Launch on flat contiguous tensors (same dtype); ``out`` flat contiguous."""
    n = out.numel()
    x0 = tensors[0]
    w = torch.tensor([float(v) for v in weights], dtype=torch.float32, device=x0.device)
    block = block_size(n)
    grid = (triton.cdiv(n, block),)
    _weighted_sum_kernel[grid](x0, pointer_offsets(tensors, x0), w, out, n, float(divisor),
                               K=len(tensors), NORMALIZE=bool(normalize), BLOCK=block, **launch_options())
    return out
