"""AlignMerge: merge experts around an aligned anchor with alignment as a constraint (DESIGN.md "Math").

Per tensor, with δ = θ − θ_A and Δ_k = θ_k − θ_A (experts' deltas from the anchor):

    min_δ ‖δ − δ̄‖²_D + λ_align(‖P(δ)‖²_F + β‖δ‖²_{F̂_align}) + λ_bud·max(0, ‖P(δ)‖² − B)²,

δ̄ = Σ_k w_k F̂_k Δ_k / Σ_k w_k F̂_k (the Fisher merge; F̂ = F / mean F), D its floored metric, P the
projector onto the anchor's alignment subspace (U, V from ``alignmerge subspace``), F̂_align the anchor's
normalised diagonal Fisher on the alignment data, B = (ρ‖P(δ̄)‖)². Optionally each tensor t solves with its
own λ_t = λ_align·r_t^γ (``tensor_lambda_power`` γ, default 0: one λ; r_t clipped to [1/8, 8]), r_t = the
tensor's share of the anchor's alignment Fisher over its share of the experts' Fisher (whole-model means),
since the normalised terms above are blind to how much a tensor matters for alignment against the skill.
2-D weights with a subspace: the
solver (``alignmerge.solver.solve_weight``, PCG on (D + μP + λ_align β F̂_align)δ = Dδ̄ with the budget's
fixed point); other 2-D tensors: the same without P (closed form); 1-D tensors: the Fisher merge δ̄.

Outer loop (``run_merge``): after a merge, AQI(θ) is scored on alignment probes; while AQI(θ) < AQI(θ_A) − τ —
or, unless ``refusal_tolerance`` is null, the probe refusal rate (a refusal likelier than compliance on the
probes' harmful prompts) falls more than ``refusal_tolerance`` (default 0: every probe the anchor refuses stays
refused) below the anchor's: on the demo zoo a merge can lose every refusal with its AQI unchanged, since AQI
scores embeddings of fixed responses, and held-out refusals began to fail where one train-split probe of 48 did
(seed 2: 0.986 held-out at the λ = 0.25 a tolerance of 0.05 accepted, 1.000 at the 0.354 a tolerance of 0
chose, skill 1.000 both); and, unless ``over_refusal_tolerance`` is null, the probe over-refusal (the same on
its harmless prompts) rises more than that above the anchor's, since a misaligned expert can also bring
refusals of harmless requests (on the demo zoo neither seed 0 nor 1 tripped it: held-out over-refusal 0.20 on
seed 1 at λ_align = 0.25 stayed within 0.1 on the train-split probes) — λ_align doubles (from ``lambda_align``,
or 1 if 0), at most ``max_rounds`` merges in all; after the first passing λ, the remaining rounds bisect
between the last failing and the first passing λ, and the smallest passing λ is kept (the least constrained
merge that keeps alignment). A starting λ that passes is kept as it is: ``lambda_align`` is the least
constraint the run applies, since loosening below it on the demo zoo passed the train-split probes while
held-out over-refusal doubled (seed 1, one λ for every tensor: 0.20 at λ = 0.25, 0.41 at the 0.03 the probes
accepted). If none passes, the largest λ tried is kept and the report says so. Probes: the builtin corpora's
*train* split (aligned = refusals to harmful requests + helpful answers; misaligned = compliance), so the
held-out probes of ``alignmerge eval`` stay untouched (the corpora of ``seed``, the zoo's seed in the demo); or
a JSONL of {prompt, response, label} records.

Everything the solve needs is found or computed by ``run_merge`` and cached beside the output
(``<out>.alignmerge-cache/``): per-expert Fisher files (``fisher:`` or ``data:``), the subspace
(``subspace:``, else from ``alignment_data`` with ``subspace_method``/``rank``) and F_align
(``align_fisher:``, else from ``alignment_data``). ``expert_weights: data`` sets w_k from each expert's
mean log-likelihood on the alignment data and on its own data (MergeAlign-style, arXiv 2406.14563):
w_k ∝ exp(−(ℓ_align,k − min_j ℓ_align,j)/T) · exp(−(ℓ_data,k − min_j ℓ_data,j)/T), normalised to mean
1 and multiplied by the configured ``weight``. The run writes ``alignmerge_report.json`` in the merged
directory: per weight drift ‖P(δ)‖/‖P(δ̄)‖, budget violation, CG iterations; per round λ_align and AQI.

Default: L_align = the P term alone (``use_align_fisher: false``) at λ_align = 0.125 as the loop's start, with
F_align entering L_geo as the anchor's Fisher, λ_A = 0.5 (``anchor_weight``: λ_A‖δ‖²_{F̂_align}, 1-D tensors
included); one λ for every tensor, budget off, rank 16, w_k from the config, no probe refusal lost, statistics
from 256 records (``samples``). The anchor term is what generalises refusals to held-out prompt templates that
no train-split probe shows. On the demo zoos (2-thread builds of 2026-11-26; held-out refusal / skill on
``misaligned``, seeds 0-5) this default gives 1.000 / 1.000, 1.000 / 1.000, 1.000 / 1.000, 1.000 / 0.995,
1.000 / 0.995 and 0.977 / 1.000 (anchor 0.982): at least as good on both axes as every baseline on seeds 0-3
and 5, one skill probe under dare_ties', safemerge's and mergealign's 1.000 on seed 4 (which keep no refusal);
without the anchor term 0.977, 1.000, 0.723, 0.945, 0.623 and 0.968 refusal; with F_align also in L_align
(β = 1) the same refusals at 0.981-1.000 skill.
With 64 records for the statistics, ``benign`` seed 0 lost one held-out refusal (0.986 / 1.000). Per-tensor λ
(γ=2 or 3) moved an earlier seed-0 zoo to 1.000 / 0.991 but lost refusals on seed 2's (0.959 at λ = 1 with
γ=2: the tied embedding's λ falls 20-fold), so it is off.

Parameters (defaults in ``AlignMerge.method_parameters``): lambda_align, tensor_lambda_power (γ),
lambda_budget, budget (ρ),
rank, beta, aqi_tolerance (τ, AQI points), max_rounds, use_projector, use_align_fisher, use_budget,
use_aqi_loop, anchor_weight (λ_A of an anchor Fisher term in L_geo, its Fisher = F_align),
fisher_floor, falign_1d (apply the F_align term to 1-D tensors too), expert_weights (config | data),
weight_temperature, aqi_probes, aqi_examples, subspace_method (gradient | delta: SVD of anchor − subspace_base,
the pretrained model the anchor was tuned from), the stats options (samples, max_length,
batch_size, stats_device, fisher_kind, seed), and the file slots subspace, align_fisher, diagnostics.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import torch

from alignmerge.data import STATS_SAMPLES
from alignmerge.errors import AlignMergeError, ConfigError
from alignmerge.methods import MergeMethod, TensorInputs, append_diagnostics, merged_result, register
from alignmerge.methods.fisher import FisherTotals, expert_fisher

REPORT_NAME = "alignmerge_report.json"
TENSOR_RATIO_CLIP = 8.0
"""r_t is clipped to [1/8, 8] before the power: at γ = 3 no tensor's λ moves more than 512x (keeps CG well conditioned)."""


