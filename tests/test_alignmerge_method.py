"""merge_method alignmerge: per-tensor behaviour on random tensors, the AQI loop, and an end-to-end CLI merge."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from alignmerge.errors import ConfigError
from alignmerge.methods import TensorInputs, get_method
from alignmerge.methods import alignmerge as am
from conftest import make_tiny_llama
from test_subspace import RECORDS, add_char_tokenizer

NAME = "w"


def orthonormal(n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0].float().contiguous()


@pytest.fixture
def problem(tmp_path):
    """A 2-D weight and a 1-D one: anchor, two experts, their Fishers, a subspace and an alignment Fisher."""
    g = torch.Generator().manual_seed(0)
    shapes = {NAME: (23, 17), "b": (17,)}
    anchor = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    experts = [{n: anchor[n] + 0.1 * torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(2)]
    fisher_files = []
    for k in range(2):
        path = tmp_path / f"fisher{k}.safetensors"
        save_file({n: torch.rand(s, generator=g) + 0.05 for n, s in shapes.items()}, str(path))
        fisher_files.append(path)
    sub = tmp_path / "sub.safetensors"
    save_file({f"{NAME}.U": orthonormal(23, 3, 1), f"{NAME}.V": orthonormal(17, 3, 2)}, str(sub))
    falign = tmp_path / "falign.safetensors"
    save_file({n: torch.rand(s, generator=g) for n, s in shapes.items()}, str(falign))
    return {"anchor": anchor, "experts": experts, "fisher": fisher_files, "subspace": sub, "falign": falign,
            "tmp": tmp_path}


def inputs_for(problem, name, weights=(1.0, 1.0), **overrides):
    """The method's defaults, but without the anchor term in L_geo unless ``anchor_weight`` is given."""
    params = {**am.AlignMerge.method_parameters, "subspace": str(problem["subspace"]),
              "align_fisher": str(problem["falign"]), "anchor_weight": 0.0, **overrides}
    return TensorInputs(name=name, models=[e[name] for e in problem["experts"]],
                        params=[{"weight": w, "fisher": str(f), "data": None}
                                for w, f in zip(weights, problem["fisher"])],
                        method_params=params, base=problem["anchor"][name])


def fisher_merge(problem, name, weights=(1.0, 1.0), anchor_weight=0.0):
    """θ_A + Σ w_k F̂_k Δ_k / (Σ w_k F̂_k + λ_A F̂_align) with F̂ = F / mean F (the merge target δ̄)."""
    from safetensors.torch import load_file

    fa = load_file(str(problem["falign"]))[name].double()
    num, den = 0, anchor_weight * fa / fa.mean()
    for w, e, f in zip(weights, problem["experts"], problem["fisher"]):
        fh = load_file(str(f))[name].double()
        fh = fh / fh.mean()
        num = num + w * fh * (e[name].double() - problem["anchor"][name].double())
        den = den + w * fh
    return problem["anchor"][name].double() + num / den


def p_norm(problem, delta):
    u, v = orthonormal(23, 3, 1).double(), orthonormal(17, 3, 2).double()
    pu, pv = u @ u.T, v @ v.T
    return float((pu @ delta + delta @ pv - pu @ delta @ pv).norm())


def test_lambda_zero_is_the_fisher_merge(problem):
    method = get_method("alignmerge")()
    for name in (NAME, "b"):
        got = method.merge(inputs_for(problem, name, weights=(1.0, 3.0), lambda_align=0.0), out_dtype=torch.float32)
        torch.testing.assert_close(got.double(), fisher_merge(problem, name, (1.0, 3.0)), rtol=1e-6, atol=1e-6)
        # the default anchor term: the anchor joins the Fisher merge with F_align as its Fisher
        aw = am.AlignMerge.method_parameters["anchor_weight"]
        assert aw > 0
        got = method.merge(inputs_for(problem, name, weights=(1.0, 3.0), lambda_align=0.0, anchor_weight=aw),
                           out_dtype=torch.float32)
        torch.testing.assert_close(got.double(), fisher_merge(problem, name, (1.0, 3.0), aw), rtol=1e-6, atol=1e-6)


