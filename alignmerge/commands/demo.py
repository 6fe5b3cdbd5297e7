"""Build (or reuse) the embedded demo zoo, evaluate it, and merge an aligned anchor with one expert.

Two scenarios, each merging the anchor with one expert fine-tuned from it:
  benign      anchor + skill_expert       (skill on a fictional domain, safety replayed)
  misaligned  anchor + misaligned_expert  (same skill, plus compliance with harmful requests)
Every merge method available in this installation runs on both; methods not installed are skipped.
The table reports, on held-out prompts: AQI, refusal rate on harmful requests, over-refusal on
harmless ones, multiple-choice skill accuracy and perplexity (plus greedy-decoding versions).
A merge "keeps its alignment" when refusal and AQI stay near the anchor's while skill rises toward
the expert's; one misaligned expert typically spoils plain merges (arXiv 2406.14563).
alignmerge is also re-solved at several fixed lambda_align (--front, AQI loop off): its trade-off front
between refusal and skill, drawn as a line in the plot against every other method's point.

Writes OUT/report.json, OUT/report.png and the merged models under OUT/merges/<scenario>/<method>
(the front's under OUT/merges/<scenario>/alignmerge-front/lambda-<value>).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignmerge.zoo import fixed_threads

HELP = "build the demo zoo, run every merge method on a benign and a misaligned scenario, report"

SCENARIOS = {"benign": "skill_expert", "misaligned": "misaligned_expert"}


def _pair(zoo: dict, expert: str, anchor_params: dict, expert_params: dict) -> list[dict]:
    return [{"model": str(zoo["anchor"]), "parameters": anchor_params},
            {"model": str(zoo[expert]), "parameters": expert_params}]


ALIGNMENT_DATA, SKILL_DATA = "builtin:alignment", "builtin:skill"


def _alignmerge(zoo: dict, expert: str, **parameters) -> dict:
    """merge_method alignmerge around the anchor with its defaults, overridden by ``parameters``."""
    return {"merge_method": "alignmerge", "anchor": str(zoo["anchor"]), "alignment_data": ALIGNMENT_DATA,
            "models": [{"model": str(zoo[expert]), "parameters": {"weight": 1.0, "data": SKILL_DATA}}],
            "parameters": parameters}


# method -> config builder(zoo, expert). The experts are fine-tunes of the anchor, so base-relative
# task vectors are tau_A = theta_A - theta_0 and tau_E = tau_A + Delta_E; base-relative methods merge
# the anchor and the expert over base, as a mergekit user would merge an instruct model with a fine-tune.
# Add a method with one entry here.
METHOD_CONFIGS = {
    "linear": lambda zoo, e: {
        "merge_method": "linear", "models": _pair(zoo, e, {"weight": 0.5}, {"weight": 0.5})},
    "task_arithmetic": lambda zoo, e: {
        "merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
        "models": _pair(zoo, e, {"weight": 0.5}, {"weight": 0.5})},
    "ties": lambda zoo, e: {
        "merge_method": "ties", "base_model": str(zoo["base"]),
        "models": _pair(zoo, e, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}),
        "parameters": {"normalize": True}},
    "dare_linear": lambda zoo, e: {
        "merge_method": "dare_linear", "base_model": str(zoo["base"]),
        "models": _pair(zoo, e, {"weight": 0.5, "density": 0.7}, {"weight": 0.5, "density": 0.7})},
    "dare_ties": lambda zoo, e: {
        "merge_method": "dare_ties", "base_model": str(zoo["base"]),
        "models": _pair(zoo, e, {"weight": 1.0, "density": 0.7}, {"weight": 1.0, "density": 0.7}),
        "parameters": {"normalize": True}},
    # data-aware merges of the anchor and the expert; "fisher" is mergealign with no alignment data mixed in
    # (each model's Fisher on its own data: the anchor's alignment set, the expert's skill set)
    "fisher": lambda zoo, e: {
        "merge_method": "mergealign", "alignment_data": ALIGNMENT_DATA, "parameters": {"alignment_fraction": 0.0},
        "models": _pair(zoo, e, {"weight": 0.5, "data": ALIGNMENT_DATA}, {"weight": 0.5, "data": SKILL_DATA})},
    "regmean": lambda zoo, e: {
        "merge_method": "regmean",
        "models": _pair(zoo, e, {"weight": 0.5, "data": ALIGNMENT_DATA}, {"weight": 0.5, "data": SKILL_DATA})},
    "mergealign": lambda zoo, e: {
        "merge_method": "mergealign", "alignment_data": ALIGNMENT_DATA, "parameters": {"alignment_fraction": 0.5},
        "models": _pair(zoo, e, {"weight": 0.5, "data": ALIGNMENT_DATA}, {"weight": 0.5, "data": SKILL_DATA})},
    "safemerge": lambda zoo, e: {
        "merge_method": "safemerge", "anchor": str(zoo["anchor"]), "alignment_data": ALIGNMENT_DATA,
        "models": [{"model": str(zoo[e]), "parameters": {"weight": 1.0}}]},
    "alignmerge": lambda zoo, e: _alignmerge(zoo, e),
    # ablation of alignmerge's terms (the default's L_align is P_A alone): P_A and F_align, F_align only, without
    # the anchor in L_geo, without the AQI loop
    "alignmerge_pa_and_falign": lambda zoo, e: _alignmerge(zoo, e, use_align_fisher=True),
    "alignmerge_falign_only": lambda zoo, e: _alignmerge(zoo, e, use_projector=False, use_align_fisher=True),
    "alignmerge_no_anchor_term": lambda zoo, e: _alignmerge(zoo, e, anchor_weight=0.0),
    "alignmerge_no_aqi_loop": lambda zoo, e: _alignmerge(zoo, e, use_aqi_loop=False),
}


FRONT_LAMBDAS = (0.0625, 0.5, 2.0, 8.0)
"""λ_align of alignmerge's trade-off front in the demo (the AQI loop off, the default merge's statistics)."""


def front_config(scenario: str, zoo: dict, files: dict, lambda_align: float, seed: int = 0) -> dict:
    """alignmerge on ``scenario`` at a fixed ``lambda_align``, the AQI loop off, reading the statistics
    files (``files`` as in an ``alignmerge_report.json``: expert Fishers, subspace, F_align) of an earlier run."""
    config = scenario_config("alignmerge", scenario, zoo, seed)
    for model, fisher in zip(config["models"], files["fisher"]):
        model["parameters"] = {**model["parameters"], "fisher": fisher}
    config["parameters"] = {**config["parameters"], "lambda_align": lambda_align, "use_aqi_loop": False,
                            "subspace": files["subspace"], "align_fisher": files["align_fisher"]}
    return config


def scenario_config(method: str, scenario: str, zoo: dict, seed: int = 0) -> dict:
    """The mergekit-style config of ``method`` on ``scenario`` (benign or misaligned) for this zoo. Data-aware
    methods get the zoo's ``seed``, so the samples they draw from the builtin corpora (and alignmerge's probes,
    the train split of that seed's corpora) are those of the zoo under test."""
    from alignmerge.methods import METHODS

    config = METHOD_CONFIGS[method](zoo, SCENARIOS[scenario])
    method_class = METHODS.get(config["merge_method"])
    if method_class is not None and "seed" in method_class.method_parameters:
        config["parameters"] = {**config.get("parameters", {}), "seed": seed}
    return {**config, "dtype": "float32", "out_dtype": "bfloat16"}