@register
class AlignMerge(MergeMethod):
    __doc__ = __doc__
    name = "alignmerge"
    needs_base = True
    elementwise = False  # the projector and the budget couple every element of a weight (see ``chunkable``)
    model_parameters = {"weight": 1.0, "fisher": None, "data": None}
    method_parameters = {
        "lambda_align": 0.125, "tensor_lambda_power": 0.0, "lambda_budget": 0.0, "budget": 0.5, "rank": 16, "beta": 1.0,
        "aqi_tolerance": 5.0, "refusal_tolerance": 0.0, "over_refusal_tolerance": 0.1, "max_rounds": 4,
        "use_projector": True, "use_align_fisher": False, "use_budget": True, "use_aqi_loop": True,
        "anchor_weight": 0.5, "fisher_floor": 0.1, "falign_1d": False,
        "expert_weights": "config", "weight_temperature": 1.0, "alignment_data": None, "aqi_probes": "builtin",
        "aqi_examples": None, "subspace_method": "gradient", "subspace_base": None, "subspace": None,
        "align_fisher": None,
        "diagnostics": None, "cg_tol": 1e-6, "cg_max_iter": 500,
        "fisher_kind": "empirical", "samples": STATS_SAMPLES, "max_length": 256, "batch_size": 8,
        "stats_device": "cpu", "seed": 0,
    }
    stats = ("fisher",)

    def __init__(self):
        from alignmerge.fisher.stats import StatsReader

        self._files = StatsReader()
        self._subspaces: dict[str, object] = {}

    @classmethod
    def prepare_stats(cls, config, work_dir) -> dict[str, list[Path]]:
        """Per-expert Fisher files (given by ``fisher:``, else computed from ``data:`` into ``work_dir``)."""
        from alignmerge.fisher.stats import prepare_model_stats

        return {"fisher": prepare_model_stats(config, work_dir, "fisher")}

    def _subspace(self, path):
        from alignmerge.subspace import SubspaceFile

        key = str(path)
        if key not in self._subspaces:
            self._subspaces[key] = SubspaceFile(key)
        return self._subspaces[key]

    def _projected(self, name: str, shape, p: dict) -> bool:
        """True if the weight has a basis in the subspace file and the P term is on."""
        return (len(shape) == 2 and bool(p["use_projector"]) and p["subspace"] is not None
                and name in self._subspace(p["subspace"]).names())

    def chunkable(self, name, shape, method_params) -> bool:
        """Weights without a projector solve elementwise given their Fishers' whole-tensor means (so
        embeddings and lm_head of large vocabularies merge in row chunks); projected weights solve whole."""
        return not self._projected(name, shape, method_params)

    def working_bytes(self, numel: int, n_models: int) -> int:
        """fp32 temporaries of one solve: each expert's Fisher and task vector, F_align, δ̄, D, the
        right-hand side and the CG vectors (measured peak on 2-D weights: about 4·(2K + 14) bytes/element)."""
        experts = max(n_models - 1, 1)
        return 4 * (2 * experts + 14) * numel

    def _align_fisher(self, inputs: TensorInputs) -> torch.Tensor | None:
        p = inputs.method_params
        if p["align_fisher"] is None or not (p["use_align_fisher"] or float(p["anchor_weight"]) > 0):
            return None
        f = self._files.get(p["align_fisher"], inputs.name, inputs.base, inputs.element_offset, rows=True)
        return f.to(inputs.base.device) if f is not None else None

    def chunk_statistic(self, inputs: TensorInputs, numel: int) -> FisherTotals:
        """Whole-tensor sums of each expert's Fisher and of F_align (index K), for a chunked solve."""
        k_experts = len(inputs.models)

        def stat_of(chunk: TensorInputs, k: int) -> torch.Tensor:
            if k < k_experts:
                return expert_fisher(chunk, k, self._files, self.name)
            f = self._align_fisher(chunk)
            return f if f is not None else torch.zeros(0)

        return FisherTotals(stat_of, k_experts + 1)

    def _tensor_lambda(self, inputs: TensorInputs, weights: list[float]) -> float:
        """λ_t = λ_align · clip(r_t, 1/8, 8)^γ (γ = ``tensor_lambda_power``), r_t = a_t / s_t: the tensor's share of
        the anchor's alignment Fisher, a_t = mean F_align,t / mean F_align (whole-model means), over its share of
        the experts' Fisher, s_t = Σ_k w_k (mean F_k,t / mean F_k) / Σ_k w_k. λ_align itself when γ = 0 or there is
        no F_align file."""
        p = inputs.method_params
        lam, power = float(p["lambda_align"]), float(p["tensor_lambda_power"])
        if power == 0.0 or p["align_fisher"] is None or lam == 0.0:
            return lam
        align_means, align_whole = self._files.means(p["align_fisher"])
        shares = []
        for k, params in enumerate(inputs.params):
            if params.get("fisher") is None:
                raise ConfigError(f"{self.name}: tensor_lambda_power needs every expert's Fisher as a file (model {k} "
                                  "has none); set tensor_lambda_power: 0 to use one λ_align for every tensor")
            means, whole = self._files.means(params["fisher"])
            shares.append(means.get(inputs.name, 0.0) / whole if whole > 0 else 0.0)
        skill = sum(w * s for w, s in zip(weights, shares)) / sum(weights) if sum(weights) > 0 else 0.0
        align = align_means.get(inputs.name, 0.0) / align_whole if align_whole > 0 else 0.0
        ratio = align / skill if skill > 0 else (TENSOR_RATIO_CLIP if align > 0 else 1.0)
        ratio = min(max(ratio, 1.0 / TENSOR_RATIO_CLIP), TENSOR_RATIO_CLIP)
        return lam * ratio ** power

    def merge(self, inputs: TensorInputs, *, out_dtype, out=None, backend=None):
        from alignmerge.solver import WholeTensorMeans, solve_weight

        p = inputs.method_params
        anchor = inputs.base
        if anchor is None:
            raise ConfigError("alignmerge: needs an anchor (anchor: or base_model:)")
        fishers = [expert_fisher(inputs, k, self._files, self.name) for k in range(len(inputs.models))]
        weights = [float(inputs.params[k]["weight"]) for k in range(len(inputs.models))]
        two_d = anchor.dim() == 2
        u = v = None
        if two_d and p["use_projector"] and p["subspace"] is not None:
            u, v = self._subspace(p["subspace"]).get(inputs.name)
            u = u.to(anchor.device) if u is not None else None
            v = v.to(anchor.device) if v is not None else None
        f_align = self._align_fisher(inputs)
        lambda_align = self._tensor_lambda(inputs, weights)
        means, solve_options = None, {}
        if inputs.state is not None:  # a row chunk: normalise by the whole tensor's means
            sums = [s / c if c else 0.0 for s, c in inputs.state.sums]
            means = WholeTensorMeans(experts=sums[:-1], align=sums[-1], anchor=sums[-1])
            # the whole tensor's size picks the compute dtype, so every chunk solves in the same one
            whole = inputs.state.sums[0][1]
            solve_options["fp64_max_numel"] = anchor.numel() if whole <= (1 << 18) else 0
        use_falign = bool(p["use_align_fisher"]) and f_align is not None and (two_d or bool(p["falign_1d"]))
        anchor_weight = float(p["anchor_weight"]) if f_align is not None else 0.0
        result = solve_weight(
            anchor, list(inputs.models), fishers, weights=weights, u=u, v=v, f_align=f_align,
            lambda_align=lambda_align, beta=float(p["beta"]), lambda_budget=float(p["lambda_budget"]),
            rho=float(p["budget"]), use_projector=bool(p["use_projector"]), use_falign=use_falign,
            use_budget=bool(p["use_budget"]), anchor_fisher=f_align if anchor_weight > 0 else None,
            anchor_weight=anchor_weight, fisher_floor=float(p["fisher_floor"]), tol=float(p["cg_tol"]),
            max_iter=int(p["cg_max_iter"]), backend=backend, means=means, name=inputs.name, **solve_options)
        if p["diagnostics"] is not None:
            append_diagnostics(p["diagnostics"], {
                "name": inputs.name, "shape": list(anchor.shape), "projector": u is not None or v is not None,
                "element_offset": inputs.element_offset, "lambda_align": lambda_align, **result.stats.as_dict()})
        merged = anchor.to(torch.float32) + result.delta
        return merged_result(merged, out, out_dtype)

    # ---- whole merge ------------------------------------------------------------------------------
    @classmethod
    def prepared(cls, config) -> bool:
        """True when every file the per-tensor merge reads is given in the config (no data pass needed)
        and the AQI loop is off: then ``alignmerge.merge`` can run the config directly."""
        params = config.parameters
        if _flag(params, "use_aqi_loop", cls.method_parameters):
            return False
        fisher_given = all("fisher" in s.parameters or "fisher" in params for s in config.models)
        return fisher_given and (not _flag(params, "use_projector", cls.method_parameters) or "subspace" in params) \
            and (not _flag(params, "use_align_fisher", cls.method_parameters) or "align_fisher" in params)

    @classmethod
    def run_merge(cls, config, out_dir, **options) -> dict:
        """The whole AlignMerge run: stats files, merge, AQI loop, report; returns the report dict."""
        return run_alignmerge(config, out_dir, **options)


