"""Shared fixtures. TRITON_INTERPRET must be set before anything imports triton kernels."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_tiny_llama(path: Path, *, seed: int, dtype=torch.bfloat16, hidden: int = 48, layers: int = 2,
                    vocab: int = 97, intermediate: int = 80, heads: int = 4, kv_heads: int = 2,
                    base_state: dict | None = None, noise: float = 0.02) -> Path:
    """Save a tiny real Llama (transformers config, random weights) as a HF directory.

    With ``base_state`` the weights are base + noise·N(0,1), like a fine-tune of that base.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if base_state is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base_state[name].float() + noise * torch.randn_like(p))
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    return Path(path)


def _tiny_family(root: Path, dtype) -> dict:
    from safetensors.torch import load_file

    base = make_tiny_llama(root / "base", seed=0, dtype=dtype)
    state = load_file(str(base / "model.safetensors"))
    experts = [make_tiny_llama(root / f"expert{i}", seed=i + 1, base_state=state, dtype=dtype) for i in range(3)]
    return {"base": base, "experts": experts}


@pytest.fixture(scope="session")
def tiny_llamas(tmp_path_factory):
    """A base and three fine-tune-like tiny Llama checkpoints (bf16), built once per session."""
    return _tiny_family(tmp_path_factory.mktemp("tiny_llamas"), torch.bfloat16)


@pytest.fixture(scope="session")
def tiny_llamas_fp32(tmp_path_factory):
    """The same family stored in fp32 (task-vector magnitudes then have no exact ties)."""
    return _tiny_family(tmp_path_factory.mktemp("tiny_llamas_fp32"), torch.float32)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The demo zoo's ``tiny`` preset ({name: HF dir}), built once per session under a session tmp dir."""
    from alignmerge.zoo import build_zoo

    return build_zoo(seed=0, preset="tiny", home=tmp_path_factory.mktemp("zoo_home"), progress=False)
