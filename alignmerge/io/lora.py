"""A PEFT LoRA adapter seen as a full checkpoint: W = W_base + s * B @ A, merged lazily per tensor.

s = alpha / r (or alpha / sqrt(r) with use_rslora), with r the rank of the module's A and alpha
``lora_alpha`` or the module's ``alpha_pattern`` entry (PEFT's pattern match). Linear layers store
``lora_A.weight`` (r x in) and ``lora_B.weight`` (out x r); embeddings store ``lora_embedding_A``
(r x vocab) and ``lora_embedding_B`` (dim x r), whose update is (B @ A)^T. Full tensors saved in the
adapter replace the base tensor before the update: ``modules_to_save`` copies (``<module>.weight``, or
``<module>.modules_to_save.default.weight`` in older PEFT) and the ``<module>.base_layer.weight`` that
PEFT saves for LoRA-adapted embeddings. Adapter tensors of any other kind are an error (never silently
ignored). Referenced in configs as ``base_path+adapter_path`` (mergekit syntax).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from alignmerge.errors import CheckpointError
from alignmerge.io.checkpoint import Checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LINEAR_A, LINEAR_B = ".lora_A.", ".lora_B."
EMBEDDING_A, EMBEDDING_B = ".lora_embedding_A", ".lora_embedding_B"
UNSUPPORTED_VARIANTS = {
    "use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D)", "lora_bias": "LoRA-bias",
    "use_qalora": "QA-LoRA", "kasa_config": "KaSA", "use_bdlora": "BD-LoRA", "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow", "alora_invocation_tokens": "activated LoRA (aLoRA, never merged)",
    "target_parameters": "parameter-targeted (target_parameters)", "layer_replication": "layer-replicating",
}
"""Adapter-config keys of LoRA variants whose update is not W + s·B·A on the base's own tensors."""


