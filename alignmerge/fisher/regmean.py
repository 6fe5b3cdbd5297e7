"""RegMean statistics: Gram matrices of every nn.Linear's inputs on a data set.

G = (1/T_total) Σ_{n,t} a_{n,t} a_{n,t}ᵀ (in × in) over all real (non-padding) tokens, stored in
fp32 under the Linear's weight name (``...q_proj.weight`` -> [in, in]). Only a forward pass runs.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from alignmerge.fisher.compute import Fp32SafetensorsWriter, _prepare, _progress, load_model
from alignmerge.data import pad_batch


def compute_gram(model_dir, data, out=None, *, samples: int | None = None, max_length: int = 512,
                 batch_size: int = 8, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 on_long: str = "truncate", chat: bool = True, progress: bool = False) -> dict[str, torch.Tensor]:
    """Mean input Gram matrix of each nn.Linear of the model on ``data``; written to ``out`` if given."""
    model_dir, _, seqs = _prepare(model_dir, data, kind="empirical", samples=samples, max_length=max_length,
                                  on_long=on_long, chat=chat)
    device = torch.device(device)
    model = load_model(model_dir, dtype=dtype, device=device)
    param_name = {id(p): n for n, p in model.named_parameters()}
    linears = {param_name[id(m.weight)]: m for m in model.modules() if isinstance(m, nn.Linear)}
    grams = {name: torch.zeros((m.in_features, m.in_features), dtype=torch.float32, device=device)
             for name, m in linears.items()}
    mask: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, inputs, output):
            a = inputs[0].reshape(-1, inputs[0].shape[-1])[mask["valid"]].float()
            grams[name].addmm_(a.t(), a)
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in linears.items()]
    tokens = 0
    bar = _progress(len(seqs), "gram", progress)
    try:
        with torch.no_grad():
            for b0 in range(0, len(seqs), batch_size):
                ids, _, valid = pad_batch(seqs[b0:b0 + batch_size])
                mask["valid"] = valid.reshape(-1).to(device)
                tokens += int(valid.sum())
                model(input_ids=ids.to(device), use_cache=False)
                bar.update(ids.shape[0])
    finally:
        for h in handles:
            h.remove()
        bar.close()
    grams = {k: (v / tokens).cpu() for k, v in grams.items()}
    if out is not None:
        meta = {"format": "pt", "alignmerge": "gram", "model": str(model_dir),
                "data": str(data) if not isinstance(data, list) else "records", "kind": "gram",
                "N": str(len(seqs)), "tokens": str(tokens)}
        writer = Fp32SafetensorsWriter(Path(out), {k: tuple(v.shape) for k, v in grams.items()}, meta)
        for k, v in grams.items():
            writer.write(k, v)
        writer.close()
    return grams
