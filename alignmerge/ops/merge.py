"""Public data-free merge ops: weighted sum, task arithmetic, TIES, DARE, TIES's magnitude select.

All ops read bf16/fp16/fp32 storage once, compute in fp32 in mergekit 0.1.5's arithmetic order and
round once to ``out_dtype`` (default: the inputs' dtype). Each has three backends behind
``backend=`` (see ``alignmerge.ops._backend.choose_backend``): ``torch`` (the references in
``alignmerge.ops.reference``), ``cpp`` (``alignmerge._C``, OpenMP, CPU tensors) and ``triton``
(``kernels/``; CUDA, or CPU under TRITON_INTERPRET=1).

Formulas (tau_k = x_k - base, w_k the expert weights, all per element):

- ``weighted_sum``:     sum_k w_k x_k (fused multiply-adds)  [/ sum_k w_k]            (mergekit linear)
- ``task_arithmetic``:  base + lambda · sum_k w_k tau_k [/ sum_k w_k]
- ``ties``:             tau_k keeps its top-k magnitudes, k = max(1, int(density_k · n)); sign election
  maj = sign(sum_k w_k tau_k); mixed = sum of the w_k tau_k agreeing with maj, divided by the sum of
  their w_k when ``normalize`` (0 -> 1); base + lambda · mixed.
- ``dare``:             tau_k keeps each element with probability density_k (counter-based stream keyed
  by seed, tensor_index, expert, global element index) and survivors are rescaled; optional sign
  election (dare_ties) and normalisation as above.

Chunking: an executor that cannot hold a whole tensor passes row chunks with ``element_offset`` (the
flat index of the chunk's first element). ``dare`` and ``task_arithmetic`` are elementwise; ``ties``
needs whole-tensor thresholds first: run a :class:`MagnitudeSelection` over the chunks (two or three
passes), then call ``ties(..., thresholds=selection.thresholds(), element_offset=...)`` per chunk. A whole
tensor given to ``ties`` on the C++ backend is selected in the merge pass itself (``ONE_PASS_MIN_NUMEL``).
For DARE with mergekit's L1 rescale use :class:`DareL1Rescale` the same way.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from alignmerge.errors import NonFiniteError
from alignmerge.ops import reference as ref
from alignmerge.ops.checks import count_nonfinite
from alignmerge.ops._backend import DTYPE_CODES, choose_backend, cpp_extension, dtype_code
from alignmerge.ops.reference import KEEP_ALL_TIES, KEEP_NONE_KEY

__all__ = [
    "weighted_sum", "task_arithmetic", "ties", "dare", "magnitude_thresholds", "MagnitudeSelection",
    "MagnitudeThresholds", "DareL1Rescale", "dare_keep_mask",
]

_SPARSIFY_NONE, _SPARSIFY_MAGNITUDE, _SPARSIFY_RANDOM = 0, 1, 2
_BINS = 1 << 16
_SKIP_PREFIX = 0xFFFFFFFF


def _triton_module(name: str):
    try:
        return importlib.import_module(f"alignmerge.kernels.{name}")
    except ImportError:
        return importlib.import_module(f"kernels.{name}")


# ------------------------------------------------------------------ validation
def _check_tensors(op: str, tensors, like: torch.Tensor | None = None, like_name: str = "base") -> torch.Tensor:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)) or len(tensors) == 0:
        raise ValueError(f"{op}: tensors must be a non-empty list of tensors")
    if like is None:
        like, like_name, start = tensors[0], "tensors[0]", 1
    else:
        start = 0
    if not isinstance(like, torch.Tensor):
        raise TypeError(f"{op}: {like_name} must be a tensor, got {type(like).__name__}")
    if like.dtype not in DTYPE_CODES:
        raise TypeError(f"{op}: {like_name} has unsupported dtype {like.dtype}; use float32, bfloat16 or float16")
    for i, t in enumerate(tensors[start:], start):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: tensors[{i}] must be a tensor, got {type(t).__name__}")
        if t.shape != like.shape:
            raise ValueError(f"{op}: tensors[{i}] has shape {tuple(t.shape)} but {like_name} has {tuple(like.shape)}")
        if t.dtype != like.dtype:
            raise TypeError(f"{op}: tensors[{i}] has dtype {t.dtype} but {like_name} has {like.dtype}")
        if t.device != like.device:
            raise ValueError(f"{op}: tensors[{i}] is on {t.device} but {like_name} is on {like.device}")
    return like


def _per_expert(op: str, name: str, value, k: int) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * k
    values = [float(v) for v in value]
    if len(values) != k:
        raise ValueError(f"{op}: {name} has {len(values)} entries for {k} tensors")
    return values


def _check_weights(op: str, weights, k: int) -> list[float]:
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if isinstance(weights, (int, float)):
        raise ValueError(f"{op}: weights must have one entry per tensor")
    return _per_expert(op, "weights", weights, k)


def _prepare_out(op: str, like: torch.Tensor, out_dtype, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        dtype = out_dtype or like.dtype
        if dtype not in DTYPE_CODES:
            raise TypeError(f"{op}: unsupported out_dtype {dtype}; use float32, bfloat16 or float16")
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    if out.dtype not in DTYPE_CODES:
        raise TypeError(f"{op}: out has unsupported dtype {out.dtype}; use float32, bfloat16 or float16")
    if out_dtype is not None and out.dtype != out_dtype:
        raise ValueError(f"{op}: out has dtype {out.dtype} but out_dtype is {out_dtype}")
    if out.shape != like.shape:
        raise ValueError(f"{op}: out has shape {tuple(out.shape)} but the inputs have {tuple(like.shape)}")
    if out.device != like.device:
        raise ValueError(f"{op}: out is on {out.device} but the inputs are on {like.device}")
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous")
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1)


def _ptrs(tensors) -> list[int]:
    return [t.data_ptr() for t in tensors]


# ------------------------------------------------------------------ weighted sum
def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = False,
                 out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """out = sum_k w_k x_k, divided by sum_k w_k when ``normalize`` (mergekit ``linear``).

    fp32 accumulation from zero in tensor order with fused multiply-adds (torch.addcmul_ rounds once),
    one rounding to ``out_dtype``: bit-identical to mergekit's linear merge (zeros, addcmul_, div_).
    """
    op = "weighted_sum"
    like = _check_tensors(op, tensors)
    w = _check_weights(op, weights, len(tensors))
    divisor = ref.sequential_sum_fp32(w)
    if normalize and divisor == 0:
        raise ValueError(f"{op}: normalize=True but the weights {w} sum to 0")
    out = _prepare_out(op, like, out_dtype, out)
    chosen = choose_backend(like, backend)
    if like.numel() == 0:
        return out
    if chosen == "torch":
        out.copy_(ref.weighted_sum_reference(list(tensors), w, normalize=normalize, out_dtype=out.dtype))
        return out
    flat = [_flat(t) for t in tensors]
    if chosen == "cpp":
        cpp_extension().weighted_sum(_ptrs(flat), dtype_code(like), w, out.data_ptr(), dtype_code(out),
                                     like.numel(), bool(normalize), divisor)
    else:
        _triton_module("weighted_sum").weighted_sum_triton(flat, w, out.view(-1), normalize=normalize,
                                                           divisor=divisor)
    return out


# ------------------------------------------------------------------ generalised task arithmetic
def _gta(op: str, base, tensors, weights, *, sparsify: int, consensus: bool, normalize: bool, lambda_: float,
         element_offset: int, out_dtype, out, backend, thresholds: "MagnitudeThresholds | None" = None,
         rng_keys=None, keep_below=None, rescale=None, keep_masks=None,
         keep_counts: Sequence[int] | None = None, check_finite: bool = False) -> torch.Tensor | None:
    """The generalised task arithmetic on the chosen backend; None only if a one-pass TIES guess failed.

    ``check_finite``: NonFiniteError if an input holds NaN/Inf (counted in the C++ magnitude pass itself)."""
    w = _check_weights(op, weights, len(tensors))
    out = _prepare_out(op, base, out_dtype, out)
    chosen = choose_backend(base, backend)
    if base.numel() == 0:
        return out
    if element_offset < 0:
        raise ValueError(f"{op}: element_offset must be >= 0, got {element_offset}")
    plain = ref.sequential_sum_fp32(w)
    plain = 1.0 if abs(plain) < 1e-8 else plain
    if check_finite and not (chosen == "cpp" and sparsify == _SPARSIFY_MAGNITUDE):
        _raise_nonfinite_inputs(op, base, tensors, backend)
    if chosen == "torch":
        out.copy_(ref.gta_reference(base, list(tensors), w, keep_masks=keep_masks, rescale=rescale,
                                    consensus=consensus, normalize=normalize, lambda_=lambda_,
                                    out_dtype=out.dtype))
        return out
    b = _flat(base)
    flat = [_flat(t) for t in tensors]
    keys = list(thresholds.keys) if thresholds is not None else None
    cutoffs = list(thresholds.cutoffs) if thresholds is not None else None
    if chosen == "cpp":
        ok, _, _, _, _, nonfinite = cpp_extension().gta_merge(
            b.data_ptr(), _ptrs(flat), dtype_code(base), out.data_ptr(), dtype_code(out), base.numel(),
            int(element_offset), w, sparsify, bool(consensus), bool(normalize), float(lambda_),
            float(lambda_) != 1.0, plain, keys or [], cutoffs or [], list(rng_keys or []), list(keep_below or []),
            [float(r) for r in rescale] if rescale is not None else [], list(keep_counts or []))
        if check_finite and any(nonfinite):  # a NaN/Inf task-vector element: from an input, or an overflow
            _raise_nonfinite_inputs(op, base, tensors, backend)
        if not ok:
            return None
    else:
        _triton_module("ties").gta_merge_triton(
            b, flat, out.view(-1), weights=w, sparsify=sparsify, consensus=consensus, normalize=normalize,
            lambda_=lambda_, plain_divisor=plain, element_offset=int(element_offset), threshold_keys=keys,
            tie_cutoffs=cutoffs, rng_keys=rng_keys, keep_below=keep_below, rescale=rescale)
    return out


def _raise_nonfinite_inputs(op: str, base: torch.Tensor, tensors, backend) -> None:
    """NonFiniteError naming the first of base, tensors[0], ... that holds NaN/Inf."""
    for name, t in [("base", base), *((f"tensors[{k}]", t) for k, t in enumerate(tensors))]:
        count = count_nonfinite(t, backend=backend)
        if count:
            raise NonFiniteError(f"{op}: {name} contains {count} NaN/Inf values")


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
                    lambda_: float = 1.0, normalize: bool = False, out_dtype: torch.dtype | None = None,
                    out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """base + lambda · sum_k w_k (x_k - base), divided by sum_k w_k when ``normalize`` (|sum| < 1e-8 -> 1)."""
    op = "task_arithmetic"
    _check_tensors(op, tensors, base)
    return _gta(op, base, tensors, weights, sparsify=_SPARSIFY_NONE, consensus=False, normalize=normalize,
                lambda_=lambda_, element_offset=0, out_dtype=out_dtype, out=out, backend=backend)


# ------------------------------------------------------------------ TIES magnitude select
@dataclass(frozen=True)
class MagnitudeThresholds:
    """Per-expert top-k rule: keep i iff key(i) > keys[k], or key(i) == keys[k] and i < cutoffs[k].

    key(i) is the fp32 bit pattern of |x_k[i] - base[i]|; i the global flat index. Exactly
    magnitude_keep_count(n, density_k) elements are kept (ties at the threshold: lowest indices first).
    """

    keys: tuple[int, ...]
    cutoffs: tuple[int, ...]

    @property
    def values(self) -> torch.Tensor:
        """Threshold magnitudes as fp32 (inf for an expert that keeps nothing)."""
        out = []
        for key in self.keys:
            if key == KEEP_NONE_KEY:
                out.append(float("inf"))
            else:
                out.append(float(torch.tensor([key], dtype=torch.int32).view(torch.float32)))
        return torch.tensor(out, dtype=torch.float32)


_SAMPLE, _LEVEL0, _LEVEL1, _TIES, _DONE = -1, 0, 1, 2, 3  # MagnitudeSelection passes, in order
SAMPLE_BLOCK, SAMPLE_STRIDE = 256, 16
"""The sampled pass reads every SAMPLE_STRIDE-th block of SAMPLE_BLOCK elements of each chunk (contiguous
blocks: a strided element sample would touch every cache line; the C++ kernel's block, csrc kBlock)."""
SAMPLE_MIN_NUMEL = 1 << 20
"""Tensors from this size on start with the sampled pass instead of a full level-0 histogram."""
_REACH = 2  # the level-1 window counts prefixes p - 2 .. p + 2 (csrc/merge_ops.cpp kReach)


class MagnitudeSelection:
    """Exact per-expert k-th largest |x_k - base| by a two-level radix select, composable over chunks.

    key = fp32 bits of |x_k - base|. Level 0 histograms the top 16 bits, level 1 the low 16 bits inside the
    chosen top-level bucket (prefix): this gives the exact threshold and how many of the elements equal to it
    belong to the top k. Only if that is fewer than all of them, a tie pass finds the index of the last tie
    to keep (chunks must then come in ascending ``element_offset`` order).

    Large tensors (``SAMPLE_MIN_NUMEL``, C++ and torch backends) skip the full level-0 pass: the prefix is
    guessed from a histogram of every ``SAMPLE_STRIDE``-th block of ``SAMPLE_BLOCK`` elements, and the level-1 pass also counts the
    elements above and around the guess (prefixes p ± 2). If those exact counts put the k-th key in another
    bucket of the window, one more level-1 pass takes that bucket; outside the window, a full level-0 pass
    follows. The result is exact either way. Usage::

        sel = MagnitudeSelection(numel, densities)
        while not sel.done:
            for offset, base_chunk, expert_chunks in chunks():
                sel.update(base_chunk, expert_chunks, element_offset=offset)
            sel.finish_pass()
        thresholds = sel.thresholds()
    """

    def __init__(self, numel: int, densities: Sequence[float]):
        self.numel = int(numel)
        self.keep_counts = [ref.magnitude_keep_count(self.numel, float(d)) for d in densities]
        k = len(self.keep_counts)
        if k == 0:
            raise ValueError("MagnitudeSelection: need at least one density")
        self._keys: list[int | None] = [None] * k
        self._cutoffs: list[int | None] = [None] * k
        self._phase = [_DONE] * k   # the pass each expert waits for
        self._prefix = [0] * k
        self._rank = [0] * k        # rank of the threshold inside the current bucket (1-based)
        self._guessed = [False] * k  # prefix guessed from the sample: the level-1 window must confirm it
        self._need = [0] * k        # ties still to find in the tie pass
        first = _SAMPLE if self.numel >= SAMPLE_MIN_NUMEL else _LEVEL0
        for e, keep in enumerate(self.keep_counts):
            if keep == self.numel:
                self._keys[e], self._cutoffs[e] = 0, KEEP_ALL_TIES
            elif keep == 0:
                self._keys[e], self._cutoffs[e] = KEEP_NONE_KEY, 0
            else:
                self._phase[e], self._rank[e] = first, keep
        # numpy allocation: torch.zeros of these 1.5 MB costs milliseconds per call on a busy machine
        self._hist = torch.from_numpy(np.zeros((k, _BINS), dtype=np.int64))
        self._window = torch.from_numpy(np.zeros((k, 2 * _REACH + 2), dtype=np.int64))
        self._sampled = 0      # elements seen by the sampled pass
        self._sample_exact = False  # the sampled pass ran as a full level-0 pass (Triton)
        self._seen = 0
        self._next_offset = 0

    @property
    def stage(self) -> int:
        """The next pass: -1 sampled, 0 level-0, 1 level-1, 2 ties, 3 done."""
        return min(self._phase)

    @property
    def done(self) -> bool:
        return self.stage == _DONE

    def update(self, base: torch.Tensor, tensors: Sequence[torch.Tensor], *, element_offset: int = 0,
               backend: str | None = None) -> None:
        """Feed one chunk (same rows of base and every expert) to the current pass."""
        op = "MagnitudeSelection.update"
        _check_tensors(op, tensors, base)
        if len(tensors) != len(self.keep_counts):
            raise ValueError(f"{op}: got {len(tensors)} tensors for {len(self.keep_counts)} densities")
        if self.done:
            raise RuntimeError(f"{op}: the selection is already complete")
        n = base.numel()
        if element_offset < 0 or element_offset + n > self.numel:
            raise ValueError(f"{op}: chunk [{element_offset}, {element_offset + n}) is outside [0, {self.numel})")
        self._seen += n
        if n == 0:
            return
        chosen = choose_backend(base, backend)
        b = _flat(base)
        flat = [_flat(t) for t in tensors]
        stage = self.stage
        active = [phase == stage for phase in self._phase]
        if stage == _SAMPLE and chosen != "triton":
            if chosen == "cpp":
                self._sampled += cpp_extension().magnitude_histogram(
                    b.data_ptr(), _ptrs(flat), dtype_code(base), n, 0, [0 if a else _SKIP_PREFIX for a in active],
                    self._hist.data_ptr(), 0, SAMPLE_STRIDE)
                return
            whole = n - n % SAMPLE_BLOCK  # every SAMPLE_STRIDE-th block of this chunk: 1/16 of its memory
            sample_b = b[:whole].view(-1, SAMPLE_BLOCK)[::SAMPLE_STRIDE].float()
            self._sampled += sample_b.numel()
            for e, x in enumerate(flat):
                if active[e] and whole:  # top halves of the keys (magnitude_keys_reference) of the sample
                    top = x[:whole].view(-1, SAMPLE_BLOCK)[::SAMPLE_STRIDE].float() - sample_b  # never in place
                    top = top.view(torch.int32).bitwise_right_shift_(16).bitwise_and_(0x7FFF)
                    self._hist[e] += torch.bincount(top.view(-1), minlength=_BINS).cpu()
            return
        if stage in (_SAMPLE, _LEVEL0, _LEVEL1):
            # Triton has no window counts: its "sampled" pass is a full level-0 pass
            self._sample_exact = stage == _SAMPLE
            level = 1 if stage == _LEVEL1 else 0
            prefixes = [(self._prefix[e] if level else 0) if active[e] else _SKIP_PREFIX for e in range(len(flat))]
            window = level == 1 and any(g for g, a in zip(self._guessed, active) if a)
            if chosen == "cpp":
                cpp_extension().magnitude_histogram(b.data_ptr(), _ptrs(flat), dtype_code(base), n, level, prefixes,
                                                    self._hist.data_ptr(), self._window.data_ptr() if window else 0)
            elif chosen == "triton":  # no window counts: a guessed prefix then falls back to the full pass
                _triton_module("ties").magnitude_histogram_triton(
                    b, flat, level, [-1 if p == _SKIP_PREFIX else p for p in prefixes], self._hist)
            else:
                for e, x in enumerate(flat):
                    if prefixes[e] == _SKIP_PREFIX:
                        continue
                    keys = ref.magnitude_keys_reference(b, x)
                    hi = keys >> 16
                    if level == 0:
                        bins = hi
                    else:
                        bins = keys[hi == prefixes[e]] & 0xFFFF
                        if window:
                            top = prefixes[e] + _REACH
                            self._window[e, 0] += int((hi > top).sum())
                            for d in range(2 * _REACH + 1):
                                self._window[e, 1 + d] += int((hi == top - d).sum())
                    self._hist[e] += torch.bincount(bins.cpu(), minlength=_BINS)
            return
        # tie pass: locate the need-th tie, chunks in order
        if element_offset != self._next_offset:
            raise ValueError(f"{op}: the tie pass needs chunks in order; expected element_offset "
                             f"{self._next_offset}, got {element_offset}")
        self._next_offset = element_offset + n
        keys = [int(k) if k is not None else 0 for k in self._keys]
        need = [self._need[e] if active[e] else 0 for e in range(len(keys))]
        if chosen == "cpp":
            counts, local = cpp_extension().magnitude_tie_cutoffs(b.data_ptr(), _ptrs(flat), dtype_code(base), n,
                                                                  keys, need)
        elif chosen == "triton":
            counts, local = _triton_module("ties").magnitude_tie_cutoffs_triton(b, flat, keys, need)
        else:
            counts, local = [], []
            for e, x in enumerate(flat):
                eq = ref.magnitude_keys_reference(b, x) == keys[e]
                counts.append(int(eq.sum()) if need[e] > 0 else 0)
                local.append(int(torch.nonzero(eq)[need[e] - 1, 0]) + 1
                             if need[e] > 0 and counts[-1] >= need[e] else -1)
        for e in range(len(keys)):
            if need[e] <= 0 or self._cutoffs[e] is not None:
                continue
            if local[e] >= 0:
                self._cutoffs[e] = element_offset + int(local[e])
            else:
                self._need[e] -= int(counts[e])

    def finish_pass(self) -> None:
        """Resolve the pass once every chunk has been fed to ``update``."""
        if self.done:
            raise RuntimeError("MagnitudeSelection.finish_pass: the selection is already complete")
        if self._seen != self.numel:
            raise ValueError(f"MagnitudeSelection.finish_pass: this pass saw {self._seen} of {self.numel} elements")
        self._seen = 0
        stage = self.stage
        active = [e for e, phase in enumerate(self._phase) if phase == stage]
        if stage == _TIES:
            if any(self._cutoffs[e] is None for e in active):
                raise RuntimeError("MagnitudeSelection.finish_pass: tie pass ended without finding every cutoff")
            for e in active:
                self._phase[e] = _DONE
            return
        hists = self._hist.numpy()  # numpy: single-threaded, no thread-pool wake-ups for 64K bins
        windows = self._window.numpy()
        for e in active:
            if stage == _SAMPLE and not self._sample_exact and self._sampled == 0:  # chunks under one block
                self._phase[e] = _LEVEL0
            elif stage == _SAMPLE and not self._sample_exact:
                # the bucket holding the k-th largest sampled key, at the sample's rank
                rank = min(max(1, round(self.keep_counts[e] * self._sampled / self.numel)), max(1, self._sampled))
                self._prefix[e] = self._bucket_at(hists[e], rank)[0]
                self._guessed[e], self._phase[e] = True, _LEVEL1
            elif stage in (_SAMPLE, _LEVEL0):
                self._prefix[e], self._rank[e] = self._bucket_at(hists[e], self._rank[e])
                self._phase[e] = _LEVEL1
            elif not self._guessed[e] or self._confirm(e, windows[e]):
                self._resolve_low(e, hists[e])
        hists.fill(0)
        windows.fill(0)
        self._sampled = 0
        if self.stage == _TIES:
            self._next_offset = 0

    @staticmethod
    def _bucket_at(hist: np.ndarray, rank: int) -> tuple[int, int]:
        """(bin, rank inside it) of the rank-th largest element counted in ``hist``."""
        from_top = np.cumsum(hist[::-1])               # count of elements in bins >= 65535 - j
        j = int(np.searchsorted(from_top, rank))
        bin_ = _BINS - 1 - min(j, _BINS - 1)
        return bin_, rank - (int(from_top[j]) - int(hist[bin_]) if j < _BINS else 0)

    def _confirm(self, e: int, window: np.ndarray) -> bool:
        """After a level-1 pass on a guessed prefix, from the exact window counts: True if the k-th key is in
        that bucket; else the expert goes on to a level-1 pass on the right bucket of the window, or to the
        full level-0 pass if it lies outside."""
        self._guessed[e] = False
        above = int(window[0])
        for d in range(2 * _REACH + 1 if above < self.keep_counts[e] else 0):
            count = int(window[1 + d])
            if above + count >= self.keep_counts[e]:
                self._rank[e] = self.keep_counts[e] - above
                prefix, self._prefix[e] = self._prefix[e], self._prefix[e] + _REACH - d
                return prefix == self._prefix[e]
            above += count
        self._phase[e], self._rank[e] = _LEVEL0, self.keep_counts[e]
        return False

    def _resolve_low(self, e: int, hist: np.ndarray) -> None:
        """After a level-1 pass on the right bucket: the exact key and how many of its ties to keep."""
        bin_, rank = self._bucket_at(hist, self._rank[e])
        self._keys[e] = (self._prefix[e] << 16) | bin_
        if rank == int(hist[bin_]):
            self._cutoffs[e], self._phase[e] = KEEP_ALL_TIES, _DONE
        else:
            self._need[e], self._phase[e] = rank, _TIES

    def thresholds(self) -> MagnitudeThresholds:
        if not self.done:
            raise RuntimeError("MagnitudeSelection.thresholds: passes are not complete")
        return MagnitudeThresholds(tuple(int(k) for k in self._keys), tuple(int(c) for c in self._cutoffs))


def magnitude_thresholds(base: torch.Tensor, tensors: Sequence[torch.Tensor], densities, *,
                         backend: str | None = None) -> MagnitudeThresholds:
    """Whole-tensor top-k magnitude thresholds of x_k - base (see :class:`MagnitudeSelection`)."""
    op = "magnitude_thresholds"
    _check_tensors(op, tensors, base)
    sel = MagnitudeSelection(base.numel(), _per_expert(op, "densities", densities, len(tensors)))
    while not sel.done:
        sel.update(base, tensors, backend=backend)
        sel.finish_pass()
    return sel.thresholds()


ONE_PASS_MIN_NUMEL = 1 << 20
"""From this size on, whole-tensor TIES on the C++ backend selects in its merge pass: a sample guesses each
expert's k-th magnitude and a band around it, the pass records the band, and only the elements the guess got
wrong are merged again (csrc/merge_ops.cpp, ties_one_pass_impl). If the k-th element falls outside the band,
the exact :class:`MagnitudeSelection` runs and the merge is repeated; the result is the same either way."""


def _fixed_thresholds(numel: int, densities: Sequence[float]) -> MagnitudeThresholds:
    """The rule of experts that keep everything or nothing (placeholders for the others)."""
    keys, cutoffs = [], []
    for d in densities:
        keep = ref.magnitude_keep_count(numel, d)
        keys.append(KEEP_NONE_KEY if keep == 0 else 0)
        cutoffs.append(KEEP_ALL_TIES if keep == numel else 0)
    return MagnitudeThresholds(tuple(keys), tuple(cutoffs))


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *, density,
         lambda_: float = 1.0, normalize: bool = True, consensus: bool = True,
         thresholds: MagnitudeThresholds | None = None, element_offset: int = 0,
         out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
         backend: str | None = None, check_finite: bool = False) -> torch.Tensor:
    """TIES (mergekit ``ties``): magnitude top-k per expert, sign election ("sum"), disjoint mean.

    ``density``: float or one per expert. ``thresholds``: from :func:`magnitude_thresholds` or a
    :class:`MagnitudeSelection` over the whole tensor; required when ``element_offset`` != 0
    (a chunk), computed here otherwise. ``check_finite``: raise NonFiniteError if base or an expert
    holds NaN/Inf (the sign election can drop one from the output); the C++ pass counts them as it merges.
    """
    op = "ties"
    _check_tensors(op, tensors, base)
    densities = _per_expert(op, "density", density, len(tensors))
    if thresholds is None:
        if element_offset != 0:
            raise ValueError(f"{op}: a chunk (element_offset={element_offset}) needs whole-tensor thresholds")
        if choose_backend(base, backend) == "cpp" and base.numel() >= ONE_PASS_MIN_NUMEL:
            merged = _gta(op, base, tensors, weights, sparsify=_SPARSIFY_MAGNITUDE, consensus=consensus,
                          normalize=normalize, lambda_=lambda_, element_offset=0, out_dtype=out_dtype, out=out,
                          backend="cpp", thresholds=_fixed_thresholds(base.numel(), densities),
                          keep_counts=[ref.magnitude_keep_count(base.numel(), d) for d in densities],
                          check_finite=check_finite)
            if merged is not None:
                return merged
        thresholds = magnitude_thresholds(base, tensors, densities, backend=backend)
    elif len(thresholds.keys) != len(tensors):
        raise ValueError(f"{op}: thresholds has {len(thresholds.keys)} experts for {len(tensors)} tensors")
    masks = None
    if choose_backend(base, backend) == "torch":
        masks = [ref.magnitude_mask_reference(base, x, key, cut, element_offset)
                 for x, key, cut in zip(tensors, thresholds.keys, thresholds.cutoffs)]
    return _gta(op, base, tensors, weights, sparsify=_SPARSIFY_MAGNITUDE, consensus=consensus, normalize=normalize,
                lambda_=lambda_, element_offset=element_offset, out_dtype=out_dtype, out=out, backend=backend,
                thresholds=thresholds, keep_masks=masks, check_finite=check_finite)