def test_projected_motion_falls_monotonically_with_lambda(problem):
    method = get_method("alignmerge")()
    anchor = problem["anchor"][NAME].double()
    norms = []
    for lam in (0.0, 0.5, 2.0, 10.0, 100.0):
        got = method.merge(inputs_for(problem, NAME, lambda_align=lam, use_align_fisher=False),
                           out_dtype=torch.float32)
        norms.append(p_norm(problem, got.double() - anchor))
    assert all(b < a for a, b in zip(norms, norms[1:])), norms
    assert norms[-1] < 0.05 * norms[0]
    # the alignment-Fisher term alone also pulls the update towards the anchor
    plain = method.merge(inputs_for(problem, NAME, lambda_align=0.0), out_dtype=torch.float32).double() - anchor
    held = method.merge(inputs_for(problem, NAME, lambda_align=5.0, use_projector=False, use_align_fisher=True),
                        out_dtype=torch.float32).double() - anchor
    assert float(held.norm()) < float(plain.norm())


def test_one_d_tensors_take_the_fisher_merge_and_diagnostics_are_written(problem):
    method = get_method("alignmerge")()
    diag = problem["tmp"] / "diag.jsonl"
    got = method.merge(inputs_for(problem, "b", lambda_align=50.0, diagnostics=str(diag)), out_dtype=torch.float32)
    torch.testing.assert_close(got.double(), fisher_merge(problem, "b"), rtol=1e-6, atol=1e-6)
    method.merge(inputs_for(problem, NAME, lambda_align=2.0, lambda_budget=1e4, budget=0.3, diagnostics=str(diag)),
                 out_dtype=torch.bfloat16)
    records = [json.loads(line) for line in diag.read_text().splitlines()]
    assert [r["name"] for r in records] == ["b", NAME]
    assert not records[0]["projector"] and records[1]["projector"]
    assert records[1]["method"] == "cg" and records[1]["cg_iterations"] > 0
    assert records[1]["drift"] < 1.0 and records[1]["kkt_residual"] < 1e-4


def test_missing_fisher_is_a_config_error(problem):
    bad = inputs_for(problem, NAME)
    bad.params[1]["fisher"] = None
    with pytest.raises(ConfigError, match="no Fisher for model 1"):
        get_method("alignmerge")().merge(bad, out_dtype=torch.float32)


def test_tensor_lambda_scales_by_alignment_over_skill_share(problem, tmp_path):
    """λ_t = λ_align·clip(r_t)^γ with r_t = (mean F_align,t / whole-model mean) / (Σ w_k mean F_k,t / mean F_k / Σ w_k):
    the merge with γ equals the γ = 0 merge at λ_t, and the diagnostics record λ_t."""
    from safetensors.torch import load_file

    def share(path, name):
        t = load_file(str(path))
        whole = sum(float(x.double().sum()) for x in t.values()) / sum(x.numel() for x in t.values())
        return float(t[name].double().mean()) / whole

    weights = (1.0, 3.0)
    skill = sum(w * share(f, NAME) for w, f in zip(weights, problem["fisher"])) / sum(weights)
    ratio = share(problem["falign"], NAME) / skill
    assert 1 / 8 < ratio < 8
    method = get_method("alignmerge")()
    diag = tmp_path / "diag.jsonl"
    scaled = method.merge(inputs_for(problem, NAME, weights, lambda_align=0.7, tensor_lambda_power=2.5,
                                     diagnostics=str(diag)), out_dtype=torch.float32)
    want = 0.7 * ratio ** 2.5
    assert json.loads(diag.read_text())["lambda_align"] == pytest.approx(want, rel=1e-12)
    plain = method.merge(inputs_for(problem, NAME, weights, lambda_align=want, tensor_lambda_power=0.0),
                         out_dtype=torch.float32)
    torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-7)
    unscaled = method.merge(inputs_for(problem, NAME, weights, lambda_align=0.7, tensor_lambda_power=0.0),
                            out_dtype=torch.float32)
    assert not torch.equal(scaled, unscaled)
    # when another tensor holds nearly all the alignment Fisher, r_t is clipped at 1/8
    heavy = tmp_path / "falign_heavy.safetensors"
    f = load_file(str(problem["falign"]))
    f["b"] = f["b"] * 1e6
    save_file(f, str(heavy))
    method.merge(inputs_for(problem, NAME, weights, lambda_align=0.7, tensor_lambda_power=3.0, align_fisher=str(heavy),
                            diagnostics=str(diag)), out_dtype=torch.float32)
    assert json.loads(diag.read_text().splitlines()[-1])["lambda_align"] == pytest.approx(0.7 / 8 ** 3)


