"""AlignMerge's per-weight constrained solve (objective in ``alignmerge.solver.objective``).

``solve_weight`` minimises, for one parameter tensor,

    ‖δ − δ̄‖²_D + λ_align(‖P(δ)‖² + β‖δ‖²_{F̂_align}) + λ_bud·max(0, ‖P(δ)‖² − B)²

by solving (D + μP + λ_align β F̂_align) δ = D δ̄ with Jacobi-preconditioned CG (one fused pass over
the weight per iteration), with μ = λ_align + 2λ_bud(‖Pδ‖² − B)_+ found as the fixed point of a
monotone scalar equation (safeguarded secant on the model ‖Pδ(μ)‖^{-1} ≈ linear in μ, which is exact
when D is constant). ``lambda_budget=inf`` makes the budget a hard constraint ‖Pδ‖² ≤ B.
Closed forms: no projector (1-D tensors, or P-term and budget off) → δ = Dδ̄ / (D + cF̂_align);
λ_align = 0 with the budget slack at δ̄ → δ = δ̄ exactly (the Fisher merge); one-sided P (only U or
only V) → exact Woodbury solve for any diagonal D (``one_sided_solve``), no CG.
Tensors up to ``fp64_max_numel`` elements are solved in fp64 (torch reference ops), larger in fp32.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from alignmerge.errors import ConfigError, NonFiniteError
from alignmerge.ops import projector as ops
from alignmerge.solver.cg import CGResult, _norm, solve_pcg
from alignmerge.solver.objective import Problem, WholeTensorMeans, fisher_merge_problem

__all__ = ["SolveResult", "SolveStats", "solve_weight", "solve_pcg", "one_sided_solve", "CGResult", "Problem",
           "WholeTensorMeans", "fisher_merge_problem"]


@dataclass
class SolveStats:
    """Diagnostics of one weight's solve (all plain Python numbers)."""

    method: str
    """"closed_form" (diagonal), "woodbury" (one-sided P, exact) or "cg"."""
    dtype: str
    cg_iterations: int
    fixed_point_rounds: int
    mu: float
    """Multiplier of P in the normal equations of the last solve."""
    mu_gap: float
    """|μ(δ) − μ|: the soft budget's fixed-point mismatch, μ(δ) = λ_align + 2λ_bud(‖Pδ‖² − B)_+."""
    drift: float
    """‖P(δ)‖ / ‖P(δ̄)‖ (0 when there is no projector or P(δ̄) = 0)."""
    p_sqnorm: float
    """‖P(δ)‖²_F."""
    p_sqnorm_fisher_merge: float
    """‖P(δ̄)‖²_F."""
    budget: float
    """B = (ρ‖P(δ̄)‖)² (nan when the budget is off)."""
    budget_violation: float
    """(‖P(δ)‖² − B)_+ (0 when the budget is off)."""
    falign_sqnorm: float
    """‖δ‖²_{F̂_align} (nan without an alignment Fisher)."""
    geo: float
    """‖δ − δ̄‖²_D."""
    kkt_residual: float
    """‖∇L(δ)/2‖ / ‖Dδ̄‖: relative residual of the normal equations at the returned δ with μ
    re-evaluated at δ (so it includes ``mu_gap``; for a very large λ_bud that gap is the CG error
    of ‖Pδ‖² amplified by 2λ_bud). Rounding-level for the closed forms."""
    converged: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SolveResult:
    delta: torch.Tensor
    """δ = θ_merged − θ_anchor in fp32, on the anchor's device."""
    stats: SolveStats


def _floats(t: torch.Tensor) -> float:
    return float(t.sum(dtype=torch.float64))


