"""torchrun (gloo, CPU): a merge split across 2 ranks writes the same bytes as one process."""
import filecmp
import shutil
import subprocess
import sys

import pytest
import yaml


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_merge_equals_single_process(tiny_llamas, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(tiny_llamas["base"]),
        "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in tiny_llamas["experts"]],
        "out_dtype": "bfloat16"}))
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = ["merge", str(cfg), "--no-progress", "--out-shard-size", "40KB"]
    assert subprocess.run([sys.executable, "-m", "alignmerge", *args[:2], str(single), *args[2:]]).returncode == 0
    proc = subprocess.run([*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "alignmerge",
                           *args[:2], str(multi), *args[2:]], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in single.iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) >= 2
    assert names == sorted(p.name for p in multi.iterdir())
    for n in names:
        assert filecmp.cmp(single / n, multi / n, shallow=False), n
