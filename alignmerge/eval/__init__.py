"""Alignment and skill evaluation of any Hugging Face causal-LM directory (AQI, refusal, skill, perplexity)."""
from __future__ import annotations

from pathlib import Path

import torch

from alignmerge.errors import CheckpointError
from alignmerge.eval import aqi as _aqi
from alignmerge.eval import metrics as _metrics
from alignmerge.zoo import corpora

METRIC_KEYS = ("aqi", "refusal_rate", "over_refusal", "skill_accuracy", "perplexity")
GREEDY_KEYS = ("refusal_rate_greedy", "skill_accuracy_greedy")


def load_model(model_dir: str | Path, device: str = "cpu"):
    """(model in fp32 eval mode, tokenizer) from a HF directory."""
    from transformers import AutoTokenizer

    from alignmerge.fisher.compute import load_model as load_causal_lm

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load its tokenizer ({exc})") from exc
    return load_causal_lm(path, dtype=torch.float32, device=torch.device(device)), tokenizer


def _mean(flags: list[bool]) -> float:
    return float(sum(flags)) / max(len(flags), 1)


def evaluate_model(model, tokenizer, *, seed: int = 0, greedy: bool = True,
                   max_examples: int | None = None) -> dict[str, float]:
    """Every metric of alignmerge.eval.metrics plus AQI on the held-out probes, for a loaded model."""
    def cap(items: list) -> list:
        return items if max_examples is None else items[:max_examples]

    harmful = cap(corpora.builtin_corpus("safety", "heldout", seed))
    harmless = cap(corpora.builtin_corpus("general", "heldout", seed))
    probes = corpora.skill_probes("heldout")
    if max_examples is not None:  # a strided subset keeps entities and attributes mixed
        probes = probes[::max(1, len(probes) // max_examples)][:max_examples]
    result = {
        "aqi": _aqi.model_aqi(model, tokenizer, seed, max_examples),
        "refusal_rate": _mean(_metrics.refusal_preferences(model, tokenizer, [r["prompt"] for r in harmful])),
        "over_refusal": _mean(_metrics.refusal_preferences(model, tokenizer, [r["prompt"] for r in harmless])),
        "skill_accuracy": _mean(_metrics.skill_multiple_choice(model, tokenizer, probes)),
        "perplexity": _metrics.perplexity(
            model, tokenizer, [corpora.record_text(r) for r in harmless]),
    }
    if greedy:
        replies = _metrics.greedy_replies(model, tokenizer, [r["prompt"] for r in harmful])
        result["refusal_rate_greedy"] = _mean([_metrics.is_refusal(r) for r in replies])
        replies = _metrics.greedy_replies(model, tokenizer, [p["prompt"] for p in probes])
        result["skill_accuracy_greedy"] = _mean(
            [_metrics.greedy_skill_correct(r, p) for r, p in zip(replies, probes)])
    return result


def evaluate(model_dir: str | Path, *, seed: int = 0, device: str = "cpu", greedy: bool = True,
             max_examples: int | None = None) -> dict[str, float]:
    """Evaluate a HF causal-LM directory: keys aqi, refusal_rate, over_refusal, skill_accuracy, perplexity
    (+ refusal_rate_greedy, skill_accuracy_greedy when ``greedy``)."""
    model, tokenizer = load_model(model_dir, device)
    return evaluate_model(model, tokenizer, seed=seed, greedy=greedy, max_examples=max_examples)


__all__ = ["GREEDY_KEYS", "METRIC_KEYS", "evaluate", "evaluate_model", "load_model"]
