"""alignmerge vs mergekit on three random Llama-shaped bf16 checkpoints (default ~0.54B parameters each).

Runs linear and ties through both tools in one run, each as a separate process, and prints wall
time (the median of --repeats runs, each writing a fresh directory), peak RSS (the child's VmHWM, the
largest over the runs) and the speed ratio. Checkpoints are written once under --work and reused;
both tools then read them from the page cache. Outputs go under --out-root (default --work).

It also prints the effective rate of each merge (bytes read + written over wall time) against the
memory-copy rate, and the ceiling that the output's file system puts on that rate: the time alignmerge's
output writer alone (checks, checksum, writes, fsync; nothing merged) needs for the output bytes.

    python benchmarks/merge_vs_mergekit.py [--layers 28] [--hidden 1024] [--methods linear ties] [--repeats 3]
    python benchmarks/merge_vs_mergekit.py --methods linear --skip-mergekit --out-root /dev/shm   # tmpfs output
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from measure import copy_rate_gbs, merge_seconds, run_measured, writer_rate_gbs  # noqa: E402
from synthetic_llama import write_llama_family  # noqa: E402


def config_for(method: str, base: Path, experts: list[Path]) -> dict:
    models = [{"model": str(e), "parameters": {"weight": 1.0 / len(experts) if method == "linear" else 1.0,
                                               **({"density": 0.5} if method == "ties" else {})}}
              for e in experts]
    cfg = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if method != "linear":
        cfg["base_model"] = str(base)
        cfg["parameters"] = {"normalize": True}
    return cfg


def run_repeated(cmd: list[str], out: Path, repeats: int) -> tuple[float, float, int, float | None]:
    """(median wall s, largest peak RSS GB, first non-zero exit code or 0, median of the merge's own time as
    ``alignmerge merge`` prints it, else None) of ``repeats`` runs of ``cmd``, each into a fresh ``out``
    (deleting it is not timed)."""
    runs, inside = [], []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        with tempfile.NamedTemporaryFile() as stdout:
            runs.append(run_measured(cmd, stdout_path=stdout.name))
            seconds = merge_seconds(Path(stdout.name).read_text(errors="replace"))
        if seconds is not None:
            inside.append(seconds)
    walls = sorted(r[0] for r in runs)
    inside.sort()
    return (walls[len(walls) // 2], max(r[1] for r in runs), next((r[2] for r in runs if r[2]), 0),
            inside[len(inside) // 2] if inside else None)


def warm_page_cache(dirs: list[Path]) -> None:
    """Read every checkpoint file once, so each tool reads its inputs from the page cache."""
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/alignmerge-bench/merge_vs_mergekit")
    ap.add_argument("--out-root", help="directory for the merged outputs (default: --work)")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--methods", nargs="+", default=["linear", "ties"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool; the median wall time is reported")
    args = ap.parse_args()

    work = Path(args.work)
    heads = max(1, args.hidden // 64)
    base, experts = write_llama_family(work / "models", n_experts=3, hidden=args.hidden,
                                       intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
                                       heads=heads, kv_heads=heads)
    from alignmerge.io import Checkpoint

    ck = Checkpoint(base)
    n_params = sum(ck.nbytes(n) for n in ck.names()) // 2
    print(f"checkpoints: 3 experts + base, {n_params / 1e6:.0f}M parameters each (bf16), in {work / 'models'}")
    out_root = Path(args.out_root) if args.out_root else work
    out_root.mkdir(parents=True, exist_ok=True)
    rate = copy_rate_gbs()
    print(f"memory copy rate (read+write): {rate:.1f} GB/s")
    writer_rate = writer_rate_gbs(out_root, n_params * 2)
    print(f"output writer alone into {out_root}: {writer_rate:.2f} GB/s ({n_params * 2 / 1e9:.2f} GB, nothing merged)")
    print(f"{'method':<8} {'tool':<11} {'wall s':>8} {'peak RSS GB':>12}")
    for method in args.methods:
        warm_page_cache([base, *experts])
        cfg_path = work / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(config_for(method, base, experts)))
        results = {}
        out = out_root / f"out-{method}-alignmerge"
        ours = [sys.executable, "-m", "alignmerge", "merge", str(cfg_path), str(out), "--threads", str(args.threads),
                "--no-progress"]
        results["alignmerge"] = run_repeated(ours, out, args.repeats)
        results["no-prefetch"] = run_repeated(ours + ["--no-prefetch"], out, args.repeats)
        if not args.skip_mergekit and shutil.which("mergekit-yaml"):
            out = out_root / f"out-{method}-mergekit"
            results["mergekit"] = run_repeated([shutil.which("mergekit-yaml"), str(cfg_path), str(out), "--quiet",
                                                "--num-threads", str(args.threads)], out, args.repeats)
        out = out_root / f"out-{method}-alignmerge"
        written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        moved = sum(f.stat().st_size for d in ([base] if method != "linear" else []) + experts
                    for f in d.glob("*.safetensors")) + written
        for tool, (wall, rss, code, _) in results.items():
            print(f"{method:<8} {tool:<11} {wall:8.2f} {rss:12.2f}" + ("" if code == 0 else f"  (exit {code})"))
        wall = results["alignmerge"][0]
        print(f"{method:<8} prefetch   {results['no-prefetch'][0] / wall:8.2f}x faster than --no-prefetch "
              "(read-ahead and write-behind threads off); "
              f"{moved / wall / 1e9:.2f} GB/s end to end = {moved / wall / 1e9 / rate:.0%} of the copy rate "
              "(process start included)")
        inside = results["alignmerge"][3]
        if inside:
            print(f"{method:<8} in-process {inside:8.2f} s as the merge reports it (interpreter and torch start-up "
                  f"excluded): {moved / inside / 1e9:.2f} GB/s = {moved / inside / 1e9 / rate:.0%} of the copy rate")
        if written:
            ceiling = moved / written * writer_rate
            print(f"{method:<8} ceiling    writing the {written / 1e9:.2f} GB output alone takes "
                  f"{written / writer_rate / 1e9:.2f} s, so no merge into {out_root} can pass {ceiling:.2f} GB/s "
                  f"= {ceiling / rate:.0%} of the copy rate")
        if "mergekit" in results and results["mergekit"][2] == 0 and results["alignmerge"][2] == 0:
            print(f"{method:<8} speed-up   {results['mergekit'][0] / results['alignmerge'][0]:8.1f}x")


if __name__ == "__main__":
    main()
