"""The per-weight AlignMerge solver on random tensors (DESIGN.md "Math", issue 5 "Must show" 1)."""
import math

import pytest
import torch

from alignmerge.errors import ConfigError, NonFiniteError
from alignmerge.ops import projector as projector_ops
from alignmerge.ops import reference
from alignmerge.solver import solve_pcg, solve_weight
from alignmerge.solver.cg import attainable_residual


def orthonormal(rows, r, gen):
    return torch.linalg.qr(torch.randn(rows, r, generator=gen, dtype=torch.float64))[0]


def make_case(m=23, n=17, r=4, experts=3, seed=0, dtype=torch.float32):
    """Anchor, experts near it, Fishers of very different scales (and zeros), U, V, a tiny F_align."""
    gen = torch.Generator().manual_seed(seed)
    anchor = torch.randn(m, n, generator=gen)
    thetas = [anchor + 0.05 * torch.randn(m, n, generator=gen) for _ in range(experts)]
    fishers = [torch.rand(m, n, generator=gen) ** 4 * 10.0 ** (3 * k) for k in range(experts)]
    fishers[0][0, :3] = 0.0
    f_align = torch.rand(m, n, generator=gen) ** 3 * 1e-8  # saturated refusals: tiny raw scale
    u, v = orthonormal(m, r, gen), orthonormal(n, r, gen)
    cast = (lambda t: t.to(dtype))
    return dict(anchor=cast(anchor), experts=[cast(t) for t in thetas], fishers=[cast(f) for f in fishers],
                u=u, v=v, f_align=cast(f_align))


def fisher_merge(case, weights):
    """Independent Fisher merge: Σλ_k F̂_k Δ_k / Σλ_k F̂_k with F̂ = F / mean F (fp64)."""
    anchor = case["anchor"].double()
    num = torch.zeros_like(anchor)
    den = torch.zeros_like(anchor)
    for theta, f, lam in zip(case["experts"], case["fishers"], weights):
        fn = f.double() / f.double().mean()
        num += lam * fn * (theta.double() - anchor)
        den += lam * fn
    return num / den


def dense_solution(case, weights, lam, beta, sides="both", fisher_floor=0.1):
    """Minimiser by a dense direct solve of (D + λP + λβF̂_align) δ = Dδ̄ on vec(δ) (fp64)."""
    anchor = case["anchor"].double()
    m, n = anchor.shape
    dbar = fisher_merge(case, weights)
    d_raw = sum(lam_k * f.double() / f.double().mean() for f, lam_k in zip(case["fishers"], weights))
    metric = d_raw.clamp(min=fisher_floor * d_raw.mean()) / d_raw.mean()
    fal = case["f_align"].double() / case["f_align"].double().mean()
    u = case["u"] if sides in ("both", "u") else None
    v = case["v"] if sides in ("both", "v") else None
    eye = torch.eye(m * n, dtype=torch.float64)
    proj = torch.stack([reference.project_reference(e.view(m, n), u, v).reshape(-1) for e in eye], 1)
    op = torch.diag((metric + lam * beta * fal).reshape(-1)) + lam * proj
    return torch.linalg.solve(op, (metric * dbar).reshape(-1)).view(m, n)


def p_sq(delta, case):
    return float(reference.project_reference(delta.double(), case["u"], case["v"]).square().sum())


@pytest.mark.parametrize("fp64_max_numel", [1 << 30, 0])
def test_lambda_zero_returns_the_fisher_merge_exactly(fp64_max_numel):
    case = make_case(seed=1)
    weights = [0.5, 0.3, 0.2]
    res = solve_weight(case["anchor"], case["experts"], case["fishers"], weights=weights, u=case["u"],
                       v=case["v"], f_align=case["f_align"], lambda_align=0.0, beta=2.0,
                       fp64_max_numel=fp64_max_numel)
    want = fisher_merge(case, weights)
    assert res.stats.method == "closed_form" and res.stats.cg_iterations == 0
    tol = 1e-7 if fp64_max_numel else 1e-6  # δ is returned in fp32
    assert float((res.delta.double() - want).abs().max() / want.abs().max()) < tol
    assert res.stats.drift == pytest.approx(1.0, rel=1e-5)
    assert res.delta.dtype == torch.float32


