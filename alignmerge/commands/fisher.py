"""Compute the diagonal Fisher of a model on a data set and save it as safetensors.

F = (1/N) Σ_n (∇ log p(y_n | x_n))², one term per sequence n, log p summed over the scored
tokens (every token after the first for `text` records; the response for `prompt`/`response`
records). --kind empirical uses the data's tokens, --kind true samples them from the model
(seeded). The file holds fp32 tensors under the model's own names plus metadata (model, data,
kind, N). When the model does not fit --max-memory, it is streamed layer by layer.

Examples:
  alignmerge fisher ./anchor --data builtin:safety --out anchor.fisher.safetensors
  alignmerge fisher ./expert --data train.jsonl --out f.safetensors --kind true --samples 256 --max-memory 8GB
"""
from __future__ import annotations

import argparse
import sys

HELP = "compute a model's diagonal Fisher on data (JSONL or builtin:<corpus>)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="Hugging Face model directory (config.json, safetensors, tokenizer.json)")
    parser.add_argument("--data", required=True,
                        help="JSONL file (text, or prompt+response per line) or builtin:<name>")
    parser.add_argument("--out", required=True, help="output .safetensors file (written atomically)")
    parser.add_argument("--kind", choices=["empirical", "true"], default="empirical",
                        help="labels from the data (empirical) or sampled from the model (true); default empirical")
    parser.add_argument("--samples", type=int, default=None, help="use the first N records (default: all)")
    parser.add_argument("--max-length", type=int, default=512,
                        help="longest sequence in tokens, also capped by the model's context (default 512)")
    parser.add_argument("--on-long", choices=["truncate", "error"], default="truncate",
                        help="what to do with longer sequences (default: truncate with a warning)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward/backward (default 8)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    parser.add_argument("--max-memory", default=None,
                        help="memory budget such as 8GB; above it the model is streamed layer by layer")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype of weights and activations (Fisher is always accumulated in fp32)")
    parser.add_argument("--format", choices=["chat", "plain"], default="chat",
                        help="prompt/response records as 'User: <prompt>\\nAssistant: <response>' (chat, default) or "
                             "plainly concatenated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the label sampling for --kind true")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from alignmerge.fisher import compute_fisher

    fisher = compute_fisher(
        args.model_dir, args.data, args.out, kind=args.kind, samples=args.samples, max_length=args.max_length,
        batch_size=args.batch_size, device=args.device, max_memory=args.max_memory, seed=args.seed,
        dtype=getattr(torch, args.dtype), on_long=args.on_long, chat=args.format == "chat",
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    total = sum(float(t.sum()) for t in fisher.values())
    print(f"wrote {args.out}: {len(fisher)} tensors, kind={args.kind}, sum={total:.4g}")
    return 0
