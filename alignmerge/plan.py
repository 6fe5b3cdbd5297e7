"""Planning: a validated config and its checkpoints become a list of per-tensor merge tasks.

Preflight runs here, before any heavy compute: every input opens and validates, every planned
tensor exists in every model with one shape, vocabularies agree, and all problems are reported at once.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from alignmerge.config import MergeConfig, ModelSpec, resolve_parameters
from alignmerge.errors import AlignMergeError, CheckpointError
from alignmerge.io.checkpoint import Checkpoint
from alignmerge.methods import MergeMethod, get_method

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class TensorTask:
    """One output tensor: what to merge, with which resolved parameters, in which row chunks."""

    index: int
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    params: list[dict]
    method_params: dict
    chunks: list[tuple[int, int]] = field(default_factory=list)
    copy_from_reference: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.out_dtype.itemsize


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    models: list[Checkpoint]
    base: Checkpoint | None
    reference: Checkpoint
    tasks: list[TensorTask]

    @property
    def inputs(self) -> list[Checkpoint]:
        return self.models + ([self.base] if self.base is not None else [])

    def input_bytes(self) -> int:
        return sum(ck.nbytes(t.name) for t in self.tasks for ck in self.inputs if t.name in ck)

    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)


def open_model(spec: ModelSpec, *, allow_pickle: bool = False) -> Checkpoint:
    """Open one input model (a directory, or a LoRA adapter merged lazily onto one)."""
    if spec.lora:
        from alignmerge.io.lora import LoraCheckpoint

        return LoraCheckpoint(spec.path, spec.lora, allow_pickle=allow_pickle)
    return Checkpoint(spec.path, allow_pickle=allow_pickle)


def layer_position(name: str, num_layers: int) -> float:
    """t in [0, 1] for gradient parameters: layer / (num_layers - 1); 0 outside the layer stack."""
    m = LAYER_RE.search(name)
    if m is None or num_layers <= 1:
        return 0.0
    return min(1.0, int(m.group(1)) / (num_layers - 1))


def build_plan(config: MergeConfig, *, allow_pickle: bool = False, max_chunk_bytes: int = 512 * 2**20,
               memory_budget: int | None = None, method: MergeMethod | None = None) -> MergePlan:
    """Open every input, run the preflight checks and return the per-tensor tasks.

    Chunkable tensors are split so that one chunk's inputs, output and the method's working memory stay
    under ``max_chunk_bytes``; a tensor the method cannot chunk whose merge needs more than
    ``memory_budget`` is refused here, before any compute, naming the tensor."""
    method = method or get_method(config.merge_method)()
    problems: list[str] = []

    def opened(spec: ModelSpec) -> Checkpoint | None:
        try:
            return open_model(spec, allow_pickle=allow_pickle)
        except AlignMergeError as exc:
            problems.append(str(exc))
            return None

    base_label = config.base_model.label if config.base_model else None
    expert_specs = [s for s in config.models if not (method.needs_base and s.label == base_label)]
    if not expert_specs:
        raise AlignMergeError(f"models: {config.merge_method} needs at least one model besides the base model")
    models = [opened(s) for s in expert_specs]
    base = opened(config.base_model) if (config.base_model and method.needs_base) else None
    if problems:
        raise AlignMergeError("; ".join(problems))
    reference = base if base is not None else models[0]
    names = [n for n in reference.names()]
    others = [(spec.label, ck) for spec, ck in zip(expert_specs, models) if ck is not reference]
    for label, ck in others:
        missing = [n for n in names if n not in ck]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            problems.append(f"{label}: tensor {missing[0]!r} is missing{more}")
            continue
        for n in names:
            if ck.shape(n) != reference.shape(n):
                hint = ""
                if "embed" in n or "lm_head" in n:
                    hint = " (vocabulary sizes differ; merge models that share a tokenizer)"
                problems.append(f"{label}: tensor {n!r} has shape {list(ck.shape(n))}, "
                                f"{reference.path} has {list(reference.shape(n))}{hint}")
    vocab_sizes = {ck.config.get("vocab_size") for ck in [reference] + [c for _l, c in others]} - {None}
    if len(vocab_sizes) > 1:
        problems.append(f"config.json vocab_size differs between models: {sorted(vocab_sizes)}")
    if problems:
        raise AlignMergeError("; ".join(problems[:20]) + (f"; ... {len(problems) - 20} more" if len(problems) > 20 else ""))

    num_layers = int(reference.config.get("num_hidden_layers") or 0)
    if not num_layers:
        found = [int(m.group(1)) for n in names if (m := LAYER_RE.search(n))]
        num_layers = max(found) + 1 if found else 1
    model_scopes = [[spec.parameters, config.parameters] for spec in expert_specs]
    tasks = []
    for index, name in enumerate(names):
        dtype = reference.dtype(name)
        shape = reference.shape(name)
        if dtype not in FLOAT_DTYPES:
            tasks.append(TensorTask(index, name, shape, dtype, [], {}, [(0, shape[0] if shape else 1)], True))
            continue
        t = layer_position(name, num_layers)
        params = [resolve_parameters(method.model_parameters, scopes, name, t, f"models[{k}]")
                  for k, scopes in enumerate(model_scopes)]
        method_params = resolve_parameters(method.method_parameters, [config.parameters], name, t, "parameters")
        out_dtype = config.out_dtype or config.dtype or dtype
        task = TensorTask(index, name, shape, out_dtype, params, method_params)
        inputs = [reference] + [c for _l, c in others]
        footprint = [ck.nbytes(name) for ck in inputs] + [task.nbytes, method.working_bytes(math.prod(shape), len(inputs))]
        if method.chunkable(name, shape, method_params):
            task.chunks = row_chunks(shape, footprint, max_chunk_bytes)
        else:
            task.chunks = row_chunks(shape, footprint, None)
            if memory_budget is not None and sum(footprint) > memory_budget:
                problems.append(f"tensor {name!r} {list(shape)}: {method.name} merges it whole and needs about "
                                f"{sum(footprint) / 1e9:.2f} GB, over the memory budget of {memory_budget / 1e9:.2f} GB "
                                "(raise --max-memory)")
        tasks.append(task)
    if problems:
        raise AlignMergeError("; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else ""))
    return MergePlan(config, method, models, base, reference, tasks)


def row_chunks(shape: tuple[int, ...], tensor_bytes: list[int], max_chunk_bytes: int | None) -> list[tuple[int, int]]:
    """Split dim 0 so that one chunk of all inputs and the output stays under ``max_chunk_bytes``."""
    rows = shape[0] if shape else 1
    total = sum(tensor_bytes)
    if max_chunk_bytes is None or not shape or total <= max_chunk_bytes or rows <= 1:
        return [(0, rows)]
    step = max(1, max_chunk_bytes * rows // total)
    return [(s, min(rows, s + step)) for s in range(0, rows, step)]


def check_preflight_disk(plan: MergePlan, out_parent, needed: int) -> None:
    import shutil

    free = shutil.disk_usage(out_parent).free
    if needed > free:
        raise CheckpointError(
            f"{out_parent}: not enough free disk space for the output ({needed / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free)"
        )
