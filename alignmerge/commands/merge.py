"""Merge the models listed in a mergekit-style YAML config into a new Hugging Face model directory.

Inputs are read lazily, one tensor (or row chunk) at a time, merged on the chosen device and
streamed into pre-allocated safetensors shards in a hidden staging directory, which is renamed
to OUT_DIR only when the merge is complete.

Example config (TIES):

  merge_method: ties
  base_model: ./base
  models:
    - model: ./math-expert
      parameters: {weight: 1.0, density: 0.5}
    - model: ./code-expert
      parameters: {weight: 1.0, density: 0.5}
  parameters: {normalize: true}
  dtype: float32
  out_dtype: bfloat16
"""
from __future__ import annotations

HELP = "merge checkpoints described by a YAML config"


def add_arguments(p) -> None:
    p.add_argument("config", help="merge config (YAML, mergekit-compatible)")
    p.add_argument("out_dir", help="output model directory (created atomically)")
    p.add_argument("--device", default="cpu", help="where tensors are merged: cpu or cuda[:N] (default: cpu)")
    p.add_argument("--out-shard-size", default="5GB", metavar="SIZE",
                   help="maximum bytes per output shard, e.g. 2GB or 500MB (default: 5GB)")
    p.add_argument("--seed", type=int, default=0, help="seed for randomised methods such as DARE (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and the C++ kernels")
    p.add_argument("--max-memory", default="1GB", metavar="SIZE",
                   help="memory budget for tensor buffers and the method's working memory; larger tensors are "
                        "merged in row chunks, and a tensor the method must merge whole but cannot fit is refused "
                        "before any compute (default: 1GB)")
    p.add_argument("--allow-nonfinite", action="store_true", help="merge inputs containing NaN/Inf instead of failing")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model.bin weights (loaded with torch.load(weights_only=True))")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--resume", action="store_true", help="continue an interrupted merge from its completed shards")
    p.add_argument("--no-prefetch", action="store_true",
                   help="disable the read-ahead and write-behind threads (read, merge and write in turn)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    import gc

    # torch's import creates hundreds of thousands of long-lived objects and no garbage worth collecting:
    # with the cyclic collector off it took 1.06-1.09 s here instead of 1.13-1.21 s. Freezing what the
    # imports made spares the collector rescanning it later (one full collection cost 0.06 s of a 1 s merge).
    gc.disable()
    from alignmerge.api import merge

    gc.freeze()
    gc.enable()
    result = merge(
        args.config, args.out_dir, device=args.device, out_shard_size=args.out_shard_size, seed=args.seed,
        threads=args.threads, max_memory=args.max_memory, allow_nonfinite=args.allow_nonfinite,
        allow_pickle=args.allow_pickle, overwrite=args.overwrite, resume=args.resume,
        prefetch=not args.no_prefetch, progress=not args.no_progress,
    )
    print(f"wrote {result.out_dir} ({result.tensors} tensors, {result.bytes_written / 1e6:.1f} MB "
          f"in {len(result.shards)} shard(s)) in {result.seconds:.2f} s")
    if result.peak_device_bytes is not None:
        print(f"peak CUDA memory allocated: {result.peak_device_bytes / 1e9:.2f} GB (--max-memory {args.max_memory})")
    return 0
