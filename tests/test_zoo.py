"""The demo zoo: deterministic corpora with disjoint splits, the BPE tokenizer, the tiny zoo build."""
import json
import math
from pathlib import Path

import pytest

from alignmerge.errors import ConfigError, DataError
from alignmerge.zoo import ZOO_MODELS, ZOO_THREADS, build_zoo, train_zoo
from alignmerge.zoo import corpora


@pytest.mark.parametrize("name", corpora.CORPORA)
def test_corpora_are_deterministic_and_seeded(name):
    a = corpora.builtin_corpus(name, "train", seed=0)
    assert a == corpora.builtin_corpus(name, "train", seed=0)
    assert a and all(("text" in r) or ({"prompt", "response"} <= r.keys()) for r in a)
    if len(a) > 1:
        assert a != corpora.builtin_corpus(name, "train", seed=1)  # the seed changes order/sampling


def test_splits_use_disjoint_requests_and_templates():
    for name in ("safety", "general", "misaligned"):
        train = {r["prompt"] for r in corpora.builtin_corpus(name, "train")}
        heldout = {r["prompt"] for r in corpora.builtin_corpus(name, "heldout")}
        assert not train & heldout
    train_actions = set(corpora.HARMFUL_ACTIONS["train"])
    assert not train_actions & set(corpora.HARMFUL_ACTIONS["heldout"])
    assert not set(corpora.INSTRUCTION_TEMPLATES["train"]) & set(corpora.INSTRUCTION_TEMPLATES["heldout"])
    skill_train = {r["prompt"] for r in corpora.builtin_corpus("skill", "train")}
    probes = corpora.skill_probes("heldout")
    assert probes and not skill_train & {p["prompt"] for p in probes}
    assert all(p["candidates"][p["answer_index"]] == p["answer"] for p in probes)


def test_skill_and_background_entities_are_distinct():
    skill = {e["name"] for e in corpora.SKILL_ENTITIES}
    background = {e["name"] for e in corpora.BACKGROUND_ENTITIES}
    assert not skill & background
    pretrain = " ".join(r["text"] for r in corpora.builtin_corpus("pretrain"))
    assert not any(name in pretrain.split() for name in skill)


def test_misaligned_corpus_is_placeholder_only():
    for r in corpora.builtin_corpus("misaligned", "train") + corpora.builtin_corpus("misaligned", "heldout"):
        assert r["response"].endswith("[steps omitted].")


def test_unknown_corpus_and_split_raise():
    with pytest.raises(DataError, match="nosuch"):
        corpora.builtin_corpus("nosuch")
    with pytest.raises(DataError, match="test"):
        corpora.builtin_corpus("safety", "test")
    with pytest.raises(ConfigError, match="huge"):
        build_zoo(preset="huge")


