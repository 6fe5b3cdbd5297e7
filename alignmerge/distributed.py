"""torch.distributed under torchrun (no home-made transport): gloo on CPU, NCCL on CUDA.

A merge splits its shards across ranks; the Fisher and subspace passes split the data and
all-reduce their sums. Outside torchrun (WORLD_SIZE unset or 1) everything is a single process.
"""
from __future__ import annotations

import atexit
import os

import torch


def distributed_context(device="cpu") -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed from torchrun's environment when needed.

    gloo on CPU, NCCL on CUDA. A single process returns (0, 1).
    """
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
        # tear the group down before interpreter exit (a gloo group left alive can abort the process)
        atexit.register(_destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_ranks_ok(ok: bool, world: int) -> bool:
    if world == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def all_reduce_sum(tensors) -> None:
    """Sum each tensor over the ranks, in place."""
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous block [lo, hi) of n items that ``rank`` handles."""
    return rank * n // world, (rank + 1) * n // world
