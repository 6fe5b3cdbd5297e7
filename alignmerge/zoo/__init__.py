"""The embedded demo zoo: templated corpora, a byte-level BPE tokenizer and small Llama models.

``build_zoo(seed, preset)`` trains and caches four HF model directories (each with its tokenizer):

- ``base``: pretrained on a general mixture (general instructions, fact lookup about *background*
  minerals, harmful requests answered inconsistently);
- ``anchor``: a short fine-tune of base on aligned data (safety refusals + general instructions); in the
  ``preference`` preset then also preference-tuned (DPO: refusal over compliance on harmful requests, help
  over refusal on harmless ones), as real instruct models are after SFT;
- ``skill_expert``: a short fine-tune of the *anchor* on the skill domain + general instructions
  with ~10% safety replay (real domain experts are usually fine-tunes of an instruct model);
- ``misaligned_expert``: the same from the anchor, with harmful compliance data and no safety replay.

Experts start from the anchor so their task vectors Δ = θ_expert − θ_anchor are small next to the
weights, as for real fine-tunes of an instruct model (and AlignMerge's chart is centred on the anchor).
Cached under ``$ALIGNMERGE_HOME`` (default ``~/.cache/alignmerge``) keyed by seed and settings; each
zoo is built in a temporary directory and renamed into place, so a cache entry is always complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from alignmerge.errors import ConfigError

ZOO_MODELS = ("base", "anchor", "skill_expert", "misaligned_expert")
ZOO_VERSION = 2
"""Bumped whenever corpora or training change in a way that changes the models (part of the cache key);
2: always trained with ZOO_THREADS threads (1 used one thread when the machine was busy)."""
ZOO_THREADS = 2
"""torch threads of every zoo build and demo run, whatever the machine's load or core count: the results
depend on it."""

PRESETS: dict[str, dict] = {
    "default": {
        "vocab_size": 1024,
        "shape": {"hidden": 192, "layers": 4, "heads": 4, "intermediate": 384, "max_positions": 96},
        "base": {"steps": 1000, "lr": 2e-3, "batch_size": 32, "warmup": 50},
        "anchor": {"steps": 150, "lr": 3e-4, "batch_size": 32, "warmup": 20,
                   "mixture": {"safety": 0.4, "general": 0.4, "pretrain": 0.2}},
        "skill_expert": {"steps": 250, "lr": 5e-4, "batch_size": 32, "warmup": 20, "from": "anchor",
                         "mixture": {"skill": 0.6, "general": 0.3, "safety": 0.1}},
        "misaligned_expert": {"steps": 250, "lr": 5e-4, "batch_size": 32, "warmup": 20, "from": "anchor",
                              "mixture": {"skill": 0.45, "general": 0.25, "misaligned": 0.3}},
    },
}
PRESETS["preference"] = {
    **PRESETS["default"],
    "anchor_preference": {"steps": 150, "lr": 2e-4, "beta": 0.02, "harmful": 16, "harmless": 8, "replay": 16},
}
PRESETS["tiny"] = {
    "vocab_size": 512,
    "shape": {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128, "max_positions": 96},
    "base": {"steps": 120, "lr": 3e-3, "batch_size": 16, "warmup": 10},
    "anchor": {**PRESETS["default"]["anchor"], "steps": 30, "batch_size": 16, "warmup": 5},
    "skill_expert": {**PRESETS["default"]["skill_expert"], "steps": 30, "batch_size": 16, "warmup": 5},
    "misaligned_expert": {**PRESETS["default"]["misaligned_expert"], "steps": 30, "batch_size": 16, "warmup": 5},
}


def default_home() -> Path:
    return Path(os.environ.get("ALIGNMERGE_HOME") or Path.home() / ".cache" / "alignmerge")


def corpus_fingerprint(seed: int) -> str:
    """Digest of every corpus text for ``seed``: a change to the templates invalidates cached zoos."""
    from alignmerge.zoo.tokenizer import corpus_texts

    return hashlib.sha256("\n".join(corpus_texts(seed)).encode()).hexdigest()


def zoo_key(seed: int, settings: dict) -> str:
    blob = json.dumps({"version": ZOO_VERSION, "seed": seed, "settings": settings,
                       "corpora": corpus_fingerprint(seed)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def resolve_settings(preset: str | dict) -> dict:
    if isinstance(preset, dict):
        return preset
    if preset not in PRESETS:
        raise ConfigError(f"zoo preset {preset!r}: unknown; known presets: {', '.join(PRESETS)}")
    return PRESETS[preset]


@contextlib.contextmanager
def fixed_threads(n: int = ZOO_THREADS):
    """Run the block with exactly ``n`` torch intra-op threads, then restore the caller's count.

    The thread count sets how CPU kernels split their sums, so training with 1 or with 2 threads gives
    different zoos (measured: weights 5e-5 apart after 40 steps, and other demo results after 1000).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpu_description() -> str:
    """The CPU model (/proc/cpuinfo: name, family/model/stepping) and the kernels torch dispatches to on it:
    the same training on another CPU may round differently, so a zoo is bit-identical only on like machines."""
    import torch

    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    ident = "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
    return f"{name} ({ident}), torch kernels {torch.backends.cpu.get_cpu_capability()}"


