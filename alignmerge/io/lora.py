"""A PEFT LoRA adapter seen as a full checkpoint: W = W_base + s * B @ A, merged lazily per tensor.

s = lora_alpha / r (or lora_alpha / sqrt(r) with use_rslora). Linear layers store
``lora_A.weight`` (r x in) and ``lora_B.weight`` (out x r); embeddings store ``lora_embedding_A``
(r x vocab) and ``lora_embedding_B`` (dim x r), whose update is (B @ A)^T. ``modules_to_save``
tensors replace the base tensor. Referenced in configs as ``base_path+adapter_path`` (mergekit syntax).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from alignmerge.errors import CheckpointError
from alignmerge.io.checkpoint import Checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoraCheckpoint(Checkpoint):
    """The base model's tensors with the adapter's low-rank updates applied on read."""

    def __init__(self, base_path: str | Path, adapter_path: str | Path, *, allow_pickle: bool = False):
        super().__init__(base_path, allow_pickle=allow_pickle)
        self.adapter_path = Path(adapter_path)
        cfg_path = self.adapter_path / ADAPTER_CONFIG
        if not cfg_path.exists():
            raise CheckpointError(f"{self.adapter_path}: not a PEFT LoRA adapter (no {ADAPTER_CONFIG})")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{cfg_path}: unreadable adapter config ({exc})") from None
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{cfg_path}: DoRA adapters are not supported")
        if cfg.get("fan_in_fan_out"):
            raise CheckpointError(f"{cfg_path}: fan_in_fan_out adapters (Conv1D) are not supported")
        r = int(cfg.get("r", 8))
        alpha = float(cfg.get("lora_alpha", r))
        self.scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        weights = self.adapter_path / ADAPTER_WEIGHTS
        if not weights.exists():
            raise CheckpointError(f"{self.adapter_path}: {ADAPTER_WEIGHTS} is missing")
        self._adapter = Checkpoint.from_file(weights)
        self._pairs: dict[str, tuple[str, str, bool]] = {}
        self._replaced: dict[str, str] = {}
        for key in self._adapter.names():
            module = _strip_prefix(key)
            if ".lora_A." in module or ".lora_embedding_A" in module:
                embedding = ".lora_embedding_A" in module
                target = module.split(".lora_embedding_A" if embedding else ".lora_A.")[0] + ".weight"
                b_key = key.replace("lora_embedding_A", "lora_embedding_B") if embedding else key.replace(".lora_A.", ".lora_B.")
                if b_key not in self._adapter:
                    raise CheckpointError(f"{weights}: {key!r} has no matching {b_key!r}")
                if target not in self:
                    raise CheckpointError(f"{weights}: adapter targets {target!r}, which the base model lacks")
                self._pairs[target] = (key, b_key, embedding)
            elif ".modules_to_save." in module:
                target = module.replace(".modules_to_save.default", "").replace(".modules_to_save", "")
                if target not in self:
                    raise CheckpointError(f"{weights}: modules_to_save tensor {target!r} is not in the base model")
                self._replaced[target] = key

    def read(self, name: str, *, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        if name in self._replaced:
            full = self._adapter.read(self._replaced[name]).to(self.dtype(name))
            result = full[rows[0]:rows[1]] if rows is not None else full
        elif name in self._pairs:
            a_key, b_key, embedding = self._pairs[name]
            base = super().read(name, rows=rows)
            a = self._adapter.read(a_key).float()
            b = self._adapter.read(b_key).float()
            if embedding:  # weight (vocab x dim) += (B @ A)^T = A^T @ B^T
                a_rows = a.t() if rows is None else a.t()[rows[0]:rows[1]]
                update = a_rows @ b.t()
            else:          # weight (out x in) += B @ A
                update = (b if rows is None else b[rows[0]:rows[1]]) @ a
            result = (base.float() + self.scale * update).to(base.dtype)
        else:
            return super().read(name, rows=rows, out=out)
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
