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
    """(label, metrics) for every zoo model and every merge, in report order."""
    rows = [(name, m) for name, m in report.get("models", {}).items()]
    for scenario, merges in report.get("merges", {}).items():
        rows += [(f"{scenario}/{method}", m) for method, m in merges.items()]
    return rows


def format_table(report: dict) -> str:
    """A fixed-width table; columns beyond the standard ones (e.g. drift) are appended when present."""
    rows = report_rows(report)
    extra = sorted({k for _, m in rows for k, v in m.items()
                    if k not in TABLE_COLUMNS and isinstance(v, (int, float))})
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


def plot_report(report: dict, path: str | Path) -> Path:
    """Scatter of alignment (refusal rate, and AQI) against skill accuracy for every model and merge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"models": "s", "benign": "o", "misaligned": "^"}
    colors = {"models": "black", "benign": "tab:green", "misaligned": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, metric, label in ((axes[0], "refusal_rate", "refusal rate (held-out harmful prompts)"),
                              (axes[1], "aqi", "AQI")):
        groups = [("models", report.get("models", {}))] + list(report.get("merges", {}).items())
        for group, entries in groups:
            xs, ys, names = [], [], []
            for name, m in entries.items():
                x, y = m.get("skill_accuracy"), m.get(metric)
                if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
                    continue
                xs.append(x)
                ys.append(y)
                names.append(name)
            ax.scatter(xs, ys, marker=markers.get(group, "o"), color=colors.get(group, "tab:blue"),
                       label="zoo models" if group == "models" else f"{group} merges", s=45)
            for x, y, name in zip(xs, ys, names):
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("skill accuracy (held-out paraphrases, multiple choice)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(-0.05, 1.05)
    fig.suptitle("Alignment against skill: zoo models and merges")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
