"""Torch reference implementations of the hot ops: the test oracles and last-resort fallbacks."""
from __future__ import annotations

import torch


# --- fisher ---
def fisher_accumulate_reference(out: torch.Tensor, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """out[o,i] += sum_n (sum_t g[n,t,o] a[n,t,i])^2: materialise every per-sample gradient
    G_n = g_n^T a_n in fp32, square, sum over n (the oracle for alignmerge.ops.fisher)."""
    per_sample = torch.einsum("nto,nti->noi", g.float(), a.float())
    out.add_(per_sample.square().sum(0))
    return out
