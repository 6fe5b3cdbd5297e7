"""mergekit plugin: alignmerge's merge methods as mergekit ``merge_method:`` names.

``register()`` adds every method of ``alignmerge.methods.METHODS`` that mergekit lacks (today
fisher and regmean; alignmerge, safemerge, mergealign once they exist) to mergekit's method
registry, so a mergekit YAML can say ``merge_method: fisher``. It is idempotent, and methods that
mergekit already has (linear, ties, ...) keep mergekit's own implementation. Run a YAML through
mergekit with them registered with ``alignmerge mergekit-yaml CONFIG OUT [mergekit options]``, or
from Python::

    import alignmerge.mergekit_plugin
    alignmerge.mergekit_plugin.register()
    # then mergekit.merge.run_merge(...) as usual

How one of our methods is seen by mergekit (``MergekitAdapter``):

- per-model parameters (``MergeMethod.model_parameters``) become per-input parameters (only the
  non-base inputs when the method needs a base), method parameters become shared parameters, with
  our defaults (a REQUIRED default is a required mergekit parameter);
- the base / anchor is the group entry flagged ``is_base`` (mergekit's ``base_model:``); methods
  without a base merge every input, so, as with mergekit's ``linear``, a ``base_model:`` that is
  set is merged as one more input;
- the tensor name comes from the group's metadata;
- per-model statistics (``fisher: file.safetensors``, ``gram: file.safetensors``) are string
  parameters naming files written by ``alignmerge fisher``; each file is checked once against its
  model's names and shapes, then read lazily, one tensor at a time, with our safetensors reader.
  Statistics computed on the fly from ``data:`` are not possible inside mergekit: that fails with
  a message asking for the files, or for ``alignmerge merge``.

Differences from ``alignmerge merge``: inputs are merged whole (no row chunks), the result is
returned in mergekit's input dtype (mergekit then casts it to ``out_dtype``; with ``dtype:
bfloat16`` and ``out_dtype: float32`` that is one bf16 rounding more), and counter-based
randomness sees seed 0 and tensor index 0.

Importing this module imports mergekit; ``import alignmerge`` never does.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import torch
from mergekit.merge_methods import registry as mergekit_registry
from mergekit.merge_methods.base import (
    MISSING,
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from alignmerge.config import MergeConfig, ModelSpec
from alignmerge.errors import CheckpointError, ConfigError
from alignmerge.io.checkpoint import Checkpoint
from alignmerge.methods import METHODS, REQUIRED, MergeMethod, TensorInputs

DATA_PARAMETER = "data"
"""Per-model parameter of our data-aware methods from which ``alignmerge merge`` computes statistics."""


def _value_type(default: Any) -> Any:
    """pydantic type for a parameter from its default: bool, int, float kept; anything else as given."""
    if isinstance(default, bool):
        return bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return Any


def _parameter(name: str, default: Any, scope: ParameterScope) -> ParameterSpec:
    return ParameterSpec(name=name, value_type=_value_type(default), scope=scope,
                         default=MISSING if default is REQUIRED else default)


def method_spec(method_cls: type[MergeMethod]) -> MergeMethodSpec:
    """The mergekit spec of one of our methods (parameters, defaults and base contract)."""
    if method_cls.needs_base:
        contract = InputContract(base=BasePolicy.REQUIRED, min_non_base=1)
        model_scope = ParameterScope.NON_BASE
    else:
        contract = InputContract(base=BasePolicy.IGNORED, min_inputs=1)
        model_scope = ParameterScope.INPUT
    parameters = [_parameter(n, d, model_scope) for n, d in method_cls.model_parameters.items()]
    parameters += [_parameter(n, d, ParameterScope.SHARED) for n, d in method_cls.method_parameters.items()
                   if n not in method_cls.model_parameters]
    doc = (method_cls.__doc__ or getattr(sys.modules.get(method_cls.__module__), "__doc__", None) or "").strip()
    pretty = doc.splitlines()[0].rstrip(".") if doc else method_cls.name
    return MergeMethodSpec(name=method_cls.name, parameters=tuple(parameters), contract=contract,
                           pretty_name=f"{pretty} (alignmerge)")


class StatisticFiles:
    """Per-tensor reads from statistic files (safetensors), each opened and validated once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Path, Checkpoint] = {}
        self._validated: set[tuple[Path, str, str]] = set()

    def read(self, path: str | Path, kind: str, tensor_name: str, model_dir: str | None) -> torch.Tensor | None:
        """Tensor ``tensor_name`` of the ``kind`` file at ``path`` (None if the file has no such tensor).

        With ``model_dir`` (a local model directory), the file's names and shapes are first checked
        against that model, as ``alignmerge merge`` does before it starts.
        """
        from alignmerge.fisher.stats import validate_stats_file

        path = Path(path).expanduser().resolve()
        with self._lock:
            key = (path, kind, str(model_dir))
            if model_dir is not None and key not in self._validated:
                validate_stats_file(path, model_dir, kind)
                self._validated.add(key)
            ck = self._open.get(path)
            if ck is None:
                if not path.is_file():
                    raise CheckpointError(f"{path}: {kind} file not found")
                ck = Checkpoint.from_file(path)
                self._open[path] = ck
        if tensor_name not in ck:
            return None
        return ck.read(tensor_name)


STAT_FILES = StatisticFiles()


def _local_model_dir(model_id: Any) -> str | None:
    """The local directory of a mergekit ModelReference without LoRA, else None (no file check then)."""
    model = getattr(model_id, "model", None)
    path = getattr(model, "path", None)
    if getattr(model_id, "lora", None) is not None or not isinstance(path, str) or not Path(path).is_dir():
        return None
    return path