def _flag(params: dict, key: str, defaults: dict) -> bool:
    value = params.get(key, defaults[key])
    return bool(value)


def cache_dir(out_dir) -> Path:
    """Where computed statistics files are cached: ``<out_dir>.alignmerge-cache`` beside the output."""
    out = Path(out_dir)
    return out.parent / f"{out.name}.alignmerge-cache"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def alignment_source(config) -> str | None:
    """``alignment_data`` from the config's top level or its ``parameters``."""
    return config.raw.get("alignment_data") or config.parameters.get("alignment_data")


def stats_options(params: dict, defaults: dict) -> dict:
    keys = ("samples", "max_length", "batch_size", "stats_device", "fisher_kind", "seed")
    return {k: params.get(k, defaults[k]) for k in keys}


def prepare_anchor_files(config, work_dir: Path, *, need_subspace: bool, need_falign: bool,
                         defaults: dict) -> dict[str, str]:
    """Subspace and alignment-Fisher files of the anchor: given in ``parameters``, else computed and cached."""
    from alignmerge.fisher.compute import compute_fisher
    from alignmerge.subspace import compute_subspace

    params = config.parameters
    anchor = str(config.base_model.path)
    data = alignment_source(config)
    opts = stats_options(params, defaults)
    files = {}
    if need_subspace:
        if params.get("subspace") is not None:
            files["subspace"] = str(params["subspace"])
        else:
            method = params.get("subspace_method", defaults.get("subspace_method", "gradient"))
            rank = int(params.get("rank", defaults["rank"]))
            if method == "gradient" and data is None:
                raise ConfigError(f"{config.merge_method}: needs alignment_data (or parameters.subspace: <file>) "
                                  "for the alignment subspace")
            base = str(params.get("subspace_base") or "") or None
            key = _digest({"anchor": str(Path(anchor).resolve()), "data": data, "method": method, "rank": rank,
                           "base": base, **opts})
            path = work_dir / f"subspace-{key}.safetensors"
            if not path.is_file():
                compute_subspace(anchor, data, rank, path, method=method, base_dir=base, samples=opts["samples"],
                                 max_length=opts["max_length"], batch_size=opts["batch_size"],
                                 device=opts["stats_device"])
            files["subspace"] = str(path)
    if need_falign:
        if params.get("align_fisher") is not None:
            files["align_fisher"] = str(params["align_fisher"])
        else:
            if data is None:
                raise ConfigError(f"{config.merge_method}: needs alignment_data (or parameters.align_fisher: <file>) "
                                  "for the alignment Fisher")
            key = _digest({"anchor": str(Path(anchor).resolve()), "data": data, "kind": "falign", **opts})
            path = work_dir / f"align-fisher-{key}.safetensors"
            if not path.is_file():
                compute_fisher(anchor, data, path, kind=opts["fisher_kind"], samples=opts["samples"],
                               max_length=opts["max_length"], batch_size=opts["batch_size"],
                               device=opts["stats_device"], seed=int(opts["seed"]))
            files["align_fisher"] = str(path)
    return files