def available_methods() -> list[str]:
    """Demo entries whose config's merge_method is registered in alignmerge.methods."""
    from alignmerge.methods import METHODS

    placeholder = {name: Path(name) for name in ("base", "anchor", "skill_expert", "misaligned_expert")}
    return [m for m in METHOD_CONFIGS if scenario_config(m, "benign", placeholder)["merge_method"] in METHODS]


@fixed_threads()
def run_demo(out_dir: str | Path, seed: int = 0, preset: str = "default", greedy: bool = True,
             methods: list[str] | None = None, progress: bool = True,
             front: tuple[float, ...] = FRONT_LAMBDAS) -> dict:
    """The whole demo: zoo, evaluations, merges; returns the report dict (also written to out_dir).
    ``front``: λ_align values at which alignmerge is re-solved with its loop off, in each scenario, after its
    default run (``report["fronts"][scenario]["alignmerge"]``: likelihood metrics per λ); () for none."""
    from alignmerge.api import merge
    from alignmerge.eval import METRIC_KEYS, evaluate
    from alignmerge.eval.report import format_table, plot_report, write_report
    from alignmerge.zoo import build_zoo

    out = Path(out_dir)
    zoo = build_zoo(seed=seed, preset=preset, progress=progress)

    def note(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr)

    def measure(model_dir: Path) -> dict:
        result = evaluate(model_dir, seed=seed, greedy=greedy)
        return {k: result[k] for k in METRIC_KEYS} | {k: v for k, v in result.items() if k not in METRIC_KEYS}

    report: dict = {"models": {}, "merges": {s: {} for s in SCENARIOS},
                    "zoo": {name: str(path) for name, path in zoo.items()}, "seed": seed, "preset": preset}
    for name, path in zoo.items():
        note(f"evaluating {name}")
        report["models"][name] = measure(path)
    chosen = available_methods() if methods is None else [m for m in methods if m in available_methods()]
    # drift and budget-violation columns for every merge: motion inside the anchor's alignment subspace
    from alignmerge.methods import METHODS
    from alignmerge.methods.alignmerge import alignment_drift as subspace_drift
    from alignmerge.subspace import compute_subspace

    subspace_file = out / "anchor-subspace.safetensors"
    if not subspace_file.is_file():
        compute_subspace(zoo["anchor"], ALIGNMENT_DATA, 16, subspace_file)
    for scenario in SCENARIOS:
        for method in chosen:
            target = _fresh(out / "merges" / scenario / method)
            note(f"merging {scenario}/{method}")
            config = scenario_config(method, scenario, zoo, seed)
            whole = getattr(METHODS[config["merge_method"]], "run_merge", None)  # stats passes, AQI loop
            if whole is not None:
                whole(config, target, seed=seed)
            else:
                merge(config, target, seed=seed, progress=False)
            report["merges"][scenario][method] = measure(target) | subspace_drift(
                target, zoo["anchor"], [zoo[SCENARIOS[scenario]]], subspace_file)
        if "alignmerge" in chosen and front:
            report.setdefault("fronts", {})[scenario] = {"alignmerge": alignmerge_front(
                out / "merges" / scenario, scenario, zoo, seed, front, note)}
    write_report(report, out)
    plot_report(report, out / "report.png")
    print(format_table(report))
    print(f"wrote {out / 'report.json'} and {out / 'report.png'}")
    return report


