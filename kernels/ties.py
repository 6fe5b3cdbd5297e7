"""Triton kernels: generalised task arithmetic in one pass, and TIES's magnitude radix select.

``_gta_kernel`` covers task arithmetic, TIES and DARE (mergekit's GeneralizedTaskArithmeticMerge):
tau_k = x_k - b, sparsified (SPARSIFY 1: magnitude threshold key + tie cutoff; 2: DARE stream),
weighted, optionally sign-elected (CONSENSUS) and normalised, out = b + lambda · mixed.
With consensus each expert is read twice per block (once for the vote, once for the masked sums)
instead of keeping K register tiles.

Magnitude select: key = fp32 bits of |tau| (monotone). ``_magnitude_histogram_kernel`` adds key >> 16
(LEVEL 0) or, within the chosen 16-bit prefix, key & 0xffff (LEVEL 1) into a [K, 65536] histogram with
atomics; ``_tie_count_kernel`` counts elements equal to the threshold key per block, so the host can
find the block that holds the m-th tie.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dare import dare_uniform32, signed64
from .weighted_sum import block_size, launch_options, pointer_offsets, to_storage

BINS = 1 << 16


@triton.jit
def _weighted_delta(b, x0_ptr, x_offsets_ptr, k, offs, gi, mask, w, thr_key_ptr, cutoff_ptr, rng_key_ptr,
                    keep_below_ptr, rescale_ptr, SPARSIFY: tl.constexpr, RESCALE: tl.constexpr):
    xo = tl.load(x_offsets_ptr + k)
    d = tl.load(x0_ptr + xo + offs, mask=mask, other=0.0).to(tl.float32) - b
    if SPARSIFY == 1:
        key = (d.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
        t = tl.load(thr_key_ptr + k)
        keep = (key > t) | ((key == t) & (gi < tl.load(cutoff_ptr + k)))
        d = d * tl.where(keep, 1.0, 0.0)
    if SPARSIFY == 2:
        rk = tl.load(rng_key_ptr + k).to(tl.uint64, bitcast=True)
        keep = dare_uniform32(rk, gi) < tl.load(keep_below_ptr + k)
        d = d * tl.where(keep, 1.0, 0.0)
        if RESCALE:
            d = d * tl.load(rescale_ptr + k)
    return d * w


@triton.jit
def _gta_kernel(base_ptr, x0_ptr, x_offsets_ptr, out_ptr, w_ptr, thr_key_ptr, cutoff_ptr, rng_key_ptr,
                keep_below_ptr, rescale_ptr, n, element_offset, plain_divisor, lam,
                K: tl.constexpr, SPARSIFY: tl.constexpr, RESCALE: tl.constexpr, CONSENSUS: tl.constexpr,
                NORMALIZE: tl.constexpr, APPLY_LAMBDA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gi = offs + element_offset
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mixed = tl.zeros([BLOCK], dtype=tl.float32)
    if CONSENSUS:
        vote = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            w = tl.load(w_ptr + k)
            vote = vote + _weighted_delta(b, x0_ptr, x_offsets_ptr, k, offs, gi, mask, w, thr_key_ptr, cutoff_ptr,
                                          rng_key_ptr, keep_below_ptr, rescale_ptr, SPARSIFY, RESCALE)
        positive = vote >= 0.0
        div = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            w = tl.load(w_ptr + k)
            wd = _weighted_delta(b, x0_ptr, x_offsets_ptr, k, offs, gi, mask, w, thr_key_ptr, cutoff_ptr,
                                 rng_key_ptr, keep_below_ptr, rescale_ptr, SPARSIFY, RESCALE)
            m = tl.where(tl.where(positive, wd > 0.0, wd < 0.0), 1.0, 0.0)
            mixed = mixed + wd * m
            div = div + w * m
        div = tl.where(div == 0.0, 1.0, div)
    else:
        for k in tl.static_range(K):
            w = tl.load(w_ptr + k)
            mixed = mixed + _weighted_delta(b, x0_ptr, x_offsets_ptr, k, offs, gi, mask, w, thr_key_ptr,
                                            cutoff_ptr, rng_key_ptr, keep_below_ptr, rescale_ptr, SPARSIFY,
                                            RESCALE)
        div = plain_divisor
    if NORMALIZE:
        mixed = mixed / div
    if APPLY_LAMBDA:
        mixed = mixed * lam
    tl.store(out_ptr + offs, to_storage(b + mixed, out_ptr), mask=mask)


def gta_merge_triton(base, tensors, out, *, weights, sparsify: int, consensus: bool, normalize: bool,
                     lambda_: float, plain_divisor: float, element_offset: int, threshold_keys=None,
                     tie_cutoffs=None, rng_keys=None, keep_below=None, rescale=None) -> torch.Tensor:
    """Launch on flat contiguous tensors of one dtype; per-expert parameters as Python lists."""
    n = base.numel()
    dev = base.device
    K = len(tensors)
    x0 = tensors[0]

    def i64(values, fill=0):
        return torch.tensor(values if values is not None else [fill] * K, dtype=torch.int64, device=dev)

    w = torch.tensor([float(v) for v in weights], dtype=torch.float32, device=dev)
    scale = torch.tensor(rescale if rescale is not None else [1.0] * K, dtype=torch.float32, device=dev)
    keys = [signed64(k) for k in rng_keys] if rng_keys is not None else None
    block = block_size(n)
    _gta_kernel[(triton.cdiv(n, block),)](
        base, x0, pointer_offsets(tensors, x0), out, w, i64(threshold_keys), i64(tie_cutoffs), i64(keys),
        i64(keep_below), scale, n, element_offset, float(plain_divisor), float(lambda_),
        K=K, SPARSIFY=sparsify, RESCALE=rescale is not None and any(float(r) != 1.0 for r in rescale),
        CONSENSUS=bool(consensus), NORMALIZE=bool(normalize), APPLY_LAMBDA=float(lambda_) != 1.0, BLOCK=block,
        **launch_options())
    return out


@triton.jit
def _magnitude_histogram_kernel(base_ptr, x0_ptr, x_offsets_ptr, prefix_ptr, hist_ptr, n,
                                K: tl.constexpr, LEVEL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        prefix = tl.load(prefix_ptr + k)
        xo = tl.load(x_offsets_ptr + k)
        d = tl.load(x0_ptr + xo + offs, mask=mask, other=0.0).to(tl.float32) - b
        key = d.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        if LEVEL == 0:
            bins = key >> 16
            valid = mask & ((bins.to(tl.int64) * 0 + prefix) >= 0)
        else:
            bins = key & 0xFFFF
            valid = mask & ((key >> 16).to(tl.int64) == prefix)
        tl.atomic_add(hist_ptr + k * 65536 + bins, 1, mask=valid)


def magnitude_histogram_triton(base, tensors, level: int, prefixes, hist: torch.Tensor) -> None:
    """hist (int64 [K, 65536], CPU) += this slice's counts; prefixes: int per expert, -1 = skip."""
    n = base.numel()
    x0 = tensors[0]
    offsets = pointer_offsets(tensors, x0)
    pre = torch.tensor(prefixes, dtype=torch.int64, device=base.device)
    piece = 1 << 30  # int32 bins cannot overflow
    for start in range(0, n, piece):
        stop = min(n, start + piece)
        counts = torch.zeros((len(tensors), BINS), dtype=torch.int32, device=base.device)
        block = block_size(stop - start)
        _magnitude_histogram_kernel[(triton.cdiv(stop - start, block),)](
            base[start:stop], x0[start:], offsets, pre, counts, stop - start, K=len(tensors), LEVEL=level,
            BLOCK=block)
        hist += counts.to(torch.int64).cpu()


