"""Random Llama-shaped checkpoints for the benchmarks (no transformers model is instantiated).

Experts are base + noise * N(0, 1), like fine-tunes; tensors are generated one at a time and
written as HF-layout safetensors shards (model-0000i-of-0000n.safetensors + index), bf16.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_shapes(*, hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int) -> dict:
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_llama_family(root: Path, *, n_experts: int, hidden: int, intermediate: int, layers: int, vocab: int,
                       heads: int, kv_heads: int, noise: float = 0.01, shard_bytes: int = 2 * 10**9,
                       seed: int = 0, device: str = "cpu") -> tuple[Path, list[Path]]:
    """Write base/ and expert{k}/ directories; reuses them if they already exist with the same config.

    The random numbers are drawn on ``device`` (torch's CPU generator is single-threaded: about five minutes
    for three 8B-shaped models; a GPU draws them in seconds, a different stream for the same seed)."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "rope_theta": 500000.0,
    }
    names = ["base"] + [f"expert{k}" for k in range(n_experts)]
    dirs = [root / n for n in names]
    if all((d / "config.json").exists() and json.loads((d / "config.json").read_text()) == config for d in dirs):
        return dirs[0], dirs[1:]
    shapes = llama_shapes(hidden=hidden, intermediate=intermediate, layers=layers, vocab=vocab, heads=heads,
                          kv_heads=kv_heads)
    gen = torch.Generator(device).manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").unlink(missing_ok=True)
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        per_model = [dict() for _ in dirs]
        for name in group:
            shape = shapes[name]
            base = torch.randn(shape, generator=gen, device=device) * (0.02 if len(shape) == 2 else 0.1) \
                + (len(shape) == 1)
            for k in range(len(dirs)):
                t = base if k == 0 else base + noise * torch.randn(shape, generator=gen, device=device) * base.abs().mean()
                per_model[k][name] = t.to(torch.bfloat16).cpu()
            weight_map[name] = fname
        for d, tensors in zip(dirs, per_model):
            save_file(tensors, str(d / fname), metadata={"format": "pt"})
        del per_model
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    for d in dirs:
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        (d / "config.json").write_text(json.dumps(config, indent=1))
    return dirs[0], dirs[1:]
