"""Peak memory of the Fisher pass against depth: in memory vs streamed layer by layer.

For each depth (default 2, 4, 8, 16 layers) a random Llama checkpoint (width 512, vocab 4096,
fp32) is written to a temporary directory; each pass runs in a fresh process via
alignmerge.fisher.compute_fisher on N sequences of T tokens, and reports the peak RSS during the
pass (the kernel's VmHWM, reset just before it) above the RSS before it. Streaming keeps about one
layer of weights, its Fisher, and one batch of activations; boundary activations are spilled to
disk on a CPU-only run, so its peak should stay flat with depth while the in-memory pass grows
with the model (weights + an fp32 Fisher buffer).

  python benchmarks/fisher_streaming_memory.py [--depths 2,4,8,16 --width 512 --n 16 --t 128]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHARS = "abcdefghijklmnopqrstuvwxyz .,?!'0123456789"


def make_checkpoint(path: Path, layers: int, width: int, vocab: int) -> None:
    import torch
    from tokenizers import Tokenizer, models, processors
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(layers)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=width // 64, num_key_value_heads=width // 64,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab_map, merges=[], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))


def child(args) -> None:
    import random

    import torch

    import transformers.models.llama.modeling_llama  # noqa: F401 - imports before the baseline
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignmerge.fisher import compute_fisher
    from alignmerge.fisher.compute import _skeleton

    torch.set_num_threads(args.threads)
    _skeleton(AutoConfig.from_pretrained(args.model), torch.float32)  # warm lazy imports (meta device, no memory)
    del AutoModelForCausalLM
    rng = random.Random(0)
    records = [{"text": "".join(rng.choice(CHARS) for _ in range(args.t - 1))} for _ in range(args.n)]
    base = rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    compute_fisher(args.model, records, args.out, batch_size=args.batch_size, stream=args.stream == "stream",
                   max_length=args.t)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    print(json.dumps({"seconds": seconds, "peak_extra_bytes": peak - base}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="2,4,8,16")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--t", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--stream", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    # a fixed mmap threshold makes glibc return freed layer-sized blocks to the OS at once, so
    # RSS shows live memory rather than the allocator's high-water mark
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_ARENA_MAX="2",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    rows = []
    print(f"Llama width={args.width} vocab={args.vocab} fp32, N={args.n} T={args.t} batch={args.batch_size}, "
          f"{args.threads} threads; peak RSS during the pass above the RSS before it")
    print(f"{'layers':>6}{'params M':>10}{'in-memory MB':>14}{'s':>7}{'streamed MB':>13}{'s':>7}")
    with tempfile.TemporaryDirectory(prefix="fisher-stream-bench-") as tmp:
        for depth in [int(d) for d in args.depths.split(",")]:
            model = Path(tmp) / f"llama{depth}"
            make_checkpoint(model, depth, args.width, args.vocab)
            params = sum(os.path.getsize(p) for p in model.glob("*.safetensors")) / 4
            row = {"layers": depth, "params": params}
            for mode in ("memory", "stream"):
                cmd = [sys.executable, __file__, "--child", f"--model={model}", f"--out={tmp}/f{depth}{mode}.st",
                       f"--stream={mode}", f"--n={args.n}", f"--t={args.t}", f"--batch-size={args.batch_size}",
                       f"--threads={args.threads}"]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr)
                row[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{depth:>6}{params / 1e6:>10.1f}{row['memory']['peak_extra_bytes'] / 1e6:>14.0f}"
                  f"{row['memory']['seconds']:>7.1f}{row['stream']['peak_extra_bytes'] / 1e6:>13.0f}"
                  f"{row['stream']['seconds']:>7.1f}", flush=True)
            for f in model.glob("*"):
                f.unlink()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
