"""Fisher pass: CLI and API equal a brute-force per-sequence autograd loop, both kinds; error paths."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from alignmerge.cli import main as cli_main
from alignmerge.data import load_tokenizer, special_token_ids, tokenize_records
from alignmerge.errors import ConfigError, DataError
from alignmerge.fisher import compute_fisher
from alignmerge.fisher.compute import sample_labels
from conftest import make_tiny_llama

CHARS = "abcdefghijklmnopqrstuvwxyz .,?!'0123456789"
RECORDS = [
    {"text": "the cat sat on the mat."},
    {"prompt": "what is two plus two? ", "response": "four."},
    {"text": "hello world, how are you today?"},
    {"prompt": "say hi. ", "response": "hi!"},
    {"prompt": "count: ", "response": "1 2 3 4 5 6 7 8 9"},
]


def add_char_tokenizer(model_dir):
    """A character-level tokenizer.json (BOS prepended) small enough for the tiny test vocab."""
    from tokenizers import Tokenizer, models, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(model_dir / "tokenizer.json"))
    return model_dir


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def fp32_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("fisher_llama")
    model = make_tiny_llama(root / "m", seed=3, dtype=torch.float32, hidden=32, intermediate=48, layers=2)
    return add_char_tokenizer(model)


def brute_force_fisher(model_dir, records, kind, seed=0, max_length=512):
    """(1/N) Σ_n (∇ log p(y_n|x_n))² by one autograd call per sequence (no padding, no hooks)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    tok = load_tokenizer(model_dir)
    bos, eos = special_token_ids(model_dir, tok, model.config)
    seqs = tokenize_records(records, tok, max_length=max_length, bos_id=bos, eos_id=eos)
    params = dict(model.named_parameters())
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    for n, s in enumerate(seqs):
        ids = s.ids.unsqueeze(0)
        logits = model(input_ids=ids).logits[0]
        targets = s.ids[1:].clone()
        if kind == "true":
            targets = sample_labels(logits[:-1], seed, n)
        logp = torch.log_softmax(logits[:-1], -1).gather(1, targets.unsqueeze(1)).squeeze(1)
        ll = logp[s.scored[1:]].sum()
        grads = torch.autograd.grad(ll, list(params.values()))
        for k, g in zip(params, grads):
            fisher[k] += g.square()
    return {k: v / len(seqs) for k, v in fisher.items()}


