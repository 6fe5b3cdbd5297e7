"""Data sources for the data-aware passes (Fisher, Gram, alignment subspace).

A source is a JSONL path whose lines hold either ``text`` or ``prompt`` and ``response``, or
``builtin:<name>`` for a corpus of the demo zoo (``alignmerge.zoo.corpora.builtin_corpus``).
``tokenize_records`` turns records into token ids plus a mask of *scored* tokens: every token
after the first for ``text``; only the response tokens (and EOS) for prompt/response records,
so that log p(y|x) is the sum over the response. Pairs use the engine's chat format
("User: <prompt>\nAssistant: <response>", as the zoo models and the evaluation do).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from alignmerge.errors import DataError

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI can read STATS_SAMPLES cheaply
    import torch

BUILTIN_PREFIX = "builtin:"
STATS_SAMPLES = 256
"""Records a statistics pass reads by default (Fisher, Gram, subspace, expert weights): on the demo zoos 64
left a noisy F_align and subspace (one held-out refusal lost on seed 0 `benign`; see the README)."""


def load_records(src: str | Path, *, max_samples: int | None = None) -> list[dict]:
    """Read records from a JSONL file or a ``builtin:<name>`` corpus (train split).

    Every record must have a non-empty string ``text``, or ``prompt`` and ``response``;
    a bad line raises DataError naming the file and the 1-based line number.
    """
    src_str = str(src)
    if src_str.startswith(BUILTIN_PREFIX):
        name = src_str[len(BUILTIN_PREFIX):]
        try:
            from alignmerge.zoo.corpora import builtin_corpus
        except ImportError as exc:
            raise DataError(f"{src_str}: the builtin corpora are not available ({exc})") from None
        try:
            records = list(builtin_corpus(name, split="train"))
        except (KeyError, ValueError) as exc:
            raise DataError(f"{src_str}: unknown builtin corpus ({exc})") from None
        origin = src_str
        for i, rec in enumerate(records):
            _check_record(rec, origin, i + 1)
    else:
        path = Path(src_str)
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        records = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                _check_record(rec, str(path), lineno)
                records.append(rec)
                if max_samples is not None and len(records) >= max_samples:
                    break
        origin = str(path)
    if not records:
        raise DataError(f"{origin}: no records (empty data source)")
    if max_samples is not None:
        if max_samples < 1:
            raise DataError(f"{origin}: --samples must be at least 1 (got {max_samples})")
        records = records[:max_samples]
    return records


def _check_record(rec, origin: str, lineno: int) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{origin}:{lineno}: expected a JSON object with 'text' or 'prompt'+'response'")
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise DataError(f"{origin}:{lineno}: 'text' must be a non-empty string")
        return
    missing = [k for k in ("prompt", "response") if k not in rec]
    if missing:
        raise DataError(
            f"{origin}:{lineno}: record has neither 'text' nor both 'prompt' and 'response' "
            f"(missing {', '.join(repr(m) for m in missing)})"
        )
    for key in ("prompt", "response"):
        if not isinstance(rec[key], str):
            raise DataError(f"{origin}:{lineno}: {key!r} must be a string")
    if not rec["response"]:
        raise DataError(f"{origin}:{lineno}: 'response' is empty, nothing to score")


@dataclass
class TokenizedSequence:
    """Token ids of one record and the mask of the tokens whose log-probability is scored.

    ``scored[t]`` is True when token t is a target (predicted from tokens < t); ``scored[0]``
    is always False.
    """

    ids: torch.Tensor  # int64 [T]
    scored: torch.Tensor  # bool [T]


def load_tokenizer(model_dir: str | Path):
    """The ``tokenizers.Tokenizer`` stored as ``tokenizer.json`` in a HF model directory."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path}: no tokenizer.json in the model directory; cannot tokenise the data")
    return Tokenizer.from_file(str(path))


