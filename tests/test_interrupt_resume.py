"""Interruption (SIGINT, SIGKILL) and --resume give byte-identical output; a full disk fails cleanly."""
import filecmp
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_tiny_llama


@pytest.fixture(scope="module")
def medium_models(tmp_path_factory):
    """Three fp32 Llamas (~25M parameters each), big enough that a merge takes a moment."""
    root = tmp_path_factory.mktemp("medium")
    kw = dict(dtype=__import__("torch").float32, hidden=512, layers=4, vocab=16000, intermediate=1024,
              heads=8, kv_heads=4)
    base = make_tiny_llama(root / "base", seed=0, **kw)
    experts = [make_tiny_llama(root / f"e{i}", seed=i + 1, **kw) for i in range(2)]
    cfg = root / "ties.yaml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts],
        "out_dtype": "float32"}))
    return cfg


def _merge_cmd(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "alignmerge", "merge", str(cfg), str(out), "--no-progress",
            "--out-shard-size", "2MB", "--threads", "1", "--no-prefetch", *extra]


def _same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupt_then_resume_is_byte_identical(sig, medium_models, tmp_path):
    reference = tmp_path / "reference"
    assert subprocess.run(_merge_cmd(medium_models, reference)).returncode == 0

    out = tmp_path / "interrupted"
    staging = tmp_path / ".interrupted.partial"
    # a shell runs background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
    # give the merge the default disposition whatever launched the tests
    proc = subprocess.Popen(_merge_cmd(medium_models, out), stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    progress = staging / "progress.json"
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(progress.read_text())["shards"]) >= 2:
                proc.send_signal(signal.SIGSTOP)  # freeze it at once: a busy CI machine may not run us again soon
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    assert proc.poll() is None, "merge finished before it could be interrupted"
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    if sig == signal.SIGINT:
        assert "--resume" in proc.stderr.read()
    assert not out.exists(), "an interrupted merge must not look finished"
    assert staging.exists()
    done = len(json.loads(progress.read_text())["shards"])
    assert done >= 2

    resumed = subprocess.run(_merge_cmd(medium_models, out, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert not staging.exists()
    assert _same_tree(out, reference)


def test_serial_and_overlapped_executors_write_identical_bytes(medium_models, tmp_path):
    """--no-prefetch reads, merges and writes in turn (O_DIRECT blocks too); the overlapped executor's read-ahead,
    write-behind and I/O threads give the same bytes (the 32 MB embedding fills the 4 MB staging buffer often)."""
    serial, overlapped = tmp_path / "serial", tmp_path / "overlapped"
    assert subprocess.run(_merge_cmd(medium_models, serial)).returncode == 0
    assert subprocess.run([c for c in _merge_cmd(medium_models, overlapped) if c != "--no-prefetch"]).returncode == 0
    assert _same_tree(serial, overlapped)


def test_resume_without_partial_output_is_an_error(medium_models, tmp_path):
    proc = subprocess.run(_merge_cmd(medium_models, tmp_path / "o", "--resume"), capture_output=True, text=True)
    assert proc.returncode != 0 and "nothing to resume" in proc.stderr


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_fails_cleanly(medium_models, tmp_path):
    out = tmp_path / "full"
    proc = subprocess.run(_merge_cmd(medium_models, out), capture_output=True, text=True,
                          preexec_fn=_limit_file_size(1_000_000))
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "disk" in err or "file size" in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / ".full.partial").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_on_small_tmpfs(medium_models, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("tmpfs mount not permitted here")
    try:
        proc = subprocess.run(_merge_cmd(medium_models, mnt / "out"), capture_output=True, text=True)
        assert proc.returncode != 0 and "disk" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)])


def test_direct_and_buffered_shards_are_byte_identical(tmp_path, monkeypatch):
    """Shards written with O_DIRECT through the staging buffer equal buffered writes byte for byte (odd
    sizes across staging-buffer edges, row chunks, an out-of-order write, the checksums), and a file system
    that refuses O_DIRECT's probe write falls back to buffered writes."""
    from alignmerge.io import writer as wmod

    g = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randn(shape, generator=g).to(dtype) for i, (shape, dtype) in enumerate([
        ((1000, 1037), torch.bfloat16), ((3,), torch.float32), ((2049, 513), torch.float16),
        ((7, 5), torch.bfloat16), ((1500, 999), torch.float32)])}
    outputs = [wmod.OutputTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]

    def write_all(directory, direct):
        w = wmod.ShardedWriter(directory, outputs, max_shard_bytes=6 * 2**20, direct=direct)
        w.open()
        used_direct = bool(w._direct)
        for name, t in tensors.items():
            if name == "t2":  # row chunks, the second before the first: out of order
                w.write(name, t[1000:], 1000)
                w.write(name, t[:1000], 0)
            else:
                w.write(name, t)
        sums = [w.shard_checksum(s) for s in w.shard_names]
        w.close()
        return used_direct, [(directory / s).read_bytes() for s in w.shard_names], sums, w.shard_names

    used, direct_files, direct_sums, names = write_all(tmp_path / "direct", True)
    if not used:
        pytest.skip("this file system refuses O_DIRECT")
    assert not write_all(tmp_path / "buffered", False)[0]
    _, buffered_files, buffered_sums, _ = write_all(tmp_path / "buffered", False)
    assert len(names) > 1 and direct_files == buffered_files and direct_sums == buffered_sums
    assert torch.equal(load_file(str(tmp_path / "direct" / names[-1]))["t4"], tensors["t4"])

    def refuse(self, which, nbytes, offset):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(wmod._DirectAppender, "_write", refuse)
    used, refused_files, _, _ = write_all(tmp_path / "refused", True)
    assert not used and refused_files == buffered_files
