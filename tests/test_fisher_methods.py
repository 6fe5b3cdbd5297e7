"""Fisher merging and RegMean equal their formulas on hand-built tensors; stats files are
found, validated (names and shapes) and computed from data when missing."""
import pytest
import torch
from safetensors.torch import save_file

from alignmerge.config import ModelSpec, MergeConfig
from alignmerge.errors import CheckpointError, ConfigError
from alignmerge.fisher.stats import validate_stats_file
from alignmerge.methods import TensorInputs, get_method
from conftest import make_tiny_llama
from test_fisher import RECORDS, add_char_tokenizer, write_jsonl


def _inputs(method, models, stats, params=None, **method_params):
    cls = get_method(method)
    mp = {k: v for k, v in cls.method_parameters.items()}
    mp.update(method_params)
    params = params or [{"weight": 1.0} for _ in models]
    return cls(), TensorInputs(name="w", models=models, params=params, method_params=mp, stats=stats)


def test_fisher_merge_formula():
    gen = torch.Generator().manual_seed(0)
    thetas = [torch.randn(5, 7, generator=gen) for _ in range(3)]
    fishers = [torch.rand(5, 7, generator=gen) for _ in range(3)]
    fishers[1][0, :] = 0.0  # floored at epsilon
    w = [0.5, 1.0, 2.0]
    eps = 1e-3
    method, inputs = _inputs("fisher", thetas, {"fisher": fishers}, [{"weight": x} for x in w], epsilon=eps)
    got = method.merge(inputs, out_dtype=torch.float32)
    f = [fk.clamp_min(eps) for fk in fishers]
    want = sum(wk * fk * tk for wk, fk, tk in zip(w, f, thetas)) / sum(wk * fk for wk, fk in zip(w, f))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # all Fishers zero -> the weighted average
    _, zero = _inputs("fisher", thetas, {"fisher": [torch.zeros(5, 7)] * 3}, [{"weight": x} for x in w])
    avg = sum(wk * tk for wk, tk in zip(w, thetas)) / sum(w)
    torch.testing.assert_close(method.merge(zero, out_dtype=torch.float32), avg, rtol=1e-6, atol=1e-6)


