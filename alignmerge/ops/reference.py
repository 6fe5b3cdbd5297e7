"""Torch reference implementations of the hot ops: the test oracles and last-resort fallbacks."""
from __future__ import annotations

import torch


# --- fisher ---
def fisher_accumulate_reference(out: torch.Tensor, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """out[o,i] += sum_n (sum_t g[n,t,o] a[n,t,i])^2: materialise every per-sample gradient
    G_n = g_n^T a_n in fp32, square, sum over n (the oracle for alignmerge.ops.fisher)."""
    per_sample = torch.einsum("nto,nti->noi", g.float(), a.float())
    out.add_(per_sample.square().sum(0))
    return out


# --- projector ---
# P(X) = U Uᵀ X + X V Vᵀ − U Uᵀ X V Vᵀ for orthonormal U (out×r), V (in×r); one-sided forms with one
# of them None. Plain, unfused torch: the oracle for alignmerge/ops/projector.py. Math in fp32 (fp64
# inputs stay fp64).


def _projector_compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def project_factors_reference(x, u=None, v=None):
    """(Uᵀ X, X V) in the compute dtype; an entry is None where its side is absent."""
    dt = _projector_compute_dtype(x)
    xf = x.to(dt)
    ux = u.to(dt).T @ xf if u is not None else None
    xv = xf @ v.to(dt) if v is not None else None
    return ux, xv


def project_reference(x, u=None, v=None):
    """P(X) in x's dtype: U(UᵀX) + (XV)Vᵀ − U(UᵀXV)Vᵀ."""
    dt = _projector_compute_dtype(x)
    xf = x.to(dt)
    out = torch.zeros_like(xf)
    if u is not None:
        uf = u.to(dt)
        out += uf @ (uf.T @ xf)
    if v is not None:
        vf = v.to(dt)
        out += (xf @ vf) @ vf.T
    if u is not None and v is not None:
        out -= uf @ (uf.T @ xf @ vf) @ vf.T
    return out.to(x.dtype)


def projector_diagonal_reference(m, n, u=None, v=None, dtype=torch.float32):
    """diag(P) as an m×n matrix: a_i + b_j − a_i b_j with a = ‖U_i‖², b = ‖V_j‖²."""
    a = (u.to(dtype) ** 2).sum(1) if u is not None else torch.zeros(m, dtype=dtype)
    b = (v.to(dtype) ** 2).sum(1) if v is not None else torch.zeros(n, dtype=dtype)
    return a[:, None] + b[None, :] - a[:, None] * b[None, :]


def apply_operator_reference(x, d, u=None, v=None, mu=1.0):
    """Y = D⊙X + μ·P(X) (the solver's normal-equation operator), in the compute dtype."""
    dt = _projector_compute_dtype(x)
    return d.to(dt) * x.to(dt) + mu * project_reference(x.to(dt), u, v)


def cg_step_reference(x, r, p, d, u=None, v=None, *, alpha, beta, mu, precond_mu=0.0):
    """One preconditioned-CG step with the next direction formed in place (see ops.projector.cg_step).

    M = D + precond_mu·diag(P); z = r/M; p ← z + βp; q = D⊙p + μP(p); x ← x + αp; r ← r − αq;
    z' = r/M. Updates x, r, p in place and returns the reductions
    (⟨r,z'⟩, ⟨z',Dz'⟩, ⟨z',Dp⟩, ⟨p,Dp⟩, ⟨r,r⟩) as a tensor plus Uᵀz' and z'V.
    """
    dt = x.dtype
    m, n = x.shape
    precond = d.to(dt)
    if precond_mu != 0.0 and (u is not None or v is not None):
        precond = precond + precond_mu * projector_diagonal_reference(m, n, u, v, dt)
    z = r / precond
    p.mul_(beta).add_(z)
    q = apply_operator_reference(p, d, u, v, mu).to(dt)
    x.add_(p, alpha=alpha)
    r.sub_(alpha * q)
    z = r / precond
    dd = d.to(dt)
    sums = torch.stack([(r * z).sum(), (z * dd * z).sum(), (z * dd * p).sum(), (p * dd * p).sum(), (r * r).sum()])
    uz, zv = project_factors_reference(z, u, v)
    return sums, uz, zv