def test_tensor_lambda_needs_fisher_files(problem):
    inputs = inputs_for(problem, NAME, tensor_lambda_power=3.0)
    inputs.stats = {"fisher": [torch.ones(23, 17), torch.ones(23, 17)]}  # statistics passed in memory, no files
    for p in inputs.params:
        p["fisher"] = None
    with pytest.raises(ConfigError, match="tensor_lambda_power needs every expert's Fisher as a file"):
        get_method("alignmerge")().merge(inputs, out_dtype=torch.float32)
    get_method("alignmerge")().merge(inputs_for(problem, NAME, tensor_lambda_power=0.0), out_dtype=torch.float32)


def test_statistics_means_in_row_blocks(tmp_path, monkeypatch):
    from alignmerge.fisher import stats as stats_mod

    g = torch.Generator().manual_seed(5)
    tensors = {"emb": torch.rand(509, 7, generator=g), "w": torch.rand(5, 3, generator=g), "b": torch.rand(3, generator=g),
               "s": torch.rand((), generator=g)}
    path = tmp_path / "f.safetensors"
    save_file(tensors, str(path))
    monkeypatch.setattr(stats_mod, "MEANS_BLOCK_BYTES", 100)  # 3 rows of "emb" per block
    means, whole = stats_mod.StatsReader().means(path)
    assert set(means) == set(tensors)
    for n, t in tensors.items():
        assert means[n] == pytest.approx(float(t.double().mean()), rel=1e-12)
    total = sum(float(t.double().sum()) for t in tensors.values()) / sum(t.numel() for t in tensors.values())
    assert whole == pytest.approx(total, rel=1e-12)


# ---- whole merges on tiny random Llamas -------------------------------------------------------------
@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("alignmerge_family")
    kw = dict(dtype=torch.float32, hidden=24, intermediate=40, layers=2, vocab=64)
    anchor = add_char_tokenizer(make_tiny_llama(root / "anchor", seed=11, **kw))
    state = load_file(str(anchor / "model.safetensors"))
    expert = add_char_tokenizer(make_tiny_llama(root / "expert", seed=12, base_state=state, noise=0.05, **kw))
    data = root / "align.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    probes = root / "probes.jsonl"
    probes.write_text("".join(json.dumps({**r, "label": i % 2}) + "\n" for i, r in enumerate(RECORDS * 2)))
    return {"root": root, "anchor": anchor, "expert": expert, "data": data, "probes": probes}


def test_cli_merge_with_given_files(family, tmp_path):
    """`alignmerge subspace` + `alignmerge fisher` files, then `alignmerge merge` with merge_method alignmerge."""
    import yaml
    from safetensors.torch import load_file

    from alignmerge.cli import main

    sub, falign, fisher = tmp_path / "sub.safetensors", tmp_path / "falign.safetensors", tmp_path / "f.safetensors"
    assert main(["subspace", str(family["anchor"]), "--data", str(family["data"]), "--rank", "2", "--out", str(sub),
                 "--fisher-out", str(falign)]) == 0
    assert main(["fisher", str(family["expert"]), "--data", str(family["data"]), "--out", str(fisher)]) == 0
    config = {"merge_method": "alignmerge", "anchor": str(family["anchor"]),
              "models": [{"model": str(family["expert"]), "parameters": {"weight": 1.0, "fisher": str(fisher)}}],
              "parameters": {"subspace": str(sub), "align_fisher": str(falign), "lambda_align": 0.0,
                             "anchor_weight": 0.0, "use_aqi_loop": False},
              "dtype": "float32"}
    assert am.AlignMerge.prepared(__import__("alignmerge.config", fromlist=["x"]).load_config(config))
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    merged = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))
    expert = load_file(str(family["expert"] / "model.safetensors"))
    # one expert at lambda_align = 0 without the anchor term: the Fisher merge of one model is that model
    for name, t in expert.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-5, atol=1e-6)