class MergekitAdapter(GroupMergeMethod):
    """One of our per-tensor ``MergeMethod`` classes behind mergekit's group-method interface."""

    def __init__(self, method_cls: type[MergeMethod]):
        self.method_cls = method_cls
        self.method = method_cls()
        self.spec = method_spec(method_cls)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        cls = self.method_cls
        name = group.metadata.name or "<unnamed tensor>"
        entries = group.non_base if cls.needs_base else group.entries
        base = group.base.tensor if cls.needs_base else None
        model_params = [{p: parameters[p][entry.id] for p in cls.model_parameters} for entry in entries]
        method_params = {p: parameters[p] for p in cls.method_parameters if p not in cls.model_parameters}
        stats = {kind: self._statistics(kind, name, entries, model_params, method_params) for kind in cls.stats}
        self._check_runs_per_tensor(entries, model_params, method_params)
        inputs = TensorInputs(name=name, models=[entry.tensor for entry in entries], params=model_params,
                              method_params=method_params, base=base, stats=stats)
        out_dtype = entries[0].tensor.dtype
        return self.method.merge(inputs, out_dtype=out_dtype)

    def _check_runs_per_tensor(self, entries, model_params: list[dict], method_params: dict) -> None:
        """Methods with a ``prepared(config)`` test (e.g. alignmerge's data passes and AQI loop) must pass it."""
        prepared = getattr(self.method_cls, "prepared", None)
        if prepared is None:
            return
        given = MergeConfig(
            merge_method=self.method_cls.name,
            models=[ModelSpec(str(entry.id), None, {k: v for k, v in params.items() if v is not None})
                    for entry, params in zip(entries, model_params)],
            parameters={k: v for k, v in method_params.items() if v is not None},
        )
        if not prepared(given):
            raise ConfigError(
                f"merge_method {self.method_cls.name}: this config needs work that mergekit cannot run (statistics "
                f"computed from data, or an evaluation loop around the merge); give every statistics file and turn "
                f"such loops off{_prepared_hint(self.method_cls.name)}, or run this config with `alignmerge merge`"
            )

    def _statistics(self, kind: str, tensor_name: str, entries, model_params: list[dict],
                    method_params: dict) -> list[torch.Tensor | None]:
        cls = self.method_cls
        if kind not in cls.model_parameters:
            raise ConfigError(
                f"merge_method {cls.name}: its {kind!r} statistics cannot be passed through mergekit "
                f"(no per-model parameter {kind!r}); run this config with `alignmerge merge`"
            )
        found = []
        for entry, params in zip(entries, model_params):
            path = params.get(kind)
            if path is None:
                how = (f"it has {DATA_PARAMETER}: {params[DATA_PARAMETER]!r}, but mergekit cannot compute "
                       f"statistics from data" if params.get(DATA_PARAMETER) is not None else "none is given")
                if entry.is_base:
                    how += ("; it is the base_model:, which mergekit merges as one more input for methods "
                            "without a base: drop base_model: or give its file too")
                raise ConfigError(
                    f"merge_method {cls.name}: model {entry.id} needs a {kind} file ({how}); give "
                    f"`{kind}: <file.safetensors>` per model{_writer_hint(kind)}, or run this config with "
                    f"`alignmerge merge`"
                )
            if not isinstance(path, (str, Path)):
                raise ConfigError(f"merge_method {cls.name}: model {entry.id}: {kind}: expected a file path, "
                                  f"got {path!r}")
            found.append(STAT_FILES.read(path, kind, tensor_name, _local_model_dir(entry.id)))
        return found


def _prepared_hint(method: str) -> str:
    return {"alignmerge": " (alignmerge: use_aqi_loop: false, fisher: <file> per model, subspace: <file> unless "
                          "use_projector: false, align_fisher: <file> if use_align_fisher: true or anchor_weight > 0 "
                          "(the default))"}.get(method, "")


def _writer_hint(kind: str) -> str:
    """Where the user gets a ``kind`` file from."""
    return {"fisher": " (write it with `alignmerge fisher MODEL --data ... --out FILE`)",
            "gram": " (write it with alignmerge.fisher.regmean.compute_gram)"}.get(kind, "")


def adapt(method_cls: type[MergeMethod]) -> MergekitAdapter:
    """A mergekit ``MergeMethod`` running our method ``method_cls`` (not registered)."""
    return MergekitAdapter(method_cls)


def register(names: list[str] | None = None) -> list[str]:
    """Register our methods that mergekit lacks with mergekit's registry; return their names.

    ``names`` limits the methods (default: all of ``METHODS``). Idempotent: a name we registered
    before is kept, a name mergekit implements itself is left to mergekit.
    """
    wanted = sorted(METHODS) if names is None else list(names)
    ours = []
    for name in wanted:
        if name not in METHODS:
            raise ConfigError(f"unknown alignmerge method {name!r}; known: {', '.join(sorted(METHODS))}")
        try:
            existing = mergekit_registry.get(name)
        except RuntimeError:
            existing = None
        if existing is None:
            mergekit_registry.register(adapt(METHODS[name]))
            ours.append(name)
        elif isinstance(existing, MergekitAdapter):
            ours.append(name)
    return ours


def registered() -> list[str]:
    """Names of our methods currently in mergekit's registry."""
    return sorted(m.spec.name for m in mergekit_registry.registered_methods() if isinstance(m, MergekitAdapter))
