"""Per-model statistic files for data-aware merge methods: find, validate, or compute them.

``prepare_model_stats(config, work_dir, kind)`` returns one safetensors path per model of the
config for ``kind`` ("fisher" or "gram"). A model's file comes from its parameter ``fisher:`` /
``gram:`` (per model, or global under ``parameters:``); otherwise it is computed from the
parameter ``data:`` (a JSONL path or ``builtin:<name>``; per model or global) and cached in
``work_dir`` under a name hashing (model, data, options), so a re-run reuses it. Every file is
validated against the model's tensor names and shapes before any merge starts.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from alignmerge.data import STATS_SAMPLES
from alignmerge.errors import CheckpointError, ConfigError
from alignmerge.io.checkpoint import Checkpoint
from alignmerge.io.safetensors_file import read_header

if TYPE_CHECKING:
    import torch

STAT_KINDS = ("fisher", "gram")
MEANS_BLOCK_BYTES = 64 << 20
# method parameters steering the computation of missing files, with defaults
COMPUTE_OPTIONS = {"fisher_kind": "empirical", "samples": STATS_SAMPLES, "max_length": 256, "batch_size": 8,
                   "stats_device": "cpu", "seed": 0}


def _param(config, spec, key, default=None):
    if key in spec.parameters:
        return spec.parameters[key]
    return config.parameters.get(key, default)


def validate_stats_file(path: str | Path, model_dir: str | Path, kind: str) -> None:
    """Raise CheckpointError unless the file's names/shapes fit the model (before any compute).

    fisher: exactly the model's tensors with the same shapes (tied aliases may be absent);
    gram: names of 2-D weights [out, in] holding [in, in] matrices.
    """
    from alignmerge.io.checkpoint import Checkpoint

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {kind} file not found")
    entries, _ = read_header(path)
    model = Checkpoint(model_dir)
    for name, entry in entries.items():
        if name not in model:
            raise CheckpointError(f"{path}: {kind} tensor {name!r} is not a tensor of model {model_dir}")
        shape = tuple(model.shape(name))
        want = shape if kind == "fisher" else ((shape[1], shape[1]) if len(shape) == 2 else None)
        if want is None or tuple(entry.shape) != want:
            raise CheckpointError(f"{path}: {kind} tensor {name!r} has shape {tuple(entry.shape)}, expected "
                                  f"{want} for model {model_dir} (tensor shape {shape})")
    if kind == "fisher":
        missing = [n for n in model.names() if n not in entries]
        if missing:
            raise CheckpointError(f"{path}: fisher file lacks {len(missing)} tensor(s) of model {model_dir}, "
                                  f"e.g. {missing[0]!r}")

def stats_given(config, kind: str) -> bool:
    """True if every model of ``config`` has a ``kind`` file parameter (nothing to compute)."""
    return all(_param(config, spec, kind) is not None for spec in config.models)


def prepare_model_stats(config, work_dir: str | Path, kind: str) -> list[Path]:
    """One validated statistics file per model of ``config.models`` (computing missing ones)."""
    if kind not in STAT_KINDS:
        raise ValueError(f"unknown statistic kind {kind!r}")
    work_dir = Path(work_dir)
    paths = []
    for i, spec in enumerate(config.models):
        given = _param(config, spec, kind)
        if given is not None:
            path = Path(given)
        else:
            data = _param(config, spec, "data")
            if data is None:
                raise ConfigError(f"models[{i}].parameters: {config.merge_method} needs {kind}: <file> or data: "
                                  f"<jsonl | builtin:name> for model {spec.label}")
            if spec.lora:
                raise ConfigError(f"models[{i}]: cannot compute {kind} for a LoRA adapter ({spec.label}); give "
                                  f"{kind}: <file>")
            options = {k: _param(config, spec, k, v) for k, v in COMPUTE_OPTIONS.items()}
            key = json.dumps({"model": str(Path(spec.path).resolve()), "data": str(data), "kind": kind, **options},
                             sort_keys=True)
            digest = hashlib.sha256(key.encode()).hexdigest()[:16]
            path = work_dir / f"{kind}-{Path(spec.path).name}-{digest}.safetensors"
            if not path.is_file():
                _compute(kind, spec.path, data, path, options)
        validate_stats_file(path, spec.path, kind)
        paths.append(path)
    return paths


def _compute(kind: str, model_dir, data, path: Path, options: dict) -> None:
    common = dict(samples=options["samples"], max_length=options["max_length"], batch_size=options["batch_size"],
                  device=options["stats_device"])
    if kind == "fisher":
        from alignmerge.fisher.compute import compute_fisher

        compute_fisher(model_dir, data, path, kind=options["fisher_kind"], seed=options["seed"], **common)
    else:
        from alignmerge.fisher.regmean import compute_gram

        compute_gram(model_dir, data, path, **common)


class StatsReader:
    """Per-tensor reads from statistics files (validated headers, cached per file), row-sliced for chunked
    merges. Reads are pread copies, not memory maps, so a pass over multi-GB Fisher files keeps a bounded RSS."""

    def __init__(self):
        self._files: dict[str, Checkpoint] = {}
        self._means: dict[str, tuple[dict[str, float], float]] = {}

    def _open(self, path) -> Checkpoint:
        key = str(path)
        if key not in self._files:
            if not Path(key).is_file():
                raise CheckpointError(f"{key}: statistics file not found")
            self._files[key] = Checkpoint.from_file(key)
        return self._files[key]

    def means(self, path) -> tuple[dict[str, float], float]:
        """({tensor: mean}, whole-file mean over every element) of a statistics file: one pass in row blocks
        of at most ``MEANS_BLOCK_BYTES`` (bounded memory for 128k-vocabulary embeddings), cached per file."""
        import torch

        key = str(path)
        if key not in self._means:
            stats = self._open(key)
            sums, counts = {}, {}
            for name in stats.names():
                shape = stats.shape(name)
                rows = shape[0] if shape else 1
                step = max(1, MEANS_BLOCK_BYTES // max(1, stats.nbytes(name) // max(rows, 1)))
                total = 0.0
                for start in range(0, rows, step):
                    block = stats.read(name, rows=(start, min(rows, start + step)) if shape else None)
                    total += float(block.to(torch.float64).sum())
                sums[name], counts[name] = total, math.prod(shape)
            whole = sum(sums.values()) / max(1, sum(counts.values()))
            self._means[key] = ({n: sums[n] / counts[n] if counts[n] else 0.0 for n in sums}, whole)
        return self._means[key]

    def get(self, path, name: str, like: "torch.Tensor", element_offset: int = 0, *, rows: bool = False):
        """Tensor ``name`` of file ``path`` as fp32 (None if the file has no such tensor). With
        ``rows`` (statistics shaped like the tensor, e.g. a Fisher) it is cut to the row block
        ``like`` covers: the executor merges big tensors in row chunks from flat index
        ``element_offset``."""
        import torch

        stats = self._open(path)
        if name not in stats:
            return None
        shape = stats.shape(name)
        if rows and like.dim() >= 1 and len(shape) == like.dim() and shape[1:] == tuple(like.shape[1:]) \
                and shape[0] > like.shape[0]:
            start = element_offset // max(1, like[0].numel())
            return stats.read(name, rows=(start, start + like.shape[0])).to(torch.float32)
        return stats.read(name).to(torch.float32)