def test_fisher_merge_normalisation_and_chunks():
    gen = torch.Generator().manual_seed(1)
    thetas = [torch.randn(6, 4, generator=gen) for _ in range(2)]
    fishers = [torch.rand(6, 4, generator=gen), 1e4 * torch.rand(6, 4, generator=gen)]
    method, inputs = _inputs("fisher", thetas, {"fisher": fishers}, normalize_fisher=True, epsilon=1e-9)
    got = method.merge(inputs, out_dtype=torch.float32)
    f = [fk / fk.mean() for fk in fishers]
    want = (f[0] * thetas[0] + f[1] * thetas[1]) / (f[0] + f[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # chunked: the chunk statistic fed every row block gives whole-tensor means; merge per block matches
    blocks = [(0, 2), (2, 6)]

    def part(r0, r1):
        return _inputs("fisher", [t[r0:r1] for t in thetas], {"fisher": [fk[r0:r1] for fk in fishers]},
                       normalize_fisher=True, epsilon=1e-9)[1]

    stat = method.chunk_statistic(part(*blocks[0]), 24)
    while not stat.done:
        for r0, r1 in blocks:
            stat.update(part(r0, r1))
        stat.finish_pass()
    pieces = []
    for r0, r1 in blocks:
        chunk = part(r0, r1)
        chunk.state = stat
        pieces.append(method.merge(chunk, out_dtype=torch.float32))
    torch.testing.assert_close(torch.cat(pieces), want, rtol=1e-5, atol=1e-6)


def test_fisher_merge_bf16_output_and_errors():
    thetas = [torch.randn(3, 3).bfloat16() for _ in range(2)]
    method, inputs = _inputs("fisher", thetas, {"fisher": [torch.ones(3, 3)] * 2})
    got = method.merge(inputs, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ((thetas[0].float() + thetas[1].float()) / 2).bfloat16().float())
    _, missing = _inputs("fisher", thetas, {"fisher": [torch.ones(3, 3), None]})
    with pytest.raises(ConfigError, match="no Fisher for model 1"):
        method.merge(missing, out_dtype=torch.float32)
    _, bad = _inputs("fisher", thetas, {"fisher": [torch.ones(3, 3), torch.ones(3, 4)]})
    with pytest.raises(ConfigError, match="shape"):
        method.merge(bad, out_dtype=torch.float32)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_regmean_formula(alpha):
    gen = torch.Generator().manual_seed(2)
    out_f, in_f = 5, 4
    weights = [torch.randn(out_f, in_f, generator=gen, dtype=torch.float64) for _ in range(3)]
    acts = [torch.randn(20, in_f, generator=gen, dtype=torch.float64) for _ in range(3)]
    grams = [a.t() @ a / 20 for a in acts]
    method, inputs = _inputs("regmean", [w.float() for w in weights], {"gram": [g.float() for g in grams]},
                             alpha=alpha)
    got = method.merge(inputs, out_dtype=torch.float32)
    gt = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in grams]
    want = sum(w @ g for w, g in zip(weights, gt)) @ torch.linalg.inv(sum(gt))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if alpha == 1.0:  # the least-squares optimum of sum_k ||X_k W^T - X_k W_k^T||^2
        x = torch.cat(acts)
        y = torch.cat([a @ w.t() for a, w in zip(acts, weights)])
        lstsq = torch.linalg.lstsq(x, y).solution.t()
        torch.testing.assert_close(got.double(), lstsq, rtol=1e-4, atol=1e-4)


def test_regmean_non_linear_tensors_average():
    vecs = [torch.randn(6) for _ in range(2)]
    method, inputs = _inputs("regmean", vecs, {"gram": [None, None]}, params=[{"weight": 1.0}, {"weight": 3.0}])
    torch.testing.assert_close(method.merge(inputs, out_dtype=torch.float32), (vecs[0] + 3 * vecs[1]) / 4)
    _, partial = _inputs("regmean", [torch.randn(2, 2)] * 2, {"gram": [torch.eye(2), None]})
    with pytest.raises(ConfigError, match="only some models"):
        method.merge(partial, out_dtype=torch.float32)


# ---- prepare_stats ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fm")
    a = add_char_tokenizer(make_tiny_llama(root / "a", seed=1, dtype=torch.float32, hidden=16, intermediate=24,
                                           layers=1, heads=2, kv_heads=1))
    b = add_char_tokenizer(make_tiny_llama(root / "b", seed=2, dtype=torch.float32, hidden=16, intermediate=24,
                                           layers=1, heads=2, kv_heads=1))
    return a, b


def _config(method, models, **params):
    return MergeConfig(merge_method=method, models=[ModelSpec(path=str(m)) for m in models], parameters=params)


@pytest.mark.parametrize("method,kind", [("fisher", "fisher"), ("regmean", "gram")])
def test_prepare_stats_computes_and_caches(two_models, tmp_path, method, kind):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS[:3])
    config = _config(method, two_models, data=str(data), samples=3)
    paths = get_method(method).prepare_stats(config, tmp_path / "work")[kind]
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    again = get_method(method).prepare_stats(config, tmp_path / "work")[kind]
    assert again == paths and [p.stat().st_mtime_ns for p in again] == mtimes
    # a file given per model wins over data (same architecture, so b's file validates for a)
    config.models[0].parameters[kind] = str(paths[1])
    assert get_method(method).prepare_stats(config, tmp_path / "work")[kind][0] == paths[1]
    config.models[0].parameters[kind] = str(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match=f"absent.safetensors: {kind} file not found"):
        get_method(method).prepare_stats(config, tmp_path / "work")


def test_prepared_only_when_every_file_is_given(two_models):
    config = _config("fisher", two_models, data="builtin:safety")
    assert not get_method("fisher").prepared(config)
    for spec in config.models:
        spec.parameters["fisher"] = "f.safetensors"
    assert get_method("fisher").prepared(config)
    assert not get_method("regmean").prepared(config)
    assert get_method("regmean").prepared(_config("regmean", two_models, gram="g.safetensors"))


def test_prepare_stats_needs_data_or_file(two_models, tmp_path):
    with pytest.raises(ConfigError, match=r"models\[0\].*needs fisher: <file> or data:"):
        get_method("fisher").prepare_stats(_config("fisher", two_models), tmp_path)


def test_stats_file_names_and_shapes_checked(two_models, tmp_path):
    model = two_models[0]
    from alignmerge.io.checkpoint import Checkpoint

    ck = Checkpoint(model)
    good = {n: torch.ones(ck.shape(n)) for n in ck.names()}
    save_file(good, str(tmp_path / "good.safetensors"))
    validate_stats_file(tmp_path / "good.safetensors", model, "fisher")
    wrong_shape = dict(good)
    wrong_shape["lm_head.weight"] = torch.ones(3, 3)
    save_file(wrong_shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape.safetensors: fisher tensor 'lm_head.weight' has shape \(3, 3\)"):
        validate_stats_file(tmp_path / "shape.safetensors", model, "fisher")
    extra = dict(good)
    extra["model.layers.9.mlp.up_proj.weight"] = torch.ones(2)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="is not a tensor of model"):
        validate_stats_file(tmp_path / "extra.safetensors", model, "fisher")
    missing = dict(good)
    missing.pop("model.norm.weight")
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensor"):
        validate_stats_file(tmp_path / "missing.safetensors", model, "fisher")
    gram = {"model.layers.0.mlp.down_proj.weight": torch.ones(16, 16)}  # down_proj is [16, 24]: needs 24x24
    save_file(gram, str(tmp_path / "gram.safetensors"))
    with pytest.raises(CheckpointError, match="expected \\(24, 24\\)"):
        validate_stats_file(tmp_path / "gram.safetensors", model, "gram")


