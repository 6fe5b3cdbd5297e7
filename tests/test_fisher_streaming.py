"""Streamed (layer by layer, weights read per layer) Fisher equals the in-memory Fisher."""
import pytest
import torch
from safetensors.torch import load_file

from alignmerge.errors import ConfigError
from alignmerge.fisher import compute_fisher
from alignmerge.fisher.compute import _skeleton, _load_config, estimate_bytes
from conftest import make_tiny_llama
from test_fisher import RECORDS, add_char_tokenizer, assert_close


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_llama")
    return add_char_tokenizer(make_tiny_llama(root / "m", seed=5, dtype=torch.float32, hidden=32,
                                              intermediate=48, layers=3))


@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_streamed_equals_in_memory(llama3, tmp_path, kind):
    ref = compute_fisher(llama3, RECORDS, kind=kind, batch_size=2, seed=3)
    out = tmp_path / "s.safetensors"
    got = compute_fisher(llama3, RECORDS, out, kind=kind, batch_size=2, seed=3, stream=True)
    assert_close({k: v.clone() for k, v in got.items()}, ref)
    assert_close(load_file(str(out)), ref)


def test_memory_budget_selects_streaming(llama3, tmp_path):
    skel = _skeleton(_load_config(llama3), torch.float32)
    est = estimate_bytes(skel, skel.config, batch_size=2, seq_len=40, dtype=torch.float32)
    assert est["streamed"] < est["in_memory"]
    budget = (est["streamed"] + est["in_memory"]) // 2
    out = tmp_path / "b.safetensors"
    got = compute_fisher(llama3, RECORDS[:2], out, batch_size=2, max_memory=budget)
    ref = compute_fisher(llama3, RECORDS[:2], batch_size=2)
    assert_close({k: v.clone() for k, v in got.items()}, ref)
    with pytest.raises(ConfigError, match="below even one streamed layer"):
        compute_fisher(llama3, RECORDS[:2], max_memory=1000, batch_size=2)


def test_streamed_without_out_leaves_no_temporary_files(llama3, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    got = compute_fisher(llama3, RECORDS[:2], batch_size=2, stream=True)
    assert not list(tmp_path.iterdir())
    assert_close({k: v.clone() for k, v in got.items()}, compute_fisher(llama3, RECORDS[:2], batch_size=2))


def test_streaming_tied_embeddings(tmp_path):
    """A tied lm_head/embedding: streamed per-sample gradient sums both uses, as in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    add_char_tokenizer(tmp_path / "tied")
    ref = compute_fisher(tmp_path / "tied", RECORDS, batch_size=2)
    got = compute_fisher(tmp_path / "tied", RECORDS, batch_size=2, stream=True)
    assert "lm_head.weight" not in got
    assert_close({k: v.clone() for k, v in got.items()}, ref)


def test_cli_max_memory_streams(llama3, tmp_path):
    from alignmerge.cli import main as cli_main
    from test_fisher import write_jsonl

    skel = _skeleton(_load_config(llama3), torch.float32)
    est = estimate_bytes(skel, skel.config, batch_size=2, seq_len=40, dtype=torch.float32)
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS[:3])
    out = tmp_path / "cli.safetensors"
    rc = cli_main(["fisher", str(llama3), "--data", str(data), "--out", str(out), "--batch-size", "2",
                   "--max-memory", str((est["streamed"] + est["in_memory"]) // 2)])
    assert rc == 0
    assert_close(load_file(str(out)), compute_fisher(llama3, RECORDS[:3], batch_size=2))