# ------------------------------------------------------------------ DARE
def _dare_stream(op, seed, tensor_index, densities):
    if not 0 <= int(tensor_index) < (1 << 63):
        raise ValueError(f"{op}: tensor_index must be a non-negative int64, got {tensor_index}")
    keys = [ref.dare_stream_key(int(seed), int(tensor_index), e) for e in range(len(densities))]
    return keys, [ref.dare_keep_below(d) for d in densities]


class DareL1Rescale:
    """mergekit's DARE rescale (``rescale: true``): factor_k = sum|tau_k| / sum|kept tau_k| over the tensor.

    Accumulates the two L1 sums over chunks (any order); ``factors()`` gives 1 where mergekit leaves
    the tensor unscaled (density >= 1, or a sum below 1e-7).
    """

    def __init__(self, densities: Sequence[float], *, seed: int, tensor_index: int):
        self.densities = [float(d) for d in densities]
        self._keys, self._below = _dare_stream("DareL1Rescale", seed, tensor_index, self.densities)
        self.sums = torch.zeros((len(self.densities), 2), dtype=torch.float64)

    def update(self, base: torch.Tensor, tensors: Sequence[torch.Tensor], *, element_offset: int = 0,
               backend: str | None = None) -> None:
        op = "DareL1Rescale.update"
        _check_tensors(op, tensors, base)
        if len(tensors) != len(self.densities):
            raise ValueError(f"{op}: got {len(tensors)} tensors for {len(self.densities)} densities")
        n = base.numel()
        if n == 0:
            return
        chosen = choose_backend(base, backend)
        b = _flat(base)
        flat = [_flat(t) for t in tensors]
        if chosen == "cpp":
            cpp_extension().dare_l1_sums(b.data_ptr(), _ptrs(flat), dtype_code(base), n, int(element_offset),
                                         self._keys, self._below, self.sums.data_ptr())
        elif chosen == "triton":
            self.sums += _triton_module("dare").dare_l1_sums_triton(b, flat, self._keys, self._below,
                                                                    int(element_offset))
        else:
            for e, x in enumerate(flat):
                tau = (x.float() - b.float()).abs().double()
                keep = ref.dare_uniform_reference(self._keys[e], n, element_offset) < self._below[e]
                self.sums[e, 0] += tau.sum().cpu()
                self.sums[e, 1] += (tau * keep.to(tau.device)).sum().cpu()

    def factors(self) -> list[float]:
        out = []
        for d, (before, after) in zip(self.densities, self.sums.tolist()):
            out.append(1.0 if d >= 1 or before < 1e-7 or after < 1e-7 else before / after)
        return out