class LoraCheckpoint(Checkpoint):
    """The base model's tensors with the adapter's low-rank updates applied on read."""

    def __init__(self, base_path: str | Path, adapter_path: str | Path, *, allow_pickle: bool = False):
        super().__init__(base_path, allow_pickle=allow_pickle)
        self.adapter_path = Path(adapter_path)
        if not self.adapter_path.is_dir():
            raise CheckpointError(f"{self.adapter_path}: LoRA adapter directory does not exist")
        cfg_path = self.adapter_path / ADAPTER_CONFIG
        if not cfg_path.exists():
            raise CheckpointError(f"{self.adapter_path}: not a PEFT LoRA adapter (no {ADAPTER_CONFIG})")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{cfg_path}: unreadable adapter config ({exc})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{cfg_path}: adapter config is not a JSON object")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
        for key, what in UNSUPPORTED_VARIANTS.items():
            if cfg.get(key):
                raise CheckpointError(f"{cfg_path}: {what} adapters ({key}: {json.dumps(cfg[key])}) are not supported")
        self.rslora = bool(cfg.get("use_rslora"))
        self.alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))
        self.alpha_pattern = {str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()}
        weights = self.adapter_path / ADAPTER_WEIGHTS
        if not weights.exists():
            raise CheckpointError(f"{self.adapter_path}: {ADAPTER_WEIGHTS} is missing")
        self._adapter = Checkpoint.from_file(weights)
        self._pairs: dict[str, tuple[str, str, bool, float]] = {}
        self._replaced: dict[str, str] = {}
        partners: set[str] = set()
        for key in self._adapter.names():
            module = _strip_prefix(key)
            if LINEAR_A in module or EMBEDDING_A in module:
                embedding = EMBEDDING_A in module
                module_name = module.split(EMBEDDING_A if embedding else LINEAR_A)[0]
                target = module_name + ".weight"
                b_key = key.replace(EMBEDDING_A, EMBEDDING_B) if embedding else key.replace(LINEAR_A, LINEAR_B)
                if b_key not in self._adapter:
                    raise CheckpointError(f"{weights}: {key!r} has no matching {b_key!r}")
                if target not in self:
                    raise CheckpointError(f"{weights}: adapter targets {target!r}, which the base model lacks")
                self._check_pair(weights, key, b_key, target, embedding)
                self._pairs[target] = (key, b_key, embedding, self._scale(module_name, self._adapter.shape(key)[0]))
                partners.add(b_key)
            elif LINEAR_B in module or EMBEDDING_B in module:
                continue  # checked with its A below
            else:
                target = (module.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
                          .replace(".base_layer.", "."))
                if target not in self:
                    raise CheckpointError(f"{weights}: adapter tensor {key!r} is neither a LoRA factor nor a "
                                          f"tensor of the base model ({target!r} is missing there)")
                if self._adapter.shape(key) != self.shape(target):
                    raise CheckpointError(f"{weights}: {key!r} has shape {list(self._adapter.shape(key))}, the base "
                                          f"model's {target!r} {list(self.shape(target))}")
                self._replaced[target] = key
        orphans = [k for k in self._adapter.names()
                   if (LINEAR_B in _strip_prefix(k) or EMBEDDING_B in _strip_prefix(k)) and k not in partners]
        if orphans:
            raise CheckpointError(f"{weights}: {orphans[0]!r} has no matching LoRA A factor")

    def _scale(self, module_name: str, rank: int) -> float:
        """s = alpha / r (alpha / sqrt(r) with rsLoRA); alpha from ``alpha_pattern`` as PEFT matches it."""
        alpha = self.alpha
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module_name):
                alpha = value
                break
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def _check_pair(self, weights: Path, a_key: str, b_key: str, target: str, embedding: bool) -> None:
        a_shape, b_shape, w_shape = self._adapter.shape(a_key), self._adapter.shape(b_key), self.shape(target)
        if len(a_shape) != 2 or len(b_shape) != 2 or len(w_shape) != 2 or a_shape[0] != b_shape[1]:
            raise CheckpointError(f"{weights}: LoRA factors {a_key!r} {list(a_shape)} and {b_key!r} {list(b_shape)} "
                                  f"do not form a rank-r update")
        update = (a_shape[1], b_shape[0]) if embedding else (b_shape[0], a_shape[1])
        if tuple(update) != tuple(w_shape):
            raise CheckpointError(f"{weights}: LoRA update of {target!r} has shape {list(update)}, the base model's "
                                  f"tensor {list(w_shape)}")

    def map(self, name: str, *, rows: tuple[int, int] | None = None, check_finite: bool = False) -> torch.Tensor | None:
        """Tensors the adapter does not touch map from the base model; LoRA-merged ones are computed (None)."""
        if name in self._replaced or name in self._pairs:
            return None
        return super().map(name, rows=rows, check_finite=check_finite)

    def read(self, name: str, *, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None,
             check_finite: bool = False) -> torch.Tensor:
        if name not in self._replaced and name not in self._pairs:
            return super().read(name, rows=rows, out=out, check_finite=check_finite)
        if name in self._replaced:
            base = self._adapter.read(self._replaced[name], rows=rows).to(self.dtype(name))
        else:
            base = super().read(name, rows=rows)
        if name in self._pairs:
            a_key, b_key, embedding, scale = self._pairs[name]
            a = self._adapter.read(a_key).float()
            b = self._adapter.read(b_key).float()
            if embedding:  # weight (vocab x dim) += (B @ A)^T = A^T @ B^T
                update = (a.t() if rows is None else a.t()[rows[0]:rows[1]]) @ b.t()
            else:          # weight (out x in) += B @ A
                update = (b if rows is None else b[rows[0]:rows[1]]) @ a
            result = (base.float() + update * scale).to(base.dtype)
        else:
            result = base
        if check_finite:
            from alignmerge.ops import count_nonfinite

            self._raise_nonfinite(name, count_nonfinite(result), f"{self._adapter.path} (LoRA on {self.path})")
        if out is None:
            return result
        n = result.numel() * result.element_size()
        view = out[:n].view(result.dtype).view(result.shape)
        view.copy_(result)
        return view


def _strip_prefix(key: str) -> str:
    """'base_model.model.model.layers.0...' -> 'model.layers.0...' (PEFT's wrapper prefix)."""
    prefix = "base_model.model."
    return key[len(prefix):] if key.startswith(prefix) else key