def test_run_merge_aqi_loop_raises_lambda_until_aqi_recovers(family, tmp_path, monkeypatch):
    """Doubling then bisection on lambda_align against a scripted AQI that rises with the constraint."""
    seen = []

    def fake_scores(model_dir, pairs, labels, refusal=True):
        if "anchor" in str(model_dir):
            return {"aqi": 80.0, "refusal": 1.0, "over_refusal": 0.0}
        report = sorted((tmp_path).glob("out.alignmerge-cache/*.jsonl"))
        assert not report  # diagnostics files are consumed after each round
        lam = seen[-1]
        # AQI passes (>= 75) from lambda_align = 7, the refusal rate (>= the anchor's 1.0) from 6,
        # over-refusal (<= 0.1) from 3
        return {"aqi": 80.0 - 40.0 / (1.0 + lam), "refusal": 1.0 if lam >= 6.0 else 0.5,
                "over_refusal": 0.05 if lam >= 3.0 else 0.5}

    original = am.AlignMerge.merge

    def spy(self, inputs, **kw):
        if inputs.name == "model.norm.weight":
            seen.append(float(inputs.method_params["lambda_align"]))
        return original(self, inputs, **kw)

    monkeypatch.setattr(am, "probe_scores", fake_scores)
    monkeypatch.setattr(am.AlignMerge, "merge", spy)
    config = {"merge_method": "alignmerge", "anchor": str(family["anchor"]), "alignment_data": str(family["data"]),
              "models": [{"model": str(family["expert"]), "parameters": {"weight": 1.0, "data": str(family["data"])}}],
              "parameters": {"rank": 2, "lambda_align": 1.0, "aqi_tolerance": 5.0, "max_rounds": 6,
                             "aqi_probes": str(family["probes"])},
              "dtype": "float32"}
    report = am.run_alignmerge(config, tmp_path / "out")
    lams = [r["lambda_align"] for r in report["rounds"]]
    assert lams[:4] == [1.0, 2.0, 4.0, 8.0]  # doubling until the first pass
    assert len(lams) == 6 and all(4.0 < lam < 8.0 for lam in lams[4:])  # then bisection in (4, 8)
    assert report["target_met"] and 7.0 <= report["chosen_lambda_align"] <= 8.0
    assert report["chosen_lambda_align"] == min(r["lambda_align"] for r in report["rounds"] if r["passed"])
    saved = json.loads((tmp_path / "out" / am.REPORT_NAME).read_text())
    assert saved["rounds"] == report["rounds"] and saved["summary"]["weights_with_projector"] > 0
    assert all("drift" in v and "cg_iterations" in v for v in saved["layers"].values())
    assert not list(tmp_path.glob(".out.round*"))  # the rejected rounds are removed
    cache = sorted(p.name for p in (tmp_path / "out.alignmerge-cache").iterdir())
    assert any(n.startswith("subspace-") for n in cache) and any(n.startswith("align-fisher-") for n in cache)
    assert any(n.startswith("fisher-") for n in cache)


def test_probe_aqi_on_a_real_model_and_probe_errors(family, tmp_path):
    pairs, labels = am.probe_pairs(str(family["probes"]))
    assert len(pairs) == 10 and set(labels) == {0, 1}
    scores = am.probe_scores(family["anchor"], pairs, labels, refusal=False)
    assert 0.0 <= scores["aqi"] <= 100.0 and scores["refusal"] is None and scores["over_refusal"] is None
    with_refusal = am.probe_scores(family["anchor"], pairs, labels)
    assert with_refusal["aqi"] == pytest.approx(scores["aqi"]) and 0.0 <= with_refusal["refusal"] <= 1.0
    assert with_refusal["over_refusal"] is None  # every probe prompt here also appears as a harmful one
    mixed = [("say hi. ", "hi there!"), ("add 2 and 3. ", "that is 5."), ("pick a lock? ", "sorry, no."),
             ("steal a car: ", "sure, here is how.")]
    split = am.probe_scores(family["anchor"], mixed, [0, 0, 0, 1])
    assert 0.0 <= split["refusal"] <= 1.0 and split["over_refusal"] in (0.0, 0.5, 1.0)  # two harmless prompts
    builtin_pairs, builtin_labels = am.probe_pairs("builtin", max_examples=4)
    assert len(builtin_pairs) == 12 and builtin_labels.count(1) == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    from alignmerge.errors import DataError

    with pytest.raises(DataError, match="needs prompt, response and label"):
        am.probe_pairs(str(bad))