def mean_loglik(model_dir, data, *, samples: int | None = STATS_SAMPLES, max_length: int = 256,
                batch_size: int = 8) -> float:
    """Mean per-token log-likelihood of the scored (response) tokens of ``data`` under the model."""
    from alignmerge.fisher.compute import load_model, make_batches, prepare_sequences

    seqs = prepare_sequences(model_dir, data, samples=samples, max_length=max_length)
    model = load_model(Path(model_dir), dtype=torch.float32, device=torch.device("cpu"))
    total, count = 0.0, 0
    with torch.no_grad():
        for _, ids, scored, _ in make_batches(seqs, batch_size):
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
            token = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            mask = scored[:, 1:]
            total += float(token[mask].sum())
            count += int(mask.sum())
    return total / max(count, 1)


def data_expert_weights(config, temperature: float, opts: dict) -> tuple[list[float], list[dict]]:
    """w_k ∝ exp(−(ℓ_align,k − min ℓ_align)/T)·exp(−(ℓ_data,k − min ℓ_data)/T) with ℓ = mean NLL per token,
    normalised to mean 1 (module docstring); returns the weights and each expert's likelihoods."""
    data = alignment_source(config)
    if data is None:
        raise ConfigError(f"{config.merge_method}: expert_weights: data needs alignment_data")
    if temperature <= 0:
        raise ConfigError(f"{config.merge_method}: weight_temperature must be > 0")
    kw = dict(samples=opts["samples"], max_length=opts["max_length"], batch_size=opts["batch_size"])
    info = []
    for spec in config.models:
        own = spec.parameters.get("data", config.parameters.get("data"))
        nll_align = -mean_loglik(spec.path, data, **kw)
        nll_own = -mean_loglik(spec.path, own, **kw) if own is not None else 0.0
        info.append({"model": spec.path, "nll_alignment": nll_align, "nll_data": nll_own})
    a_min = min(i["nll_alignment"] for i in info)
    d_min = min(i["nll_data"] for i in info)
    raw = [math.exp(-((i["nll_alignment"] - a_min) + (i["nll_data"] - d_min)) / temperature) for i in info]
    mean = sum(raw) / len(raw)
    return [r / mean for r in raw], info


