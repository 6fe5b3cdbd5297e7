"""A byte-level BPE tokenizer trained with `tokenizers` on the zoo corpora, saved as a transformers fast tokenizer."""
from __future__ import annotations

from pathlib import Path

from alignmerge.zoo.corpora import CORPORA, SPLITS, builtin_corpus, record_text

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def corpus_texts(seed: int = 0) -> list[str]:
    """Every text of every corpus and split (held-out words become whole tokens too)."""
    return [record_text(r) for name in CORPORA for split in SPLITS for r in builtin_corpus(name, split, seed)]


def train_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """Train a byte-level BPE on the zoo corpora; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_texts(seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def save_tokenizer(tokenizer, path: str | Path) -> None:
    tokenizer.save_pretrained(str(path))
