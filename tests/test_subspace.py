"""Alignment subspace: gradient estimator vs explicit per-sequence gradients, delta estimator vs SVD, files, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from alignmerge.errors import CheckpointError, ConfigError
from alignmerge.subspace import SubspaceFile, compute_subspace, delta_subspace, gradient_covariance
from conftest import make_tiny_llama

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,?!:'\n-"
RECORDS = [
    {"prompt": "pick a lock? ", "response": "sorry, no."},
    {"prompt": "say hi. ", "response": "hi there!"},
    {"prompt": "steal a car: ", "response": "i won't help with that."},
    {"prompt": "add 2 and 3. ", "response": "that is 5."},
    {"prompt": "write a poem. ", "response": "roses are red."},
]


def add_char_tokenizer(model_dir):
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")).save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return model_dir


@pytest.fixture(scope="module")
def anchor(tmp_path_factory):
    root = tmp_path_factory.mktemp("subspace")
    model = make_tiny_llama(root / "anchor", seed=5, dtype=torch.float32, hidden=24, intermediate=40, layers=2,
                            vocab=64)
    return add_char_tokenizer(model)


def explicit_covariances(model_dir, records):
    """S_out = Σ_n G_n G_nᵀ, S_in = Σ_n G_nᵀ G_n with G_n from one autograd call per sequence."""
    from alignmerge.data import load_tokenizer, special_token_ids, tokenize_records
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    tok = load_tokenizer(model_dir)
    bos, eos = special_token_ids(model_dir, tok, model.config)
    seqs = tokenize_records(records, tok, max_length=64, bos_id=bos, eos_id=eos)
    linears = {n + ".weight": m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    s_out, s_in = {}, {}
    for seq in seqs:
        model.zero_grad()
        logits = model(input_ids=seq.ids[None]).logits[0, :-1]
        target = torch.where(seq.scored[1:], seq.ids[1:], torch.full_like(seq.ids[1:], -100))
        torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").backward()
        for name, w in linears.items():
            g = w.grad.detach()
            s_out[name] = s_out.get(name, 0) + g @ g.T
            s_in[name] = s_in.get(name, 0) + g.T @ g
    return s_out, s_in


def top_projector(s, r):
    evals, evecs = torch.linalg.eigh(s.double())
    basis = evecs[:, torch.argsort(evals, descending=True)[:r]]
    return basis @ basis.T, evals.sort(descending=True).values


def test_gradient_covariance_matches_explicit_per_sequence_gradients(anchor):
    cov, n = gradient_covariance(anchor, RECORDS, samples=None, batch_size=2)  # padded batches
    assert n == len(RECORDS)
    s_out, s_in = explicit_covariances(anchor, RECORDS)
    assert set(cov.s_out) == set(s_out) == set(cov.s_in)
    for name in s_out:
        torch.testing.assert_close(cov.s_out[name], s_out[name], rtol=1e-4, atol=1e-6 * float(s_out[name].abs().max()))
        torch.testing.assert_close(cov.s_in[name], s_in[name], rtol=1e-4, atol=1e-6 * float(s_in[name].abs().max()))


def test_streamed_covariance_equals_in_memory(anchor):
    memory, _ = gradient_covariance(anchor, RECORDS, samples=None, batch_size=2, stream=False)
    streamed, _ = gradient_covariance(anchor, RECORDS, samples=None, batch_size=2, stream=True)
    assert set(streamed.s_out) == set(memory.s_out) and set(streamed.s_in) == set(memory.s_in)
    for name in memory.s_out:
        torch.testing.assert_close(streamed.s_out[name], memory.s_out[name], rtol=1e-4,
                                   atol=1e-6 * float(memory.s_out[name].abs().max()))
        torch.testing.assert_close(streamed.s_in[name], memory.s_in[name], rtol=1e-4,
                                   atol=1e-6 * float(memory.s_in[name].abs().max()))
    # a budget below the in-memory estimate selects streaming
    budget, _ = gradient_covariance(anchor, RECORDS, samples=None, batch_size=2, max_memory="1KB")
    torch.testing.assert_close(budget.s_in["lm_head.weight"], streamed.s_in["lm_head.weight"])


def test_gradient_subspace_spans_top_eigenspaces(anchor):
    r = 3
    bases = compute_subspace(anchor, RECORDS, rank=r, samples=None, batch_size=3)
    s_out, s_in = explicit_covariances(anchor, RECORDS)
    checked = 0
    for name, (u, v) in bases.items():
        assert u.shape == (s_out[name].shape[0], r) and v.shape == (s_in[name].shape[0], r)
        torch.testing.assert_close(u.T @ u, torch.eye(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(v.T @ v, torch.eye(r), atol=1e-5, rtol=0)
        for basis, s in ((u, s_out[name]), (v, s_in[name])):
            proj, evals = top_projector(s, r)
            if evals[r - 1] - evals[r] > 1e-3 * evals[0]:  # a well-defined top-r eigenspace
                torch.testing.assert_close(basis.double() @ basis.double().T, proj, atol=1e-4, rtol=0)
                checked += 1
    assert checked >= len(bases)  # most sides have a clear gap on random tiny models


def test_delta_subspace_is_top_singular_vectors(tmp_path, anchor):
    from safetensors.torch import load_file

    state = load_file(str(anchor / "model.safetensors"))
    base = make_tiny_llama(tmp_path / "base", seed=6, dtype=torch.float32, hidden=24, intermediate=40, layers=2,
                           vocab=64, base_state=state, noise=0.05)
    bases = delta_subspace(anchor, base, rank=4)
    base_state = load_file(str(base / "model.safetensors"))
    assert set(bases) == {n for n, t in state.items() if t.dim() == 2}
    for name, (u, v) in bases.items():
        diff = (state[name] - base_state[name]).double()
        uu, _, vh = torch.linalg.svd(diff, full_matrices=False)
        torch.testing.assert_close(u.double() @ u.double().T, uu[:, :4] @ uu[:, :4].T, atol=1e-4, rtol=0)
        torch.testing.assert_close(v.double() @ v.double().T, vh[:4].T @ vh[:4], atol=1e-4, rtol=0)
    # a side above max_side gets no basis (one-sided P), the other still does
    one_sided = delta_subspace(anchor, base, rank=4, max_side=30)
    u, v = one_sided["model.layers.0.mlp.up_proj.weight"]  # 40 × 24
    assert u is None and v.shape == (24, 4)


def test_subspace_file_round_trip_and_cli(tmp_path, anchor, capsys):
    from alignmerge.cli import main
    from alignmerge.io.checkpoint import Checkpoint

    data = tmp_path / "align.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "sub.safetensors"
    assert main(["subspace", str(anchor), "--data", str(data), "--rank", "2", "--out", str(out),
                 "--fisher-out", str(tmp_path / "falign.safetensors")]) == 0
    assert "wrote" in capsys.readouterr().out
    f = SubspaceFile(out)
    assert f.metadata["method"] == "gradient" and f.metadata["rank"] == "2" and f.metadata["N"] == str(len(RECORDS))
    ck = Checkpoint(anchor)
    f.validate({n: ck.shape(n) for n in ck.names()})
    u, v = f.get("model.layers.1.self_attn.q_proj.weight")
    assert u.shape == (24, 2) and v.shape == (24, 2) and u.dtype == torch.float32
    assert f.get("model.norm.weight") == (None, None)
    expected = compute_subspace(anchor, str(data), rank=2)
    torch.testing.assert_close(u, expected["model.layers.1.self_attn.q_proj.weight"][0], atol=1e-5, rtol=0)
    assert (tmp_path / "falign.safetensors").is_file()
    with pytest.raises(CheckpointError, match="names no 2-D weight"):
        f.validate({"model.norm.weight": (24,)})


def test_subspace_errors(tmp_path, anchor):
    with pytest.raises(ConfigError, match="needs alignment data"):
        compute_subspace(anchor, None, rank=2)
    with pytest.raises(ConfigError, match="needs a base model"):
        compute_subspace(anchor, None, rank=2, method="delta")
    with pytest.raises(ConfigError, match="must be one of"):
        compute_subspace(anchor, RECORDS, rank=2, method="svd")
    with pytest.raises(ConfigError, match="rank"):
        compute_subspace(anchor, RECORDS, rank=0)
    with pytest.raises(CheckpointError, match="not found"):
        SubspaceFile(tmp_path / "missing.safetensors")