def dare_keep_mask(numel: int, density: float, *, seed: int, tensor_index: int, expert_index: int,
                   element_offset: int = 0, backend: str | None = None) -> torch.Tensor:
    """Bool mask of DARE survivors for one expert's elements offset..offset+numel-1 (CPU)."""
    probe = torch.empty(0)
    chosen = choose_backend(probe, backend)
    key = ref.dare_stream_key(seed, tensor_index, expert_index)
    below = ref.dare_keep_below(density)
    if chosen == "cpp":
        u = torch.empty(numel, dtype=torch.int64)
        cpp_extension().dare_uniform(key, int(element_offset), int(numel), u.data_ptr())
    elif chosen == "triton":
        u = _triton_module("dare").dare_uniform_triton(key, int(numel), int(element_offset), probe.device)
    else:
        u = ref.dare_uniform_reference(key, numel, element_offset)
    return u < below


def dare(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *, density,
         seed: int, tensor_index: int, lambda_: float = 1.0, normalize: bool = False, consensus: bool = False,
         rescale="inverse_density", element_offset: int = 0, out_dtype: torch.dtype | None = None,
         out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """DARE drop-and-rescale (mergekit ``dare_linear``; ``consensus=True``: ``dare_ties``).

    Element i of tau_k survives iff uniform32(seed, tensor_index, k, i) < round(density_k · 2^32),
    so P(keep) = density_k (to 2^-33) on every backend and for every chunking (``element_offset``).
    ``rescale``: "inverse_density" (the DARE paper: survivors · 1/density_k), "l1" (mergekit's
    ``rescale: true``: sum|tau_k| / sum|kept tau_k| over the tensors given, so only for whole tensors;
    for chunks pass ``DareL1Rescale(...).factors()``), a list of per-expert factors, or None.
    """
    op = "dare"
    _check_tensors(op, tensors, base)
    densities = _per_expert(op, "density", density, len(tensors))
    keys, below = _dare_stream(op, seed, tensor_index, densities)
    if rescale is None:
        factors = [1.0] * len(tensors)
    elif isinstance(rescale, str):
        if rescale == "inverse_density":
            factors = [1.0 / d if 0 < d < 1 else 1.0 for d in densities]
        elif rescale == "l1":
            l1 = DareL1Rescale(densities, seed=seed, tensor_index=tensor_index)
            l1.update(base, tensors, element_offset=element_offset, backend=backend)
            factors = l1.factors()
        else:
            raise ValueError(f"{op}: rescale must be 'inverse_density', 'l1', None or a list of factors, "
                             f"got {rescale!r}")
    else:
        factors = _per_expert(op, "rescale", rescale, len(tensors))
    masks = None
    if choose_backend(base, backend) == "torch":
        masks = [ref.dare_uniform_reference(k, base.numel(), element_offset).to(base.device) < kb
                 for k, kb in zip(keys, below)]
    return _gta(op, base, tensors, weights, sparsify=_SPARSIFY_RANDOM, consensus=consensus, normalize=normalize,
                lambda_=lambda_, element_offset=element_offset, out_dtype=out_dtype, out=out, backend=backend,
                rng_keys=keys, keep_below=below, rescale=factors, keep_masks=masks)