@triton.jit
def _tie_count_kernel(base_ptr, x0_ptr, x_offsets_ptr, keys_ptr, counts_ptr, n,
                      K: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        xo = tl.load(x_offsets_ptr + k)
        d = tl.load(x0_ptr + xo + offs, mask=mask, other=0.0).to(tl.float32) - b
        key = (d.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
        hit = mask & (key == tl.load(keys_ptr + k))
        tl.store(counts_ptr + k * tl.num_programs(0) + pid, tl.sum(hit.to(tl.int64), axis=0))


def magnitude_tie_cutoffs_triton(base, tensors, keys, need):
    """(counts, cutoffs) like the C++ op: ties per expert in this slice, local index after the need-th tie."""
    from alignmerge.ops.reference import magnitude_keys_reference

    n = base.numel()
    x0 = tensors[0]
    block = block_size(n)
    programs = triton.cdiv(n, block)
    per_block = torch.zeros((len(tensors), programs), dtype=torch.int64, device=base.device)
    key_t = torch.tensor([int(k) for k in keys], dtype=torch.int64, device=base.device)
    _tie_count_kernel[(programs,)](base, x0, pointer_offsets(tensors, x0), key_t, per_block, n,
                                   K=len(tensors), BLOCK=block)
    per_block = per_block.cpu()
    counts, cutoffs = [], []
    for k, x in enumerate(tensors):
        cum = per_block[k].cumsum(0)
        counts.append(int(cum[-1]))
        if need[k] <= 0 or counts[-1] < need[k]:
            cutoffs.append(-1)
            continue
        blk = int(torch.searchsorted(cum, need[k]))
        before = int(cum[blk] - per_block[k, blk])
        lo, hi = blk * block, min(n, (blk + 1) * block)
        hits = torch.nonzero(magnitude_keys_reference(base[lo:hi].cpu(), x[lo:hi].cpu()) == int(keys[k]))
        cutoffs.append(lo + int(hits[need[k] - before - 1, 0]) + 1)
    return counts, cutoffs
