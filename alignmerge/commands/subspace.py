"""Compute an aligned anchor's alignment subspace (per 2-D weight, orthonormal U and V) as safetensors.

--method gradient (default): U, V = top-r eigenvectors of Σ_n G_n G_nᵀ and Σ_n G_nᵀ G_n, G_n the
gradient of sequence n's alignment loss −log p(aligned response | prompt) (response tokens only),
computed without forming G_n. --method delta: top-r singular vectors of anchor − base (--base).
The file stores <weight>.U and <weight>.V (fp32) with metadata. --fisher-out also writes the anchor's
diagonal Fisher on the same data (the alignment Fisher F_align of merge_method alignmerge).

Examples:
  alignmerge subspace ./anchor --data builtin:alignment --rank 16 --out anchor.subspace.safetensors
  alignmerge subspace ./anchor --method delta --base ./base --rank 8 --out anchor.delta.safetensors
"""
from __future__ import annotations

import argparse

from alignmerge.data import STATS_SAMPLES

HELP = "compute the anchor's alignment subspace (gradient or delta estimator) as safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("anchor_dir", help="Hugging Face directory of the aligned anchor model")
    parser.add_argument("--data", default=None,
                        help="alignment data: JSONL of prompt/response pairs or builtin:<name> (gradient method)")
    parser.add_argument("--rank", type=int, default=16, help="subspace rank r per side (default 16)")
    parser.add_argument("--out", required=True, help="output .safetensors file (written atomically)")
    parser.add_argument("--method", choices=["gradient", "delta"], default="gradient",
                        help="per-sample alignment-loss gradients (default) or SVD of anchor - base")
    parser.add_argument("--base", default=None, help="base model directory (for --method delta)")
    parser.add_argument("--samples", type=int, default=STATS_SAMPLES,
                        help=f"use the first N records (default {STATS_SAMPLES})")
    parser.add_argument("--max-length", type=int, default=256, help="longest sequence in tokens (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward/backward (default 8)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--max-memory", default=None,
                        help="memory budget such as 8GB; above it the gradient pass streams layer by layer")
    parser.add_argument("--fisher-out", default=None,
                        help="also write the anchor's diagonal Fisher on --data to this file (F_align)")


def run(args: argparse.Namespace) -> int:
    from alignmerge.subspace import alignment_fisher, compute_subspace

    bases = compute_subspace(args.anchor_dir, args.data, args.rank, args.out, method=args.method,
                             base_dir=args.base, samples=args.samples, max_length=args.max_length,
                             batch_size=args.batch_size, device=args.device, max_memory=args.max_memory)
    one_sided = sum(1 for u, v in bases.values() if u is None or v is None)
    print(f"wrote {args.out}: {len(bases)} weights, rank {args.rank}, method {args.method}"
          + (f" ({one_sided} one-sided)" if one_sided else ""))
    if args.fisher_out:
        if args.data is None:
            from alignmerge.errors import ConfigError

            raise ConfigError("--fisher-out needs --data (the alignment data)")
        alignment_fisher(args.anchor_dir, args.data, args.fisher_out, samples=args.samples,
                         max_length=args.max_length, batch_size=args.batch_size, device=args.device,
                         max_memory=args.max_memory)
        print(f"wrote {args.fisher_out}: alignment Fisher of {args.anchor_dir}")
    return 0
