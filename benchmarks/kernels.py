"""Kernel microbenchmark: every registered kernel on every backend present, against the copy rate.

For each case it prints the best time over --repeat runs (after one warm-up run that also pays the
first-touch page faults), the effective bandwidth (bytes a single pass must move: one read of every
input plus one write of the output, divided by the time) and that bandwidth as a fraction of the
memory-copy rate measured in the same run (torch ``copy_`` between two reused buffers of the
benchmark's input size; read + write bytes). Rows are appended to a CSV (--csv).

Cases are produced by functions registered with ``@case``; later kernel families add theirs the
same way (a function taking the parsed ``Context`` and returning ``Case`` objects).

    python benchmarks/kernels.py                      # 256M-element bf16 merges, 16M for TIES vs torch
    python benchmarks/kernels.py --numel 4000000 --ties-numel 1000000 --repeat 3   # quick run
    python benchmarks/kernels.py --only ties --backends cpp
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alignmerge import ops  # noqa: E402
from alignmerge.ops._backend import available_backends, cpp_extension  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Context:
    numel: int            # elements per tensor for the merge kernels
    ties_numel: int       # elements per tensor for the fused-TIES vs plain-torch comparison
    experts: int
    dtype: torch.dtype
    out_dtype: torch.dtype
    device: torch.device
    backends: list[str]
    torch_max_numel: int  # the torch reference allocates fp32 temporaries: skip it above this
    density: float
    _cache: dict = field(default_factory=dict)

    def inputs(self, numel: int):
        """Base + experts (fine-tune-like: base + small noise), made once per size and reused."""
        key = ("inputs", numel)
        if key not in self._cache:
            g = torch.Generator().manual_seed(0)
            base = torch.empty(numel, dtype=self.dtype)
            experts = [torch.empty(numel, dtype=self.dtype) for _ in range(self.experts)]
            step = 1 << 24
            for lo in range(0, numel, step):  # fill in slices: no full-size fp32 temporaries
                hi = min(numel, lo + step)
                b = 0.02 * torch.randn(hi - lo, generator=g)
                base[lo:hi] = b.to(self.dtype)
                for x in experts:
                    x[lo:hi] = (b + 0.002 * torch.randn(hi - lo, generator=g)).to(self.dtype)
            self._cache[key] = (base.to(self.device), [x.to(self.device) for x in experts])
        return self._cache[key]

    def out(self, numel: int, dtype: torch.dtype | None = None):
        key = ("out", numel, dtype or self.out_dtype)
        if key not in self._cache:
            self._cache[key] = torch.empty(numel, dtype=dtype or self.out_dtype, device=self.device)
        return self._cache[key]

    def drop(self, numel: int) -> None:
        for key in [k for k in self._cache if k[1] == numel]:
            del self._cache[key]


@dataclass
class Case:
    kernel: str
    backend: str
    numel: int
    nbytes: int                   # bytes one pass must move (reads + writes)
    run: Callable[[], object]
    note: str = ""


CASE_FACTORIES: list[Callable[[Context], list[Case]]] = []


def case(fn: Callable[[Context], list[Case]]):
    """Register a function that returns the benchmark cases of one kernel family."""
    CASE_FACTORIES.append(fn)
    return fn


def _sizes(ctx: Context, numel: int, inputs: int) -> int:
    return numel * (inputs * ctx.dtype.itemsize + ctx.out_dtype.itemsize)


def _backends_for(ctx: Context, numel: int) -> list[str]:
    return [b for b in ctx.backends if b != "torch" or numel <= ctx.torch_max_numel]


@case
def merge_cases(ctx: Context) -> list[Case]:
    n, k = ctx.numel, ctx.experts
    base, xs = ctx.inputs(n)
    out = ctx.out(n)
    w = [1.0 / k] * k
    dens = ctx.density
    cases = []
    for be in _backends_for(ctx, n):
        cases.append(Case("weighted_sum", be, n, _sizes(ctx, n, k),
                          lambda be=be: ops.weighted_sum(xs, w, out=out, backend=be)))
        cases.append(Case("task_arithmetic", be, n, _sizes(ctx, n, k + 1),
                          lambda be=be: ops.task_arithmetic(base, xs, w, lambda_=0.9, out=out, backend=be)))
        cases.append(Case("magnitude_thresholds", be, n, n * (k + 1) * ctx.dtype.itemsize,
                          lambda be=be: ops.magnitude_thresholds(base, xs, dens, backend=be),
                          "2-3 selection passes; bytes = one read of base + experts"))
        th = ops.magnitude_thresholds(base, xs, dens, backend="cpp" if "cpp" in ctx.backends else be)
        cases.append(Case("ties_apply", be, n, _sizes(ctx, n, k + 1),
                          lambda be=be, th=th: ops.ties(base, xs, w, density=dens, thresholds=th, out=out,
                                                        backend=be),
                          "thresholds given: sparsify + sign election + disjoint mean, one pass"))
        cases.append(Case("ties", be, n, _sizes(ctx, n, k + 1),
                          lambda be=be: ops.ties(base, xs, w, density=dens, out=out, backend=be),
                          "selection + apply; bytes = one pass"))
        cases.append(Case("dare_ties", be, n, _sizes(ctx, n, k + 1),
                          lambda be=be: ops.dare(base, xs, w, density=dens, seed=0, tensor_index=0,
                                                 consensus=True, out=out, backend=be)))
    return cases


@case
def check_cases(ctx: Context) -> list[Case]:
    """The executor's per-byte checks: NaN/Inf count of an input (every backend) and the output shards'
    running checksum, CRC-32C from the C++ extension against zlib's CRC-32 (the fallback)."""
    import zlib

    n = ctx.numel
    base, _ = ctx.inputs(n)
    cases = [Case("count_nonfinite", be, n, n * ctx.dtype.itemsize,
                  lambda be=be: ops.count_nonfinite(base, backend=be)) for be in _backends_for(ctx, n)]
    if ctx.device.type == "cpu":
        raw = memoryview(base.view(torch.uint8).numpy())
        cases.append(Case("shard_checksum", "zlib", n, len(raw), lambda: zlib.crc32(raw), "CRC-32 (fallback)"))
        ext = cpp_extension()
        if ext is not None:
            cases.append(Case("shard_checksum", "cpp", n, len(raw), lambda: ext.crc32c(raw), "CRC-32C"))
    return cases


