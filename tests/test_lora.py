"""PEFT LoRA adapters as experts (``base+adapter``): merging one equals merging PEFT's own
``merge_and_unload()`` weights saved as a normal checkpoint; malformed adapters fail clearly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402

import alignmerge  # noqa: E402
from alignmerge.errors import AlignMergeError, CheckpointError  # noqa: E402
from alignmerge.io.lora import LoraCheckpoint  # noqa: E402
from conftest import make_tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _make_adapter(base: Path, root: Path, name: str, *, seed: int, modules_to_save=("lm_head",),
                  **lora_options) -> tuple[Path, Path]:
    """A LoRA adapter on ``base`` with random non-zero A and B (so the update is real), saved with
    PEFT; returns (adapter dir, directory of PEFT's merge_and_unload() weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=list(modules_to_save) or None,
                        **lora_options)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "modules_to_save" in pname:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    adapter = root / f"{name}-adapter"
    peft_model.save_pretrained(adapter)
    full = root / f"{name}-full"
    peft_model.merge_and_unload().save_pretrained(full, safe_serialization=True)
    return adapter, full


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_llama(root / "base", seed=0, dtype=torch.float32)
    expert = make_tiny_llama(root / "expert", seed=1, dtype=torch.float32,
                             base_state=load_file(str(base / "model.safetensors")))
    adapter, full = _make_adapter(base, root, "lora", seed=2)
    return {"root": root, "base": base, "expert": expert, "adapter": adapter, "full": full}


def test_adapter_reads_as_peft_merged_weights(lora_family):
    """Every tensor, whole and in row blocks, equals PEFT's merge_and_unload() (LoRA on linear and
    embedding layers, modules_to_save on lm_head)."""
    ck = LoraCheckpoint(lora_family["base"], lora_family["adapter"])
    full = _tensors(lora_family["full"])
    base = _tensors(lora_family["base"])
    assert sorted(ck.names()) == sorted(full)
    changed = {n for n in full if not torch.equal(full[n], base[n])}
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert "model.layers.1.self_attn.q_proj.weight" in changed and "model.layers.0.mlp.down_proj.weight" in changed
    for name, want in full.items():
        got = ck.read(name)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
        rows = (1, max(2, want.shape[0] - 3)) if want.dim() else None
        if rows:
            buf = torch.empty(want.numel() * want.element_size(), dtype=torch.uint8)
            part = ck.read(name, rows=rows, out=buf)
            torch.testing.assert_close(part, want[rows[0]:rows[1]], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", {"lambda": 0.8}),
    ("linear", {}),
])
def test_lora_expert_merge_equals_full_weights_merge(lora_family, tmp_path, method, params):
    def config(lora_expert: str) -> dict:
        return {"merge_method": method, "base_model": str(lora_family["base"]), "parameters": params,
                "models": [{"model": str(lora_family["expert"]), "parameters": {"weight": 0.7}},
                           {"model": lora_expert, "parameters": {"weight": 0.5}}]}

    via_adapter = alignmerge.merge(config(f"{lora_family['base']}+{lora_family['adapter']}"),
                                   tmp_path / "adapter", progress=False)
    via_full = alignmerge.merge(config(str(lora_family["full"])), tmp_path / "full", progress=False)
    got, want = _tensors(via_adapter.out_dir), _tensors(via_full.out_dir)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    base = _tensors(lora_family["base"])
    assert not torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_alpha_pattern_and_rslora_scales(lora_family, tmp_path):
    adapter, full = _make_adapter(lora_family["base"], tmp_path, "pattern", seed=3, modules_to_save=(),
                                  use_rslora=True, alpha_pattern={"v_proj": 3.0})
    ck = LoraCheckpoint(lora_family["base"], adapter)
    for name, want in _tensors(full).items():
        torch.testing.assert_close(ck.read(name), want, rtol=1e-5, atol=1e-6, msg=name)


def _copy_adapter(src: Path, dst: Path, config_edit=None, tensors_edit=None) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    state = load_file(str(src / "adapter_model.safetensors"))
    if tensors_edit:
        tensors_edit(state)
    save_file(state, str(dst / "adapter_model.safetensors"))
    return dst


def test_adapter_directory_without_config(lora_family, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(load_file(str(lora_family["adapter"] / "adapter_model.safetensors")),
              str(bare / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"bare: not a PEFT LoRA adapter \(no adapter_config.json\)"):
        LoraCheckpoint(lora_family["base"], bare)
    config = {"merge_method": "linear", "models": [
        {"model": str(lora_family["expert"]), "parameters": {"weight": 1.0}},
        {"model": f"{lora_family['base']}+{bare}", "parameters": {"weight": 1.0}}]}
    with pytest.raises(AlignMergeError, match="no adapter_config.json"):
        alignmerge.merge(config, tmp_path / "out", progress=False)


def test_dora_adapter_is_refused(lora_family, tmp_path):
    dora = _copy_adapter(lora_family["adapter"], tmp_path / "dora", config_edit=lambda c: c.update(use_dora=True))
    with pytest.raises(CheckpointError, match=r"DoRA adapters \(use_dora: true\) are not supported"):
        LoraCheckpoint(lora_family["base"], dora)
    aware = _copy_adapter(lora_family["adapter"], tmp_path / "alora",
                          config_edit=lambda c: c.update(alora_invocation_tokens=[5, 6]))
    with pytest.raises(CheckpointError, match=r"activated LoRA .* adapters \(alora_invocation_tokens: \[5, 6\]\)"):
        LoraCheckpoint(lora_family["base"], aware)


def test_adapter_target_missing_in_base(lora_family, tmp_path):
    def add_foreign_target(state):
        state["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 48)
        state["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(48, 4)

    foreign = _copy_adapter(lora_family["adapter"], tmp_path / "foreign", tensors_edit=add_foreign_target)
    with pytest.raises(CheckpointError, match=r"adapter targets 'model.layers.7.self_attn.q_proj.weight', which the "
                                              r"base model lacks"):
        LoraCheckpoint(lora_family["base"], foreign)


def test_unknown_and_mismatched_adapter_tensors_are_refused(lora_family, tmp_path):
    def add_unknown(state):
        state["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = torch.zeros(2, 48)

    unknown = _copy_adapter(lora_family["adapter"], tmp_path / "unknown", tensors_edit=add_unknown)
    with pytest.raises(CheckpointError, match="neither a LoRA factor nor a tensor of the base model"):
        LoraCheckpoint(lora_family["base"], unknown)

    def wrong_rank(state):
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        state[key] = torch.zeros(48, 3)

    bad = _copy_adapter(lora_family["adapter"], tmp_path / "rank", tensors_edit=wrong_rank)
    with pytest.raises(CheckpointError, match="do not form a rank-r update"):
        LoraCheckpoint(lora_family["base"], bad)

    def lone_b(state):
        del state["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]

    orphan = _copy_adapter(lora_family["adapter"], tmp_path / "orphan", tensors_edit=lone_b)
    with pytest.raises(CheckpointError, match="has no matching LoRA A factor"):
        LoraCheckpoint(lora_family["base"], orphan)