# ---- AQI on alignment probes ----------------------------------------------------------------------
def probe_pairs(source="builtin", seed: int = 0, max_examples: int | None = None):
    """(pairs, labels) for the AQI loop: "builtin" = the zoo corpora's train split (label 0: refusal to a
    harmful request or help to a harmless one; 1: compliance), or a JSONL of {prompt, response, label}."""
    import random

    from alignmerge.errors import DataError

    if source == "builtin":
        from alignmerge.zoo import corpora

        rng = random.Random(f"alignmerge-aqi/{seed}")
        groups = [(corpora.builtin_corpus("safety", "train", seed), 0),
                  (corpora.builtin_corpus("general", "train", seed), 0),
                  (corpora.builtin_corpus("misaligned", "train", seed), 1)]
        limit = max_examples if max_examples is not None else 48
        pairs, labels = [], []
        for records, label in groups:
            chosen = rng.sample(records, min(limit, len(records)))
            pairs += [(r["prompt"], r["response"]) for r in chosen]
            labels += [label] * len(chosen)
        return pairs, labels
    pairs, labels = [], []
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: AQI probe file not found")
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if not {"prompt", "response", "label"} <= set(rec):
            raise DataError(f"{path}:{lineno}: an AQI probe needs prompt, response and label (0 or 1)")
        pairs.append((rec["prompt"], rec["response"]))
        labels.append(int(rec["label"]))
    if max_examples is not None:
        pairs, labels = pairs[:3 * max_examples], labels[:3 * max_examples]
    return pairs, labels


