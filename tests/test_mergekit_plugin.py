"""mergekit plugin: our methods mergekit lacks run from a mergekit YAML through mergekit's own
runner (`alignmerge mergekit-yaml`) and give what `alignmerge merge` gives for the same config."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("mergekit")

from safetensors.torch import load_file, save_file  # noqa: E402

import alignmerge  # noqa: E402
from alignmerge.cli import main as cli_main  # noqa: E402
from alignmerge.errors import AlignMergeError  # noqa: E402
from alignmerge.methods import METHODS, REQUIRED  # noqa: E402

# every method of ours that mergekit lacks; those not (yet) in METHODS are skipped
PLUGIN_METHODS = ["fisher", "regmean", "alignmerge", "safemerge", "mergealign"]
METHOD_PARAMETERS = {"fisher": {"epsilon": 1e-5, "normalize_fisher": True}, "regmean": {"alpha": 0.8}}
MODEL_WEIGHTS = [0.6, 1.3]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _hand_made_stat(kind: str, model_dir: Path, path: Path, seed: int) -> Path:
    """A statistics file with our tensor names: positive Fisher diagonals, or SPD Gram matrices."""
    gen = torch.Generator().manual_seed(seed)
    state = _tensors(model_dir)
    if kind == "fisher":
        stat = {n: torch.rand(t.shape, generator=gen) ** 3 + 1e-4 for n, t in state.items()}
    elif kind == "gram":
        stat = {}
        for n, t in state.items():
            if t.dim() == 2 and "embed_tokens" not in n:
                a = torch.randn(t.shape[1], t.shape[1] + 5, generator=gen)
                stat[n] = a @ a.t() / a.shape[1]
    else:
        pytest.skip(f"no hand-made {kind!r} statistics in this test yet")
    save_file(stat, str(path))
    return path


def _orthonormal(rows: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, rank, generator=gen, dtype=torch.float64))[0].float().contiguous()


def _subspace_file(family: dict, tmp_path: Path) -> str:
    """A hand-made rank-3 alignment subspace of the anchor: orthonormal U, V per 2-D weight."""
    gen = torch.Generator().manual_seed(7)
    subspace = {}
    for name, t in _tensors(family["base"]).items():
        if t.dim() == 2 and "embed_tokens" not in name:
            subspace[f"{name}.U"] = _orthonormal(t.shape[0], 3, gen)
            subspace[f"{name}.V"] = _orthonormal(t.shape[1], 3, gen)
    save_file(subspace, str(tmp_path / "subspace.safetensors"))
    return str(tmp_path / "subspace.safetensors")


def _alignmerge_files(family: dict, tmp_path: Path) -> dict:
    """alignmerge's anchor files (subspace, F_align), with the AQI loop off."""
    align_fisher = _hand_made_stat("fisher", family["base"], tmp_path / "align_fisher.safetensors", seed=5)
    return {"use_aqi_loop": False, "subspace": _subspace_file(family, tmp_path), "align_fisher": str(align_fisher),
            "lambda_align": 2.0, "lambda_budget": 1.0}


METHOD_FILES = {"alignmerge": _alignmerge_files,
                "safemerge": lambda family, tmp_path: {"subspace": _subspace_file(family, tmp_path)}}


def _config(method: str, family: dict, tmp_path: Path, dtype: str | None) -> dict:
    cls = METHODS[method]
    models = []
    for i, expert in enumerate(family["experts"][:2]):
        params = {}
        for name, default in cls.model_parameters.items():
            if name == "weight":
                params[name] = MODEL_WEIGHTS[i]
            elif name in cls.stats:
                params[name] = str(_hand_made_stat(name, expert, tmp_path / f"{name}{i}.safetensors", seed=10 + i))
            elif default is REQUIRED:
                pytest.skip(f"{method}: no test value for required parameter {name!r}")
        models.append({"model": str(expert), "parameters": params})
    config = {"merge_method": method, "models": models, "parameters": dict(METHOD_PARAMETERS.get(method, {}))}
    if method in METHOD_FILES:
        config["parameters"].update(METHOD_FILES[method](family, tmp_path))
    if cls.needs_base:
        config["base_model"] = str(family["base"])
    if dtype:
        config["dtype"] = dtype
    return config



