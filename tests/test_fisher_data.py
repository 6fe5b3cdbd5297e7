"""Data sources and tokenisation for the data-aware passes: scored tokens, formats, limits, errors."""
import pytest

from alignmerge.data import chat_format, load_records, pad_batch, tokenize_records
from alignmerge.errors import DataError
from test_fisher import add_char_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from alignmerge.data import load_tokenizer

    d = tmp_path_factory.mktemp("tok")
    add_char_tokenizer(d)
    return load_tokenizer(d)


def _decode(tokenizer, ids):
    return "".join(tokenizer.id_to_token(int(i)) for i in ids)


def test_pair_scores_response_and_eos_only(tokenizer):
    (seq,) = tokenize_records([{"prompt": "hi?", "response": "yes."}], tokenizer, max_length=99, bos_id=1, eos_id=2)
    assert int(seq.ids[0]) == 1 and int(seq.ids[-1]) == 2
    assert seq.ids[1:-1].tolist() == tokenizer.encode(chat_format("hi?", "yes."), add_special_tokens=False).ids
    scored = seq.ids[seq.scored]
    assert _decode(tokenizer, scored[:-1]) == " yes." and int(scored[-1]) == 2
    (plain,) = tokenize_records([{"prompt": "hi?", "response": "yes."}], tokenizer, max_length=99, chat=False)
    assert _decode(tokenizer, plain.ids) == "hi?yes." and _decode(tokenizer, plain.ids[plain.scored]) == "yes."


def test_text_scores_every_token_after_the_first(tokenizer):
    (seq,) = tokenize_records([{"text": "abc"}], tokenizer, max_length=99, bos_id=1, eos_id=2)
    assert seq.scored.tolist() == [False, True, True, True, True]


def test_truncation_and_padding(tokenizer):
    with pytest.warns(UserWarning, match="1 of 2 sequences truncated to 10 tokens"):
        seqs = tokenize_records([{"text": "a" * 30}, {"text": "bb"}], tokenizer, max_length=10, bos_id=1)
    assert len(seqs[0].ids) == 10
    ids, scored, valid = pad_batch(seqs)
    assert ids.shape == (2, 10) and valid[1].sum() == 3 and not scored[1, 3:].any()
    with pytest.raises(DataError, match="no scored tokens"):
        tokenize_records([{"prompt": "a long prompt", "response": "x"}], tokenizer, max_length=4, bos_id=1)


def test_jsonl_sources(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"prompt": "p", "response": "r"}, {"text": "b"}])
    assert len(load_records(path)) == 3 and len(load_records(path, max_samples=2)) == 2
    with pytest.raises(DataError, match="data file not found"):
        load_records(tmp_path / "missing.jsonl")
    write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "response": ""}])
    with pytest.raises(DataError, match=r"e.jsonl:1: 'response' is empty"):
        load_records(tmp_path / "e.jsonl")
    write_jsonl(tmp_path / "n.jsonl", [["not", "an", "object"]])
    with pytest.raises(DataError, match=r"n.jsonl:1: expected a JSON object"):
        load_records(tmp_path / "n.jsonl")


def test_builtin_sources():
    pytest.importorskip("alignmerge.zoo.corpora")
    records = load_records("builtin:safety", max_samples=5)
    assert len(records) == 5 and all("prompt" in r and "response" in r for r in records)
    with pytest.raises(DataError, match="unknown"):
        load_records("builtin:no-such-corpus")
