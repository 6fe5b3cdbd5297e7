"""Small Llama models for the zoo and the CPU training loops (pretraining, supervised fine-tuning and a
DPO preference stage).

Pair records are trained on their response tokens only (prompt masked, as in SFT); text records on
every token. Mixtures are sampled per batch by weight, so a fine-tune sees e.g. 10% safety replay.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass

import torch

from alignmerge.eval.metrics import response_logprob_sums
from alignmerge.zoo.corpora import format_pair


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    max_positions: int = 96


def new_model(shape: ModelShape, vocab_size: int, seed: int, tokenizer=None):
    """A freshly initialised ``LlamaForCausalLM`` (untied embeddings, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions, tie_word_embeddings=False, initializer_range=0.02,
        bos_token_id=getattr(tokenizer, "bos_token_id", None), eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def encode_record(tokenizer, record: dict, max_len: int) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) for one record: BOS + text + EOS; pairs are masked up to the response."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if "text" in record:
        ids = [bos] + tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [eos]
        mask = [0] + [1] * (len(ids) - 1)
    else:
        prefix = [bos] + tokenizer(format_pair(record["prompt"]), add_special_tokens=False)["input_ids"]
        full = tokenizer(format_pair(record["prompt"], record["response"]), add_special_tokens=False)["input_ids"]
        ids = [bos] + full + [eos]
        mask = [0] * len(prefix) + [1] * (len(ids) - len(prefix))
    return ids[:max_len], mask[:max_len]


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) with -100 where no loss is taken."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (ids, mask) in enumerate(encoded):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids)
        attention[row, :n] = 1
        labels[row, :n] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
    return input_ids, attention, labels


def _optimise(model, optimizer, steps: int, step_loss, progress=None) -> list[float]:
    """``steps`` optimiser steps on ``step_loss(step)`` → (loss to descend, value to log), the gradient norm
    clipped at 1; returns the logged values."""
    model.train()
    logged = []
    for step in range(steps):
        loss, value = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        logged.append(value.item())
        if progress is not None:
            progress(step, logged[-1])
    model.eval()
    return logged


@dataclass(frozen=True)
class Stage:
    """One training stage: a weighted mixture of record lists, steps, batch size and peak learning rate."""

    steps: int
    lr: float
    batch_size: int = 32
    warmup: int = 20
    weight_decay: float = 0.0


def train(model, tokenizer, mixture: list[tuple[list[dict], float]], stage: Stage, seed: int,
          progress=None) -> list[float]:
    """AdamW with linear warm-up and cosine decay on batches drawn from ``mixture``; returns the losses."""
    rng = random.Random(seed)
    max_len = model.config.max_position_embeddings
    pools = [[encode_record(tokenizer, r, max_len) for r in records] for records, _ in mixture if records]
    weights = [w for records, w in mixture if records]
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.98),
                                  weight_decay=stage.weight_decay)

    def lr_at(step: int) -> float:
        if step < stage.warmup:
            return stage.lr * (step + 1) / stage.warmup
        frac = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
        return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def step_loss(step: int):
        counts = [0] * len(pools)
        for _ in range(stage.batch_size):
            counts[rng.choices(range(len(pools)), weights)[0]] += 1
        batch = [rng.choice(pool) for pool, c in zip(pools, counts) for _ in range(c)]
        input_ids, attention, labels = collate(batch, tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        return loss, loss

    return _optimise(model, optimizer, stage.steps, step_loss, progress)


@dataclass(frozen=True)
class PreferenceStage:
    """A DPO stage: per step ``harmful`` + ``harmless`` preference pairs and ``replay`` SFT records."""

    steps: int
    lr: float
    beta: float
    harmful: int = 16
    harmless: int = 8
    replay: int = 16


def sequence_logprob_sums(model, encoded: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over each record's response tokens (the loss-masked ones), with gradients."""
    input_ids, attention, labels = collate(encoded, pad_id)
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    return response_logprob_sums(logits, input_ids, labels != -100)


def train_preference(model, tokenizer, harmful: list[dict], harmless: list[dict], replay: list[dict],
                     stage: PreferenceStage, seed: int, progress=None) -> list[float]:
    """DPO (Rafailov et al. 2023) against a frozen copy of the starting model, plus an SFT replay term:

        L = −log σ(β·[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))]) + L_SFT(replay),

    with constant learning rate; returns the DPO losses. ``harmful`` and ``harmless`` hold
    ``{"prompt", "chosen", "rejected"}`` records (corpora.preference_pairs)."""
    rng = random.Random(seed)
    max_len = model.config.max_position_embeddings
    pad = tokenizer.pad_token_id
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    replay_pool = [encode_record(tokenizer, r, max_len) for r in replay]
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def encode(records: list[dict]) -> list[tuple]:
        """(chosen, rejected) encodings per record, made once."""
        return [tuple(encode_record(tokenizer, {"prompt": r["prompt"], "response": r[key]}, max_len)
                      for key in ("chosen", "rejected")) for r in records]

    harmful_pool, harmless_pool = encode(harmful), encode(harmless)

    def step_loss(step: int):
        pairs = rng.sample(harmful_pool, stage.harmful) + rng.sample(harmless_pool, stage.harmless)
        both = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
        with torch.no_grad():
            reference_logp = sequence_logprob_sums(reference, both, pad)
        shift = sequence_logprob_sums(model, both, pad) - reference_logp
        n = len(pairs)
        dpo = -torch.nn.functional.logsigmoid(stage.beta * (shift[:n] - shift[n:])).mean()
        loss = dpo
        if stage.replay:
            input_ids, attention, labels = collate([rng.choice(replay_pool) for _ in range(stage.replay)], pad)
            loss = loss + model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        return loss, dpo

    return _optimise(model, optimizer, stage.steps, step_loss, progress)