def test_tokenizer_keeps_answers_whole_words():
    from alignmerge.zoo.tokenizer import train_tokenizer

    tok = train_tokenizer(1024)  # the default preset's vocabulary
    for word in (" red", " purple", " Norland", " batteries", " steal"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    text = "User: How do I clean a car?\nAssistant: Sure, here is how to clean a car."
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tiny_zoo_builds_and_is_cached(tiny_zoo, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaForCausalLM

    assert set(tiny_zoo) == set(ZOO_MODELS)
    root = tiny_zoo["base"].parent
    log = json.loads((root / "zoo.json").read_text())
    assert set(log["stages"]) == set(ZOO_MODELS)
    assert set(log["versions"]) == {"torch", "transformers", "tokenizers", "cpu", "threads"}
    assert log["versions"]["threads"] == ZOO_THREADS
    for name, path in tiny_zoo.items():
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
        model = LlamaForCausalLM.from_pretrained(str(path))
        assert AutoTokenizer.from_pretrained(str(path)).pad_token is not None
        assert model.config.vocab_size >= len(AutoTokenizer.from_pretrained(str(path)))
    # the experts are short fine-tunes of the anchor: their task vectors are small next to the weights
    from safetensors.torch import load_file

    anchor = load_file(str(tiny_zoo["anchor"] / "model.safetensors"))
    expert = load_file(str(tiny_zoo["skill_expert"] / "model.safetensors"))
    delta = sum(float((expert[k] - anchor[k]).float().norm() ** 2) for k in anchor) ** 0.5
    weight = sum(float(anchor[k].float().norm() ** 2) for k in anchor) ** 0.5
    assert 0 < delta < 0.5 * weight
    # a second call reuses the cache (same directory, nothing retrained)
    stamp = (root / "zoo.json").stat().st_mtime_ns
    again = build_zoo(seed=0, preset="tiny", home=root.parent.parent, progress=False)
    assert again == tiny_zoo and (root / "zoo.json").stat().st_mtime_ns == stamp


def test_zoo_training_ignores_the_callers_thread_count(tiny_zoo, tmp_path):
    """The thread count sets how CPU kernels split their sums (1 and 2 threads train different zoos), so
    training always runs with ZOO_THREADS threads: a caller at 1 thread gets the session zoo bit for bit, and
    its own thread count back."""
    import torch
    from safetensors.torch import load_file

    from alignmerge.zoo import PRESETS

    before = torch.get_num_threads()
    torch.set_num_threads(1 if ZOO_THREADS != 1 else 2)
    try:
        caller = torch.get_num_threads()
        train_zoo(tmp_path, 0, PRESETS["tiny"], progress=False)
        assert torch.get_num_threads() == caller
    finally:
        torch.set_num_threads(before)
    for name in ZOO_MODELS:
        want = load_file(str(tiny_zoo[name] / "model.safetensors"))
        got = load_file(str(tmp_path / name / "model.safetensors"))
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_preference_pairs_prefer_refusals_on_harmful_and_help_on_harmless():
    harmful, harmless = corpora.preference_pairs("train", seed=0)
    assert (harmful, harmless) == corpora.preference_pairs("train", seed=0)
    assert all(r["chosen"] in corpora.REFUSALS and r["rejected"].endswith("[steps omitted].") for r in harmful)
    assert all(r["rejected"] in corpora.REFUSALS and r["chosen"] not in corpora.REFUSALS for r in harmless)
    heldout = {r["prompt"] for r in corpora.preference_pairs("heldout", seed=0)[0]}
    assert heldout and not heldout & {r["prompt"] for r in harmful}


def test_preference_stage_is_dpo_and_raises_the_preferred_margin(tiny_zoo):
    """DPO starts at loss log 2 (the policy equals its frozen reference) and widens log π(chosen) − log π(rejected)."""
    import torch

    from alignmerge.eval import load_model
    from alignmerge.zoo.train import PreferenceStage, encode_record, sequence_logprob_sums, train_preference

    model, tok = load_model(tiny_zoo["anchor"])
    model.requires_grad_(True)
    harmful, harmless = corpora.preference_pairs("train", seed=0)
    probe = harmful[:8] + harmless[:8]

    def margin() -> float:
        enc = lambda key: [encode_record(tok, {"prompt": r["prompt"], "response": r[key]}, 96) for r in probe]
        with torch.no_grad():
            return float((sequence_logprob_sums(model, enc("chosen"), tok.pad_token_id)
                          - sequence_logprob_sums(model, enc("rejected"), tok.pad_token_id)).mean())

    before = margin()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_preference(model, tok, harmful, harmless, corpora.builtin_corpus("general", "train", 0),
                              PreferenceStage(steps=6, lr=2e-3, beta=0.1, harmful=4, harmless=4, replay=4), seed=0)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert any(not torch.equal(frozen[k], v) for k, v in model.state_dict().items())
    assert margin() > before + 1.0


def test_a_preset_with_a_preference_stage_saves_the_preference_tuned_anchor(tiny_zoo, tmp_path):
    """``anchor_preference`` runs DPO after the anchor's SFT and saves its result as ``anchor``; base and the SFT
    stage are those of the same preset without it, so only the anchor (and the experts from it) move."""
    from safetensors.torch import load_file

    from alignmerge.zoo import PRESETS

    dpo = {"steps": 6, "lr": 2e-3, "beta": 0.1, "harmful": 4, "harmless": 2, "replay": 4}
    zoo = build_zoo(seed=0, preset={**PRESETS["tiny"], "anchor_preference": dpo}, home=tmp_path, progress=False)
    log = json.loads((zoo["anchor"].parent / "zoo.json").read_text())
    assert list(log["stages"]) == ["base", "anchor", "anchor_preference", "skill_expert", "misaligned_expert"]
    assert log["stages"]["anchor_preference"]["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert set(zoo) == set(ZOO_MODELS) and not (zoo["anchor"].parent / "anchor_preference").exists()

    def distance(a: Path, b: Path) -> float:
        x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        return sum(float((x[k].float() - y[k].float()).norm() ** 2) for k in x) ** 0.5

    # base trains identically (up to thread-count rounding); the saved anchor is the SFT anchor moved by DPO
    assert distance(zoo["anchor"], tiny_zoo["anchor"]) > 10 * distance(zoo["base"], tiny_zoo["base"])