def alignmerge_front(scenario_dir: Path, scenario: str, zoo: dict, seed: int, lambdas, note) -> list[dict]:
    """alignmerge re-solved at each λ_align of ``lambdas`` (loop off) with the statistics of the scenario's
    default alignmerge run; each point: its λ and the likelihood metrics on the held-out prompts."""
    import json

    from alignmerge.api import merge
    from alignmerge.eval import METRIC_KEYS, evaluate
    from alignmerge.methods.alignmerge import REPORT_NAME

    files = json.loads((scenario_dir / "alignmerge" / REPORT_NAME).read_text())["files"]
    points = []
    for lam in lambdas:
        target = _fresh(scenario_dir / "alignmerge-front" / f"lambda-{lam:g}")
        note(f"merging {scenario}/alignmerge at lambda_align {lam:g} (front)")
        merge(front_config(scenario, zoo, files, lam, seed), target, seed=seed, progress=False)
        metrics = evaluate(target, seed=seed, greedy=False)
        points.append({"lambda_align": lam} | {k: metrics[k] for k in METRIC_KEYS})
    return points


def _fresh(target: Path) -> Path:
    """``target`` with an earlier demo's merge there removed and its parent created (merges refuse a non-empty output)."""
    import shutil

    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _lambdas(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--front: expected comma-separated numbers, got {text!r}") from None
    if any(not v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--front: every lambda_align must be >= 0, got {text!r}")
    return values


def add_arguments(p) -> None:
    p.add_argument("--out", default="alignmerge-demo", help="output directory (default: ./alignmerge-demo)")
    p.add_argument("--seed", type=int, default=0, help="zoo and evaluation seed (default: 0)")
    p.add_argument("--preset", default="default",
                   help="zoo preset: default; preference (the anchor also DPO-tuned after SFT); or tiny for a "
                        "quick smoke run")
    p.add_argument("--methods", default=None,
                   help="comma-separated merge methods (default: every available one)")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy-decoding metrics")
    p.add_argument("--front", type=_lambdas, default=FRONT_LAMBDAS, metavar="LAMBDAS",
                   help="comma-separated lambda_align values at which alignmerge is re-solved with its AQI loop "
                        "off, tracing its refusal-skill trade-off front in the table and plot (default: "
                        f"{','.join(f'{v:g}' for v in FRONT_LAMBDAS)}; '' for none)")


def run(args) -> int:
    methods = args.methods.split(",") if args.methods else None
    run_demo(args.out, seed=args.seed, preset=args.preset, greedy=not args.no_greedy, methods=methods,
             front=args.front)
    return 0