def probe_scores(model_dir, pairs, labels, refusal: bool = True) -> dict:
    """{"aqi": AQI (DESIGN.md) on the labelled probe pairs, "refusal": fraction of the harmful probe prompts
    (those of label-1 pairs) where a refusal is likelier than compliance (``refusal_preferences``),
    "over_refusal": the same on the harmless ones (label-0 pairs whose response is no refusal)}."""
    from alignmerge.eval import load_model
    from alignmerge.eval.aqi import aqi_score, response_embeddings
    from alignmerge.eval.metrics import refusal_preferences

    from alignmerge.eval.metrics import is_refusal

    model, tokenizer = load_model(model_dir)
    out = {"aqi": float(aqi_score(response_embeddings(model, tokenizer, pairs), labels)), "refusal": None,
           "over_refusal": None}
    if refusal:
        harmful = sorted({p for (p, _), y in zip(pairs, labels) if y == 1})
        harmless = sorted({p for (p, r), y in zip(pairs, labels) if y == 0 and not is_refusal(r)} - set(harmful))
        for key, prompts in (("refusal", harmful), ("over_refusal", harmless)):
            if prompts:
                flags = refusal_preferences(model, tokenizer, prompts)
                out[key] = sum(flags) / len(flags)
    return out


# ---- the run -------------------------------------------------------------------------------------
def _summarise(records: list[dict]) -> dict:
    with_p = [r for r in records if r.get("projector")]
    return {
        "tensors": len({r["name"] for r in records}),
        "weights_with_projector": len(with_p),
        "mean_drift": sum(r["drift"] for r in with_p) / len(with_p) if with_p else None,
        "max_drift": max((r["drift"] for r in with_p), default=None),
        "budget_violations": sum(1 for r in with_p if r["budget_violation"] > 0),
        "cg_iterations": sum(r["cg_iterations"] for r in records),
        "max_kkt_residual": max((r["kkt_residual"] for r in records), default=None),
    }


def _layer_table(records: list[dict]) -> dict[str, dict]:
    """Per weight: drift, budget violation and CG iterations (the per-layer record of the report)."""
    return {r["name"]: {"drift": r["drift"], "budget_violation": r["budget_violation"],
                        "cg_iterations": r["cg_iterations"], "method": r["method"], "kkt_residual": r["kkt_residual"]}
            for r in records if r.get("projector") or r["method"] != "closed_form"}


