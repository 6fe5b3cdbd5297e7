"""RegMean (Jin et al., 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

For an nn.Linear weight W_k (out × in) with input Gram matrix G_k = mean_t a_t a_tᵀ (in × in):
    G̃_k = α G_k + (1 − α) diag(G_k)        (off-diagonal scaling, ``alpha``)
    W = (Σ_k w_k W_k G̃_k) (Σ_k w_k G̃_k)⁻¹   (per layer, solved in fp64 as a linear system)
which minimises Σ_k w_k ‖W A_kᵀ − W_k A_kᵀ‖² when α = 1. Tensors without a Gram matrix
(embeddings, norms, biases) get the w-weighted average. Gram files: per-model ``gram:
<file.safetensors>`` (read per tensor), or computed from ``data:`` by ``prepare_stats`` /
``run_merge`` (cached in ``<out>.alignmerge-cache``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from alignmerge.data import STATS_SAMPLES
from alignmerge.errors import ConfigError
from alignmerge.methods import MergeMethod, TensorInputs, merged_result, register


@register
class RegMean(MergeMethod):
    name = "regmean"
    model_parameters = {"weight": 1.0, "gram": None, "data": None}
    method_parameters = {"alpha": 0.9, "samples": STATS_SAMPLES, "max_length": 256, "batch_size": 8,
                         "stats_device": "cpu", "seed": 0}
    stats = ("gram",)
    elementwise = False

    def __init__(self):
        from alignmerge.fisher.stats import StatsReader

        self._files = StatsReader()

    @classmethod
    def run_merge(cls, config, out_dir, **options) -> dict:
        """Compute or find every model's Gram file, then merge (``alignmerge.api.merge`` options)."""
        from alignmerge.methods.fisher import run_with_stats

        return run_with_stats(cls, config, out_dir, **options)

    @classmethod
    def prepare_stats(cls, config, work_dir: str | Path) -> dict[str, list[Path]]:
        """Per-model Gram files: given by ``gram:``, else computed from ``data:`` into ``work_dir``."""
        from alignmerge.fisher.stats import prepare_model_stats

        return {"gram": prepare_model_stats(config, work_dir, "gram")}

    @classmethod
    def prepared(cls, config) -> bool:
        """True when every model names its gram file, so no data pass is needed (e.g. under mergekit)."""
        from alignmerge.fisher.stats import stats_given

        return stats_given(config, "gram")

    def merge(self, inputs: TensorInputs, *, out_dtype, out=None, backend=None):
        weights = [float(p["weight"]) for p in inputs.params]
        if sum(weights) <= 0:
            raise ConfigError(f"regmean: weights for tensor {inputs.name!r} must sum to > 0")
        from alignmerge.methods.fisher import model_stat

        grams = [model_stat(inputs, "gram", k, self._files) if inputs.models[k].dim() == 2 else None
                 for k in range(len(inputs.models))]
        present = [g is not None for g in grams]
        if any(present) and not all(present):
            raise ConfigError(f"regmean: only some models have a Gram matrix for {inputs.name!r}")
        if not all(present) or inputs.models[0].dim() != 2:
            merged = sum(w * t.to(torch.float64) for w, t in zip(weights, inputs.models)) / sum(weights)
        else:
            alpha = float(inputs.method_params["alpha"])
            if not 0.0 <= alpha <= 1.0:
                raise ConfigError(f"regmean: alpha must be in [0, 1] (got {alpha})")
            in_features = inputs.models[0].shape[1]
            lhs = torch.zeros((in_features, in_features), dtype=torch.float64)
            rhs = torch.zeros((in_features, inputs.models[0].shape[0]), dtype=torch.float64)
            for w, theta, gram in zip(weights, inputs.models, grams):
                g = gram.to("cpu", torch.float64)
                if g.shape != (in_features, in_features):
                    raise ConfigError(f"regmean: Gram matrix for {inputs.name!r} has shape {tuple(g.shape)}, "
                                      f"expected {(in_features, in_features)}")
                g = alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))
                lhs.add_(g, alpha=w)
                rhs.add_(g @ theta.to("cpu", torch.float64).t(), alpha=w)  # (W_k G̃_k)ᵀ = G̃_k W_kᵀ
            try:
                merged = torch.linalg.solve(lhs, rhs).t()  # W = rhsᵀ lhs⁻¹ (lhs symmetric)
            except torch.linalg.LinAlgError:
                merged = (torch.linalg.pinv(lhs, hermitian=True) @ rhs).t()
            merged = merged.to(inputs.models[0].device)
        return merged_result(merged, out, out_dtype)