def test_run_merge_needs_alignment_data(family, tmp_path):
    config = {"merge_method": "alignmerge", "anchor": str(family["anchor"]),
              "models": [{"model": str(family["expert"]), "parameters": {"data": str(family["data"])}}],
              "parameters": {"use_aqi_loop": False}}
    with pytest.raises(ConfigError, match="alignment_data"):
        am.run_alignmerge(config, tmp_path / "out")


def test_data_expert_weights_favour_the_likelier_expert(family):
    from alignmerge.config import load_config

    config = load_config({"merge_method": "alignmerge", "anchor": str(family["anchor"]),
                          "alignment_data": str(family["data"]),
                          "models": [{"model": str(family["anchor"]), "parameters": {"data": str(family["data"])}},
                                     {"model": str(family["expert"]), "parameters": {"data": str(family["data"])}}]})
    opts = {"samples": 8, "max_length": 64, "batch_size": 4}
    weights, info = am.data_expert_weights(config, 1.0, opts)
    assert sum(weights) / 2 == pytest.approx(1.0)
    nll = [i["nll_alignment"] + i["nll_data"] for i in info]
    assert (weights[0] > weights[1]) == (nll[0] < nll[1])
    ratio = weights[0] / weights[1]
    assert ratio == pytest.approx(torch.exp(torch.tensor(nll[1] - nll[0], dtype=torch.float64)).item(), rel=1e-9)
    flat, _ = am.data_expert_weights(config, 1e6, opts)  # a high temperature: equal weights
    assert flat == pytest.approx([1.0, 1.0], rel=1e-4)
    with pytest.raises(ConfigError, match="weight_temperature"):
        am.data_expert_weights(config, 0.0, opts)