def ties_plain_torch(base: torch.Tensor, xs: list[torch.Tensor], weights: list[float], density: float):
    """The plain-torch TIES composition: kthvalue threshold, sign election, masked (disjoint) mean."""
    b = base.float()
    taus = torch.stack([x.float() - b for x in xs])
    n = b.numel()
    keep = max(1, int(density * n))
    for tau in taus:
        mag = tau.abs()
        threshold = mag.kthvalue(n - keep + 1).values
        tau.mul_(mag >= threshold)
    w = torch.tensor(weights, dtype=torch.float32, device=b.device).view(-1, 1)
    taus.mul_(w)
    elected = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(taus) == elected
    merged = (taus * agree).sum(0) / (w * agree).sum(0).clamp_min(1e-8)
    return (b + merged).to(base.dtype)


@case
def ties_vs_torch_cases(ctx: Context) -> list[Case]:
    n, k = ctx.ties_numel, ctx.experts
    base, xs = ctx.inputs(n)
    out = ctx.out(n)
    w = [1.0] * k
    cases = [Case("ties_plain_torch", "torch", n, _sizes(ctx, n, k + 1),
                  lambda: ties_plain_torch(base, xs, w, ctx.density), "kthvalue + sign election + masked mean")]
    for be in ctx.backends:
        if be != "torch":
            cases.append(Case("ties", be, n, _sizes(ctx, n, k + 1),
                              lambda be=be: ops.ties(base, xs, w, density=ctx.density, out=out, backend=be),
                              "fused, for the plain-torch comparison"))
    return cases


