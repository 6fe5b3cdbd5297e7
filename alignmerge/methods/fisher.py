"""Fisher merging (Matena & Raffel, 2022, arXiv 2111.09832).

theta = Σ_k w_k F̃_k θ_k / Σ_k w_k F̃_k, elementwise, with F̃_k = max(c_k F_k, ε): the diagonal
Fisher of model k floored at ``epsilon`` (so that where every Fisher vanishes the merge falls
back to the w-weighted average), and c_k = 1 / mean(F_k) over the tensor when
``normalize_fisher: true`` (per-model normalisation: each model's Fisher on the same scale),
else c_k = 1. Fisher files: per-model parameter ``fisher: <file.safetensors>`` (from
``alignmerge fisher``), or computed from ``data: <jsonl | builtin:name>`` by ``prepare_stats``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from alignmerge.errors import ConfigError
from alignmerge.methods import MergeMethod, TensorInputs, register


def _stat(inputs: TensorInputs, kind: str, k: int) -> torch.Tensor:
    stats = inputs.stats.get(kind)
    if stats is None or k >= len(stats) or stats[k] is None:
        raise ConfigError(f"{kind}: no statistic for model {k} and tensor {inputs.name!r}")
    return stats[k]


@register
class FisherMerge(MergeMethod):
    name = "fisher"
    model_parameters = {"weight": 1.0, "fisher": None, "data": None}
    method_parameters = {"epsilon": 1e-6, "normalize_fisher": False, "fisher_kind": "empirical", "samples": 64,
                         "max_length": 256, "batch_size": 8, "stats_device": "cpu", "seed": 0}
    stats = ("fisher",)
    elementwise = True

    @classmethod
    def prepare_stats(cls, config, work_dir: str | Path) -> dict[str, list[Path]]:
        """Per-model Fisher files: given by ``fisher:``, else computed from ``data:`` into ``work_dir``."""
        from alignmerge.fisher.stats import prepare_model_stats

        return {"fisher": prepare_model_stats(config, work_dir, "fisher")}

    @classmethod
    def prepared(cls, config) -> bool:
        """True when every model names its fisher file, so no data pass is needed (e.g. under mergekit)."""
        from alignmerge.fisher.stats import stats_given

        return stats_given(config, "fisher")

    def prepass(self, inputs: TensorInputs):
        """Whole-tensor (sum, count) of each model's Fisher, for ``normalize_fisher`` on chunks."""
        sums = [(float(_stat(inputs, "fisher", k).double().sum()), _stat(inputs, "fisher", k).numel())
                for k in range(len(inputs.models))]
        if inputs.state is None:
            return sums
        return [(s0 + s1, c0 + c1) for (s0, c0), (s1, c1) in zip(inputs.state, sums)]

    def merge(self, inputs: TensorInputs, *, out_dtype, out=None, backend=None):
        eps = float(inputs.method_params["epsilon"])
        if eps <= 0:
            raise ConfigError(f"fisher: epsilon must be > 0 (got {eps}) for tensor {inputs.name!r}")
        normalize = bool(inputs.method_params["normalize_fisher"])
        totals = inputs.state if inputs.state is not None else (self.prepass(inputs) if normalize else None)
        num = torch.zeros(inputs.models[0].shape, dtype=torch.float32, device=inputs.models[0].device)
        den = torch.zeros_like(num)
        for k, theta in enumerate(inputs.models):
            weight = float(inputs.params[k]["weight"])
            fisher = _stat(inputs, "fisher", k).to(num.device, torch.float32)
            if fisher.shape != num.shape:
                raise ConfigError(f"fisher: statistic of model {k} for {inputs.name!r} has shape "
                                  f"{tuple(fisher.shape)}, the tensor {tuple(num.shape)}")
            if normalize:
                total, count = totals[k]
                mean = total / max(count, 1)
                fisher = fisher / mean if mean > 0 else fisher
            f = fisher.clamp_min(eps).mul_(weight)
            num.addcmul_(f, theta.to(torch.float32))
            den.add_(f)
        merged = num.div_(den)
        if out is not None:
            out.copy_(merged)
            return out
        return merged.to(out_dtype)
