"""End-to-end `alignmerge merge` on tiny real Llama checkpoints, cross-checked against mergekit 0.1.5."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from alignmerge.cli import main as cli_main


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def configs(tiny):
    base = str(tiny["base"])
    e1, e2, _ = (str(p) for p in tiny["experts"])
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": e1, "parameters": {"weight": 0.3}}, {"model": e2, "parameters": {"weight": 0.7}}],
            "dtype": "float32", "out_dtype": "bfloat16"},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": e1, "parameters": {"weight": 0.6}}, {"model": e2, "parameters": {"weight": 0.8}}],
            "parameters": {"lambda": 0.9}, "dtype": "float32", "out_dtype": "bfloat16"},
        "ties": {"merge_method": "ties", "base_model": base, "models": [
            {"model": e1, "parameters": {"weight": 1.0, "density": 0.4}},
            {"model": e2, "parameters": {"weight": 0.5, "density": 0.7}}],
            "parameters": {"normalize": True}, "dtype": "float32", "out_dtype": "bfloat16"},
    }


def run_mergekit(cfg_path: Path, out: Path) -> None:
    exe = shutil.which("mergekit-yaml")
    if exe is None:
        pytest.skip("mergekit is not installed (pip install mergekit==0.1.5)")
    proc = subprocess.run([exe, str(cfg_path), str(out), "--device", "cpu", "--quiet", "--random-seed", "0"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def bf16_ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 units in the last place (on the sign-magnitude integer line)."""
    def key(x):
        i = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return int((key(a) - key(b)).abs().max()) if a.numel() else 0


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_matches_mergekit(method, tiny_llamas_fp32, tmp_path):
    """fp32 checkpoints, bf16 output. (On bf16 checkpoints TIES can differ where task-vector magnitudes
    tie exactly at the top-k threshold: mergekit's unstable argsort picks any of them, we keep the
    lowest indices; both are valid TIES.)"""
    cfg = write_config(tmp_path / "cfg.yaml", configs(tiny_llamas_fp32)[method])
    ours, theirs = tmp_path / "ours", tmp_path / "mergekit"
    assert cli_main(["merge", str(cfg), str(ours), "--no-progress"]) == 0
    run_mergekit(cfg, theirs)
    a, b = load_dir(ours), load_dir(theirs)
    assert set(a) == set(b)
    worst = max(bf16_ulp_diff(a[k], b[k]) for k in a)
    assert all(a[k].dtype == torch.bfloat16 for k in a)
    assert worst <= 1, f"{method}: outputs differ by {worst} bf16 ulp"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ours)
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_keep_rate_and_rescale_match_mergekit(method, tiny_llamas, tmp_path):
    base, e1 = str(tiny_llamas["base"]), str(tiny_llamas["experts"][0])
    density = 0.3
    cfg = write_config(tmp_path / "cfg.yaml", {
        "merge_method": method, "base_model": base,
        "models": [{"model": e1, "parameters": {"weight": 1.0, "density": density}}],
        "dtype": "float32", "out_dtype": "float32"})
    assert cli_main(["merge", str(cfg), str(tmp_path / "ours"), "--no-progress", "--seed", "3"]) == 0
    run_mergekit(cfg, tmp_path / "mergekit")
    theta0, theta1 = load_dir(Path(base)), load_dir(Path(e1))
    for out in ("ours", "mergekit"):
        merged = load_dir(tmp_path / out)
        kept = total = 0
        for name, m in merged.items():
            tau = theta1[name].float() - theta0[name].float()
            delta = m.float() - theta0[name].float()
            nz = tau != 0
            keep = (delta != 0) & nz
            kept += int(keep.sum())
            total += int(nz.sum())
            if keep.sum() > 50:
                # rescale: true keeps the L1 norm (mergekit 0.1.5): factor = sum|tau| / sum|kept tau|
                factor = tau.abs().sum() / tau[keep].abs().sum()
                ratio = delta[keep] / tau[keep]
                assert torch.allclose(ratio, factor.expand_as(ratio), rtol=1e-3), f"{out}: {name} rescale"
                assert 1 / density / 1.5 < factor < 1.5 / density
        rate = kept / total
        assert abs(rate - density) < 0.01, f"{out}: keep rate {rate:.4f}"


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["merge", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--out-shard-size" in text and "mergekit" in text


def test_sharded_output_and_index(tiny_llamas, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", configs(tiny_llamas)["task_arithmetic"])
    out = tmp_path / "sharded"
    assert cli_main(["merge", str(cfg), str(out), "--no-progress", "--out-shard-size", "20KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    single = tmp_path / "single"
    assert cli_main(["merge", str(cfg), str(single), "--no-progress"]) == 0
    a, b = load_dir(out), load_dir(single)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert "task_arithmetic" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".*partial"))


def test_chunked_merge_equals_whole(tiny_llamas, tmp_path):
    """A memory budget smaller than the embedding forces row chunks; the result must not change."""
    from alignmerge.config import load_config
    from alignmerge.plan import build_plan

    for method in ("ties", "task_arithmetic"):
        cfg = write_config(tmp_path / f"{method}.yaml", configs(tiny_llamas)[method])
        plan = build_plan(load_config(cfg), max_chunk_bytes=30_000 // 3)  # what --max-memory 30KB plans
        assert max(len(t.chunks) for t in plan.tasks) >= 3
        whole, chunked = tmp_path / f"{method}-whole", tmp_path / f"{method}-chunked"
        assert cli_main(["merge", str(cfg), str(whole), "--no-progress"]) == 0
        assert cli_main(["merge", str(cfg), str(chunked), "--no-progress", "--max-memory", "30KB"]) == 0
        a, b = load_dir(whole), load_dir(chunked)
        assert all(torch.equal(a[k], b[k]) for k in a), method


# ---- bad input: one-line error naming the culprit, non-zero exit, no output left behind ----------

def _corrupt(tiny, tmp_path, how):
    """Copy expert 0 and break it in one way; return (config dict, expected text in the error)."""
    bad = tmp_path / "bad_expert"
    shutil.copytree(tiny["experts"][0], bad)
    st = bad / "model.safetensors"
    cfg = configs(tiny)["task_arithmetic"]
    cfg["models"][0]["model"] = str(bad)
    if how == "missing_path":
        shutil.rmtree(bad)
        return cfg, "does not exist"
    if how == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
        return cfg, "past the end"
    if how == "corrupt_header":
        data = bytearray(st.read_bytes())
        data[8:16] = b"\x00garbag"
        st.write_bytes(bytes(data))
        return cfg, "corrupt safetensors header"
    tensors = load_file(str(st))
    if how == "missing_tensor":
        del tensors["model.norm.weight"]
        expect = "model.norm.weight"
    elif how == "shape_mismatch":
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1].clone()
        expect = "model.layers.1.mlp.up_proj.weight"
    elif how == "nan":
        t = tensors["model.layers.0.self_attn.q_proj.weight"].clone()
        t[3, 5] = float("nan")
        tensors["model.layers.0.self_attn.q_proj.weight"] = t
        expect = "model.layers.0.self_attn.q_proj.weight"
    save_file(tensors, str(st), metadata={"format": "pt"})
    return cfg, expect


@pytest.mark.parametrize("how", ["missing_path", "truncated", "corrupt_header", "missing_tensor",
                                 "shape_mismatch", "nan"])
def test_bad_checkpoint_errors(how, tiny_llamas, tmp_path, capsys):
    cfg, expect = _corrupt(tiny_llamas, tmp_path, how)
    out = tmp_path / "out"
    code = cli_main(["merge", str(write_config(tmp_path / "cfg.yaml", cfg)), str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert expect in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
@pytest.mark.parametrize("value", [float("nan"), -float("inf")])
@pytest.mark.parametrize("io", ["prefetch-mapped", "serial-mapped", "prefetch-read"])
def test_nonfinite_input_is_named(method, value, io, tiny_llamas, tmp_path, capsys, monkeypatch):
    """Whether inputs are counted on read (ties) or through the merged output (linear, task_arithmetic:
    ``output_reveals_nonfinite_inputs``), the error names the input file and tensor, with or without prefetch,
    from memory maps or pread buffers."""
    from alignmerge.io.checkpoint import Checkpoint

    if io.endswith("read"):
        monkeypatch.setattr(Checkpoint, "map", lambda self, name, rows=None, check_finite=False: None)
    bad = tmp_path / "bad_expert"
    shutil.copytree(tiny_llamas["experts"][1], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    t = tensors[name].clone()
    t[-1, 2] = value
    tensors[name] = t
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    cfg = configs(tiny_llamas)[method]
    cfg["models"][1]["model"] = str(bad)
    out = tmp_path / "out"
    argv = ["merge", str(write_config(tmp_path / "cfg.yaml", cfg)), str(out), "--no-progress"]
    assert cli_main(argv + (["--no-prefetch"] if io.startswith("serial") else [])) != 0
    err = capsys.readouterr().err.strip()
    assert f"{bad / 'model.safetensors'}: tensor {name!r} contains 1 NaN/Inf values" in err, err
    assert "--allow-nonfinite" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_allow_nonfinite_passes_nan_through(tiny_llamas, tmp_path):
    cfg, _ = _corrupt(tiny_llamas, tmp_path, "nan")
    cfg["merge_method"] = "linear"
    cfg.pop("base_model")
    cfg["parameters"] = {}
    out = tmp_path / "out"
    assert cli_main(["merge", str(write_config(tmp_path / "cfg.yaml", cfg)), str(out), "--no-progress",
                     "--allow-nonfinite"]) == 0
    assert torch.isnan(load_dir(out)["model.layers.0.self_attn.q_proj.weight"]).any()


def test_overflowing_merge_is_refused_with_no_output(tiny_llamas_fp32, tmp_path, capsys):
    """Finite inputs whose weighted sum overflows: the write-behind check names the merged tensor."""
    cfg = configs(tiny_llamas_fp32)["linear"]
    for spec in cfg["models"]:
        spec["parameters"]["weight"] = 3e38
    cfg["parameters"] = {"normalize": False}
    out = tmp_path / "out"
    assert cli_main(["merge", str(write_config(tmp_path / "cfg.yaml", cfg)), str(out), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "merged tensor 'model." in err and "contains NaN or Inf" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("edit,expect", [
    (lambda c: c.update(merge_method="slerpy"), "unknown method 'slerpy'"),
    (lambda c: c["models"][0]["parameters"].update(wieght=1), "models[0].parameters.wieght"),
    (lambda c: c.update(parameters={"lambda": 1, "densty": 0.2}), "parameters.densty"),
    (lambda c: c.update(dtype="float8"), "dtype"),
    (lambda c: c.pop("base_model"), "base_model"),
    (lambda c: c.update(modelz=[]), "unknown key 'modelz'"),
])
def test_bad_config_errors(edit, expect, tiny_llamas, tmp_path, capsys):
    cfg = configs(tiny_llamas)["task_arithmetic"]
    edit(cfg)
    out = tmp_path / "out"
    assert cli_main(["merge", str(write_config(tmp_path / "cfg.yaml", cfg)), str(out), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_cli_entry_point_exit_code(tiny_llamas, tmp_path):
    """The program exits without interpreter teardown (``cli.run``): exit codes and piped output still arrive."""
    proc = subprocess.run([sys.executable, "-m", "alignmerge", "merge", str(tmp_path / "nope.yaml"), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr
    cfg = write_config(tmp_path / "linear.yaml", configs(tiny_llamas)["linear"])
    proc = subprocess.run([sys.executable, "-m", "alignmerge", "merge", str(cfg), str(tmp_path / "o"), "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and f"wrote {tmp_path / 'o'}" in proc.stdout, proc.stderr
    assert re.search(r"\) in \d+\.\d\d s$", proc.stdout, re.MULTILINE), proc.stdout  # benchmarks parse it
    assert load_dir(tmp_path / "o")


def test_mapped_inputs_equal_read_inputs(tiny_llamas, tmp_path, monkeypatch):
    """CPU merges read their inputs through memory maps; the same merge through pread buffers is byte-identical,
    and a map equals a read for any row range."""
    from alignmerge.io.checkpoint import Checkpoint

    ck = Checkpoint(tiny_llamas["experts"][0])
    for name in ck.names():
        rows = ck.shape(name)[0] if ck.shape(name) else 1
        for r in [None, (0, 1), (rows // 3, rows - rows // 5)] if rows > 2 else [None]:
            assert torch.equal(ck.map(name, rows=r).view(torch.uint8), ck.read(name, rows=r).view(torch.uint8)), name
    cfg = write_config(tmp_path / "ties.yaml", configs(tiny_llamas)["ties"])
    assert cli_main(["merge", str(cfg), str(tmp_path / "mapped"), "--no-progress"]) == 0
    monkeypatch.setattr(Checkpoint, "map", lambda self, name, rows=None, check_finite=False: None)
    assert cli_main(["merge", str(cfg), str(tmp_path / "read"), "--no-progress", "--max-memory", "30KB"]) == 0
    assert cli_main(["merge", str(cfg), str(tmp_path / "read-whole"), "--no-progress"]) == 0
    assert (tmp_path / "mapped" / "model.safetensors").read_bytes() == (tmp_path / "read-whole" / "model.safetensors").read_bytes()
    a, b = load_dir(tmp_path / "mapped"), load_dir(tmp_path / "read")
    assert all(torch.equal(a[k], b[k]) for k in a)