def solve_weight(anchor: torch.Tensor, experts: list[torch.Tensor], fishers: list[torch.Tensor], *,
                 weights: list[float] | None = None, u: torch.Tensor | None = None, v: torch.Tensor | None = None,
                 f_align: torch.Tensor | None = None, lambda_align: float = 0.0, beta: float = 1.0,
                 lambda_budget: float = 0.0, rho: float = 0.5, use_projector: bool = True,
                 use_falign: bool = True, use_budget: bool = True, anchor_fisher: torch.Tensor | None = None,
                 anchor_weight: float = 0.0, normalize_fishers: bool = True, fisher_floor: float = 0.1,
                 tol: float = 1e-6, max_iter: int = 500, max_rounds: int = 30, fp64_max_numel: int = 1 << 18,
                 jacobi_projector: bool = True, one_sided_closed_form: bool = True, warm_start: torch.Tensor | None = None, backend: str | None = None,
                 means: WholeTensorMeans | None = None, name: str = "tensor") -> SolveResult:
    """Solve one weight's AlignMerge objective; returns δ (fp32) and ``SolveStats``.

    anchor, experts[k], fishers[k], f_align: same shape, any float dtype (bf16 fine), one device.
    u (out×r), v (in×r): bases of the alignment subspace (re-orthonormalised here by QR, so bf16
    storage is fine), for 2-D weights only (either may be None: one-sided P).
    weights: λ_k per expert (default 1/K). Switches: ``use_projector`` (the ‖Pδ‖² term),
    ``use_falign`` (the β‖δ‖²_{F̂_align} term), ``use_budget`` (the soft budget; it also needs
    lambda_budget > 0). tol: relative residual of each CG solve; max_iter: CG iterations per solve.
    one_sided_closed_form: with only u or only v, solve exactly by Woodbury (``one_sided_solve``)
    instead of CG. warm_start: an earlier δ for this weight (e.g. from the previous λ_align round of
    the AQI loop) to start CG from instead of δ̄. means: the whole tensor's Fisher means when the inputs
    are a row block of it (only without a projector, whose terms couple all rows).
    """
    weights = list(weights) if weights is not None else [1.0 / len(experts)] * len(experts)
    if (u is not None or v is not None) and anchor.dim() != 2:
        raise ConfigError(f"{name}: a projector (u, v) needs a 2-D weight, got shape {tuple(anchor.shape)}")
    if means is not None and (u is not None or v is not None):
        raise ConfigError(f"{name}: a projector couples every row of the weight; solve it whole, not in row blocks")
    if lambda_align < 0 or beta < 0 or lambda_budget < 0 or rho < 0:
        raise ConfigError(f"{name}: lambda_align, beta, lambda_budget and rho must be >= 0")
    for what, t in (("anchor", anchor), *((f"expert {k}", e) for k, e in enumerate(experts))):
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{name}: NaN or Inf in the {what}'s weights")
    small = anchor.numel() <= fp64_max_numel
    dtype = torch.float64 if small else torch.float32
    be = "torch" if small else backend
    problem = fisher_merge_problem(anchor, experts, fishers, weights=weights, anchor_fisher=anchor_fisher,
                                   anchor_weight=anchor_weight, normalize_fishers=normalize_fishers,
                                   fisher_floor=fisher_floor, f_align=f_align if use_falign else None,
                                   dtype=dtype, means=means, name=name)
    delta_bar, metric = problem.delta_bar, problem.metric
    has_p = u is not None or v is not None
    u_ = _orthonormal(u, anchor.device, dtype)
    v_ = _orthonormal(v, anchor.device, dtype)
    c_align = lambda_align * beta if problem.falign is not None else 0.0
    lam_p = lambda_align if (use_projector and has_p) else 0.0
    lam_bud = lambda_budget if (use_budget and has_p) else 0.0
    d_eff = metric + c_align * problem.falign if c_align > 0 else metric
    b = metric * delta_bar
    bnorm = _norm(b)

    def p_sqnorm(x: torch.Tensor) -> float:
        if not has_p:
            return 0.0
        return float(ops.projection_sqnorm(*ops.project_factors(x, u_, v_, backend=be), u_))

    s_bar = p_sqnorm(delta_bar)
    budget = (rho * rho) * s_bar if lam_bud > 0 else math.nan
    budget_on = lam_bud > 0 and s_bar > budget

    def mu_of(s: float) -> float:
        """μ(δ) = λ_p + 2λ_bud(‖Pδ‖² − B)_+ (the hard budget keeps its multiplier from the root search)."""
        return lam_p + (2.0 * lam_bud * max(0.0, s - budget) if budget_on and math.isfinite(lam_bud) else 0.0)

    cg_iterations = 0
    rounds = 0
    converged = True
    if lam_p == 0.0 and not budget_on:
        method, mu = "closed_form", 0.0
        delta = delta_bar.clone() if c_align == 0.0 else b / d_eff
        s = p_sqnorm(delta) if has_p else 0.0
    else:
        one_sided = one_sided_closed_form and (u_ is None or v_ is None)
        method = "woodbury" if one_sided else "cg"

        # (no attribute on ``solve`` itself: a function referring to its own name is a reference cycle
        # that kept b and D of every solved weight alive until the next garbage collection)
        def solve(mu_value: float, x0: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
            """δ(μ), ‖Pδ(μ)‖² and whether CG stalled (δ already solves the equations for μ to tol)."""
            nonlocal cg_iterations, rounds, converged
            rounds += 1
            if one_sided:
                x = one_sided_solve(b, d_eff, u_, v_, mu_value)
                return x, p_sqnorm(x), False
            res = solve_pcg(b, d_eff, u_, v_, mu_value, x0=x0, tol=tol, max_iter=max_iter,
                            jacobi_projector=jacobi_projector, backend=be)
            cg_iterations += res.iterations
            converged = res.converged
            return res.x, p_sqnorm(res.x), res.iterations == 0

        mu = lam_p
        start = delta_bar if warm_start is None else warm_start.to(device=delta_bar.device, dtype=dtype)
        delta, s, _stalled = solve(mu, start)
        if budget_on and s > budget:
            delta, s, mu = _budget_fixed_point(solve, delta, s, mu, lam_p, lam_bud, budget, bnorm, tol,
                                               max_rounds, float(d_eff.mean()))
    if not bool(torch.isfinite(delta).all()):
        raise NonFiniteError(f"{name}: the AlignMerge solve produced NaN/Inf (check the Fishers and u, v)")
    # stationarity of the objective at δ: the budget's multiplier re-evaluated at δ (soft budget)
    mu_true = mu_of(s) if math.isfinite(lam_bud) or not budget_on else mu
    if method != "closed_form":
        grad = ops.apply_operator(delta, d_eff, u_, v_, mu_true, backend=be).to(dtype) - b
        kkt = _norm(grad) / bnorm if bnorm > 0 else 0.0
    else:
        kkt = _norm(d_eff * delta - b) / bnorm if bnorm > 0 else 0.0
    violation = max(0.0, s - budget) if lam_bud > 0 else 0.0
    stats = SolveStats(
        method=method, dtype=str(dtype).replace("torch.", ""), cg_iterations=cg_iterations,
        fixed_point_rounds=rounds, mu=mu, mu_gap=abs(mu_true - mu), drift=math.sqrt(s / s_bar) if s_bar > 0 else 0.0,
        p_sqnorm=s, p_sqnorm_fisher_merge=s_bar, budget=budget, budget_violation=violation,
        falign_sqnorm=_floats(problem.falign * delta * delta) if problem.falign is not None else math.nan,
        geo=_floats(metric * (delta - delta_bar) ** 2), kkt_residual=kkt, converged=converged)
    return SolveResult(delta=delta.to(torch.float32), stats=stats)


def one_sided_solve(b: torch.Tensor, d: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None,
                    mu: float) -> torch.Tensor:
    """Exact solution of D⊙X + μUUᵀX = B (or D⊙X + μXVVᵀ = B) for any positive diagonal D.

    U-sided, column j: (D_j + μUUᵀ)⁻¹ = D_j⁻¹ − D_j⁻¹U(I/μ + UᵀD_j⁻¹U)⁻¹UᵀD_j⁻¹ (Woodbury). The n
    r×r matrices UᵀD_j⁻¹U come from one GEMM, (U_k U_l)ᵀ_{kl} · D⁻¹ (r² × n), and are solved in fp64.
    The V-sided case is the same on the transpose. Cost ≈ r² multiply-adds per element, one pass.
    """
    if mu == 0.0:
        return b / d
    if u is None:
        return one_sided_solve(b.T, d.T, v, None, mu).T.contiguous()
    m, r = u.shape
    d_inv = 1.0 / d
    y = b * d_inv
    w = u.T @ y  # r × n
    pairs = (u[:, :, None] * u[:, None, :]).reshape(m, r * r)
    gram = (pairs.T @ d_inv).T.reshape(-1, r, r).double()  # n × r × r: UᵀD_j⁻¹U
    gram += torch.eye(r, dtype=torch.float64, device=b.device) / mu
    c = torch.linalg.solve(gram, w.T.double().unsqueeze(-1)).squeeze(-1).T.to(b.dtype)  # r × n
    return y - (u @ c) * d_inv


def _orthonormal(basis: torch.Tensor | None, device, dtype) -> torch.Tensor | None:
    """An orthonormal basis of span(basis) (QR in fp64): U, V stored in bf16 are only nearly
    orthonormal, and P must be an exact orthogonal projector for the solve to be well posed."""
    if basis is None:
        return None
    q, _ = torch.linalg.qr(basis.to(device=device, dtype=torch.float64))
    return q.to(dtype).contiguous()


def _budget_fixed_point(solve, delta, s, mu, lam_p, lam_bud, budget, bnorm, tol, max_rounds, d_scale):
    """Find μ ≥ λ_p with h(μ) = 0, h decreasing: soft budget h = λ_p + 2λ_bud(s(μ) − B)_+ − μ;
    hard budget (λ_bud = inf) h = B^{-1/2} − s(μ)^{-1/2}. Model: w(μ) = s(μ)^{-1/2} ≈ linear in μ."""
    hard = not math.isfinite(lam_bud)

    def h_of(mu_value: float, s_value: float) -> float:
        if hard:
            return budget ** -0.5 - s_value ** -0.5 if s_value > 0 else -math.inf
        return lam_p + 2.0 * lam_bud * max(0.0, s_value - budget) - mu_value

    lo, hi = mu, (math.inf if hard else lam_p + 2.0 * lam_bud * (s - budget))
    w_prev, mu_prev = s ** -0.5, mu
    slope = w_prev / (mu + d_scale)  # w ∝ (μ + d) when D ≡ d
    for _ in range(max_rounds):
        mu_next = _model_root(hard, mu_prev, w_prev, slope, lam_p, lam_bud, budget, lo, hi)
        if not lo < mu_next < hi:
            mu_next = 0.5 * (lo + hi) if math.isfinite(hi) else 2.0 * lo + d_scale
        delta, s, stalled = solve(mu_next, delta)
        h = h_of(mu_next, s)
        if h > 0:
            lo = mu_next
        else:
            hi = mu_next
        w = s ** -0.5 if s > 0 else math.inf
        if math.isfinite(w) and mu_next != mu_prev and (w - w_prev) / (mu_next - mu_prev) > 0:
            slope = (w - w_prev) / (mu_next - mu_prev)
        w_prev, mu_prev, mu = w, mu_next, mu_next
        # s(μ) carries the CG error (relative ~ tol), which 2λ_bud amplifies in h: stop at that noise
        # level, or when the bracket on μ is too narrow to move the normal equations by tol.
        s_noise = 10.0 * max(tol, 1e-7) * s
        if hard:
            if abs(s - budget) <= s_noise or s == 0.0:
                break
        elif abs(h) * math.sqrt(s) <= 0.1 * tol * bnorm or abs(s - budget) <= s_noise:
            break
        if math.isfinite(hi) and (hi - lo) * math.sqrt(s) <= 0.1 * tol * bnorm:
            break
        if stalled:
            break  # δ already solves the equations for this μ to tol: s cannot be resolved further
    return delta, s, mu


def _model_root(hard, mu0, w0, slope, lam_p, lam_bud, budget, lo, hi):
    """Root of h under the linear model w(μ) = w0 + slope(μ − μ0)."""
    if hard:
        return mu0 + (budget ** -0.5 - w0) / slope

    def h_model(m: float) -> float:
        w = w0 + slope * (m - mu0)
        s = 1.0 / (w * w) if w > 0 else math.inf
        return lam_p + 2.0 * lam_bud * max(0.0, s - budget) - m

    a, z = lo, hi
    for _ in range(200):
        mid = 0.5 * (a + z)
        if h_model(mid) > 0:
            a = mid
        else:
            z = mid
    return 0.5 * (a + z)
