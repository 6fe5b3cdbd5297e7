"""The per-weight AlignMerge objective and its pieces (DESIGN.md "Math").

For δ = θ − θ_A (merged weight minus anchor), Δ_k = θ_k − θ_A, each Fisher normalised by its mean
over the tensor (F̂ = F / mean F, so terms weigh in comparable units):

    L(δ) = ‖δ − δ̄‖²_D + λ_align·( [P on] ‖P(δ)‖²_F + [F_align on] β‖δ‖²_{F̂_align} )
           + [budget on] λ_bud·max(0, ‖P(δ)‖² − B)²,

    D_raw = Σ_k λ_k F̂_k (+ λ_A F̂_A),   δ̄ = Σ_k λ_k F̂_k Δ_k / D_raw   (the Fisher merge, exact),
    D = max(D_raw, floor·mean D_raw) / mean D_raw   (floored, mean 1),   B = (ρ‖P(δ̄)‖_F)².

L_geo = Σ_k λ_k ‖δ − Δ_k‖²_{F̂_k} (+ λ_A ‖δ‖²_{F̂_A}) equals ‖δ − δ̄‖²_{D_raw} + const; the solver uses
the floored, mean-normalised metric D, whose minimiser is still δ̄ exactly. Stationarity:

    (D + μP + c·F̂_align) δ = D δ̄,   μ = λ_align[P on] + 2λ_bud max(0, ‖Pδ‖² − B),  c = λ_align β [F_align on].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from alignmerge.errors import ConfigError


def normalised_fisher(f: torch.Tensor, dtype: torch.dtype, device=None, mean: float | None = None) -> torch.Tensor:
    """F / mean(F) in ``dtype`` (zeros stay zeros: a Fisher that is 0 everywhere contributes nothing).
    ``mean``: the whole tensor's mean when ``f`` is a row block of it (default: the mean of ``f``)."""
    f = f.to(device=device if device is not None else f.device, dtype=dtype)
    mean = float(f.mean()) if mean is None else float(mean)
    return f / mean if mean > 0.0 else torch.zeros_like(f)


@dataclass
class WholeTensorMeans:
    """Means over a whole tensor of the Fishers of a row-chunked solve."""

    experts: list[float]
    """mean F_k per expert."""
    align: float | None = None
    """mean F_align (None without one)."""
    anchor: float | None = None
    """mean of the anchor's Fisher in L_geo (None without one)."""


@dataclass
class Problem:
    """The data of one weight's solve, in the compute dtype."""

    delta_bar: torch.Tensor
    """The Fisher merge δ̄ (unconstrained minimiser of L_geo)."""
    metric: torch.Tensor
    """D: Σλ_k F̂_k floored at ``fisher_floor``·mean and divided by its mean."""
    falign: torch.Tensor | None
    """F̂_align = F_align / mean(F_align), or None."""


def fisher_merge_problem(anchor: torch.Tensor, experts: list[torch.Tensor], fishers: list[torch.Tensor], *,
                         weights: list[float], anchor_fisher: torch.Tensor | None = None,
                         anchor_weight: float = 0.0, normalize_fishers: bool = True, fisher_floor: float = 0.1,
                         f_align: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                         means: "WholeTensorMeans | None" = None, name: str = "tensor") -> Problem:
    """δ̄ and the floored metric D from the anchor, experts, their Fishers and weights (see module doc).
    ``means``: the whole tensor's Fisher means when the inputs are one row block of it (chunked merges);
    then mean D_raw = Σ_k λ_k mean F̂_k (+ λ_A mean F̂_A) follows from them and the block's δ equals the
    whole solve's rows."""
    if len(experts) != len(fishers) or len(experts) != len(weights) or not experts:
        raise ConfigError(f"{name}: need one Fisher and one weight per expert "
                          f"(got {len(experts)} experts, {len(fishers)} Fishers, {len(weights)} weights)")
    for k, (t, f) in enumerate(zip(experts, fishers)):
        if t.shape != anchor.shape or f.shape != anchor.shape:
            raise ConfigError(f"{name}: expert {k} or its Fisher has shape {tuple(t.shape)}/{tuple(f.shape)}, "
                              f"the anchor {tuple(anchor.shape)}")
    if any(w < 0 for w in weights) or anchor_weight < 0 or sum(weights) + anchor_weight <= 0:
        raise ConfigError(f"{name}: expert weights must be >= 0 with a positive sum, got {weights}")
    base = anchor.to(dtype)

    def prep(f: torch.Tensor, mean: float | None) -> torch.Tensor:
        if normalize_fishers:
            return normalised_fisher(f, dtype, base.device, mean)
        return f.to(device=base.device, dtype=dtype)

    def prepped_mean(mean: float) -> float:
        """mean of prep(F) over the whole tensor, from mean F."""
        return (1.0 if mean > 0.0 else 0.0) if normalize_fishers else mean

    expert_means = means.experts if means is not None else [None] * len(experts)

    numerator = torch.zeros_like(base)
    plain = torch.zeros_like(base)
    d_raw = torch.zeros_like(base)
    for theta, fisher, lam, f_mean in zip(experts, fishers, weights, expert_means):
        task = theta.to(device=base.device, dtype=dtype) - base
        f = prep(fisher, f_mean)
        numerator.add_(lam * f * task)
        plain.add_(task, alpha=lam)
        d_raw.add_(f, alpha=lam)
    if anchor_fisher is not None and anchor_weight > 0:
        if anchor_fisher.shape != anchor.shape:
            raise ConfigError(f"{name}: anchor Fisher has shape {tuple(anchor_fisher.shape)}, "
                              f"the anchor {tuple(anchor.shape)}")
        d_raw.add_(prep(anchor_fisher, means.anchor if means is not None else None), alpha=anchor_weight)
    plain.div_(sum(weights) + (anchor_weight if anchor_fisher is not None else 0.0))
    positive = d_raw > 0
    delta_bar = torch.where(positive, numerator / torch.where(positive, d_raw, 1.0), plain)
    if means is None:
        mean = float(d_raw.mean())
    else:
        mean = sum(lam * prepped_mean(m) for lam, m in zip(weights, means.experts))
        if anchor_fisher is not None and anchor_weight > 0:
            mean += anchor_weight * prepped_mean(means.anchor)
    if mean > 0.0:
        metric = d_raw.clamp(min=fisher_floor * mean) / mean
    else:
        metric = torch.ones_like(d_raw)
    falign = None
    if f_align is not None:
        if f_align.shape != anchor.shape:
            raise ConfigError(f"{name}: alignment Fisher has shape {tuple(f_align.shape)}, "
                              f"the anchor {tuple(anchor.shape)}")
        falign = normalised_fisher(f_align, dtype, base.device, means.align if means is not None else None)
    return Problem(delta_bar=delta_bar, metric=metric, falign=falign)