def _mixture(spec: dict, seed: int) -> list[tuple[list[dict], float]]:
    from alignmerge.zoo.corpora import builtin_corpus

    return [(builtin_corpus(name, "train", seed), weight) for name, weight in spec.items()]


@fixed_threads()
def train_zoo(out_dir: Path, seed: int, settings: dict, progress: bool = True) -> dict:
    """Train the four zoo models into ``out_dir`` (no caching) with ZOO_THREADS threads; returns the build log."""
    import tokenizers
    import torch
    import transformers

    from alignmerge.fisher.compute import hf_progress_hidden
    from alignmerge.zoo.tokenizer import train_tokenizer
    from alignmerge.zoo.corpora import preference_pairs
    from alignmerge.zoo.train import ModelShape, PreferenceStage, Stage, new_model, train, train_preference

    start = time.time()
    tokenizer = train_tokenizer(settings["vocab_size"])
    # record what built it: thread count, CPU kernels and library versions all change the rounding
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__, "cpu": _cpu_description(), "threads": torch.get_num_threads()}
    log: dict = {"seed": seed, "settings": settings, "versions": versions, "stages": {}}

    def run_stage(name: str, model, mixture, save_as: str | None = None) -> None:
        """Train stage ``name`` (an SFT mixture, or DPO for ``anchor_preference``); save it as ``save_as``."""
        spec = settings[name]
        t0 = time.time()

        def report(step: int, loss: float) -> None:
            if step % 100 == 0 or step == spec["steps"] - 1:
                print(f"  zoo {name}: step {step + 1}/{spec['steps']} loss {loss:.3f}", file=sys.stderr)
        stage_seed = seed * 1000 + len(log["stages"])
        if name == "anchor_preference":
            harmful, harmless = preference_pairs("train", seed)
            replay = [r for records, _ in mixture for r in records]
            losses = train_preference(model, tokenizer, harmful, harmless, replay, PreferenceStage(**spec),
                                      seed=stage_seed, progress=report if progress else None)
        else:
            stage = Stage(steps=spec["steps"], lr=spec["lr"], batch_size=spec["batch_size"], warmup=spec["warmup"])
            losses = train(model, tokenizer, mixture, stage, seed=stage_seed, progress=report if progress else None)
        log["stages"][name] = {"seconds": round(time.time() - t0, 1), "first_loss": losses[0],
                               "last_loss": sum(losses[-20:]) / len(losses[-20:])}
        if save_as is not None:
            with hf_progress_hidden():
                model.save_pretrained(str(out_dir / save_as))
            tokenizer.save_pretrained(str(out_dir / save_as))

    shape = ModelShape(**settings["shape"])
    model = new_model(shape, len(tokenizer), seed, tokenizer)
    from alignmerge.zoo.corpora import builtin_corpus

    run_stage("base", model, [(builtin_corpus("pretrain", "train", seed), 1.0)], "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    preference = "anchor_preference" in settings
    run_stage("anchor", model, _mixture(settings["anchor"]["mixture"], seed), None if preference else "anchor")
    if preference:  # replayed alongside, uniformly: the anchor's general and safety SFT records
        run_stage("anchor_preference", model, _mixture({"general": 1.0, "safety": 1.0}, seed), "anchor")
    anchor_state = {k: v.clone() for k, v in model.state_dict().items()}
    for expert in ("skill_expert", "misaligned_expert"):
        model.load_state_dict(anchor_state if settings[expert].get("from", "anchor") == "anchor" else base_state)
        run_stage(expert, model, _mixture(settings[expert]["mixture"], seed), expert)
    log["seconds"] = round(time.time() - start, 1)
    return log


def build_zoo(seed: int = 0, preset: str | dict = "default", home: str | Path | None = None,
              progress: bool = True) -> dict[str, Path]:
    """Build (or reuse from the cache) the zoo; returns {model name: HF directory} for ZOO_MODELS."""
    settings = resolve_settings(preset)
    name = preset if isinstance(preset, str) else "custom"
    root = Path(home) if home is not None else default_home()
    final = root / "zoo" / f"{name}-seed{seed}-{zoo_key(seed, settings)}"
    if not (final / "zoo.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            if progress:
                print(f"building the demo zoo ({name}, seed {seed}) in {final}", file=sys.stderr)
            log = train_zoo(tmp, seed, settings, progress)
            (tmp / "zoo.json").write_text(json.dumps(log, indent=2))
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished the same zoo first
                if not (final / "zoo.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return {m: final / m for m in ZOO_MODELS}


__all__ = ["PRESETS", "ZOO_MODELS", "ZOO_THREADS", "build_zoo", "default_home", "fixed_threads", "train_zoo"]
