"""SafeMerge and MergeAlign formulas on hand-built tensors; their whole-merge drivers on tiny Llamas."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from alignmerge.errors import ConfigError
from alignmerge.methods import TensorInputs, get_method
from alignmerge.methods.mergealign import mixed_records
from alignmerge.methods.safemerge import projection_cosine
from conftest import make_tiny_llama
from test_subspace import RECORDS, add_char_tokenizer


def safemerge_inputs(tmp_path, anchor, experts, weights, **params):
    sub = tmp_path / "sub.safetensors"
    # P projects onto the first row and the first column: U = e_0 (4 rows), V = e_0 (3 columns)
    save_file({"w.U": torch.eye(4)[:, :1].contiguous(), "w.V": torch.eye(3)[:, :1].contiguous()}, str(sub))
    method_params = {**get_method("safemerge").method_parameters, "subspace": str(sub), **params}
    return TensorInputs(name="w", models=experts, params=[{"weight": w} for w in weights],
                        method_params=method_params, base=anchor)


def test_projection_cosine_by_hand():
    u, v = torch.eye(4)[:, :1], torch.eye(3)[:, :1]
    tau = torch.zeros(4, 3)
    tau[0, 1], tau[2, 2] = 3.0, 4.0  # P keeps the first row only: ‖Pτ‖ = 3, ‖τ‖ = 5
    assert projection_cosine(tau, u, v) == pytest.approx(0.6)
    assert projection_cosine(torch.zeros(4, 3), u, v) == 0.0
    assert projection_cosine(tau, None, v) == pytest.approx(0.0)  # V-side alone sees only column 0


def test_safemerge_blends_only_layers_outside_the_subspace(tmp_path):
    anchor = torch.ones(4, 3)
    inside = torch.zeros(4, 3)
    inside[0, :] = 1.0  # entirely in the first row: cos = 1
    outside = torch.zeros(4, 3)
    outside[1:, 1:] = 1.0  # no first row or column: cos = 0
    inputs = safemerge_inputs(tmp_path, anchor, [anchor + inside, anchor + outside], [1.0, 0.5],
                              threshold=0.5, alpha=0.25, diagnostics=str(tmp_path / "d.jsonl"))
    got = get_method("safemerge")().merge(inputs, out_dtype=torch.float32)
    torch.testing.assert_close(got, anchor + 1.0 * inside + 0.5 * 0.25 * outside)
    record = json.loads((tmp_path / "d.jsonl").read_text())
    assert record["scales"] == [1.0, 0.25] and record["cosines"] == pytest.approx([1.0, 0.0])
    # alpha = 0 reverts the unsafe layer to the anchor; threshold 0 keeps every update
    reverted = get_method("safemerge")().merge(
        safemerge_inputs(tmp_path, anchor, [anchor + outside], [1.0], threshold=0.5, alpha=0.0),
        out_dtype=torch.float32)
    torch.testing.assert_close(reverted, anchor)
    kept = get_method("safemerge")().merge(
        safemerge_inputs(tmp_path, anchor, [anchor + outside], [1.0], threshold=0.0, alpha=0.0),
        out_dtype=torch.bfloat16)
    assert kept.dtype == torch.bfloat16
    torch.testing.assert_close(kept.float(), anchor + outside)


def test_safemerge_tensors_without_basis_keep_the_update_and_alpha_is_checked(tmp_path):
    anchor, expert = torch.zeros(3), torch.arange(3.0)
    inputs = safemerge_inputs(tmp_path, anchor, [expert], [0.5])
    inputs.name = "norm"
    torch.testing.assert_close(get_method("safemerge")().merge(inputs, out_dtype=torch.float32), 0.5 * expert)
    with pytest.raises(ConfigError, match="alpha"):
        get_method("safemerge")().merge(safemerge_inputs(tmp_path, torch.zeros(4, 3), [torch.ones(4, 3)], [1.0],
                                                         alpha=2.0), out_dtype=torch.float32)


def test_mergealign_is_the_fisher_formula_on_given_fishers(tmp_path):
    """θ = Σ w_k F_k θ_k / Σ w_k F_k elementwise, Fishers read from the per-model files."""
    thetas = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0]])]
    fishers = [torch.tensor([[1.0, 0.0], [2.0, 1.0]]), torch.tensor([[1.0, 3.0], [0.0, 1.0]])]
    files = []
    for k, f in enumerate(fishers):
        save_file({"w": f}, str(tmp_path / f"f{k}.safetensors"))
        files.append(str(tmp_path / f"f{k}.safetensors"))
    params = get_method("mergealign").method_parameters
    inputs = TensorInputs(name="w", models=thetas, params=[{"weight": 1.0, "fisher": files[0], "data": None},
                                                            {"weight": 2.0, "fisher": files[1], "data": None}],
                          method_params={**params, "epsilon": 1e-12})
    got = get_method("mergealign")().merge(inputs, out_dtype=torch.float32)
    expected = torch.tensor([[(1 * 1 + 2 * 5) / 3, 6.0], [3.0, (4 + 2 * 8) / 3]])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["fisher", "regmean", "mergealign", "safemerge", "alignmerge"])
def test_data_aware_methods_read_the_same_number_of_records_by_default(name):
    """The demo compares alignmerge with the data-aware baselines: their statistics come from equally many records."""
    from alignmerge.data import STATS_SAMPLES
    from alignmerge.fisher.stats import COMPUTE_OPTIONS

    assert get_method(name).method_parameters["samples"] == STATS_SAMPLES == COMPUTE_OPTIONS["samples"]


def test_mixed_records_keep_the_fraction_interleaved():
    task = [{"prompt": f"t{i}", "response": "x"} for i in range(10)]
    align = [{"prompt": f"a{i}", "response": "y"} for i in range(10)]
    import alignmerge.data as data

    orig = data.load_records
    try:
        data.load_records = lambda src, max_samples=None: (task if src == "task" else align)[:max_samples]
        mix = mixed_records("task", "align", 8, 0.25)
    finally:
        data.load_records = orig
    names = [r["prompt"] for r in mix]
    assert sorted(names) == ["a0", "a1", "t0", "t1", "t2", "t3", "t4", "t5"]
    assert names[0] == "a0" and names.index("a1") in (3, 4, 5)  # spread, not appended
    with pytest.raises(ConfigError, match="alignment_fraction"):
        mixed_records("task", "align", 8, 1.5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("baselines")
    kw = dict(dtype=torch.float32, hidden=24, intermediate=40, layers=2, vocab=64)
    anchor = add_char_tokenizer(make_tiny_llama(root / "anchor", seed=21, **kw))
    state = load_file(str(anchor / "model.safetensors"))
    expert = add_char_tokenizer(make_tiny_llama(root / "expert", seed=22, base_state=state, noise=0.05, **kw))
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return {"anchor": anchor, "expert": expert, "data": str(data)}


def test_run_merge_drivers_end_to_end(pair, tmp_path):
    from safetensors.torch import load_file

    from alignmerge.methods.alignmerge import alignment_drift

    safe = {"merge_method": "safemerge", "anchor": str(pair["anchor"]), "alignment_data": pair["data"],
            "models": [{"model": str(pair["expert"]), "parameters": {"weight": 1.0}}],
            "parameters": {"rank": 2, "threshold": 2.0, "alpha": 0.0}, "dtype": "float32"}
    report = get_method("safemerge").run_merge(safe, tmp_path / "safe")
    assert all(s == [0.0] for s in (t["scales"] for t in report["tensors"].values()) if s != [1.0])
    merged = load_file(str(next((tmp_path / "safe").glob("*.safetensors"))))
    anchor = load_file(str(pair["anchor"] / "model.safetensors"))
    torch.testing.assert_close(merged["model.layers.0.mlp.up_proj.weight"], anchor["model.layers.0.mlp.up_proj.weight"])
    drift = alignment_drift(tmp_path / "safe", pair["anchor"], [pair["expert"]], report["files"]["subspace"])
    assert drift["drift"] == pytest.approx(0.0, abs=1e-6) and drift["violations"] == 0.0

    mix = {"merge_method": "mergealign", "alignment_data": pair["data"], "dtype": "float32",
           "models": [{"model": str(pair["anchor"]), "parameters": {"weight": 0.5, "data": pair["data"]}},
                      {"model": str(pair["expert"]), "parameters": {"weight": 0.5, "data": pair["data"]}}],
           "parameters": {"samples": 4, "alignment_fraction": 0.5}}
    out = get_method("mergealign").run_merge(mix, tmp_path / "mix")
    assert len(out["files"]["fisher"]) == 2 and all(p.endswith(".safetensors") for p in out["files"]["fisher"])
    again = get_method("mergealign").run_merge(mix, tmp_path / "mix2")  # another output: its own cache
    assert again["files"]["fisher"] != out["files"]["fisher"]
    a = load_file(str(next((tmp_path / "mix").glob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "mix2").glob("*.safetensors"))))
    for name in a:
        torch.testing.assert_close(a[name], b[name])  # deterministic