def _run_mergekit(config: dict, tmp_path: Path, name: str) -> Path:
    yml = tmp_path / f"{name}.yml"
    yml.write_text(yaml.safe_dump(config))
    out = tmp_path / f"{name}-mergekit"
    rc = cli_main(["mergekit-yaml", str(yml), str(out), "--no-copy-tokenizer", "--quiet"])
    assert rc == 0
    return out


def _assert_bf16_within_one_ulp(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Adjacent bf16 values of one sign differ by 1 in their bit patterns."""
    equal = a.float() == b.float()
    bits = (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()
    same_sign = torch.signbit(a) == torch.signbit(b)
    ok = equal | (same_sign & (bits <= 1))
    assert bool(ok.all()), f"{name}: {int((~ok).sum())} elements differ by more than 1 bf16 ulp"


@pytest.mark.parametrize("method", PLUGIN_METHODS)
@pytest.mark.parametrize("family_name, dtype", [("tiny_llamas", None), ("tiny_llamas_fp32", "float32")])
def test_mergekit_runner_equals_alignmerge_merge(method, family_name, dtype, request, tmp_path):
    if method not in METHODS:
        pytest.skip(f"merge method {method!r} is not registered in alignmerge yet")
    family = request.getfixturevalue(family_name)
    config = _config(method, family, tmp_path, dtype)
    ours = _tensors(alignmerge.merge(config, tmp_path / f"{method}-alignmerge", progress=False).out_dir)
    theirs = _tensors(_run_mergekit(config, tmp_path, method))
    assert sorted(theirs) == sorted(ours)
    for name, ref in ours.items():
        got = theirs[name]
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        if ref.dtype == torch.bfloat16:
            _assert_bf16_within_one_ulp(got, ref, name)
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7, msg=name)
    # the merge is not a copy of an input
    first = _tensors(family["experts"][0])
    assert any(not torch.equal(first[n], ours[n]) for n in ours)


def test_register_is_idempotent_and_leaves_mergekit_methods_alone():
    from mergekit.merge_methods import get
    from mergekit.merge_methods.linear import linear_merge

    from alignmerge.mergekit_plugin import MergekitAdapter, register, registered

    first = register()
    assert register() == first
    assert "fisher" in first and "linear" not in first and "task_arithmetic" not in first
    assert registered() == sorted(first)
    assert get("linear") is linear_merge
    for name in first:
        assert isinstance(get(name), MergekitAdapter) and get(name).method_cls is METHODS[name]
    with pytest.raises(AlignMergeError, match="unknown alignmerge method"):
        register(["no_such_method"])


def test_spec_maps_parameters_defaults_and_base():
    from mergekit.merge_methods.base import MISSING, BasePolicy, ParameterScope

    from alignmerge.mergekit_plugin import method_spec

    fisher = {p.name: p for p in method_spec(METHODS["fisher"]).parameters}
    assert fisher["weight"].scope == ParameterScope.INPUT and fisher["weight"].default == 1.0
    assert fisher["fisher"].scope == ParameterScope.INPUT and fisher["fisher"].default is None
    assert fisher["epsilon"].scope == ParameterScope.SHARED and fisher["epsilon"].default == 1e-6
    assert fisher["epsilon"].validate("1e-3") == pytest.approx(1e-3)
    ta = method_spec(METHODS["task_arithmetic"])
    params = {p.name: p for p in ta.parameters}
    assert ta.contract.base == BasePolicy.REQUIRED
    assert params["weight"].scope == ParameterScope.NON_BASE and params["weight"].default is MISSING
    assert params["lambda"].scope == ParameterScope.SHARED and params["lambda"].default == 1.0


def test_adapter_matches_our_method_on_a_group_with_a_base():
    """A base-needing method (task arithmetic, adapted, not registered) through mergekit's call API."""
    from mergekit.merge_methods import TensorGroup

    from alignmerge.methods import TensorInputs
    from alignmerge.mergekit_plugin import adapt

    gen = torch.Generator().manual_seed(3)
    base, e1, e2 = (torch.randn(7, 5, generator=gen) for _ in range(3))
    group = TensorGroup.from_tensors([e1, base, e2], ids=["e1", "base", "e2"], base_index=1, name="w")
    (got,) = adapt(METHODS["task_arithmetic"])([group], parameters={"weight": {"e1": 0.5, "e2": 2.0},
                                                                   "lambda": 0.7})
    want = METHODS["task_arithmetic"]().merge(
        TensorInputs("w", [e1, e2], [{"weight": 0.5}, {"weight": 2.0}],
                     {"lambda": 0.7, "normalize": False, "rescale": False, "int8_mask": False}, base=base),
        out_dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, base + 0.7 * (0.5 * (e1 - base) + 2.0 * (e2 - base)))


def test_statistics_from_data_fail_with_a_clear_message(tiny_llamas, tmp_path, capsys):
    expert0, expert1 = tiny_llamas["experts"][:2]
    fisher1 = _hand_made_stat("fisher", expert1, tmp_path / "f1.safetensors", seed=1)
    config = {"merge_method": "fisher", "models": [
        {"model": str(expert0), "parameters": {"data": "builtin:safety"}},
        {"model": str(expert1), "parameters": {"fisher": str(fisher1)}}]}
    yml = tmp_path / "data.yml"
    yml.write_text(yaml.safe_dump(config))
    assert cli_main(["mergekit-yaml", str(yml), str(tmp_path / "out"), "--no-copy-tokenizer", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"model {expert0} needs a fisher file (it has data: 'builtin:safety', but mergekit cannot" in err
    assert "alignmerge merge" in err


def test_alignmerge_loop_outside_mergekit_fails_with_a_clear_message(tiny_llamas, tmp_path, capsys):
    if "alignmerge" not in METHODS:
        pytest.skip("merge method 'alignmerge' is not registered in alignmerge yet")
    config = _config("alignmerge", tiny_llamas, tmp_path, None)
    del config["parameters"]["use_aqi_loop"]  # default: the AQI loop, which needs evaluation passes
    yml = tmp_path / "loop.yml"
    yml.write_text(yaml.safe_dump(config))
    assert cli_main(["mergekit-yaml", str(yml), str(tmp_path / "out"), "--no-copy-tokenizer", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "merge_method alignmerge: this config needs work that mergekit cannot run" in err
    assert "use_aqi_loop: false" in err


def test_mergekit_fisher_equals_the_formula_per_tensor(tiny_llamas_fp32, tmp_path):
    """The plugin's Fisher merge, checked on every tensor against F-weighted averaging written out."""
    config = _config("fisher", tiny_llamas_fp32, tmp_path, None)
    config["parameters"] = {"epsilon": 1e-5}
    merged = _tensors(_run_mergekit(config, tmp_path, "fisher-formula"))
    thetas = [_tensors(Path(m["model"])) for m in config["models"]]
    fishers = [load_file(m["parameters"]["fisher"]) for m in config["models"]]
    assert sorted(merged) == sorted(thetas[0])
    for name, got in merged.items():
        f = [MODEL_WEIGHTS[k] * fishers[k][name].clamp_min(1e-5) for k in range(2)]
        want = (f[0] * thetas[0][name] + f[1] * thetas[1][name]) / (f[0] + f[1])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)


def test_statistics_file_checked_against_the_model(tiny_llamas, tmp_path, capsys):
    expert0, expert1 = tiny_llamas["experts"][:2]
    good = _hand_made_stat("fisher", expert0, tmp_path / "good.safetensors", seed=1)
    state = load_file(str(good))
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    config = {"merge_method": "fisher", "models": [
        {"model": str(expert0), "parameters": {"fisher": str(good)}},
        {"model": str(expert1), "parameters": {"fisher": str(tmp_path / "bad.safetensors")}}]}
    yml = tmp_path / "bad.yml"
    yml.write_text(yaml.safe_dump(config))
    rc = cli_main(["mergekit-yaml", str(yml), str(tmp_path / "out"), "--no-copy-tokenizer", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.safetensors: fisher tensor 'model.norm.weight' has shape (3,)" in err


def test_importing_alignmerge_does_not_import_mergekit():
    code = ("import sys, alignmerge, alignmerge.api, alignmerge.cli, alignmerge.methods; "
            "alignmerge.cli.build_parser(); assert 'mergekit' not in sys.modules, 'mergekit imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


def test_anchor_key_is_refused_before_mergekit_runs(tiny_llamas, tmp_path, capsys):
    config = {"merge_method": "fisher", "anchor": str(tiny_llamas["base"]),
              "models": [{"model": str(e)} for e in tiny_llamas["experts"][:2]]}
    yml = tmp_path / "anchor.yml"
    yml.write_text(yaml.safe_dump(config))
    assert cli_main(["mergekit-yaml", str(yml), str(tmp_path / "out")]) == 2
    assert f"anchor: is an alignmerge key that mergekit ignores; write the anchor as base_model: " \
           f"{tiny_llamas['base']}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_alignmerge_on_the_tiny_zoo_through_mergekit_equals_alignmerge_merge(tiny_zoo, tmp_path):
    """merge_method: alignmerge from a mergekit YAML on the demo zoo (anchor + two experts), with real
    statistics files: experts' Fisher on their data, the anchor's subspace (delta estimator) and F_align."""
    if "alignmerge" not in METHODS:
        pytest.skip("merge method 'alignmerge' is not registered in alignmerge yet")
    from alignmerge.fisher.compute import compute_fisher
    from alignmerge.subspace import compute_subspace

    anchor = tiny_zoo["anchor"]
    experts = [(tiny_zoo["skill_expert"], "builtin:skill"), (tiny_zoo["misaligned_expert"], "builtin:general")]
    models = []
    for i, (expert, data) in enumerate(experts):
        fisher = tmp_path / f"expert{i}.fisher.safetensors"
        compute_fisher(expert, data, fisher, samples=8, max_length=64, batch_size=4)
        models.append({"model": str(expert), "parameters": {"weight": MODEL_WEIGHTS[i], "fisher": str(fisher)}})
    compute_subspace(anchor, rank=4, out=tmp_path / "subspace.safetensors", method="delta", base_dir=tiny_zoo["base"])
    compute_fisher(anchor, "builtin:safety", tmp_path / "align.fisher.safetensors", samples=8, max_length=64,
                   batch_size=4)
    config = {"merge_method": "alignmerge", "base_model": str(anchor), "models": models,
              "parameters": {"use_aqi_loop": False, "subspace": str(tmp_path / "subspace.safetensors"),
                             "align_fisher": str(tmp_path / "align.fisher.safetensors"), "lambda_align": 4.0}}
    ours = _tensors(alignmerge.merge(config, tmp_path / "alignmerge-out", progress=False).out_dir)
    theirs = _tensors(_run_mergekit(config, tmp_path, "zoo"))
    assert sorted(theirs) == sorted(ours)
    for name, ref in ours.items():
        assert theirs[name].dtype == ref.dtype, name
        if ref.dtype == torch.bfloat16:
            _assert_bf16_within_one_ulp(theirs[name], ref, name)
        else:
            torch.testing.assert_close(theirs[name], ref, rtol=1e-5, atol=1e-7, msg=name)
    anchor_state = _tensors(anchor)
    assert any(not torch.equal(anchor_state[n], ours[n]) for n in ours)


def test_base_model_of_a_baseless_method_is_one_more_input(tiny_llamas, tmp_path, capsys):
    """As with mergekit's linear, a base_model: given to fisher is merged too, so it needs a Fisher file."""
    expert0, expert1 = tiny_llamas["experts"][:2]
    config = {"merge_method": "fisher", "base_model": str(tiny_llamas["base"]), "models": [
        {"model": str(e), "parameters": {"fisher": str(_hand_made_stat("fisher", e, tmp_path / f"f{i}.st", seed=i))}}
        for i, e in enumerate([expert0, expert1])]}
    yml = tmp_path / "base.yml"
    yml.write_text(yaml.safe_dump(config))
    assert cli_main(["mergekit-yaml", str(yml), str(tmp_path / "out"), "--no-copy-tokenizer", "--quiet"]) == 2
    assert "it is the base_model:, which mergekit merges as one more input" in capsys.readouterr().err


def test_mergekit_options_pass_through(tiny_llamas, tmp_path):
    config = {"merge_method": "linear", "models": [{"model": str(e), "parameters": {"weight": 1.0}}
                                                  for e in tiny_llamas["experts"][:2]]}
    yml = tmp_path / "linear.yml"
    yml.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert cli_main(["mergekit-yaml", str(yml), str(out), "--no-copy-tokenizer", "--quiet",
                     "--out-shard-size", "40K"]) == 0
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
