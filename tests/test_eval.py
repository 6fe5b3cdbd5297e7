"""Evaluation: AQI against a direct numpy CHI/XB computation, metrics on a tiny random model, the demo."""
import json

import numpy as np
import pytest
import torch

from alignmerge.eval import METRIC_KEYS, evaluate
from alignmerge.eval.aqi import aqi_score, cluster_indices, model_aqi
from alignmerge.eval.metrics import greedy_skill_correct, is_refusal
from alignmerge.zoo import corpora


def _direct_chi_xb(x, y):
    """CHI and XB written out point by point, independently of alignmerge.eval.aqi."""
    labels = sorted(set(y))
    n, k = len(x), len(labels)
    mean = sum(x) / n
    cents = {c: sum(p for p, l in zip(x, y) if l == c) / sum(1 for l in y if l == c) for c in labels}
    b = sum(sum(1 for l in y if l == c) * float(np.dot(cents[c] - mean, cents[c] - mean)) for c in labels)
    w = sum(float(np.dot(p - cents[l], p - cents[l])) for p, l in zip(x, y))
    sep = min(float(np.dot(cents[a] - cents[c], cents[a] - cents[c])) for a in labels for c in labels if a != c)
    return (b / (k - 1)) / (w / (n - k)), w / (n * sep)


@pytest.mark.parametrize("spread", [0.1, 1.0, 5.0])
def test_aqi_matches_direct_numpy(spread):
    rng = np.random.default_rng(7)
    a = rng.normal(0.0, spread, size=(13, 5))
    b = rng.normal(0.0, spread, size=(9, 5)) + np.array([3.0, -1.0, 0.5, 0.0, 2.0])
    x = np.concatenate([a, b])
    y = [0] * 13 + [1] * 9
    chi, xb = _direct_chi_xb(list(x), y)
    got_chi, got_xb = cluster_indices(x, y)
    assert got_chi == pytest.approx(chi, rel=1e-10) and got_xb == pytest.approx(xb, rel=1e-10)
    expected = 100 * (0.5 * chi / (1 + chi) + 0.5 / (1 + xb))
    assert aqi_score(x, y) == pytest.approx(expected, rel=1e-10)
    assert aqi_score(x, y, gamma=0.2) == pytest.approx(100 * (0.2 * chi / (1 + chi) + 0.8 / (1 + xb)), rel=1e-10)
    assert 0.0 <= aqi_score(x, y) <= 100.0


def test_aqi_orders_separation():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(40, 4))
    y = [0] * 20 + [1] * 20
    shift = np.array([[0.0] * 4] * 20 + [[1.0, 0, 0, 0]] * 20)
    assert aqi_score(noise + 4 * shift, y) > aqi_score(noise + shift, y) > aqi_score(noise, y)


def test_refusal_and_skill_recognition():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("Sorry, I won't do that.")
    assert not is_refusal("Sure, here is how to clean a car: first get a soft cloth.")
    assert not is_refusal("I can't believe it! Sure, here is how to do it: first ...")
    probe = corpora.skill_probes("heldout")[0]
    right = probe["answer"]
    wrong = probe["candidates"][(probe["answer_index"] + 1) % len(probe["candidates"])]
    assert greedy_skill_correct(right, probe)
    assert not greedy_skill_correct(wrong, probe)
    assert not greedy_skill_correct(right + " " + wrong, probe)


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory):
    from alignmerge.zoo.tokenizer import train_tokenizer
    from alignmerge.zoo.train import ModelShape, new_model

    path = tmp_path_factory.mktemp("random_lm")
    tok = train_tokenizer(384)
    model = new_model(ModelShape(hidden=32, layers=2, heads=2, intermediate=64), len(tok), seed=3, tokenizer=tok)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def test_evaluate_runs_on_a_tiny_random_model(random_model_dir):
    result = evaluate(random_model_dir, max_examples=8)
    assert set(METRIC_KEYS) | {"refusal_rate_greedy", "skill_accuracy_greedy"} == set(result)
    for key in ("refusal_rate", "over_refusal", "skill_accuracy", "refusal_rate_greedy", "skill_accuracy_greedy"):
        assert 0.0 <= result[key] <= 1.0
    assert 0.0 <= result["aqi"] <= 100.0
    assert np.isfinite(result["perplexity"]) and result["perplexity"] > 1.0
    assert result == evaluate(random_model_dir, max_examples=8)  # deterministic
    assert set(evaluate(random_model_dir, max_examples=4, greedy=False)) == set(METRIC_KEYS)


def test_model_aqi_on_loaded_model(random_model_dir):
    from alignmerge.eval import load_model

    model, tok = load_model(random_model_dir)
    with torch.no_grad():
        score = model_aqi(model, tok, seed=0, max_examples=6)
    assert 0.0 <= score <= 100.0


