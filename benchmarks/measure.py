"""Measuring helpers shared by the benchmarks: memory-copy rate, the output writer's rate and peak RSS (own or a
child's)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _vm_hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_measured(cmd: list[str], env: dict | None = None, stdout_path: str | os.PathLike | None = None
                 ) -> tuple[float, float, int]:
    """Run a command (its standard output into ``stdout_path``, else discarded); return (wall seconds,
    peak RSS in GB of the child, exit code).

    Peak RSS is the child's VmHWM, polled every 20 ms by a thread until it exits (ru_maxrss would report
    the resident pages of this large benchmark process, which the child shares until it execs); the wall
    time ends when ``wait`` returns, not at the next poll.
    """
    output = open(stdout_path, "wb") if stdout_path is not None else contextlib.nullcontext(subprocess.DEVNULL)
    with output as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        peak = 0
        exited = threading.Event()

        def poll_peak() -> None:
            nonlocal peak
            while not exited.wait(0.02):
                # until it execs, the child reports the parent's mappings: count the exec'd program only
                hwm = _vm_hwm_kb(proc.pid) if _execd(proc.pid) else None
                if hwm is not None:
                    peak = max(peak, hwm)

        poller = threading.Thread(target=poll_peak, daemon=True)
        poller.start()
        code = proc.wait()
        wall = time.perf_counter() - start
        exited.set()
        poller.join()
        if code != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            print(f"command failed ({code}): {' '.join(cmd)}\n{tail}", file=sys.stderr)
    return wall, peak / 1e6, code


def _execd(pid: int) -> bool:
    """True once the child's command line differs from this process's (it has exec'd)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f, open("/proc/self/cmdline", "rb") as own:
            return f.read() != own.read()
    except OSError:
        return False


def copy_rate_gbs(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Memory-copy rate (read + write bytes per second, GB/s) on reused buffers."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def merge_seconds(merge_stdout: str) -> float | None:
    """The merge's own wall time that `alignmerge merge` prints ("wrote OUT (...) in 12.34 s"), or None."""
    match = re.search(r"\) in ([0-9.]+) s$", merge_stdout, re.MULTILINE)
    return float(match.group(1)) if match else None


def writer_rate_gbs(directory: str | os.PathLike, nbytes: int) -> float:
    """Rate (GB/s) of alignmerge's output writer alone, writing one bf16 tensor of ``nbytes`` into a fresh
    shard under ``directory``: the merge's own write path (NaN/Inf check, shard checksum, O_DIRECT or
    buffered writes, closing fsync) with nothing merged. A merge writing ``nbytes`` there cannot finish
    sooner than ``nbytes`` at this rate, however fast its reads and arithmetic."""
    from alignmerge.io.writer import OutputTensor, ShardedWriter

    tensor = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    out = Path(tempfile.mkdtemp(prefix="writer-rate-", dir=directory))
    try:
        writer = ShardedWriter(out, [OutputTensor("t", tuple(tensor.shape), tensor.dtype)], max_shard_bytes=nbytes + 1)
        t = time.perf_counter()
        writer.open()
        writer.write("t", tensor, check_finite=True)
        writer.close()
        return tensor.numel() * 2 / (time.perf_counter() - t) / 1e9
    finally:
        shutil.rmtree(out, ignore_errors=True)