def assert_close(got, ref, tol=1e-5):
    assert set(got) == set(ref)
    for k in ref:
        err = ((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"{k}: rel err {err:.2e}"
        assert torch.isfinite(got[k]).all()


@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_cli_fisher_equals_brute_force(fp32_llama, tmp_path, kind):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    out = tmp_path / "f.safetensors"
    rc = cli_main(["fisher", str(fp32_llama), "--data", str(data), "--out", str(out), "--kind", kind,
                   "--batch-size", "2", "--seed", "7"])
    assert rc == 0
    got = load_file(str(out))
    assert all(t.dtype == torch.float32 for t in got.values())
    assert_close(got, brute_force_fisher(fp32_llama, RECORDS, kind, seed=7))
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["kind"] == kind and meta["N"] == str(len(RECORDS)) and meta["model"] == str(fp32_llama)
    assert meta["data"] == str(data)


def test_true_fisher_depends_on_seed_not_batching(fp32_llama):
    a = compute_fisher(fp32_llama, RECORDS, kind="true", seed=1, batch_size=1)
    b = compute_fisher(fp32_llama, RECORDS, kind="true", seed=1, batch_size=5)
    c = compute_fisher(fp32_llama, RECORDS, kind="true", seed=2, batch_size=5)
    assert_close(b, a)
    assert any(not torch.allclose(c[k], a[k]) for k in a)


def test_tied_embeddings_sum_both_uses(tmp_path):
    """A tied embedding/lm_head weight gets (G_emb,n + G_head,n)² per sequence."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    add_char_tokenizer(tmp_path / "tied")
    got = compute_fisher(tmp_path / "tied", RECORDS[:3], batch_size=2)
    ref = brute_force_fisher(tmp_path / "tied", RECORDS[:3], "empirical")
    assert_close(got, ref)


def test_bf16_checkpoint_computed_in_fp32(tiny_llamas, tmp_path):
    model = add_char_tokenizer(tiny_llamas["base"])
    got = compute_fisher(model, RECORDS[:2])
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in got.values())
    assert all(t.abs().sum() > 0 for t in got.values())


def test_backpack_sum_grad_squared_agrees_on_lm_head(fp32_llama):
    """BackPACK's SumGradSquared on the lm_head Linear (batch of one sequence per row)."""
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import SumGradSquared

    from alignmerge.data import pad_batch
    from alignmerge.fisher import load_model, prepare_sequences

    model = load_model(fp32_llama, dtype=torch.float32, device=torch.device("cpu"))
    seqs = prepare_sequences(fp32_llama, RECORDS)
    ids, scored, _ = pad_batch(seqs)
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state  # [N, T, H]
    # BackPACK's first-order extensions treat dim 0 as the sample axis and sum a Linear's
    # gradient over the extra (token) axis before squaring: exactly the per-sequence gradient.
    head = backpack.extend(torch.nn.Linear(hidden.shape[2], model.config.vocab_size, bias=False))
    head.weight.data.copy_(model.lm_head.weight)
    head.weight.requires_grad_(True)
    logits = head(hidden)
    targets = torch.where(scored[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    with backpack.backpack(SumGradSquared()):
        loss.backward()
    ours = compute_fisher(fp32_llama, RECORDS)["lm_head.weight"] * len(RECORDS)
    assert ((head.weight.sum_grad_squared - ours).abs().max() / ours.abs().max()).item() <= 1e-5


# ---- errors before compute -----------------------------------------------------------------
def test_empty_data_file(fp32_llama, tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="e.jsonl: no records"):
        compute_fisher(fp32_llama, str(tmp_path / "e.jsonl"))


def test_line_without_fields_names_file_and_line(fp32_llama, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"prompt": "no response"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*'response'"):
        compute_fisher(fp32_llama, str(path))
    (tmp_path / "junk.jsonl").write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(DataError, match=r"junk.jsonl:2: not valid JSON"):
        compute_fisher(fp32_llama, str(tmp_path / "junk.jsonl"))


def test_long_sequences_truncate_with_warning_or_error(fp32_llama, tmp_path):
    long = [{"text": "abc " * 40}]
    with pytest.warns(UserWarning, match="truncated to 16 tokens"):
        got = compute_fisher(fp32_llama, long, max_length=16)
    assert all(torch.isfinite(t).all() for t in got.values())
    with pytest.raises(DataError, match="more than the limit of 16"):
        compute_fisher(fp32_llama, long, max_length=16, on_long="error")
    # the model's context (64 positions) caps --max-length
    with pytest.warns(UserWarning, match="truncated to 64 tokens"):
        compute_fisher(fp32_llama, [{"text": "abc " * 40}], max_length=1000)


def test_cli_errors_are_one_line(fp32_llama, tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    rc = cli_main(["fisher", str(fp32_llama), "--data", str(path), "--out", str(tmp_path / "o.safetensors")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.jsonl:1" in err
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(ConfigError, match="kind must be one of"):
        compute_fisher(fp32_llama, RECORDS, kind="fake")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            compute_fisher(fp32_llama, RECORDS, device="cuda")
    with pytest.raises(ConfigError, match="max_memory"):
        compute_fisher(fp32_llama, RECORDS, max_memory="lots")
    with pytest.raises(DataError, match="no tokenizer.json"):
        compute_fisher(make_tiny_llama(tmp_path / "notok", seed=1), RECORDS)


def test_fisher_is_mean_over_sequences(fp32_llama):
    """F(one sequence repeated k times) == F(that sequence)."""
    one = compute_fisher(fp32_llama, RECORDS[:1])
    many = compute_fisher(fp32_llama, RECORDS[:1] * 3, batch_size=2)
    assert_close(many, one)
    assert math.isclose(float(one["lm_head.weight"].sum()), float(many["lm_head.weight"].sum()), rel_tol=1e-5)


def test_linear_capture_gives_per_sequence_gradients(fp32_llama):
    """LinearCapture's (a, g): G_n = g_nᵀ a_n is sequence n's gradient (checked against autograd,
    also Σ_n G_n G_nᵀ, the alignment-subspace statistic)."""
    from alignmerge.fisher import LinearCapture, load_model, prepare_sequences, sequence_backward

    model = load_model(fp32_llama, dtype=torch.float32, device=torch.device("cpu"))
    seqs = prepare_sequences(fp32_llama, RECORDS[:3])
    name = "model.layers.1.mlp.down_proj"
    stats = {"gram": 0, "seen": []}

    def on_linear(module_name, module, a, g):
        stats["seen"].append(module_name)
        grads = torch.einsum("nto,nti->noi", g, a)
        stats["gram"] = stats["gram"] + torch.einsum("noi,npi->op", grads, grads)

    with LinearCapture(model, on_linear, names={name}) as cap:
        for _ in sequence_backward(model, seqs, batch_size=2, before_batch=cap.new_batch):
            pass
    assert stats["seen"] == [name, name]
    weight = model.get_submodule(name).weight.requires_grad_(True)
    want = 0
    for s in seqs:
        logits = model(input_ids=s.ids.unsqueeze(0)).logits[0, :-1]
        ll = torch.log_softmax(logits, -1).gather(1, s.ids[1:, None]).squeeze(1)[s.scored[1:]].sum()
        (grad,) = torch.autograd.grad(ll, [weight])
        want = want + grad @ grad.t()
    assert ((stats["gram"] - want).abs().max() / want.abs().max()).item() <= 1e-5
