"""AlignMerge: merge fine-tuned LLM checkpoints around an aligned anchor, fast and memory-bounded.

Python API (imported lazily, so ``import alignmerge`` stays cheap)::

    alignmerge.merge(config_or_path, out_dir, **options)      # a whole merge, like `alignmerge merge`
    alignmerge.compute_fisher(model_dir, data, out=None, ...)  # diagonal Fisher, like `alignmerge fisher`
    alignmerge.compute_subspace(anchor_dir, data, rank, ...)   # alignment subspace U, V per weight
    alignmerge.evaluate(model_dir, ...)                        # AQI, refusal, over-refusal, skill, perplexity
    alignmerge.ops.ties(...), .fisher_merge(...), .project(...), .fisher_accumulate(...)  # tensor-level ops
"""
from __future__ import annotations

import importlib

__version__ = "0.2.0"

_LAZY = {
    "merge": ("alignmerge.api", "merge"),
    "load_config": ("alignmerge.config", "load_config"),
    "compute_fisher": ("alignmerge.fisher", "compute_fisher"),
    "compute_subspace": ("alignmerge.subspace", "compute_subspace"),
    "evaluate": ("alignmerge.eval", "evaluate"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name == "ops":
        return importlib.import_module("alignmerge.ops")
    raise AttributeError(f"module 'alignmerge' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
