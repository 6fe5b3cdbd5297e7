"""Hostile or broken inputs: each gives a one-line error naming the file or tensor, a non-zero exit,
no traceback, and no output directory left behind (issue: reliability and security)."""
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from alignmerge.cli import main as cli_main
from alignmerge.config import load_config
from alignmerge.errors import AlignMergeError, CheckpointError, ConfigError
from alignmerge.io.safetensors_file import read_header


def _header_bytes(header: dict) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    path.write_bytes(_header_bytes(header) + data[8 + n:])


def _sharded_copy(src: Path, dst: Path) -> Path:
    """Re-save a single-file checkpoint as two shards with an index."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, group in enumerate([names[:half], names[half:]]):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in group}, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _break(kind: str, tiny: dict, tmp: Path):
    """Return (argv for `alignmerge merge` minus out dir, text the error must contain)."""
    bad = tmp / "bad"
    shutil.copytree(tiny["experts"][0], bad)
    st_file = bad / "model.safetensors"
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tiny["base"]),
           "models": [{"model": str(bad), "parameters": {"weight": 1.0}}], "out_dtype": "bfloat16"}
    expect = str(st_file)
    if kind == "truncated":
        st_file.write_bytes(st_file.read_bytes()[:-100])
    elif kind == "offsets_past_end":
        _rewrite_header(st_file, lambda h: h["model.norm.weight"].update(data_offsets=[10**9, 10**9 + 96]))
        expect = "model.norm.weight"
    elif kind == "huge_tensor":
        _rewrite_header(st_file, lambda h: h["model.norm.weight"].update(
            shape=[2**40], data_offsets=[0, 2**41]))
        expect = "model.norm.weight"
    elif kind == "huge_header":
        st_file.write_bytes(struct.pack("<Q", 2**50) + st_file.read_bytes()[8:])
    elif kind == "unknown_dtype":
        _rewrite_header(st_file, lambda h: h["model.norm.weight"].update(dtype="Q7"))
        expect = "unknown dtype 'Q7'"
    elif kind == "duplicate_names":
        data = st_file.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        text = data[8:8 + n].decode().rstrip()
        entry = json.dumps({"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]})
        text = text[:-1] + f',"model.norm.weight":{entry}' + "}"
        st_file.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data[8 + n:])
        expect = "duplicate tensor name 'model.norm.weight'"
    elif kind == "shape_mismatch":
        t = load_file(str(st_file))
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :-3].clone()
        save_file(t, str(st_file))
        expect = "model.layers.0.mlp.down_proj.weight"
    elif kind == "missing_shard":
        shutil.rmtree(bad)
        _sharded_copy(tiny["experts"][0], bad)
        (bad / "model-00002-of-00002.safetensors").unlink()
        expect = "model-00002-of-00002.safetensors"
    elif kind == "index_lists_absent_tensor":
        shutil.rmtree(bad)
        _sharded_copy(tiny["experts"][0], bad)
        index = json.loads((bad / "model.safetensors.index.json").read_text())
        index["weight_map"]["model.phantom.weight"] = "model-00001-of-00002.safetensors"
        (bad / "model.safetensors.index.json").write_text(json.dumps(index))
        expect = "model.phantom.weight"
    elif kind == "shard_outside_dir":
        shutil.rmtree(bad)
        _sharded_copy(tiny["experts"][0], bad)
        index = json.loads((bad / "model.safetensors.index.json").read_text())
        index["weight_map"]["model.norm.weight"] = "../../etc/passwd"
        (bad / "model.safetensors.index.json").write_text(json.dumps(index))
        expect = "outside the model directory"
    elif kind == "nan":
        t = load_file(str(st_file))
        t["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("inf")
        save_file(t, str(st_file))
        expect = "model.layers.1.self_attn.o_proj.weight"
    elif kind == "vocab_mismatch":
        t = load_file(str(st_file))
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:-5].clone()
        t["lm_head.weight"] = t["lm_head.weight"][:-5].clone()
        save_file(t, str(st_file))
        expect = "vocabulary sizes differ"
    elif kind == "unreadable_file":
        st_file.unlink()
        st_file.mkdir()  # a directory where the weights should be (root ignores file permissions)
        expect = "cannot read"
    elif kind == "pickle_without_flag":
        st_file.unlink()
        (bad / "pytorch_model.bin").write_bytes(b"not really a pickle")
        expect = "--allow-pickle"
    elif kind == "fisher_for_another_model":
        other = {name: torch.ones(3, 5) for name in load_file(str(st_file))}  # names right, shapes wrong
        fisher = tmp / "other_fisher.safetensors"
        save_file(other, str(fisher))
        cfg = {"merge_method": "fisher", "models": [{"model": str(bad), "parameters": {"fisher": str(fisher)}},
                                                    {"model": str(tiny["experts"][1]),
                                                     "parameters": {"fisher": str(fisher)}}]}
        expect = str(fisher)
    elif kind == "output_inside_input":
        return cfg, "output directory lies inside input model", bad / "merged"
    elif kind == "empty_config":
        return None, "config is empty", None
    elif kind == "unknown_method":
        cfg["merge_method"] = "frankenmerge"
        expect = "unknown method 'frankenmerge'"
    elif kind == "python_yaml_tag":
        return "!!python/object/apply:os.system ['echo pwned']\n", "invalid YAML", None
    else:
        raise AssertionError(kind)
    return cfg, expect, None


HOSTILE = ["truncated", "offsets_past_end", "huge_tensor", "huge_header", "unknown_dtype", "duplicate_names",
           "shape_mismatch", "missing_shard", "index_lists_absent_tensor", "shard_outside_dir", "nan",
           "vocab_mismatch", "unreadable_file", "pickle_without_flag", "fisher_for_another_model",
           "output_inside_input", "empty_config",
           "unknown_method", "python_yaml_tag"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_input(kind, tiny_llamas, tmp_path, capsys):
    cfg, expect, out = _break(kind, tiny_llamas, tmp_path)
    out = out or tmp_path / "out"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("" if cfg is None else cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    code = cli_main(["merge", str(cfg_path), str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expect in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial"))


def test_refuses_to_overwrite_without_flag(tiny_llamas, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(tiny_llamas["experts"][0]), "parameters": {"weight": 1.0}}]}))
    assert cli_main(["merge", str(cfg), str(out), "--no-progress"]) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert cli_main(["merge", str(cfg), str(out), "--no-progress", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_debug_shows_traceback(tiny_llamas, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "nope", "models": ["x"]}))
    with pytest.raises(ConfigError):
        cli_main(["merge", "--debug", str(cfg), str(tmp_path / "out")])


# ---- property-based: fuzzed configs and headers never raise anything but our own errors ----------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
                      max_leaves=12)
config_keys = st.sampled_from(["merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                               "tokenizer_source", "slices", "weight", "model"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(config_keys, values, max_size=6))
def test_fuzzed_configs_raise_only_config_errors(raw):
    try:
        load_config(raw)
    except ConfigError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.dictionaries(st.text(max_size=12), values, max_size=4), tail=st.binary(max_size=64),
       prefix=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_fuzzed_safetensors_headers_raise_only_checkpoint_errors(tmp_path_factory, header, tail, prefix):
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    blob = json.dumps(header).encode()
    n = len(blob) if prefix is None else prefix
    path.write_bytes(struct.pack("<Q", n) + blob + tail)
    try:
        read_header(path)
    except CheckpointError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_raw_bytes_raise_only_checkpoint_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzzraw") / "x.safetensors"
    path.write_bytes(data)
    try:
        read_header(path)
    except AlignMergeError:
        pass