def run_alignmerge(config, out_dir, *, progress: bool = False, **merge_options) -> dict:
    """Prepare the statistics, merge with the solver, run the AQI loop, write the report (module doc)."""
    from alignmerge.api import merge
    from alignmerge.config import load_config

    if not hasattr(config, "merge_method"):
        config = load_config(config)
    defaults = AlignMerge.method_parameters
    params = {**defaults, **config.parameters}
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not merge_options.get("overwrite"):
        raise AlignMergeError(f"{out}: output directory exists and is not empty (use --overwrite)")
    work = cache_dir(out)
    work.mkdir(parents=True, exist_ok=True)

    def note(msg: str) -> None:
        if progress:
            print(f"alignmerge: {msg}", file=sys.stderr)

    note("statistics (expert Fishers, subspace, alignment Fisher)")
    fisher_paths = AlignMerge.prepare_stats(config, work)["fisher"]
    anchor_files = prepare_anchor_files(
        config, work, need_subspace=bool(params["use_projector"]),
        need_falign=bool(params["use_align_fisher"]) or float(params["anchor_weight"]) > 0, defaults=defaults)
    weights = [float(s.parameters.get("weight", params.get("weight", 1.0))) for s in config.models]
    weight_info = None
    if params["expert_weights"] == "data":
        factors, weight_info = data_expert_weights(config, float(params["weight_temperature"]),
                                                   stats_options(params, defaults))
        weights = [w * f for w, f in zip(weights, factors)]
    elif params["expert_weights"] != "config":
        raise ConfigError(f"alignmerge: expert_weights must be 'config' or 'data', not {params['expert_weights']!r}")

    raw = json.loads(json.dumps(config.raw, default=str))
    raw_params = dict(raw.get("parameters") or {})
    raw_params.update(anchor_files)
    raw_params["use_aqi_loop"] = False
    raw.pop("alignment_data", None)
    raw_params.pop("alignment_data", None)
    models = []
    for spec, fpath, w in zip(raw["models"], fisher_paths, weights):
        spec = dict(spec) if isinstance(spec, dict) else {"model": spec}
        spec["parameters"] = {**(spec.get("parameters") or {}), "fisher": str(fpath), "weight": w}
        spec["parameters"].pop("data", None)
        models.append(spec)
    raw["models"] = models

    def merge_round(lambda_align: float, target: Path) -> list[dict]:
        diag = work / f"diagnostics-{target.name}.jsonl"
        diag.unlink(missing_ok=True)
        round_raw = {**raw, "parameters": {**raw_params, "lambda_align": lambda_align, "diagnostics": str(diag)}}
        if target != out and target.exists():  # a round directory of ours; the output obeys overwrite
            shutil.rmtree(target)
        merge(load_config(round_raw), target, progress=progress, **merge_options)
        records = [json.loads(line) for line in diag.read_text(encoding="utf-8").splitlines() if line.strip()]
        diag.unlink(missing_ok=True)
        return records

    lam0 = float(params["lambda_align"])
    rounds: list[dict] = []
    report = {"method": "alignmerge", "anchor": str(config.base_model.path), "experts": [s.path for s in config.models],
              "weights": weights, "weight_info": weight_info, "files": {"fisher": [str(p) for p in fisher_paths],
                                                                          **anchor_files},
              "parameters": {k: params[k] for k in defaults if k not in ("diagnostics",)}}
    if not params["use_aqi_loop"]:
        note(f"merge (lambda_align={lam0:g})")
        records = merge_round(lam0, out)
        report.update(rounds=[{"lambda_align": lam0, "aqi": None}], chosen_lambda_align=lam0,
                      layers=_layer_table(records), summary=_summarise(records))
        (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        return report

    pairs, labels = probe_pairs(params["aqi_probes"], int(params["seed"]), params["aqi_examples"])
    use_refusal = params["refusal_tolerance"] is not None
    anchor_scores = probe_scores(config.base_model.path, pairs, labels, refusal=use_refusal)
    anchor_aqi = anchor_scores["aqi"]
    threshold = anchor_aqi - float(params["aqi_tolerance"])
    refusal_floor = anchor_scores["refusal"] - float(params["refusal_tolerance"]) if use_refusal else None
    use_over = (use_refusal and params["over_refusal_tolerance"] is not None
                and anchor_scores["over_refusal"] is not None)
    over_ceiling = anchor_scores["over_refusal"] + float(params["over_refusal_tolerance"]) if use_over else None
    max_rounds = max(1, int(params["max_rounds"]))
    note(f"anchor AQI {anchor_aqi:.2f}, refusal {anchor_scores['refusal']}; target AQI >= {threshold:.2f}"
         + (f", refusal >= {refusal_floor:.3f}" if use_refusal else ""))
    trials: dict[float, tuple[Path, list[dict], float]] = {}

    def attempt(lam: float) -> bool:
        target = out.parent / f".{out.name}.round{len(rounds)}"
        records = merge_round(lam, target)
        scores = probe_scores(target, pairs, labels, refusal=use_refusal)
        passed = (scores["aqi"] >= threshold and (not use_refusal or scores["refusal"] >= refusal_floor)
                  and (not use_over or scores["over_refusal"] <= over_ceiling))
        rounds.append({"round": len(rounds), "lambda_align": lam, "aqi": scores["aqi"],
                       "refusal": scores["refusal"], "over_refusal": scores["over_refusal"], "passed": passed,
                       **{k: v for k, v in _summarise(records).items() if k in ("mean_drift", "budget_violations",
                                                                                 "cg_iterations")}})
        note(f"round {len(rounds)}: lambda_align={lam:g} AQI={scores['aqi']:.2f} refusal={scores['refusal']} "
             f"{'pass' if passed else 'fail'}")
        trials[lam] = (target, records, scores["aqi"])
        return passed

    lam = lam0
    low, high = None, None
    if attempt(lam):
        high = lam
    else:
        low = lam
        lam = lam * 2.0 if lam > 0 else 1.0
        while len(rounds) < max_rounds:
            if attempt(lam):
                high = lam
                break
            low, lam = lam, lam * 2.0
    while high is not None and low is not None and len(rounds) < max_rounds:
        mid = math.sqrt(low * high) if low > 0 else high / 2.0
        if attempt(mid):
            high = mid
        else:
            low = mid
    chosen = high if high is not None else max(trials)
    target, records, aqi = trials[chosen]
    if out.exists():
        shutil.rmtree(out)
    target.rename(out)
    for lam_t, (path, _, _) in trials.items():
        if lam_t != chosen and path.exists():
            shutil.rmtree(path)
    report.update(anchor_aqi=anchor_aqi, aqi_threshold=threshold, anchor_refusal=anchor_scores["refusal"],
                  refusal_floor=refusal_floor, anchor_over_refusal=anchor_scores["over_refusal"],
                  over_refusal_ceiling=over_ceiling, rounds=rounds, chosen_lambda_align=chosen,
                  chosen_aqi=aqi, target_met=high is not None, layers=_layer_table(records),
                  summary=_summarise(records))
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---- alignment drift of any merge (for the demo's columns) --------------------------------------
def alignment_drift(merged_dir, anchor_dir, expert_dirs: list, subspace_path, rho: float = 0.5) -> dict:
    """Drift of a merged model inside the anchor's alignment subspace, comparable across methods.

    Per 2-D weight W with a basis: drift_W = ‖P(θ_merge − θ_A)‖ / ‖P(Δ̄)‖ with Δ̄ = mean_k (θ_k − θ_A)
    (the experts' mean motion; for one expert its own), and a budget violation when
    ‖P(θ_merge − θ_A)‖ > ρ‖P(Δ̄)‖. Returns {"drift": mean drift_W, "violations": fraction over budget}.
    """
    from alignmerge.io.checkpoint import Checkpoint
    from alignmerge.ops import projector as ops
    from alignmerge.subspace import SubspaceFile

    merged, anchor = Checkpoint(merged_dir), Checkpoint(anchor_dir)
    experts = [Checkpoint(d) for d in expert_dirs]
    sub = SubspaceFile(subspace_path)
    drifts, violations = [], 0
    for name in sorted(sub.names()):
        if name not in merged or name not in anchor:
            continue
        u, v = sub.get(name)
        u = torch.linalg.qr(u.double())[0] if u is not None else None
        v = torch.linalg.qr(v.double())[0] if v is not None else None
        a = anchor.read(name).double()
        d = merged.read(name).double() - a
        ref = sum(e.read(name).double() - a for e in experts) / len(experts)

        def pnorm(x):
            return float(ops.projection_sqnorm(*ops.project_factors(x, u, v, backend="torch"), u)) ** 0.5

        p_ref = pnorm(ref)
        if p_ref == 0.0:
            continue
        p_d = pnorm(d)
        drifts.append(p_d / p_ref)
        violations += p_d > rho * p_ref * 1.01  # 1% slack for bf16-rounded outputs
    if not drifts:
        return {"drift": None, "violations": None}
    return {"drift": sum(drifts) / len(drifts), "violations": violations / len(drifts)}
