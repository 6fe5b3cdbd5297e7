"""Merge configs: the YAML mergekit users already write, validated with errors that name the key.

Schema (a superset of mergekit's ``models:`` form)::

    merge_method: ties
    base_model: path/to/base            # or anchor: for merge_method alignmerge
    models:
      - model: path/to/expert           # "path+lora_path" selects a PEFT LoRA adapter on a base
        parameters: {weight: 0.5, density: [0.2, 0.8]}
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32                      # dtype the inputs are cast to before merging (mergekit semantics)
    out_dtype: bfloat16                 # dtype of the written tensors (default: dtype, else the base's)
    tokenizer_source: base              # base | <model path> (tokenizer files copied from there)

A parameter value is a scalar, a gradient (list of numbers interpolated over the layer depth
t = layer / (num_layers - 1)), or a list of ``{filter: substring, value: ...}`` conditions, the first
match winning (mergekit semantics). Per-model settings override the method-wide ``parameters``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from alignmerge.errors import ConfigError

TOP_LEVEL_KEYS = {
    "merge_method", "base_model", "anchor", "models", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name", "alignment_data",
}
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass
class ModelSpec:
    """One input model: a directory (and optionally a LoRA adapter on it) with its parameters."""

    path: str
    lora: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.path}+{self.lora}" if self.lora else self.path


@dataclass
class MergeConfig:
    merge_method: str
    models: list[ModelSpec]
    base_model: ModelSpec | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    tokenizer_source: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def _model_ref(value: Any, where: str) -> tuple[str, str | None]:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a model path string, got {value!r}")
    path, _, lora = value.partition("+")
    return path, (lora or None)


def _dtype(value: Any, key: str) -> torch.dtype | None:
    if value is None:
        return None
    try:
        return DTYPES[str(value).lower()]
    except KeyError:
        raise ConfigError(f"{key}: unknown dtype {value!r}; use one of float32, bfloat16, float16") from None


def _check_setting(value: Any, where: str) -> None:
    """A parameter setting: scalar, list of scalars (gradient) or list of {filter, value} conditions."""
    scalar = (bool, int, float, str)
    if isinstance(value, scalar) or value is None:
        return
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if all(isinstance(v, scalar) for v in value):
            return
        for i, cond in enumerate(value):
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise ConfigError(f"{where}[{i}]: expected {{filter: ..., value: ...}}, got {cond!r}")
            _check_setting(cond["value"], f"{where}[{i}].value")
        return
    raise ConfigError(f"{where}: unsupported parameter value {value!r}")


def load_config(source: str | Path | dict) -> MergeConfig:
    """Parse and validate a merge config from a YAML file path or an already-loaded dict."""
    where = "config"
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        where = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
        if raw is None:
            raise ConfigError(f"{path}: config is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: config must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(TOP_LEVEL_KEYS))})")
    if "slices" in raw:
        raise ConfigError(f"{where}: slices: layer slicing is not supported; use models:")
    method = raw.get("merge_method")
    if not isinstance(method, str):
        raise ConfigError(f"{where}: merge_method: required, a method name")
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError(f"{where}: models: required, a non-empty list of {{model: path, parameters: ...}}")
    models = []
    for i, entry in enumerate(models_raw):
        key = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{where}: {key}: expected {{model: path, parameters: ...}}, got {entry!r}")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise ConfigError(f"{where}: {key}: unknown key {extra[0]!r}")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: {key}.parameters: expected a mapping")
        for name, value in params.items():
            _check_setting(value, f"{where}: {key}.parameters.{name}")
        path, lora = _model_ref(entry["model"], f"{where}: {key}.model")
        models.append(ModelSpec(path, lora, dict(params)))
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: parameters: expected a mapping")
    for name, value in params.items():
        _check_setting(value, f"{where}: parameters.{name}")
    base = None
    base_key = "anchor" if "anchor" in raw else "base_model"
    if raw.get(base_key) is not None:
        path, lora = _model_ref(raw[base_key], f"{where}: {base_key}")
        base = ModelSpec(path, lora)
    tokenizer_source = raw.get("tokenizer_source")
    if tokenizer_source is not None and not isinstance(tokenizer_source, str):
        raise ConfigError(f"{where}: tokenizer_source: expected 'base' or a model path")
    config = MergeConfig(
        merge_method=method,
        models=models,
        base_model=base,
        parameters=dict(params),
        dtype=_dtype(raw.get("dtype"), f"{where}: dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), f"{where}: out_dtype"),
        tokenizer_source=tokenizer_source,
        raw=raw,
    )
    _validate_against_method(config, where)
    return config


def _validate_against_method(config: MergeConfig, where: str) -> None:
    from alignmerge.methods import REQUIRED, get_method

    try:
        method = get_method(config.merge_method)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    known_model = set(method.model_parameters)
    known_method = set(method.method_parameters)
    for i, spec in enumerate(config.models):
        for name in spec.parameters:
            if name not in known_model:
                raise ConfigError(
                    f"{where}: models[{i}].parameters.{name}: unknown parameter for {method.name} "
                    f"(per-model parameters: {', '.join(sorted(known_model)) or 'none'})"
                )
    for name in config.parameters:
        if name not in known_model | known_method:
            raise ConfigError(
                f"{where}: parameters.{name}: unknown parameter for {method.name} "
                f"(known: {', '.join(sorted(known_model | known_method)) or 'none'})"
            )
    if method.needs_base and config.base_model is None:
        raise ConfigError(f"{where}: base_model: required by merge_method {method.name}")
    for name, default in method.model_parameters.items():
        if default is REQUIRED and name not in config.parameters:
            for i, spec in enumerate(config.models):
                if name not in spec.parameters and not _is_base(spec, config):
                    raise ConfigError(f"{where}: models[{i}].parameters.{name}: required by {method.name}")
    for name, default in method.method_parameters.items():
        if default is REQUIRED and name not in config.parameters:
            raise ConfigError(f"{where}: parameters.{name}: required by {method.name}")


def _is_base(spec: ModelSpec, config: MergeConfig) -> bool:
    return config.base_model is not None and spec.label == config.base_model.label


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """Resolve one parameter setting for ``tensor_name`` at layer depth ``t`` in [0, 1].

    Numeric lists interpolate linearly over t; non-numeric lists pick by t; condition lists
    take the first ``{filter, value}`` whose filter is absent, "*", or a substring of the name.
    Returns None if no condition matches.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(e, dict) for e in setting):
        numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        pos = t * (len(setting) - 1)
        i0 = int(pos)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = pos - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or f in tensor_name:
            return evaluate_setting(cond["value"], tensor_name, t)
    return None


def resolve_parameters(names: dict[str, Any], scopes: list[dict[str, Any]], tensor_name: str, t: float,
                       where: str) -> dict[str, Any]:
    """Resolve each parameter in ``names`` (name -> default) from the first scope that sets it."""
    from alignmerge.methods import REQUIRED

    out = {}
    for name, default in names.items():
        value = None
        for scope in scopes:
            if name in scope:
                value = evaluate_setting(scope[name], tensor_name, t)
                if value is not None:
                    break
        if value is None:
            if default is REQUIRED:
                raise ConfigError(f"{where}: parameter {name!r} is required for tensor {tensor_name!r}")
            value = default
        out[name] = value
    return out