# ---- end to end through `alignmerge merge` -----------------------------------------------------
def _merged(out_dir):
    from safetensors.torch import load_file

    return {k: v for f in sorted(out_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_fisher_merge_end_to_end(two_models, tmp_path):
    """Fisher files from `alignmerge fisher`, merged by `alignmerge merge`, equal the formula."""
    import yaml
    from safetensors.torch import load_file

    from alignmerge.cli import main as cli_main

    data = write_jsonl(tmp_path / "d.jsonl", RECORDS[:3])
    fishers = []
    for i, model in enumerate(two_models):
        fishers.append(tmp_path / f"f{i}.safetensors")
        assert cli_main(["fisher", str(model), "--data", str(data), "--out", str(fishers[-1])]) == 0
    config = {"merge_method": "fisher", "dtype": "float32",
              "models": [{"model": str(m), "parameters": {"weight": w, "fisher": str(f)}}
                         for m, w, f in zip(two_models, (1.0, 2.0), fishers)],
              "parameters": {"epsilon": 1e-10}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["merge", str(tmp_path / "c.yaml"), str(tmp_path / "out"), "--no-progress"]) == 0
    got = _merged(tmp_path / "out")
    thetas = [load_file(str(m / "model.safetensors")) for m in two_models]
    fs = [load_file(str(f)) for f in fishers]
    for name in ("model.layers.0.mlp.up_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        f0, f1 = fs[0][name].clamp_min(1e-10), 2.0 * fs[1][name].clamp_min(1e-10)
        want = (f0 * thetas[0][name] + f1 * thetas[1][name]) / (f0 + f1)
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_run_merge_computes_stats_from_data(two_models, tmp_path, method):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS[:3])
    config = {"merge_method": method, "dtype": "float32", "models": [{"model": str(m)} for m in two_models],
              "parameters": {"data": str(data), "samples": 3}}
    report = get_method(method).run_merge(config, tmp_path / "out", progress=False)
    kind = get_method(method).stats[0]
    files = report["files"][kind]
    assert all(str(tmp_path / "out.alignmerge-cache") in f for f in files)
    got = _merged(tmp_path / "out")
    assert all(torch.isfinite(t).all() for t in got.values())
    if method == "regmean":
        from safetensors.torch import load_file

        name = "model.layers.0.self_attn.q_proj.weight"
        grams = [load_file(f)[name].double() for f in files]
        grams = [0.9 * g + 0.1 * torch.diag(torch.diagonal(g)) for g in grams]
        ws = [load_file(str(m / "model.safetensors"))[name].double() for m in two_models]
        want = (ws[0] @ grams[0] + ws[1] @ grams[1]) @ torch.linalg.inv(grams[0] + grams[1])
        torch.testing.assert_close(got[name].double(), want, rtol=1e-4, atol=1e-5)


def test_stats_reader_cuts_row_chunks(tmp_path):
    from alignmerge.fisher.stats import StatsReader

    full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    save_file({"w": full, "g": torch.eye(4)}, str(tmp_path / "s.safetensors"))
    reader = StatsReader()
    chunk = reader.get(tmp_path / "s.safetensors", "w", torch.zeros(2, 4), element_offset=8, rows=True)
    torch.testing.assert_close(chunk, full[2:4])
    assert reader.get(tmp_path / "s.safetensors", "g", torch.zeros(3, 4), rows=False).shape == (4, 4)
    assert reader.get(tmp_path / "s.safetensors", "absent", torch.zeros(1)) is None


def test_ops_fisher_merge_formula_and_errors():
    from alignmerge import ops

    g = torch.Generator().manual_seed(7)
    thetas = [torch.randn(13, 7, generator=g).to(torch.bfloat16) for _ in range(3)]
    fishers = [torch.rand(13, 7, generator=g) * 1e-3 for _ in range(3)]
    fishers[1][0, 0] = 0.0
    w, c = [0.5, 1.0, 2.0], [1.0, 3.0, 0.5]
    got = ops.fisher_merge(thetas, fishers, w, epsilon=1e-5, scales=c, out_dtype=torch.float32)
    f = [wk * (ck * fk).clamp_min(1e-5) for wk, ck, fk in zip(w, c, fishers)]
    want = sum(fk * t.float() for fk, t in zip(f, thetas)) / sum(f)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="as many fishers"):
        ops.fisher_merge(thetas, fishers[:2], w)
    with pytest.raises(ValueError, match="does not match"):
        ops.fisher_merge(thetas, [fishers[0], fishers[1], fishers[2][:3]], w)
