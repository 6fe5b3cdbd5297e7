"""SafeMERGE-style layer-wise safety merge (Djuhera et al., 2025, arXiv 2503.17239).

For each weight W (one "layer" of the merge) and expert k, with τ_k = θ_k − θ_A (the expert's update
from the aligned anchor) and P the projector onto the anchor's alignment subspace (U, V of
``alignmerge subspace``, P(X) = UUᵀX + XVVᵀ − UUᵀXVVᵀ):

    c_k = ⟨P(τ_k), τ_k⟩ / (‖P(τ_k)‖·‖τ_k‖) = ‖P(τ_k)‖ / ‖τ_k‖            (P is an orthogonal projector)
    s_k = 1 if c_k ≥ threshold, else alpha                               (alpha = weight kept of an unsafe update)
    θ = θ_A + Σ_k w_k s_k τ_k.

A layer whose update lies far from the alignment subspace (low cosine: it moves weights in directions
the anchor's alignment does not span) is blended with the anchor, θ_W = θ_A + alpha·τ (a convex blend
of the expert layer and the safe layer); aligned-looking layers keep the full update. Tensors without a
basis (1-D tensors, embeddings) keep the full update. ``subspace:`` names the file (computed by
``run_merge`` from ``alignment_data`` when absent, cached beside the output).
"""
from __future__ import annotations

import json

import torch

from alignmerge.data import STATS_SAMPLES
from alignmerge.errors import ConfigError
from alignmerge.methods import MergeMethod, TensorInputs, append_diagnostics, merged_result, register


def projection_cosine(tau: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None) -> float:
    """cos(P(τ), τ) = ‖P(τ)‖/‖τ‖ for the projector of orthonormalised U, V (0 when τ = 0)."""
    from alignmerge.ops import projector as ops

    t = tau.double()
    norm = float(t.norm())
    if norm == 0.0:
        return 0.0
    u = torch.linalg.qr(u.double())[0] if u is not None else None
    v = torch.linalg.qr(v.double())[0] if v is not None else None
    p_sq = float(ops.projection_sqnorm(*ops.project_factors(t, u, v, backend="torch"), u))
    return max(p_sq, 0.0) ** 0.5 / norm


@register
class SafeMerge(MergeMethod):
    name = "safemerge"
    needs_base = True
    elementwise = False  # the cosine is a whole-weight statistic
    model_parameters = {"weight": 1.0}
    method_parameters = {"threshold": 0.5, "alpha": 0.5, "subspace": None, "rank": 16,
                         "subspace_method": "gradient", "alignment_data": None, "diagnostics": None,
                         "samples": STATS_SAMPLES, "max_length": 256, "batch_size": 8, "stats_device": "cpu",
                         "fisher_kind": "empirical", "seed": 0}

    def __init__(self):
        self._subspaces: dict[str, object] = {}

    def merge(self, inputs: TensorInputs, *, out_dtype, out=None, backend=None):
        from alignmerge.subspace import SubspaceFile

        p = inputs.method_params
        anchor = inputs.base
        if anchor is None:
            raise ConfigError("safemerge: needs an anchor (anchor: or base_model:)")
        alpha, threshold = float(p["alpha"]), float(p["threshold"])
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"safemerge: alpha must be in [0, 1] (got {alpha})")
        u = v = None
        if anchor.dim() == 2 and p["subspace"] is not None:
            key = str(p["subspace"])
            if key not in self._subspaces:
                self._subspaces[key] = SubspaceFile(key)
            u, v = self._subspaces[key].get(inputs.name)
        base = anchor.to(torch.float32)
        merged = base.clone()
        cosines, scales = [], []
        for k, theta in enumerate(inputs.models):
            tau = theta.to(torch.float32) - base
            if u is not None or v is not None:
                c = projection_cosine(tau, u, v)
                s = 1.0 if c >= threshold else alpha
            else:
                c, s = None, 1.0
            cosines.append(c)
            scales.append(s)
            merged.add_(tau, alpha=float(inputs.params[k]["weight"]) * s)
        if p["diagnostics"] is not None:
            append_diagnostics(p["diagnostics"], {"name": inputs.name, "cosines": cosines, "scales": scales})
        return merged_result(merged, out, out_dtype)

    @classmethod
    def prepared(cls, config) -> bool:
        return "subspace" in config.parameters

    @classmethod
    def run_merge(cls, config, out_dir, **options) -> dict:
        """Compute (or reuse) the subspace file, merge, and write ``safemerge_report.json`` (blended layers)."""
        return run_with_anchor_files(cls, config, out_dir, need_subspace=True, need_falign=False,
                                     report_name="safemerge_report.json", **options)


def run_with_anchor_files(cls, config, out_dir, *, need_subspace: bool, need_falign: bool, report_name: str,
                          progress: bool = False, **options) -> dict:
    """Shared by the subspace baselines: anchor files from ``alignment_data``, one merge, a JSON report."""
    from pathlib import Path

    from alignmerge.api import merge
    from alignmerge.config import load_config
    from alignmerge.methods.alignmerge import cache_dir, prepare_anchor_files

    if not hasattr(config, "merge_method"):
        config = load_config(config)
    out = Path(out_dir)
    work = cache_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    files = prepare_anchor_files(config, work, need_subspace=need_subspace, need_falign=need_falign,
                                 defaults=cls.method_parameters)
    diag = work / f"diagnostics-{out.name}.jsonl"
    diag.unlink(missing_ok=True)
    raw = json.loads(json.dumps(config.raw, default=str))
    raw.pop("alignment_data", None)
    params = {k: v for k, v in (raw.get("parameters") or {}).items() if k != "alignment_data"}
    raw["parameters"] = {**params, **files, "diagnostics": str(diag)}
    merge(load_config(raw), out, progress=False, **options)
    records = [json.loads(line) for line in diag.read_text(encoding="utf-8").splitlines() if line.strip()]
    diag.unlink(missing_ok=True)
    report = {"method": cls.name, "files": files, "tensors": {r.pop("name"): r for r in records}}
    (out / report_name).write_text(json.dumps(report, indent=2) + "\n")
    return report
