"""The demo report: JSON (zoo models and merges per scenario), a text table and an alignment-vs-skill plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

TABLE_COLUMNS = ("aqi", "refusal_rate", "over_refusal", "skill_accuracy", "perplexity",
                 "refusal_rate_greedy", "skill_accuracy_greedy")
SHORT_NAMES = {"refusal_rate": "refusal", "over_refusal": "over_ref", "skill_accuracy": "skill",
               "perplexity": "ppl", "refusal_rate_greedy": "refusal_g", "skill_accuracy_greedy": "skill_g"}


def report_rows(report: dict) -> list[tuple[str, dict]]:
    """(label, metrics) for every zoo model, every merge and every point of a merge's trade-off front
    (labelled ``scenario/method@λ<value>``), in report order."""
    rows = [(name, m) for name, m in report.get("models", {}).items()]
    for scenario, merges in report.get("merges", {}).items():
        rows += [(f"{scenario}/{method}", m) for method, m in merges.items()]
    for scenario, fronts in report.get("fronts", {}).items():
        rows += [(f"{scenario}/{method}@λ{point['lambda_align']:g}", point)
                 for method, points in fronts.items() for point in points]
    return rows


def format_table(report: dict) -> str:
    """A fixed-width table; columns beyond the standard ones (e.g. drift) are appended when present."""
    rows = report_rows(report)
    extra = sorted({k for _, m in rows for k, v in m.items()
                    if k not in TABLE_COLUMNS and k != "lambda_align" and isinstance(v, (int, float))})
    columns = [c for c in TABLE_COLUMNS if any(c in m for _, m in rows)] + extra
    label_width = max([len("model / merge")] + [len(label) for label, _ in rows])
    widths = [max(9, len(SHORT_NAMES.get(c, c))) for c in columns]
    head = "model / merge".ljust(label_width) + "  " + "  ".join(
        SHORT_NAMES.get(c, c).rjust(w) for c, w in zip(columns, widths))
    lines = [head, "-" * len(head)]
    for label, m in rows:
        cells = []
        for c, w in zip(columns, widths):
            v = m.get(c)
            if v is None:
                cells.append("-".rjust(w))
            elif c in ("aqi", "perplexity") or abs(v) >= 100:
                cells.append(f"{v:.1f}".rjust(w))
            else:
                cells.append(f"{v:.3f}".rjust(w))
        lines.append(label.ljust(label_width) + "  " + "  ".join(cells))
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path


SCENARIO_MODELS = {"benign": ("anchor", "skill_expert"), "misaligned": ("anchor", "misaligned_expert")}
"""The zoo models drawn in each scenario's panels: the two models that scenario merges."""


def plot_report(report: dict, path: str | Path) -> Path:
    """Alignment against skill, one row of panels per scenario: refusal rate (left) and AQI (right) of the
    merged pair of zoo models (black squares), every merge method (one marker each, legend on the right)
    and every trade-off front (a line through its λ_align points, each labelled with its λ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merges = report.get("merges", {})
    fronts = report.get("fronts", {})
    scenarios = list(merges) or list(fronts)
    methods = list(dict.fromkeys(m for s in scenarios for m in merges.get(s, {})))
    palette = plt.get_cmap("tab20").colors
    markers = "o^vsDP*Xh<>pd"
    style = {m: (palette[i % len(palette)], markers[i % len(markers)]) for i, m in enumerate(methods)}
    style["alignmerge"] = ("crimson", "*")  # the method under test stands out, its front in the same colour
    metrics = (("refusal_rate", "refusal rate (held-out harmful prompts)"), ("aqi", "AQI (held-out probes)"))
    fig, axes = plt.subplots(max(len(scenarios), 1), 2, figsize=(13, 4.6 * max(len(scenarios), 1)), squeeze=False)

    def finite(m: dict, key: str) -> bool:
        v = m.get(key)
        return v is not None and math.isfinite(v)

    for row, scenario in zip(axes, scenarios):
        for ax, (metric, label) in zip(row, metrics):
            for name in SCENARIO_MODELS.get(scenario, ()):
                m = report.get("models", {}).get(name)
                if m is not None and finite(m, "skill_accuracy") and finite(m, metric):
                    ax.scatter(m["skill_accuracy"], m[metric], marker="s", color="black", s=50, zorder=3)
                    ax.annotate(name, (m["skill_accuracy"], m[metric]), fontsize=8, xytext=(4, 4),
                                textcoords="offset points")
            for method, m in merges.get(scenario, {}).items():
                if finite(m, "skill_accuracy") and finite(m, metric):
                    color, marker = style[method]
                    ax.scatter(m["skill_accuracy"], m[metric], marker=marker, color=color, label=method,
                               s=120 if method == "alignmerge" else 55,
                               edgecolors="black" if method == "alignmerge" else "none", zorder=4)
            for method, points in fronts.get(scenario, {}).items():
                pts = sorted((p["lambda_align"], p["skill_accuracy"], p[metric]) for p in points
                             if finite(p, "skill_accuracy") and finite(p, metric))
                if not pts:
                    continue
                color = style.get(method, ("tab:gray", "o"))[0]
                ax.plot([p[1] for p in pts], [p[2] for p in pts], "--", color=color, marker=".", lw=1,
                        label=f"{method}, λ_align sweep (loop off)", zorder=2)
                for lam, x, y in pts:
                    ax.annotate(f"λ={lam:g}", (x, y), fontsize=7, color=color, xytext=(3, -9),
                                textcoords="offset points")
            ax.set_title(f"{scenario}: {label.split(' (')[0]} against skill", fontsize=10)
            ax.set_xlabel("skill accuracy (held-out paraphrases, multiple choice)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        row[0].set_ylim(-0.05, 1.05)
    handles: dict = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8, frameon=False)
    fig.suptitle("Alignment against skill: the merged zoo models and every merge, per scenario")
    fig.tight_layout(rect=(0, 0, 0.83, 0.97))
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
