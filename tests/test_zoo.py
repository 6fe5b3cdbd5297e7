"""The demo zoo: deterministic corpora with disjoint splits, the BPE tokenizer, the tiny zoo build."""
import json

import pytest

from alignmerge.errors import ConfigError, DataError
from alignmerge.zoo import ZOO_MODELS, build_zoo
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