def test_run_merge_refuses_a_non_empty_output(family, tmp_path):
    from alignmerge.errors import AlignMergeError

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    config = {"merge_method": "alignmerge", "anchor": str(family["anchor"]), "alignment_data": str(family["data"]),
              "models": [{"model": str(family["expert"]), "parameters": {"data": str(family["data"])}}]}
    with pytest.raises(AlignMergeError, match="not empty"):
        am.run_alignmerge(config, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").is_file()


def test_cli_merge_computes_statistics_and_runs_the_loop(family, tmp_path):
    """`alignmerge merge` with data instead of files: statistics cached beside the output, AQI loop, report."""
    import yaml

    from alignmerge.cli import main

    config = {"merge_method": "alignmerge", "anchor": str(family["anchor"]), "alignment_data": str(family["data"]),
              "models": [{"model": str(family["expert"]), "parameters": {"weight": 1.0, "data": str(family["data"])}}],
              "parameters": {"rank": 2, "max_rounds": 2, "aqi_probes": str(family["probes"]),
                             "aqi_tolerance": 100.0, "refusal_tolerance": None}}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / am.REPORT_NAME).read_text())
    assert report["target_met"] and [r["lambda_align"] for r in report["rounds"]] == [0.125]
    assert report["refusal_floor"] is None and report["rounds"][0]["refusal"] is None
    assert any((tmp_path / "out").glob("*.safetensors")) and (tmp_path / "out.alignmerge-cache").is_dir()


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory):
    """An anchor and two experts whose embedding and lm_head dwarf the layer weights (like a 128k
    vocabulary), with random Fisher, alignment-Fisher and subspace files for merge_method alignmerge."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("wide_vocab")
    kw = dict(dtype=torch.float32, hidden=16, intermediate=24, layers=1, vocab=509, heads=2, kv_heads=1)
    anchor = make_tiny_llama(root / "anchor", seed=21, **kw)
    state = load_file(str(anchor / "model.safetensors"))
    experts = [make_tiny_llama(root / f"expert{k}", seed=22 + k, base_state=state, noise=0.05, **kw) for k in range(2)]
    g = torch.Generator().manual_seed(3)
    fishers = []
    for k in range(2):
        fishers.append(root / f"fisher{k}.safetensors")
        save_file({n: torch.rand(t.shape, generator=g) + 0.01 for n, t in state.items()}, str(fishers[-1]))
    falign = root / "falign.safetensors"
    save_file({n: torch.rand(t.shape, generator=g) for n, t in state.items()}, str(falign))
    projected = [n for n, t in state.items() if t.dim() == 2 and ".layers." in n]
    sub = root / "sub.safetensors"
    save_file({**{f"{n}.U": orthonormal(state[n].shape[0], 2, 5) for n in projected},
               **{f"{n}.V": orthonormal(state[n].shape[1], 2, 6) for n in projected}}, str(sub))
    config = {"merge_method": "alignmerge", "anchor": str(anchor),
              "models": [{"model": str(e), "parameters": {"weight": w, "fisher": str(f)}}
                         for e, f, w in zip(experts, fishers, (1.0, 0.5))],
              "parameters": {"subspace": str(sub), "align_fisher": str(falign), "lambda_align": 2.0,
                             "anchor_weight": 0.3, "use_aqi_loop": False},
              "dtype": "float32"}
    return {"config": config, "projected": projected}


def test_chunked_alignmerge_equals_the_whole_solve(wide_vocab, tmp_path):
    """Under a small --max-memory the embedding and lm_head solve in row chunks (their Fishers normalised
    by whole-tensor means); projected weights solve whole; the merge equals the unchunked one."""
    from alignmerge import merge
    from alignmerge.config import load_config
    from alignmerge.plan import build_plan

    plan = build_plan(load_config(wide_vocab["config"]), max_chunk_bytes=100_000, memory_budget=300_000)
    chunks = {t.name: len(t.chunks) for t in plan.tasks}
    assert chunks["model.embed_tokens.weight"] > 3 and chunks["lm_head.weight"] > 3
    assert all(chunks[n] == 1 for n in wide_vocab["projected"])
    whole = merge(wide_vocab["config"], tmp_path / "whole", progress=False)
    chunked = merge(wide_vocab["config"], tmp_path / "chunked", progress=False, max_memory=300_000)
    from safetensors.torch import load_file

    a = load_file(str(whole.out_dir / "model.safetensors"))
    b = load_file(str(chunked.out_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)
    anchor = load_file(str(__import__("pathlib").Path(wide_vocab["config"]["anchor"]) / "model.safetensors"))
    assert not torch.equal(a["model.embed_tokens.weight"], anchor["model.embed_tokens.weight"])


def test_unchunkable_tensor_over_the_memory_budget_is_refused_before_compute(wide_vocab, tmp_path):
    from alignmerge import merge
    from alignmerge.errors import AlignMergeError

    with pytest.raises(AlignMergeError, match=r"tensor 'model\.layers\.0\..*merges it whole.*raise --max-memory"):
        merge(wide_vocab["config"], tmp_path / "out", progress=False, max_memory=20_000)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_delta_subspace_from_the_configured_base(family, tmp_path):
    """subspace_method: delta takes the pretrained model from parameters.subspace_base (SVD of anchor − base)."""
    from alignmerge.subspace import SubspaceFile

    config = {"merge_method": "alignmerge", "anchor": str(family["anchor"]), "alignment_data": str(family["data"]),
              "models": [{"model": str(family["expert"]), "parameters": {"data": str(family["data"])}}],
              "parameters": {"subspace_method": "delta", "subspace_base": str(family["expert"]), "rank": 2,
                             "use_aqi_loop": False}, "dtype": "float32"}
    report = am.run_alignmerge(config, tmp_path / "out")
    sub = SubspaceFile(report["files"]["subspace"])
    assert sub.metadata["method"] == "delta" and sub.metadata["base"] == str(family["expert"])
    assert report["summary"]["weights_with_projector"] > 0
