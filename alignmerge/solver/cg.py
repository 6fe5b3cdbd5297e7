"""Preconditioned conjugate gradients on (D + μP) x = b with the fused single-pass step.

Each iteration is ONE call of ``ops.projector.cg_step`` (read x, r, p, D; write x, r, p). It works
because everything the step needs about the new direction p_k = z_k + β p_{k-1} follows from the
previous step's reductions by linearity:

    Uᵀp_k = Uᵀz_k + β Uᵀp_{k-1},   p_k V = z_k V + β p_{k-1} V,
    ⟨p_k, D p_k⟩ = ⟨z,Dz⟩ + 2β⟨z,Dp_{k-1}⟩ + β²⟨p_{k-1},Dp_{k-1}⟩,
    ‖P p_k‖² = ‖Uᵀp_k‖² + ‖p_k V‖² − ‖Uᵀp_k V‖²,   α = ⟨r,z⟩ / (⟨p,Dp⟩ + μ‖Pp‖²).

The recurrences drift in finite precision, so on exit the TRUE residual b − (D + μP)x is computed
and CG restarts from x if it is above tolerance (at most ``max_restarts`` times).
Preconditioner: M = D + μ·diag(P) (Jacobi by the operator's diagonal), or D alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alignmerge.ops import projector as ops


@dataclass
class CGResult:
    x: torch.Tensor
    iterations: int
    residual: float
    """True relative residual ‖b − (D + μP)x‖ / ‖b‖ at exit."""
    converged: bool


def _precond(d, u, v, precond_mu):
    if precond_mu == 0.0:
        return d
    from alignmerge.ops.reference import projector_diagonal_reference

    m, n = d.shape
    return d + precond_mu * projector_diagonal_reference(m, n, u, v, d.dtype).to(d.device)


def solve_pcg(b: torch.Tensor, d: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None, mu: float, *,
              x0: torch.Tensor | None = None, tol: float = 1e-6, max_iter: int = 500, max_restarts: int = 3,
              jacobi_projector: bool = True, backend: str | None = None) -> CGResult:
    """Solve (D⊙X + μP(X)) = b for X; D > 0 elementwise, P the projector of (u, v).

    ``b``, ``d`` (and ``x0``) share one float dtype (fp32 or fp64) and device; returns x in it.
    """
    dtype = b.dtype
    u_ = None if u is None else u.to(dtype).contiguous()
    v_ = None if v is None else v.to(dtype).contiguous()
    b = b.contiguous()
    d = d.contiguous()
    bnorm = _norm(b)
    x = torch.zeros_like(b) if x0 is None else x0.to(dtype).contiguous().clone()
    if bnorm == 0.0:
        return CGResult(torch.zeros_like(b), 0, 0.0, True)
    precond_mu = mu if jacobi_projector else 0.0
    iterations = 0
    r = (b - ops.apply_operator(x, d, u_, v_, mu, backend=backend).to(dtype)).contiguous()
    residual = _norm(r) / bnorm
    previous = math.inf
    for _ in range(max_restarts + 1):
        if residual <= tol or iterations >= max_iter or not math.isfinite(residual):
            break
        if residual > 0.5 * previous:
            break  # a restart no longer helps: rounding-level accuracy reached
        previous = residual
        z = r / _precond(d, u_, v_, precond_mu)
        rz = float(torch.dot(r.view(-1), z.view(-1)))
        zdz = float(torch.dot((d * z).view(-1), z.view(-1)))
        uz, zv = ops.project_factors(z, u_, v_, backend=backend)
        del z
        p = torch.zeros_like(b)
        ap = bp = None
        zdp = pdp = 0.0
        beta = 0.0
        while iterations < max_iter:
            ap = uz if ap is None or uz is None else uz + beta * ap
            bp = zv if bp is None or zv is None else zv + beta * bp
            pdp = zdz + 2.0 * beta * zdp + beta * beta * pdp
            ppp = float(ops.projection_sqnorm(ap, bp, u_))
            denom = pdp + mu * ppp
            if not denom > 0.0:
                break
            alpha = rz / denom
            a, g = ops.lowrank_terms(ap, bp, u_)
            sums, uz, zv = ops.cg_step(x, r, p, d, u_, v_, a, g, alpha=alpha, beta=beta, mu=mu,
                                       precond_mu=precond_mu, backend=backend)
            iterations += 1
            rz_new, zdz, zdp, pdp, rr = (float(s) for s in sums)
            if not math.isfinite(rr) or math.sqrt(max(rr, 0.0)) <= tol * bnorm or rz_new <= 0.0:
                break
            beta = rz_new / rz
            rz = rz_new
        r = (b - ops.apply_operator(x, d, u_, v_, mu, backend=backend).to(dtype)).contiguous()
        residual = _norm(r) / bnorm
    return CGResult(x, iterations, residual, residual <= max(tol, attainable_residual(x, d, mu, bnorm)))


def _norm(t: torch.Tensor) -> float:
    """‖t‖_F in t's precision (torch's scaled reduction; no fp64 copy of a big matrix)."""
    return float(torch.linalg.vector_norm(t))


def attainable_residual(x: torch.Tensor, d: torch.Tensor, mu: float, bnorm: float) -> float:
    """Relative residual that rounding alone leaves in x's precision: ~2·eps·(max D + μ)‖x‖/‖b‖.

    A tol below it (e.g. 1e-6 in fp32 with μ ≫ D) cannot be reached; the effective tolerance is the
    larger of the two, so ``converged`` means "as accurate as the working precision allows".
    """
    eps = torch.finfo(x.dtype).eps
    return 2.0 * eps * (float(d.max()) + abs(mu)) * _norm(x) / bnorm

