"""Projector ops: P is an orthogonal projector, and every fast path matches the torch reference."""
import pytest
import torch

from alignmerge.ops import projector as ops
from alignmerge.ops import reference

SIDES = ["both", "u", "v"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(params=["cpp", "cpp-blocked", "triton"])
def backend(request, monkeypatch):
    """Every fast path: the C++ kernels, the blocked-torch CPU stand-in (used when alignmerge._C is
    not built), and Triton (interpreted on CPU tensors)."""
    if request.param == "cpp-blocked":
        monkeypatch.setattr(ops, "cpp_extension", lambda: None)
        return "cpp"
    return request.param


def orthonormal(rows, r, gen):
    return torch.linalg.qr(torch.randn(rows, r, generator=gen, dtype=torch.float64))[0]


def factors(m, n, r, sides, seed):
    gen = torch.Generator().manual_seed(seed)
    u = orthonormal(m, r, gen) if sides in ("both", "u") else None
    v = orthonormal(n, r, gen) if sides in ("both", "v") else None
    return u, v, gen


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("sides", SIDES)
def test_projector_is_idempotent_and_symmetric(sides):
    u, v, gen = factors(29, 41, 6, sides, seed=1)
    x = torch.randn(29, 41, generator=gen, dtype=torch.float64)
    y = torch.randn(29, 41, generator=gen, dtype=torch.float64)
    px = reference.project_reference(x, u, v)
    assert rel(reference.project_reference(px, u, v), px) < 1e-12
    lhs = (px * y).sum()
    rhs = (x * reference.project_reference(y, u, v)).sum()
    assert abs(float(lhs - rhs)) < 1e-12 * float(x.norm() * y.norm())
    # not the identity and not zero: a genuine rank-deficient projector
    assert 0.05 < float(px.norm() / x.norm()) < 0.95
    # ‖P x‖² from the factors alone
    assert abs(float(ops.projection_sqnorm(*reference.project_factors_reference(x, u, v), u))
               - float(px.square().sum())) < 1e-10 * float(px.square().sum())


@pytest.mark.parametrize("sides", SIDES)
def test_fast_projector_is_idempotent_and_symmetric(backend, sides):
    u, v, gen = factors(37, 53, 5, sides, seed=2)
    x = torch.randn(37, 53, generator=gen)
    y = torch.randn(37, 53, generator=gen)
    px = ops.project(x, u, v, backend=backend)
    assert rel(ops.project(px, u, v, backend=backend), px) < 1e-5
    lhs = float((px.double() * y.double()).sum())
    rhs = float((x.double() * ops.project(y, u, v, backend=backend).double()).sum())
    assert abs(lhs - rhs) < 1e-5 * float(x.norm() * y.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("shape", [(37, 53, 5), (70, 19, 3), (17, 131, 12), (40, 29, 20)])
def test_project_matches_reference(backend, dtype, sides, shape):
    m, n, r = shape
    u, v, gen = factors(m, n, r, sides, seed=m * 1000 + n + r)
    x = (torch.randn(m, n, generator=gen) * 3.0).to(dtype)
    want = reference.project_reference(x, u, v)
    got = ops.project(x, u, v, backend=backend)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.isfinite(got).all()
    assert rel(got, want) <= TOL[dtype]
    ux, xv = ops.project_factors(x, u, v, backend=backend)
    ux_ref, xv_ref = reference.project_factors_reference(x, u, v)
    for got_f, want_f in ((ux, ux_ref), (xv, xv_ref)):
        assert (got_f is None) == (want_f is None)
        if got_f is not None:
            assert rel(got_f, want_f) <= 1e-5


def test_project_accepts_row_strided_input(backend):
    u, v, gen = factors(33, 47, 4, "both", seed=5)
    big = torch.randn(33, 60, generator=gen)
    x = big[:, 5:52]
    assert not x.is_contiguous()
    assert rel(ops.project(x, u, v, backend=backend), reference.project_reference(x, u, v)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sides", SIDES)
def test_apply_operator_matches_reference(backend, dtype, sides):
    u, v, gen = factors(45, 38, 7, sides, seed=11)
    x = torch.randn(45, 38, generator=gen).to(dtype)
    d = (torch.rand(45, 38, generator=gen) + 0.1).to(dtype)
    want = reference.apply_operator_reference(x, d, u, v, 2.75)
    got = ops.apply_operator(x, d, u, v, 2.75, backend=backend)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert rel(got, want) <= 1e-5  # fp32 output from the same bf16 inputs


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("precond_mu", [0.0, 1.3])
def test_cg_step_matches_reference(backend, sides, precond_mu):
    m, n, r = 41, 67, 6
    u, v, gen = factors(m, n, r, sides, seed=21)
    x0, r0, p0 = (torch.randn(m, n, generator=gen) for _ in range(3))
    d = torch.rand(m, n, generator=gen) + 0.2
    alpha, beta, mu = 0.37, 0.61, 2.2
    # (a, g) of the new direction p = z + βp, which the solver gets from the previous reductions
    precond = d.double() + precond_mu * reference.projector_diagonal_reference(m, n, u, v, torch.float64)
    p_new = (r0.double() / precond + beta * p0.double()).float()
    a, g = ops.lowrank_terms(*reference.project_factors_reference(p_new, u, v), u)
    results = {}
    for be in ("torch", backend):
        state = [t.clone() for t in (x0, r0, p0)]
        sums, uz, zv = ops.cg_step(*state, d, u, v, a, g, alpha=alpha, beta=beta, mu=mu,
                                   precond_mu=precond_mu, backend=be)
        results[be] = (*state, uz, zv, sums)
    for got, want in zip(results[backend], results["torch"]):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.isfinite(got).all()
            assert rel(got, want) <= 1e-5


def test_backend_rules():
    x = torch.randn(8, 9)
    u, v, _ = factors(8, 9, 2, "both", seed=3)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.project(x, u, v, backend="cuda")
    with pytest.raises(ValueError, match="u must be"):
        ops.project(x, v, None)
    with pytest.raises(ValueError, match="needs u, v or both"):
        ops.project(x)
    # fp64 inputs run the reference whatever the backend
    xd = x.double()
    assert ops.project(xd, u, v, backend="cpp").dtype == torch.float64
    assert ops.project(xd, u, v).dtype == torch.float64
    assert ops.apply_operator(xd, xd.abs(), u, v, 2.0).dtype == torch.float64


def test_triton_partial_sums_across_many_programs():
    """Small tiles force several programs along both axes (partial UᵀX / XV sums, row steps, masks)."""
    tk = ops._triton_kernels()
    m, n, r = 45, 70, 5
    u, v, gen = factors(m, n, r, "both", seed=31)
    u32, v32 = u.float().contiguous(), v.float().contiguous()
    tiles = dict(block_m=16, block_n=32, row_steps=2)
    x = torch.randn(m, n, generator=gen)
    ux, xv = tk.project_factors(x, u32, v32, **tiles)
    ux_ref, xv_ref = reference.project_factors_reference(x, u, v)
    assert rel(ux, ux_ref) <= 1e-5 and rel(xv, xv_ref) <= 1e-5
    d = torch.rand(m, n, generator=gen) + 0.3
    x0, r0, p0 = (torch.randn(m, n, generator=gen) for _ in range(3))
    p_new = r0 / d  # β = 0, no diag(P) in the preconditioner: the step's new direction is r/D
    a, g = ops.lowrank_terms(*reference.project_factors_reference(p_new, u, v), u)
    state = [t.clone() for t in (x0, r0, p0)]
    got = tk.cg_step(*state, d, u32, a.float(), g.float(), v32, alpha=0.2, beta=0.0, mu=1.5, precond_mu=0.0,
                     **tiles)
    want_state = [t.clone() for t in (x0, r0, p0)]
    want = reference.cg_step_reference(*want_state, d, u, v, alpha=0.2, beta=0.0, mu=1.5)
    for got_t, want_t in zip((*state, got[1], got[2]), (*want_state, want[1], want[2])):
        assert rel(got_t, want_t) <= 1e-5
    assert rel(got[0], want[0]) <= 1e-5