def special_token_ids(model_dir: str | Path, tokenizer, config=None) -> tuple[int | None, int | None]:
    """(bos_id, eos_id): from tokenizer_config.json's bos_token/eos_token, else config.json's ids."""
    ids: dict[str, int | None] = {"bos": None, "eos": None}
    cfg_path = Path(model_dir) / "tokenizer_config.json"
    if cfg_path.is_file():
        tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        for key in ids:
            token = tok_cfg.get(f"{key}_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str):
                ids[key] = tokenizer.token_to_id(token)
    for key in ids:
        if ids[key] is None and config is not None:
            value = getattr(config, f"{key}_token_id", None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            ids[key] = value
    return ids["bos"], ids["eos"]


def chat_format(prompt: str, response: str | None = None) -> str:
    """The engine's chat format for prompt/response records (the demo zoo is trained on it)."""
    head = f"User: {prompt}\nAssistant:"
    return head if response is None else f"{head} {response}"


def tokenize_records(records: list[dict], tokenizer, *, max_length: int, bos_id: int | None = None,
                     eos_id: int | None = None, chat: bool = True, on_long: str = "truncate",
                     origin: str = "data") -> list[TokenizedSequence]:
    """Tokenise records; sequences over ``max_length`` are truncated (one warning) or raise.

    ``text``: [BOS] + encode(text) + [EOS], every token after the first scored.
    ``prompt``/``response``: [BOS] + encode(chat_format(prompt, response)) + [EOS] (``chat``), or
    the plain concatenation prompt + response; only the response tokens and EOS are scored.
    BOS/EOS are added only when their ids are known.
    """
    import torch

    if on_long not in ("truncate", "error"):
        raise DataError(f"on_long must be 'truncate' or 'error', not {on_long!r}")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 (got {max_length})")

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    bos = [bos_id] if bos_id is not None else []
    eos = [eos_id] if eos_id is not None else []
    out: list[TokenizedSequence] = []
    n_truncated = 0
    for i, rec in enumerate(records):
        if "text" in rec:
            ids = bos + enc(rec["text"]) + eos
            n_head = 1
        else:
            head_text = chat_format(rec["prompt"]) if chat else rec["prompt"]
            full_text = chat_format(rec["prompt"], rec["response"]) if chat else rec["prompt"] + rec["response"]
            head, full = bos + enc(head_text), bos + enc(full_text)
            if full[: len(head)] != head:  # a token merged across the boundary: encode the parts apart
                full = head + enc((" " if chat else "") + rec["response"])
            ids, n_head = full + eos, max(1, len(head))
        scored = [False] * n_head + [True] * (len(ids) - n_head)
        if len(ids) > max_length:
            if on_long == "error":
                raise DataError(
                    f"{origin}: record {i + 1} has {len(ids)} tokens, more than the limit of {max_length} "
                    "(use a larger --max-length, or --on-long truncate)"
                )
            n_truncated += 1
            ids, scored = ids[:max_length], scored[:max_length]
        if not any(scored):
            raise DataError(f"{origin}: record {i + 1} has no scored tokens after tokenisation/truncation")
        out.append(TokenizedSequence(torch.tensor(ids, dtype=torch.long), torch.tensor(scored, dtype=torch.bool)))
    if n_truncated:
        warnings.warn(f"{origin}: {n_truncated} of {len(records)} sequences truncated to {max_length} tokens",
                      UserWarning, stacklevel=2)
    return out


def pad_batch(seqs: list[TokenizedSequence], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch: (ids [n,T], scored [n,T], valid [n,T]).

    With right padding and a causal model, padded positions never influence real ones and,
    being unscored, receive zero output gradients, so no attention mask is needed.
    """
    import torch

    T = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    scored = torch.zeros((len(seqs), T), dtype=torch.bool)
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    for r, s in enumerate(seqs):
        ids[r, : len(s.ids)] = s.ids
        scored[r, : len(s.ids)] = s.scored
        valid[r, : len(s.ids)] = True
    return ids, scored, valid