@pytest.mark.parametrize("sides", ["both", "u", "v"])
@pytest.mark.parametrize("use_falign", [False, True])
def test_solution_matches_a_dense_direct_solve(sides, use_falign):
    case = make_case(m=9, n=7, r=2, seed=2)
    weights = [0.2, 0.5, 0.3]
    lam, beta = 3.0, 0.7
    res = solve_weight(case["anchor"], case["experts"], case["fishers"], weights=weights,
                       u=case["u"] if sides != "v" else None, v=case["v"] if sides != "u" else None,
                       f_align=case["f_align"], use_falign=use_falign, lambda_align=lam, beta=beta, tol=1e-10)
    want = dense_solution(case, weights, lam, beta if use_falign else 0.0, sides)
    assert float((res.delta.double() - want).norm() / want.norm()) < 1e-6
    assert res.stats.kkt_residual < 1e-8 and res.stats.converged


@pytest.mark.parametrize("terms", ["projector", "falign", "both"])
def test_penalised_quantity_falls_monotonically_to_zero(terms):
    case = make_case(seed=3)
    use_p, use_f = terms in ("projector", "both"), terms in ("falign", "both")
    beta = 1.0

    def penalty(delta):
        out = p_sq(delta, case) if use_p else 0.0
        if use_f:
            fal = case["f_align"].double() / case["f_align"].double().mean()
            out += beta * float((fal * delta.double() ** 2).sum())
        return out

    values = []
    for lam in (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1000.0):
        res = solve_weight(case["anchor"], case["experts"], case["fishers"], u=case["u"], v=case["v"],
                           f_align=case["f_align"], lambda_align=lam, beta=beta, use_projector=use_p,
                           use_falign=use_f, tol=1e-9)
        assert res.stats.kkt_residual < 1e-4
        values.append(penalty(res.delta))
    assert all(b < a for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.01 * values[0]


@pytest.mark.parametrize("backend", ["torch", "cpp", "cpp-blocked", "triton"])
@pytest.mark.parametrize("lambda_align,lambda_budget", [(1.0, 0.0), (30.0, 0.0), (0.5, 50.0)])
def test_fp32_fast_paths_meet_the_kkt_residual(backend, lambda_align, lambda_budget, monkeypatch):
    if backend == "cpp-blocked":  # the CPU stand-in used when alignmerge._C is not built
        monkeypatch.setattr(projector_ops, "cpp_extension", lambda: None)
        backend = "cpp"
    case = make_case(m=45, n=38, r=5, seed=4)
    res = solve_weight(case["anchor"], case["experts"], case["fishers"], u=case["u"], v=case["v"],
                       f_align=case["f_align"], lambda_align=lambda_align, beta=0.5, lambda_budget=lambda_budget,
                       rho=0.3, fp64_max_numel=0, backend=backend)
    st = res.stats
    assert st.dtype == "float32" and st.method == "cg"
    assert st.kkt_residual < 1e-4, st
    assert torch.isfinite(res.delta).all()
    ref = solve_weight(case["anchor"], case["experts"], case["fishers"], u=case["u"], v=case["v"],
                       f_align=case["f_align"], lambda_align=lambda_align, beta=0.5, lambda_budget=lambda_budget,
                       rho=0.3, tol=1e-10)
    assert ref.stats.dtype == "float64"
    assert float((res.delta.double() - ref.delta.double()).norm() / ref.delta.double().norm()) < 1e-4


@pytest.mark.parametrize("lambda_budget", [1e6, 1e9, math.inf])
def test_budget_is_met_when_lambda_budget_is_large(lambda_budget):
    case = make_case(seed=5)
    free = solve_weight(case["anchor"], case["experts"], case["fishers"], u=case["u"], v=case["v"],
                        lambda_align=0.05)
    res = solve_weight(case["anchor"], case["experts"], case["fishers"], u=case["u"], v=case["v"],
                       lambda_align=0.05, lambda_budget=lambda_budget, rho=0.3)
    st = res.stats
    assert st.budget == pytest.approx(0.09 * st.p_sqnorm_fisher_merge)
    assert free.stats.p_sqnorm > 2 * st.budget  # the budget binds
    assert st.p_sqnorm <= st.budget * (1 + 1e-3), st
    assert st.budget_violation <= 1e-3 * st.budget
    assert st.drift == pytest.approx(0.3, rel=1e-3)
    assert st.mu > 0.05 and st.fixed_point_rounds >= 2


def test_soft_budget_is_a_fixed_point():
    case = make_case(seed=6)
    res = solve_weight(case["anchor"], case["experts"], case["fishers"], u=case["u"], v=case["v"],
                       lambda_align=0.1, lambda_budget=20.0, rho=0.2, tol=1e-10)
    st = res.stats
    assert st.p_sqnorm > st.budget  # soft: some violation remains
    assert st.mu == pytest.approx(0.1 + 2 * 20.0 * (st.p_sqnorm - st.budget), rel=1e-6)
    assert st.kkt_residual < 1e-6


def test_budget_is_slack_when_rho_is_one():
    case = make_case(seed=7)
    res = solve_weight(case["anchor"], case["experts"], case["fishers"], u=case["u"], v=case["v"],
                       lambda_align=0.0, lambda_budget=1e6, rho=1.0)
    assert res.stats.method == "closed_form" and res.stats.budget_violation == 0.0


def test_one_dimensional_tensors_use_the_closed_form():
    gen = torch.Generator().manual_seed(8)
    anchor = torch.randn(31, generator=gen).bfloat16()
    experts = [(anchor.float() + 0.1 * torch.randn(31, generator=gen)).bfloat16() for _ in range(2)]
    fishers = [torch.rand(31, generator=gen) + 0.5 for _ in range(2)]
    f_align = torch.rand(31, generator=gen)
    res = solve_weight(anchor, experts, fishers, weights=[0.5, 0.5], f_align=f_align, lambda_align=2.0,
                       beta=0.5)
    d_raw = sum(0.5 * f.double() / f.double().mean() for f in fishers)
    dbar = sum(0.5 * f.double() / f.double().mean() * (e.double() - anchor.double())
               for f, e in zip(fishers, experts)) / d_raw
    metric = d_raw.clamp(min=0.1 * d_raw.mean()) / d_raw.mean()
    want = metric * dbar / (metric + 1.0 * f_align.double() / f_align.double().mean())
    assert res.stats.method == "closed_form"
    assert float((res.delta.double() - want).abs().max()) < 1e-7
    assert res.stats.kkt_residual < 1e-12


def test_fisher_floor_keeps_cg_stable_with_near_zero_fishers():
    case = make_case(m=40, n=33, r=6, seed=9)
    case["fishers"] = [f * (torch.rand_like(f) < 0.05) for f in case["fishers"]]  # mostly exact zeros
    res = solve_weight(case["anchor"], case["experts"], case["fishers"], u=case["u"], v=case["v"],
                       lambda_align=10.0, fp64_max_numel=0, backend="cpp")
    assert res.stats.converged and res.stats.kkt_residual < 1e-4
    assert res.stats.cg_iterations < 200
    assert float(res.delta.abs().max()) < 10 * float(
        max((t - case["anchor"]).abs().max() for t in case["experts"]))


def test_bad_inputs_are_named():
    case = make_case(seed=10)
    bad = [t.clone() for t in case["experts"]]
    bad[1][2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="my.weight.*expert 1"):
        solve_weight(case["anchor"], bad, case["fishers"], name="my.weight")
    with pytest.raises(ConfigError, match="my.weight"):
        solve_weight(case["anchor"], case["experts"], case["fishers"][:2], name="my.weight")
    with pytest.raises(ConfigError, match="2-D"):
        solve_weight(case["anchor"][0], [e[0] for e in case["experts"]], [f[0] for f in case["fishers"]],
                     u=case["u"])


def test_pcg_restarts_reach_the_true_residual():
    gen = torch.Generator().manual_seed(11)
    m, n, r = 30, 26, 5
    d = (torch.rand(m, n, generator=gen) + 0.1)
    b = torch.randn(m, n, generator=gen)
    u, v = orthonormal(m, r, gen).float(), orthonormal(n, r, gen).float()
    res = solve_pcg(b, d, u, v, 50.0, tol=1e-6, backend="cpp")
    resid = b.double() - reference.apply_operator_reference(res.x.double(), d.double(), u, v, 50.0)
    assert res.converged
    assert float(resid.norm() / b.double().norm()) == pytest.approx(res.residual, rel=0.1)
    floor = attainable_residual(res.x, d, 50.0, float(b.norm()))
    assert res.residual <= max(1e-6, floor) and res.residual < 1e-5
    # in fp64 the same system reaches the requested tolerance itself
    res64 = solve_pcg(b.double(), d.double(), u, v, 50.0, tol=1e-10, backend="torch")
    assert res64.converged and res64.residual <= 1e-10


def test_nearly_orthonormal_bf16_bases_are_reorthonormalised():
    case = make_case(m=9, n=7, r=2, seed=12)
    weights = [0.2, 0.5, 0.3]
    res = solve_weight(case["anchor"], case["experts"], case["fishers"], weights=weights,
                       u=case["u"].bfloat16(), v=case["v"].bfloat16(), lambda_align=3.0, tol=1e-10)
    exact = solve_weight(case["anchor"], case["experts"], case["fishers"], weights=weights,
                         u=case["u"], v=case["v"], lambda_align=3.0, tol=1e-10)
    assert res.stats.kkt_residual < 1e-8
    # same subspace up to bf16 rounding of the basis
    assert float((res.delta - exact.delta).norm() / exact.delta.norm()) < 2e-2


def test_warm_start_from_a_previous_round_saves_iterations():
    case = make_case(m=40, n=33, r=6, seed=13)
    common = dict(u=case["u"], v=case["v"], f_align=case["f_align"], beta=0.5, fp64_max_numel=0)
    first = solve_weight(case["anchor"], case["experts"], case["fishers"], lambda_align=4.0, **common)
    cold = solve_weight(case["anchor"], case["experts"], case["fishers"], lambda_align=5.0, **common)
    warm = solve_weight(case["anchor"], case["experts"], case["fishers"], lambda_align=5.0,
                        warm_start=first.delta, **common)
    assert warm.stats.kkt_residual < 1e-4 and cold.stats.kkt_residual < 1e-4
    assert warm.stats.cg_iterations < cold.stats.cg_iterations
    assert float((warm.delta - cold.delta).norm() / cold.delta.norm()) < 1e-4


@pytest.mark.parametrize("side", ["u", "v"])
@pytest.mark.parametrize("lambda_align,lambda_budget", [(7.0, 0.0), (0.0, 1e6)])
def test_one_sided_woodbury_matches_cg(side, lambda_align, lambda_budget):
    case = make_case(m=36, n=28, r=5, seed=14)
    sides = dict(u=case["u"]) if side == "u" else dict(v=case["v"])
    common = dict(f_align=case["f_align"], beta=0.3, lambda_align=lambda_align, lambda_budget=lambda_budget,
                  rho=0.5, **sides)
    exact = solve_weight(case["anchor"], case["experts"], case["fishers"], **common)
    iterative = solve_weight(case["anchor"], case["experts"], case["fishers"], one_sided_closed_form=False,
                             tol=1e-10, **common)
    assert exact.stats.method == "woodbury" and exact.stats.cg_iterations == 0
    assert iterative.stats.method == "cg"
    assert float((exact.delta - iterative.delta).norm() / iterative.delta.norm()) < 1e-5
    if lambda_budget:  # (the KKT residual with μ re-evaluated is ill-conditioned for λ_bud → ∞)
        assert exact.stats.p_sqnorm <= exact.stats.budget * (1 + 1e-3)
        assert exact.stats.p_sqnorm >= exact.stats.budget * (1 - 1e-3)
    else:
        assert exact.stats.kkt_residual < 1e-10


def test_bf16_weights_and_fishers_are_accepted():
    case = make_case(m=50, n=41, r=6, seed=15, dtype=torch.bfloat16)
    res = solve_weight(case["anchor"], case["experts"], case["fishers"], u=case["u"].bfloat16(),
                       v=case["v"].bfloat16(), f_align=case["f_align"], lambda_align=2.0, fp64_max_numel=0)
    assert res.delta.dtype == torch.float32 and torch.isfinite(res.delta).all()
    assert res.stats.dtype == "float32" and res.stats.kkt_residual < 1e-4
    assert 0.0 < res.stats.drift < 1.0


def test_anchor_fisher_term_and_raw_fishers():
    case = make_case(seed=16)
    gen = torch.Generator().manual_seed(17)
    f_anchor = torch.rand(case["anchor"].shape, generator=gen) * 1e-6
    weights = [0.5, 0.3, 0.2]
    res = solve_weight(case["anchor"], case["experts"], case["fishers"], weights=weights, anchor_fisher=f_anchor,
                       anchor_weight=0.7)
    anchor = case["anchor"].double()
    norm = [f.double() / f.double().mean() for f in case["fishers"]]
    num = sum(w * f * (t.double() - anchor) for w, f, t in zip(weights, norm, case["experts"]))
    den = sum(w * f for w, f in zip(weights, norm)) + 0.7 * f_anchor.double() / f_anchor.double().mean()
    assert float((res.delta.double() - num / den).abs().max()) < 1e-7
    raw = solve_weight(case["anchor"], case["experts"], case["fishers"], weights=weights, normalize_fishers=False)
    num = sum(w * f.double() * (t.double() - anchor) for w, f, t in zip(weights, case["fishers"], case["experts"]))
    den = sum(w * f.double() for w, f in zip(weights, case["fishers"]))
    assert float((raw.delta.double() - num / den).abs().max()) < 1e-7
