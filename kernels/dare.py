"""Triton kernels for DARE: the counter-based random stream and the L1 sums of mergekit's rescale.

Stream (identical in C++, torch and here): uniform32(i) = fmix32(lo32(i)·W + page_key(key, hi32(i))) for the
global flat element index i, with murmur3's finaliser fmix32, W = 0x9E3779B9 and all arithmetic in 32 bits;
key = dare_stream_key(seed, tensor_index, expert). An element survives iff uniform32 < dare_keep_below(density),
so results depend on neither backend nor chunking.
The drop-and-rescale merge itself runs in the generalised task-arithmetic kernel (kernels/ties.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .weighted_sum import block_size, pointer_offsets


def signed64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


@triton.jit
def fmix32(h):
    """murmur3's 32-bit finaliser on uint32."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def dare_uniform32(key, gi):
    """uniform32 in [0, 2^32) as int64 for global indices gi (int64); key is uint64."""
    key_lo = (key & 0xFFFFFFFF).to(tl.uint32)
    key_hi = (key >> 32).to(tl.uint32)
    page_key = key_lo ^ fmix32(key_hi ^ fmix32((gi >> 32).to(tl.uint32)))
    u = fmix32((gi & 0xFFFFFFFF).to(tl.uint32) * 0x9E3779B9 + page_key)
    return u.to(tl.int64)


@triton.jit
def _dare_uniform_kernel(out_ptr, key, element_offset, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    u = dare_uniform32(key.to(tl.uint64, bitcast=True), offs + element_offset)
    tl.store(out_ptr + offs, u, mask=offs < n)


@triton.jit
def _dare_l1_sums_kernel(base_ptr, x0_ptr, x_offsets_ptr, rng_keys_ptr, keep_below_ptr, partial_ptr, n,
                         element_offset, K: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        xo = tl.load(x_offsets_ptr + k)
        x = tl.load(x0_ptr + xo + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.abs(x - b)
        rk = tl.load(rng_keys_ptr + k).to(tl.uint64, bitcast=True)
        keep = dare_uniform32(rk, offs + element_offset) < tl.load(keep_below_ptr + k)
        slot = (k * tl.num_programs(0) + pid) * 2
        tl.store(partial_ptr + slot, tl.sum(a, axis=0))
        tl.store(partial_ptr + slot + 1, tl.sum(tl.where(keep, a, 0.0), axis=0))


def dare_uniform_triton(key: int, numel: int, element_offset: int, device) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.int64, device=device)
    block = block_size(numel)
    _dare_uniform_kernel[(triton.cdiv(numel, block),)](out, signed64(key), element_offset, numel, BLOCK=block)
    return out


def dare_l1_sums_triton(base, tensors, rng_keys, keep_below, element_offset: int) -> torch.Tensor:
    """float64 [K, 2]: sum |tau_k| and sum |tau_k · keep_k| over the given (flat, contiguous) slice."""
    n = base.numel()
    block = block_size(n)
    programs = triton.cdiv(n, block)
    x0 = tensors[0]
    partial = torch.zeros((len(tensors), programs, 2), dtype=torch.float32, device=base.device)
    keys = torch.tensor([signed64(k) for k in rng_keys], dtype=torch.int64, device=base.device)
    below = torch.tensor(keep_below, dtype=torch.int64, device=base.device)
    _dare_l1_sums_kernel[(programs,)](base, x0, pointer_offsets(tensors, x0), keys, below, partial, n,
                                      element_offset, K=len(tensors), BLOCK=block)
    return partial.double().sum(dim=1).cpu()
