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


@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_torchrun_fisher_equals_single_process(kind, tmp_path):
    from safetensors.torch import load_file

    from conftest import make_tiny_llama
    from test_fisher import RECORDS, add_char_tokenizer, write_jsonl

    model = add_char_tokenizer(make_tiny_llama(tmp_path / "m", seed=5, dtype=__import__("torch").float32,
                                               hidden=32, intermediate=48, layers=2))
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS * 2)
    args = ["fisher", str(model), "--data", str(data), "--kind", kind, "--batch-size", "3"]
    single, multi = tmp_path / "single.safetensors", tmp_path / "multi.safetensors"
    assert subprocess.run([sys.executable, "-m", "alignmerge", *args, "--out", str(single)]).returncode == 0
    proc = subprocess.run([*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "alignmerge", *args,
                           "--out", str(multi)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(single)), load_file(str(multi))
    assert set(a) == set(b)
    for name in a:
        scale = float(a[name].abs().max())
        assert float((a[name] - b[name]).abs().max()) <= 1e-6 * max(scale, 1e-30), name


def test_torchrun_subspace_equals_single_process(tmp_path):
    import torch
    from safetensors.torch import load_file

    from conftest import make_tiny_llama
    from test_fisher import RECORDS, add_char_tokenizer, write_jsonl

    model = add_char_tokenizer(make_tiny_llama(tmp_path / "m", seed=6, dtype=torch.float32,
                                               hidden=32, intermediate=48, layers=2))
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS * 2)
    args = ["subspace", str(model), "--data", str(data), "--rank", "3", "--batch-size", "3"]
    single, multi = tmp_path / "single.safetensors", tmp_path / "multi.safetensors"
    assert subprocess.run([sys.executable, "-m", "alignmerge", *args, "--out", str(single)]).returncode == 0
    proc = subprocess.run([*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "alignmerge", *args,
                           "--out", str(multi)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(single)), load_file(str(multi))
    assert set(a) == set(b) and a
    for name in a:  # bases are defined up to sign/rotation: compare the projectors they span
        pa, pb = a[name] @ a[name].T, b[name] @ b[name].T
        assert torch.allclose(pa, pb, atol=1e-4), name