def copy_rate(ctx: Context, numel: int, repeat: int) -> float:
    """GB/s of torch copy_ (read + write) between reused buffers of numel input-dtype elements."""
    src, _ = ctx.inputs(numel)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src), ctx.device) for _ in range(repeat))
    return 2 * src.numel() * src.element_size() / best / 1e9


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=256 * 2**20, help="elements per tensor (merge kernels)")
    ap.add_argument("--ties-numel", type=int, default=16 * 2**20, help="elements for TIES vs plain torch")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--out-dtype", choices=DTYPES, default=None, help="default: --dtype")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", nargs="+", default=None, help="default: every backend present on the device")
    ap.add_argument("--only", nargs="+", default=None, help="kernel names to run")
    ap.add_argument("--torch-max-numel", type=int, default=32 * 2**20,
                    help="skip the torch reference of the merge kernels above this size (fp32 temporaries)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch and OpenMP threads")
    ap.add_argument("--csv", default="benchmarks/results/kernels.csv", help="CSV to append rows to ('' = none)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
        if cpp_extension() is not None:
            cpp_extension().set_num_threads(args.threads)
    device = torch.device(args.device)
    present = available_backends(device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        present = [b for b in present if b != "triton"]
    backends = [b for b in (args.backends or present) if b in present]
    ctx = Context(numel=args.numel, ties_numel=args.ties_numel, experts=args.experts, dtype=DTYPES[args.dtype],
                  out_dtype=DTYPES[args.out_dtype or args.dtype], device=device, backends=backends,
                  torch_max_numel=args.torch_max_numel, density=args.density)
    threads = cpp_extension().get_num_threads() if cpp_extension() is not None else torch.get_num_threads()
    print(f"device={device} backends={','.join(backends)} threads={threads} experts={args.experts} "
          f"dtype={args.dtype}->{args.out_dtype or args.dtype}")
    rows = []
    copy_rates: dict[int, float] = {}
    header = f"{'kernel':22s} {'backend':8s} {'numel':>11s} {'time_ms':>10s} {'GB/s':>8s} {'copy':>6s} {'frac':>6s}"
    print(header)
    for factory in CASE_FACTORIES:
        for c in factory(ctx):
            if args.only and c.kernel not in args.only:
                continue
            if c.numel not in copy_rates:
                copy_rates[c.numel] = copy_rate(ctx, c.numel, args.repeat)
            c.run()  # warm-up (first touch of outputs and temporaries, Triton compile)
            best = min(_timed(c.run, device) for _ in range(args.repeat))
            gbs = c.nbytes / best / 1e9
            frac = gbs / copy_rates[c.numel]
            print(f"{c.kernel:22s} {c.backend:8s} {c.numel:11d} {best * 1e3:10.2f} {gbs:8.2f} "
                  f"{copy_rates[c.numel]:6.1f} {frac:6.2f}  {c.note}")
            rows.append({
                "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(), "device": str(device), "threads": threads, "kernel": c.kernel,
                "backend": c.backend, "numel": c.numel, "experts": args.experts, "dtype": args.dtype,
                "out_dtype": args.out_dtype or args.dtype, "seconds": f"{best:.6f}", "gb_per_s": f"{gbs:.3f}",
                "copy_gb_per_s": f"{copy_rates[c.numel]:.3f}", "fraction_of_copy": f"{frac:.3f}", "note": c.note,
            })
    ties_rows = {r["backend"]: float(r["seconds"]) for r in rows
                 if r["numel"] == args.ties_numel and r["kernel"] in ("ties", "ties_plain_torch")
                 and (r["kernel"] == "ties_plain_torch") == (r["backend"] == "torch")}
    if "torch" in ties_rows:
        for be, sec in ties_rows.items():
            if be != "torch":
                print(f"fused ties ({be}) vs plain torch at {args.ties_numel} elements: "
                      f"speed-up {ties_rows['torch'] / sec:.1f}x")
    if args.csv and rows:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
