"""Fisher merging (Matena & Raffel, 2022, arXiv 2111.09832).

theta = Σ_k w_k F̃_k θ_k / Σ_k w_k F̃_k, elementwise, with F̃_k = max(c_k F_k, ε): the diagonal
Fisher of model k floored at ``epsilon`` (so that where every Fisher vanishes the merge falls
back to the w-weighted average), and c_k = 1 / mean(F_k) over the tensor when
``normalize_fisher: true`` (per-model normalisation: each model's Fisher on the same scale),
else c_k = 1. Fisher files: per-model parameter ``fisher: <file.safetensors>`` (from
``alignmerge fisher``; read per tensor), or computed from ``data: <jsonl | builtin:name>`` by
``prepare_stats`` / ``run_merge`` (cached in ``<out>.alignmerge-cache``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from alignmerge import ops
from alignmerge.data import STATS_SAMPLES
from alignmerge.errors import ConfigError
from alignmerge.methods import MergeMethod, TensorInputs, register


def model_stat(inputs: TensorInputs, kind: str, k: int, reader=None, *, rows: bool = False) -> torch.Tensor | None:
    """Model k's statistic of ``kind`` for this tensor: ``inputs.stats[kind][k]`` when the
    executor passes it, else read from the file named by model k's parameter ``kind`` (``rows``:
    the statistic is shaped like the tensor and is cut to the chunk being merged)."""
    stats = inputs.stats.get(kind)
    if stats is not None and k < len(stats) and stats[k] is not None:
        return stats[k]
    path = inputs.params[k].get(kind)
    if path is None or reader is None:
        return None
    return reader.get(path, inputs.name, inputs.models[k], inputs.element_offset, rows=rows)


def expert_fisher(inputs: TensorInputs, k: int, reader, method: str) -> torch.Tensor:
    """Model k's Fisher for this tensor (cut to the chunk being merged); a clear error when there is none."""
    f = model_stat(inputs, "fisher", k, reader, rows=True)
    if f is None:
        raise ConfigError(f"{method}: no Fisher for model {k} and tensor {inputs.name!r} (give fisher: <file> per "
                          "model, or data: <source> and merge through the method's run_merge)")
    return f.to(inputs.models[k].device)


def run_with_stats(method_cls, config, out_dir, *, progress: bool = False, **options) -> dict:
    """``prepare_stats`` (files given, or computed from ``data:`` into ``<out>.alignmerge-cache``),
    then ``alignmerge.api.merge`` with every model's statistics file filled in (a progress bar only when
    asked, as the other methods' ``run_merge``)."""
    import json

    from alignmerge.api import merge
    from alignmerge.config import load_config

    if not hasattr(config, "merge_method"):
        config = load_config(config)
    out = Path(out_dir)
    cache = out.parent / f"{out.name}.alignmerge-cache"
    files = method_cls.prepare_stats(config, cache)
    raw = json.loads(json.dumps(config.raw, default=str))
    models = []
    for k, spec in enumerate(raw["models"]):
        spec = dict(spec) if isinstance(spec, dict) else {"model": spec}
        params = {key: v for key, v in (spec.get("parameters") or {}).items() if key != "data"}
        for kind, paths in files.items():
            params[kind] = str(paths[k])
        spec["parameters"] = params
        models.append(spec)
    raw["models"] = models
    raw["parameters"] = {key: v for key, v in (raw.get("parameters") or {}).items() if key != "data"}
    result = merge(load_config(raw), out, progress=progress, **options)
    return {"method": method_cls.name, "result": result, "files": {k: [str(p) for p in v] for k, v in files.items()}}


class FisherTotals:
    """(sum, count) of each model's Fisher over a whole tensor, fed chunk by chunk (one pass)."""

    def __init__(self, fisher_of, n_models: int):
        self.fisher_of = fisher_of  # (inputs, k) -> model k's Fisher of this chunk
        self.sums = [(0.0, 0)] * n_models
        self.done = False

    def update(self, inputs: TensorInputs) -> None:
        chunks = [self.fisher_of(inputs, k) for k in range(len(self.sums))]
        self.sums = [(s + float(f.double().sum()), c + f.numel()) for f, (s, c) in zip(chunks, self.sums)]

    def finish_pass(self) -> None:
        self.done = True


@register
class FisherMerge(MergeMethod):
    name = "fisher"
    model_parameters = {"weight": 1.0, "fisher": None, "data": None}
    method_parameters = {"epsilon": 1e-6, "normalize_fisher": False, "fisher_kind": "empirical",
                         "samples": STATS_SAMPLES, "max_length": 256, "batch_size": 8, "stats_device": "cpu",
                         "seed": 0}
    stats = ("fisher",)
    elementwise = True

    def __init__(self):
        from alignmerge.fisher.stats import StatsReader

        self._files = StatsReader()

    def _fisher(self, inputs: TensorInputs, k: int) -> torch.Tensor:
        return expert_fisher(inputs, k, self._files, self.name)

    @classmethod
    def run_merge(cls, config, out_dir, **options) -> dict:
        """Compute or find every model's Fisher file, then merge (``alignmerge.api.merge`` options)."""
        return run_with_stats(cls, config, out_dir, **options)

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

    def chunk_statistic(self, inputs: TensorInputs, numel: int) -> "FisherTotals | None":
        """Whole-tensor Fisher sums per model, needed by ``normalize_fisher`` when merging in chunks."""
        return FisherTotals(self._fisher, len(inputs.models)) if inputs.method_params["normalize_fisher"] else None

    def merge(self, inputs: TensorInputs, *, out_dtype, out=None, backend=None):
        eps = float(inputs.method_params["epsilon"])
        if eps <= 0:
            raise ConfigError(f"fisher: epsilon must be > 0 (got {eps}) for tensor {inputs.name!r}")
        normalize = bool(inputs.method_params["normalize_fisher"])
        totals = None
        if normalize:
            totals = inputs.state if inputs.state is not None else FisherTotals(self._fisher, len(inputs.models))
            if inputs.state is None:
                totals.update(inputs)
            totals = totals.sums
        fishers, scales = [], []
        for k in range(len(inputs.models)):
            fisher = self._fisher(inputs, k)
            if fisher.shape != inputs.models[k].shape:
                raise ConfigError(f"fisher: statistic of model {k} for {inputs.name!r} has shape "
                                  f"{tuple(fisher.shape)}, the tensor {tuple(inputs.models[k].shape)}")
            mean = totals[k][0] / max(totals[k][1], 1) if normalize else 0.0
            fishers.append(fisher)
            scales.append(1.0 / mean if mean > 0 else 1.0)
        return ops.fisher_merge(inputs.models, fishers, [float(p["weight"]) for p in inputs.params], epsilon=eps,
                                scales=scales, out_dtype=out_dtype, out=out)
