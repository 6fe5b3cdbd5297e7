"""8B-scale streaming: three checkpoints with Llama-3-8B shapes through the streaming executor.

Writes base + 2 experts with Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
vocabulary 128256; random bf16; --layers to shorten), then for each layer count in --layers runs `alignmerge
merge` (ties) as its own process and prints wall time (and the merge's own time, start-up excluded), bytes
read and written, effective GB/s against the memory-copy rate measured in the same run, the ceiling on that
rate set by the output's file system (alignmerge's output writer alone, nothing merged, on 2 GB), and peak
RSS; mergekit's ties runs on the same files for comparison (at --mergekit-layers), and merge_method
alignmerge with its default parameters (AQI loop off) on synthetic expert and alignment Fisher files and a
synthetic subspace (at --alignmerge-layers, under --alignmerge-max-memory; tool "alignmerge-am" in the
table; its bytes read exclude the Fisher files, which go to --stats-dir). With --device cuda the table adds
each alignmerge run's peak CUDA allocation (torch.cuda.max_memory_allocated, as `alignmerge merge` prints
it). Disk: 3 x 16 GB for 32 layers, plus 3 x 32 GB of fp32 Fisher files for alignmerge (--fisher-dtype
bfloat16: 3 x 16 GB).

    python benchmarks/scale_8b.py --layers 4 8 32
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from measure import copy_rate_gbs, merge_seconds, run_measured, writer_rate_gbs  # noqa: E402
from synthetic_llama import write_llama_family  # noqa: E402

LLAMA3_8B = dict(hidden=4096, intermediate=14336, vocab=128256, heads=32, kv_heads=8)


def ties_config(base: Path, experts: list[Path]) -> dict:
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts],
            "parameters": {"normalize": True}, "dtype": "bfloat16"}


def write_synthetic_stats(root: Path, base: Path, experts: list[Path], rank: int = 16,
                          fisher_dtype: str = "float32", device: str = "cpu") -> dict:
    """Random stand-ins for the data passes (an 8B forward is out of reach here): per-expert Fisher
    files and the anchor's alignment Fisher F_align (|N(0,1)| + 0.1 in ``fisher_dtype``, streamed tensor
    by tensor) and an orthonormal rank-r subspace per 2-D layer weight, drawn on ``device``. Returns the
    alignmerge config: default parameters with the AQI loop off (it needs a forward pass)."""
    import torch

    from alignmerge.io import Checkpoint, OutputTensor, ShardedWriter
    from alignmerge.subspace import save_subspace

    ck = Checkpoint(base)
    names = ck.names()
    gen = torch.Generator(device).manual_seed(1)
    dtype = getattr(torch, fisher_dtype)
    fisher_files = []
    for label in [*(str(k) for k in range(len(experts))), "-align"]:
        out = root / f"fisher{label}-{fisher_dtype}"
        if not (out / "model.safetensors").exists():
            writer = ShardedWriter(out, [OutputTensor(n, ck.shape(n), dtype) for n in names],
                                   max_shard_bytes=2**62)
            writer.open()
            for n in names:
                writer.write(n, torch.randn(ck.shape(n), generator=gen, device=device).abs_().add_(0.1).to(dtype))
            writer.close()
        fisher_files.append(out / "model.safetensors")
    subspace = root / "subspace.safetensors"
    if not subspace.exists():
        bases = {}
        for n in names:
            shape = ck.shape(n)
            if len(shape) == 2 and ".layers." in n:
                u = torch.linalg.qr(torch.randn(shape[0], rank, generator=gen, device=device))[0]
                v = torch.linalg.qr(torch.randn(shape[1], rank, generator=gen, device=device))[0]
                bases[n] = (u.cpu(), v.cpu())
        save_subspace(bases, subspace, {"estimator": "random (benchmark)", "rank": rank})
    return {"merge_method": "alignmerge", "anchor": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 1.0, "fisher": str(f)}}
                       for e, f in zip(experts, fisher_files)],
            "parameters": {"subspace": str(subspace), "align_fisher": str(fisher_files[-1]), "use_aqi_loop": False},
            "dtype": "bfloat16"}


def peak_cuda_gb(merge_stdout: str) -> float | None:
    """The peak device allocation that `alignmerge merge --device cuda` prints (torch.cuda.max_memory_allocated)."""
    match = re.search(r"peak CUDA memory allocated: ([0-9.]+) GB", merge_stdout)
    return float(match.group(1)) if match else None


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/alignmerge-bench/scale_8b")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-memory", default="1GB")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mergekit-layers", type=int, nargs="*", default=None,
                    help="layer counts at which mergekit also runs (default: the smallest of --layers; "
                         "it needs ~100 s per 8B-shaped layer on 2 cores)")
    ap.add_argument("--alignmerge-layers", type=int, nargs="*", default=[],
                    help="layer counts at which alignmerge (synthetic Fisher and subspace files) also runs "
                         "(default: none; its fp32 Fisher files take 8 bytes per parameter of disk)")
    ap.add_argument("--alignmerge-max-memory", default="6GB",
                    help="--max-memory of the alignmerge runs: each projected weight solves whole in fp32 "
                         "(about 72 bytes per element for two experts: 4.2 GB for a 14336x4096 MLP weight); "
                         "the embedding and lm_head merge in row chunks")
    ap.add_argument("--fisher-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="storage of the synthetic Fisher files (bfloat16 halves their disk: 2 bytes per parameter)")
    ap.add_argument("--stats-dir", default=None,
                    help="where the synthetic Fisher and subspace files go (default: beside the checkpoints)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()

    rate = copy_rate_gbs()
    print(f"memory copy rate (read+write): {rate:.1f} GB/s; host budget --max-memory {args.max_memory} "
          f"(alignmerge: {args.alignmerge_max_memory})")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    writer = writer_rate_gbs(args.work, 2 * 10**9)
    print(f"output writer alone into {args.work}: {writer:.2f} GB/s (2 GB, nothing merged); 'merge s' is the "
          "merge's own time (start-up excluded), 'ceiling' the rate no merge writing there can pass, as a "
          "fraction of the copy rate")
    cuda = args.device.startswith("cuda")
    print(f"{'layers':>6} {'tool':<13} {'wall s':>8} {'merge s':>8} {'read GB':>8} {'written GB':>10} {'GB/s':>6} "
          f"{'of copy':>7} {'ceiling':>7} {'peak RSS GB':>11}" + (f" {'peak CUDA GB':>12}" if cuda else ""))
    rows = []
    for layers in args.layers:
        root = Path(args.work) / f"L{layers}"
        base, experts = write_llama_family(root / "models", n_experts=2, layers=layers, device=args.device,
                                           **LLAMA3_8B)
        cfg = root / "ties.yaml"
        cfg.write_text(yaml.safe_dump(ties_config(base, experts)))
        read = sum(dir_bytes(d) for d in [base, *experts])
        runs = {"alignmerge": [sys.executable, "-m", "alignmerge", "merge", str(cfg), str(root / "out-alignmerge"),
                               "--threads", str(args.threads), "--max-memory", args.max_memory,
                               "--device", args.device, "--no-progress", "--overwrite"]}
        mergekit_layers = [min(args.layers)] if args.mergekit_layers is None else args.mergekit_layers
        if layers in mergekit_layers and shutil.which("mergekit-yaml"):
            shutil.rmtree(root / "out-mergekit", ignore_errors=True)
            runs["mergekit"] = [shutil.which("mergekit-yaml"), str(cfg), str(root / "out-mergekit"), "--quiet",
                                "--num-threads", str(args.threads)]
        if layers in args.alignmerge_layers:
            am_cfg = root / "alignmerge.yaml"
            stats_root = Path(args.stats_dir) / f"L{layers}" if args.stats_dir else root
            stats_root.mkdir(parents=True, exist_ok=True)
            am_cfg.write_text(yaml.safe_dump(write_synthetic_stats(stats_root, base, experts,
                                                                   fisher_dtype=args.fisher_dtype,
                                                                   device=args.device)))
            runs["alignmerge-am"] = [sys.executable, "-m", "alignmerge", "merge", str(am_cfg),
                                     str(root / "out-alignmerge-am"), "--threads", str(args.threads), "--max-memory",
                                     args.alignmerge_max_memory, "--device", args.device, "--no-progress", "--overwrite"]
        print(f"{time.strftime('%H:%M:%S')} inputs ready for {layers} layers", flush=True)
        for tool, cmd in runs.items():
            log = root / f"{tool}.stdout"
            wall, rss, code = run_measured(cmd, stdout_path=log)
            written = dir_bytes(root / f"out-{tool}") if code == 0 else 0
            gbs = (read + written) / wall / 1e9
            stdout = log.read_text(errors="replace")
            device_gb = peak_cuda_gb(stdout) if cuda and tool != "mergekit" else None
            inside = merge_seconds(stdout) if tool != "mergekit" else None
            ceiling = (read + written) / written * writer / rate if written else float("nan")
            print(f"{layers:>6} {tool:<13} {wall:8.1f} {inside or float('nan'):8.1f} {read / 1e9:8.2f} "
                  f"{written / 1e9:10.2f} {gbs:6.2f} {gbs / rate:7.0%} {ceiling:7.0%} {rss:11.2f}"
                  + (f" {device_gb or float('nan'):12.2f}" if cuda else "") + ("" if code == 0 else f"  (exit {code})"))
            rows.append({"layers": layers, "tool": tool, "wall_s": wall, "merge_s": inside, "read_bytes": read,
                         "written_bytes": written, "peak_rss_gb": rss, "peak_cuda_gb": device_gb, "exit": code})
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            if args.stats_dir:
                shutil.rmtree(Path(args.stats_dir) / f"L{layers}", ignore_errors=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
