"""MergeAlign: data-aware (Fisher) merging whose calibration data mixes alignment data into the task data.

"Model Merging and Safety Alignment: One Bad Model Spoils the Bunch" (Hammoud et al., 2024, arXiv
2406.14563): build synthetic safety data and put it into the data that a data-aware merge uses to weigh
parameters. Here the data-aware merge is Fisher merging (Matena & Raffel):

    D_k = (1 − f)·N records of model k's task data (``data:``) + f·N records of ``alignment_data``
    F_k = (1/N) Σ_{n ∈ D_k} (∇ log p_k(y_n | x_n))²                                   (per sequence)
    θ = Σ_k w_k F̃_k θ_k / Σ_k w_k F̃_k,  F̃_k = max(c_k F_k, ε)                        (elementwise)

with f = ``alignment_fraction`` (default 0.5), N = ``samples``, and c_k = 1/mean(F_k) when
``normalize_fisher`` (as in ``fisher``). Parameters the alignment data makes important in a model get
that model's weights, so the aligned anchor (one of ``models``) keeps its safety-critical parameters.
``run_merge`` writes the mixed JSONL and the Fisher files into ``<out>.alignmerge-cache/`` (reused on
a re-run), then merges; with ``fisher:`` files given per model it merges them directly.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from alignmerge.errors import ConfigError
from alignmerge.methods import register
from alignmerge.methods.fisher import FisherMerge


def mixed_records(task_data, alignment_data, samples: int, fraction: float) -> list[dict]:
    """(1 − f)·N task records interleaved with f·N alignment records (first records of each source)."""
    from alignmerge.data import load_records

    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"mergealign: alignment_fraction must be in [0, 1] (got {fraction})")
    n_align = int(round(samples * fraction)) if task_data is not None else samples
    n_task = samples - n_align
    task = load_records(task_data, max_samples=n_task) if n_task > 0 else []
    align = load_records(alignment_data, max_samples=n_align) if n_align > 0 else []
    out, i, j = [], 0, 0
    while i < len(task) or j < len(align):  # interleave so that any prefix keeps the mixture
        if j < len(align) and (i >= len(task) or j * max(len(task), 1) <= i * max(len(align), 1)):
            out.append(align[j])
            j += 1
        else:
            out.append(task[i])
            i += 1
    return out


@register
class MergeAlign(FisherMerge):
    __doc__ = __doc__
    name = "mergealign"
    method_parameters = {**FisherMerge.method_parameters, "alignment_data": None, "alignment_fraction": 0.5}

    @classmethod
    def prepared(cls, config) -> bool:
        return all("fisher" in s.parameters or "fisher" in config.parameters for s in config.models)

    @classmethod
    def prepare_stats(cls, config, work_dir) -> dict[str, list[Path]]:
        """Per-model Fisher on the task data mixed with the alignment data (computed and cached in work_dir)."""
        from alignmerge.fisher.compute import compute_fisher
        from alignmerge.fisher.stats import validate_stats_file
        from alignmerge.methods.alignmerge import alignment_source

        params = {**cls.method_parameters, **config.parameters}
        align = alignment_source(config)
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, spec in enumerate(config.models):
            given = spec.parameters.get("fisher", config.parameters.get("fisher"))
            if given is not None:
                path = Path(given)
            else:
                if align is None:
                    raise ConfigError("mergealign: needs alignment_data (or fisher: <file> per model)")
                task = spec.parameters.get("data", config.parameters.get("data"))
                samples, fraction = int(params["samples"]), float(params["alignment_fraction"])
                key = hashlib.sha256(json.dumps(
                    {"model": str(Path(spec.path).resolve()), "task": task, "align": align, "samples": samples,
                     "fraction": fraction, **{k: params[k] for k in ("fisher_kind", "max_length", "seed")}},
                    sort_keys=True).encode()).hexdigest()[:16]
                path = work_dir / f"mergealign-fisher-{Path(spec.path).name}-{key}.safetensors"
                if not path.is_file():
                    records = mixed_records(task, align, samples, fraction)
                    compute_fisher(spec.path, records, path, kind=params["fisher_kind"], samples=None,
                                   max_length=int(params["max_length"]), batch_size=int(params["batch_size"]),
                                   device=params["stats_device"], seed=int(params["seed"]))
            validate_stats_file(path, spec.path, "fisher")
            paths.append(path)
        return {"fisher": paths}

    @classmethod
    def run_merge(cls, config, out_dir, *, progress: bool = False, **options) -> dict:
        """Fisher files on the mixed data (cached beside the output), then the Fisher merge."""
        from alignmerge.api import merge
        from alignmerge.config import load_config
        from alignmerge.methods.alignmerge import cache_dir

        if not hasattr(config, "merge_method"):
            config = load_config(config)
        out = Path(out_dir)
        paths = cls.prepare_stats(config, cache_dir(out))["fisher"]
        raw = json.loads(json.dumps(config.raw, default=str))
        raw.pop("alignment_data", None)
        raw["parameters"] = {k: v for k, v in (raw.get("parameters") or {}).items() if k != "alignment_data"}
        models = []
        for spec, path in zip(raw["models"], paths):
            spec = dict(spec) if isinstance(spec, dict) else {"model": spec}
            spec["parameters"] = {k: v for k, v in (spec.get("parameters") or {}).items() if k != "data"}
            spec["parameters"]["fisher"] = str(path)
            models.append(spec)
        raw["models"] = models
        merge(load_config(raw), out, progress=False, **options)
        return {"method": cls.name, "files": {"fisher": [str(p) for p in paths]}}