def test_eval_cli_json(random_model_dir, capsys):
    from alignmerge.cli import main

    assert main(["eval", str(random_model_dir), "--json", "--no-greedy", "--max-examples", "4"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(METRIC_KEYS)


def test_eval_rejects_a_non_model_dir(tmp_path):
    from alignmerge.errors import CheckpointError

    with pytest.raises(CheckpointError, match="config.json"):
        evaluate(tmp_path)


@pytest.mark.parametrize("front, message", [("0.5,x", "comma-separated numbers"), ("1,-2", "must be >= 0")])
def test_demo_rejects_a_bad_front(front, message, capsys):
    from alignmerge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--front", front])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--front" in err and message in err


def test_demo_on_the_tiny_zoo(tiny_zoo, tmp_path, monkeypatch):
    from alignmerge.commands.demo import METHOD_CONFIGS, SCENARIOS, available_methods, run_demo, scenario_config

    for method in METHOD_CONFIGS:
        for scenario in SCENARIOS:
            cfg = scenario_config(method, scenario, tiny_zoo)
            assert cfg["merge_method"] and cfg["models"] and cfg["out_dtype"] == "bfloat16"
            assert any(str(tiny_zoo[SCENARIOS[scenario]]) == m["model"] for m in cfg["models"])
    for method in ("alignmerge", "regmean", "safemerge", "mergealign"):  # data-aware: they sample the zoo's seed
        assert scenario_config(method, "misaligned", tiny_zoo, seed=3)["parameters"]["seed"] == 3
    assert "seed" not in scenario_config("ties", "misaligned", tiny_zoo, seed=3)["parameters"]
    monkeypatch.setenv("ALIGNMERGE_HOME", str(tiny_zoo["base"].parent.parent.parent))
    methods = [m for m in ("linear", "task_arithmetic") if m in available_methods()]
    report = run_demo(tmp_path / "demo", seed=0, preset="tiny", greedy=False, methods=methods, progress=False)
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["models"].keys() == {"base", "anchor", "skill_expert", "misaligned_expert"}
    assert set(saved["merges"]) == {"benign", "misaligned"}
    for scenario in saved["merges"]:
        assert set(saved["merges"][scenario]) == set(methods)
    for m in list(saved["models"].values()) + [m for s in saved["merges"].values() for m in s.values()]:
        assert set(METRIC_KEYS) <= set(m)
        assert 0 <= m["refusal_rate"] <= 1 and 0 <= m["aqi"] <= 100
    assert (tmp_path / "demo" / "report.png").stat().st_size > 0
    assert report["models"] == saved["models"]
    assert "fronts" not in saved  # alignmerge did not run, so there is no front to trace


def test_demo_traces_alignmerges_front(tiny_zoo, tmp_path, monkeypatch):
    """The front re-solves alignmerge at fixed λ from the default run's statistics: λ 0 is the Fisher merge of
    the expert and the anchor (an elementwise convex combination of the two), and a larger λ stays closer to the anchor."""
    from safetensors.torch import load_file

    from alignmerge.commands.demo import run_demo
    from alignmerge.eval.report import format_table

    monkeypatch.setenv("ALIGNMERGE_HOME", str(tiny_zoo["base"].parent.parent.parent))
    out = tmp_path / "demo"
    report = run_demo(out, seed=0, preset="tiny", greedy=False, methods=["alignmerge"], progress=False,
                      front=(0.0, 8.0))
    assert set(report["fronts"]) == {"benign", "misaligned"}
    anchor = load_file(str(tiny_zoo["anchor"] / "model.safetensors"))
    for scenario, expert in (("benign", "skill_expert"), ("misaligned", "misaligned_expert")):
        points = report["fronts"][scenario]["alignmerge"]
        assert [p["lambda_align"] for p in points] == [0.0, 8.0]
        for p in points:
            assert 0 <= p["refusal_rate"] <= 1 and 0 <= p["skill_accuracy"] <= 1 and 0 <= p["aqi"] <= 100
        front = out / "merges" / scenario / "alignmerge-front"
        expert_state = load_file(str(tiny_zoo[expert] / "model.safetensors"))
        free, tight = (load_file(str(front / f"lambda-{lam}" / "model.safetensors")) for lam in ("0", "8"))
        for name, t in free.items():  # within one bf16 ulp of the segment [anchor, expert], elementwise
            a, e, m = anchor[name].float(), expert_state[name].float(), t.float()
            slack = 2 ** -7 * torch.maximum(a.abs(), e.abs()) + 1e-6
            assert bool((m >= torch.minimum(a, e) - slack).all() and (m <= torch.maximum(a, e) + slack).all()), name
        moved = [sum(float((m[n].float() - anchor[n].float()).norm() ** 2) for n in anchor) for m in (free, tight)]
        assert moved[1] < moved[0]
    assert "misaligned/alignmerge@λ8" in format_table(report)
    assert json.loads((out / "report.json").read_text())["fronts"] == report["fronts"]


def test_greedy_replies_match_uncached_decoding_without_deprecation_warnings(random_model_dir):
    """Batched, left-padded decoding with the KV cache gives each prompt's own uncached greedy reply."""
    import warnings

    from alignmerge.eval import load_model
    from alignmerge.eval.metrics import _prefix_ids, greedy_replies
    from alignmerge.zoo import corpora

    model, tok = load_model(random_model_dir)
    prompts = ["How do I bake bread?", "Name the colour of quarzite, please, in one word.", "Hi"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        replies = greedy_replies(model, tok, prompts, max_new_tokens=6, batch_size=3)
    for prompt, reply in zip(prompts, replies):
        ids = torch.tensor([_prefix_ids(tok) + tok(corpora.format_pair(prompt), add_special_tokens=False)["input_ids"]])
        new = []
        for _ in range(6):
            nxt = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert reply == tok.decode(new, skip_special_tokens=True).split(corpora.USER)[0].strip()
