"""Alignment-subspace projector ops: P(X) = UUᵀX + XVVᵀ − UUᵀXVVᵀ and the solver's fused operator.

Public ops (each takes ``backend``: "torch" | "cpp" | "triton" | None, see ``_backend.choose_backend``):

- ``project(x, u=None, v=None)``: P(X) (one-sided with u or v None), in x's dtype, fp32 accumulation.
- ``project_factors(x, u=None, v=None)``: (UᵀX, XV) in fp32, from one read of X.
- ``projection_sqnorm(ux, xv, u)``: ‖P(X)‖²_F = ‖UᵀX‖² + ‖XV‖² − ‖UᵀXV‖² from the factors alone.
- ``apply_operator(x, d, u, v, mu)``: Y = D⊙X + μP(X) (the normal-equation operator), fp32.
- ``cg_step(x, r, p, d, u, v, a, g, alpha=, beta=, mu=, precond_mu=)``: one preconditioned-CG iteration
  that reads x, r, p, D once and writes x, r, p once, where (a, g) give P(p_new) = U a + g Vᵀ
  (``lowrank_terms``); returns the reductions for the next iteration.

Backends: "torch" is the plain reference (alignmerge/ops/reference.py). "triton" runs
kernels/projector.py (CUDA, or CPU under TRITON_INTERPRET=1). "cpp" is the CPU fast path:
csrc/projector_ops.cpp (alignmerge._C: one OpenMP region per pass, rows streamed in column chunks,
rank-r panels in cache); if the extension is not built, a blocked torch-matmul path (rank-r GEMMs on
cache-sized row blocks) stands in for it. benchmarks/projector_solve.py times both.
"""
from __future__ import annotations

import os

import torch

from alignmerge.ops import reference
from alignmerge.ops._backend import BACKENDS, cpp_extension, dtype_code, triton_available, triton_interpreted

CPU_BLOCK_ELEMENTS = 1 << 17
"""Elements per row block of the CPU path (≈512 KiB of fp32 per temporary: stays in L2)."""


def _backend(x: torch.Tensor, backend: str | None) -> str:
    """choose_backend's rules, except that "cpp" also works without alignmerge._C (blocked torch then)
    and fp64 tensors always take the reference."""
    requested = backend or os.environ.get("ALIGNMERGE_BACKEND") or None
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if x.dtype == torch.float64:
        return "torch"  # the fast paths are fp32; fp64 (small tensors) runs the reference
    triton_ok = triton_available() and (x.device.type == "cuda" or triton_interpreted())
    if requested is None:
        if x.device.type == "cuda" and triton_ok:
            return "triton"
        return "cpp" if x.device.type == "cpu" else "torch"
    if requested == "cpp" and x.device.type != "cpu":
        raise RuntimeError(f"backend 'cpp' is not available for {x.device.type} tensors")
    if requested == "triton" and not triton_ok:
        raise RuntimeError(f"backend 'triton' is not available for {x.device.type} tensors "
                           "(needs CUDA, or TRITON_INTERPRET=1 for CPU tensors)")
    return requested


def _check(x: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None, what: str = "x"):
    if x.dim() != 2:
        raise ValueError(f"{what} must be 2-D, got shape {tuple(x.shape)}")
    if u is None and v is None:
        raise ValueError("the projector needs u, v or both")
    m, n = x.shape
    if u is not None and (u.dim() != 2 or u.shape[0] != m):
        raise ValueError(f"u must be ({m}, r) for {what} of shape {(m, n)}, got {tuple(u.shape)}")
    if v is not None and (v.dim() != 2 or v.shape[0] != n):
        raise ValueError(f"v must be ({n}, r) for {what} of shape {(m, n)}, got {tuple(v.shape)}")
    if u is not None and v is not None and u.shape[1] != v.shape[1]:
        raise ValueError(f"u and v must have the same rank, got {u.shape[1]} and {v.shape[1]}")


def _triton_kernels():
    try:
        from alignmerge.kernels import projector
    except ImportError:  # a source checkout that is not installed: kernels/ is top level
        from kernels import projector
    return projector


def _thin(t: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


# ---------------------------------------------------------------------------------------------
# projector


def project_factors(x: torch.Tensor, u: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
                    backend: str | None = None):
    """(UᵀX (r×in), XV (out×r)) in fp32 (fp64 for fp64 x); None where the side is absent."""
    _check(x, u, v)
    be = _backend(x, backend)
    if be == "torch":
        return reference.project_factors_reference(x, u, v)
    if be == "triton":
        tk = _triton_kernels()
        return tk.project_factors(_rowmajor(x), _thin(u), _thin(v))
    return _cpu_factors(_rowmajor(x), _thin(u), _thin(v))


def projection_sqnorm(ux: torch.Tensor | None, xv: torch.Tensor | None, u: torch.Tensor | None) -> torch.Tensor:
    """‖P(X)‖²_F from the factors: ‖UᵀX‖² + ‖XV‖² − ‖UᵀXV‖² (orthonormal U, V)."""
    total = torch.zeros((), dtype=torch.float64, device=(ux if ux is not None else xv).device)
    if ux is not None:
        total = total + ux.double().square().sum()
    if xv is not None:
        total = total + xv.double().square().sum()
    if ux is not None and xv is not None:
        total = total - (u.to(xv.dtype).T @ xv).double().square().sum()
    return total


def lowrank_terms(ux: torch.Tensor | None, xv: torch.Tensor | None, u: torch.Tensor | None):
    """(A, G) with P(X) = U A + G Vᵀ: A = UᵀX, G = XV − U(UᵀXV) (G = XV when U is absent)."""
    if ux is not None and xv is not None:
        uf = u.to(xv.dtype)
        return ux, (xv - uf @ (uf.T @ xv)).contiguous()
    return ux, xv


def project(x: torch.Tensor, u: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
            backend: str | None = None) -> torch.Tensor:
    """P(X) = UUᵀX + XVVᵀ − UUᵀXVVᵀ (or UUᵀX, XVVᵀ one-sided) in x's dtype, fp32 accumulation."""
    _check(x, u, v)
    be = _backend(x, backend)
    if be == "torch":
        return reference.project_reference(x, u, v)
    u32, v32 = _thin(u), _thin(v)
    a, g = lowrank_terms(*project_factors(x, u32, v32, backend=be), u32)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if be == "triton":
        tk = _triton_kernels()
        return tk.lowrank_apply(x, None, u32, a, g, v32, 1.0, out)
    return _cpu_lowrank_apply(x, None, u32, a, g, v32, 1.0, out)


def apply_operator(x: torch.Tensor, d: torch.Tensor, u: torch.Tensor | None = None,
                   v: torch.Tensor | None = None, mu: float = 1.0, *, backend: str | None = None) -> torch.Tensor:
    """Y = D⊙X + μ·P(X) in fp32 (fp64 for fp64 x): two reads of X, one of D, one write."""
    _check(x, u, v)
    if d.shape != x.shape:
        raise ValueError(f"d must have x's shape {tuple(x.shape)}, got {tuple(d.shape)}")
    be = _backend(x, backend)
    if be == "torch":
        return reference.apply_operator_reference(x, d, u, v, mu)
    u32, v32 = _thin(u), _thin(v)
    a, g = lowrank_terms(*project_factors(x, u32, v32, backend=be), u32)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if be == "triton":
        tk = _triton_kernels()
        return tk.lowrank_apply(_rowmajor(x), _rowmajor(d), u32, a, g, v32, mu, out)
    return _cpu_lowrank_apply(x, d, u32, a, g, v32, mu, out)


def cg_step(x: torch.Tensor, r: torch.Tensor, p: torch.Tensor, d: torch.Tensor, u: torch.Tensor | None,
            v: torch.Tensor | None, a: torch.Tensor | None, g: torch.Tensor | None, *, alpha: float, beta: float,
            mu: float, precond_mu: float = 0.0, backend: str | None = None):
    """One fused preconditioned-CG iteration on the operator D⊙X + μP(X), in place on x, r, p.

    M = D + precond_mu·diag(P); z = r/M; p ← z + βp; q = D⊙p + μ(U a + g Vᵀ) (the caller passes
    (a, g) = lowrank_terms of the NEW p, known from the previous step's reductions by linearity);
    x ← x + αp; r ← r − αq; z' = r/M. Returns (sums, Uᵀz', z'V) with sums (float64, 5) =
    (⟨r,z'⟩, ⟨z',Dz'⟩, ⟨z',Dp⟩, ⟨p,Dp⟩, ⟨r,r⟩). x, r, p, d: contiguous, same dtype (fp32; fp64 → torch).
    """
    _check(x, u, v)
    for name, t in (("r", r), ("p", p), ("d", d)):
        if t.shape != x.shape or t.dtype != x.dtype or not t.is_contiguous():
            raise ValueError(f"cg_step: {name} must be contiguous {x.dtype} of shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("cg_step: x must be contiguous")
    be = _backend(x, backend)
    if be == "torch":
        sums, uz, zv = _reference_cg_step(x, r, p, d, _thin(u, x.dtype), _thin(v, x.dtype), a, g,
                                          alpha, beta, mu, precond_mu)
        return sums.double(), uz, zv
    if x.dtype != torch.float32:
        raise ValueError(f"cg_step: the {be} path needs float32 state, got {x.dtype}")
    u32, v32 = _thin(u), _thin(v)
    a32, g32 = _thin(a), _thin(g)
    if be == "triton":
        tk = _triton_kernels()
        return tk.cg_step(x, r, p, d, u32, a32, g32, v32, alpha=alpha, beta=beta, mu=mu, precond_mu=precond_mu)
    return _cpu_cg_step(x, r, p, d, u32, a32, g32, v32, alpha, beta, mu, precond_mu)


def _reference_cg_step(x, r, p, d, u, v, a, g, alpha, beta, mu, precond_mu):
    """The reference step recomputes P(p) from p itself; (a, g) only matter to the fused paths."""
    del a, g
    return reference.cg_step_reference(x, r, p, d, u, v, alpha=alpha, beta=beta, mu=mu, precond_mu=precond_mu)


# ---------------------------------------------------------------------------------------------
# CPU path: the C++ kernels when alignmerge._C is built, else blocked torch.


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cpu_factors(x, u, v):
    ext = cpp_extension()
    if ext is None:
        return _blocked_factors(x, u, v)
    m, n = x.shape
    r = (u if u is not None else v).shape[1]
    ux = torch.empty((r, n), dtype=torch.float32) if u is not None else None
    xv = torch.empty((m, r), dtype=torch.float32) if v is not None else None
    vt = v.T.contiguous() if v is not None else None
    ext.projector_factors(x.data_ptr(), dtype_code(x), m, n, x.stride(0), _ptr(u), _ptr(vt), r, _ptr(ux), _ptr(xv))
    return ux, xv


def _cpu_lowrank_apply(x, d, u, a, g, v, mu, out):
    ext = cpp_extension()
    if ext is None:
        return _blocked_lowrank_apply(x, d, u, a, g, v, mu, out)
    m, n = out.shape
    r = (u if u is not None else v).shape[1]
    x = _rowmajor(x)
    d = _rowmajor(d) if d is not None else None
    vt = v.T.contiguous() if v is not None else None
    ext.projector_apply(x.data_ptr(), dtype_code(x), x.stride(0), _ptr(d), dtype_code(d) if d is not None else 0,
                        d.stride(0) if d is not None else 0, _ptr(u), _ptr(a), _ptr(g), _ptr(vt), float(mu),
                        out.data_ptr(), dtype_code(out), out.stride(0), m, n, r)
    return out


def _cpu_cg_step(x, r, p, d, u, a, g, v, alpha, beta, mu, precond_mu):
    ext = cpp_extension()
    if ext is None:
        return _blocked_cg_step(x, r, p, d, u, a, g, v, alpha, beta, mu, precond_mu)
    m, n = x.shape
    rank = (u if u is not None else v).shape[1]
    vt = v.T.contiguous() if v is not None else None
    sums = torch.empty(5, dtype=torch.float64)
    uz = torch.empty((rank, n), dtype=torch.float32) if u is not None else None
    zv = torch.empty((m, rank), dtype=torch.float32) if v is not None else None
    ext.projector_cg_step(x.data_ptr(), r.data_ptr(), p.data_ptr(), d.data_ptr(), _ptr(u), _ptr(a), _ptr(g),
                          _ptr(vt), m, n, rank, float(alpha), float(beta), float(mu), float(precond_mu),
                          sums.data_ptr(), _ptr(uz), _ptr(zv))
    return sums, uz, zv


# Blocked torch stand-in: row blocks small enough to stay in cache; rank-r products through BLAS.


def _row_block(n: int) -> int:
    return max(1, CPU_BLOCK_ELEMENTS // max(n, 1))


def _blocked_factors(x, u, v):
    m, n = x.shape
    r = (u if u is not None else v).shape[1]
    ux = torch.zeros((r, n), dtype=torch.float32) if u is not None else None
    xv = torch.empty((m, r), dtype=torch.float32) if v is not None else None
    step = _row_block(n)
    for i0 in range(0, m, step):
        xb = x[i0:i0 + step].to(torch.float32)
        if u is not None:
            ux.addmm_(u[i0:i0 + step].T, xb)
        if v is not None:
            torch.mm(xb, v, out=xv[i0:i0 + step])
    return ux, xv


def _blocked_lowrank_apply(x, d, u, a, g, v, mu, out):
    m, n = out.shape
    step = _row_block(n)
    vt = v.T.contiguous() if v is not None else None
    buf = torch.empty((min(step, m), n), dtype=torch.float32)
    for i0 in range(0, m, step):
        i1 = min(i0 + step, m)
        yb = buf[: i1 - i0]
        if d is not None:
            torch.mul(d[i0:i1].to(torch.float32), x[i0:i1].to(torch.float32), out=yb)
        else:
            yb.zero_()
        if u is not None:
            yb.addmm_(u[i0:i1], a, alpha=mu)
        if v is not None:
            yb.addmm_(g[i0:i1], vt, alpha=mu)
        out[i0:i1].copy_(yb)
    return out


def _blocked_cg_step(x, r, p, d, u, a, g, v, alpha, beta, mu, precond_mu):
    m, n = x.shape
    rank = (u if u is not None else v).shape[1]
    step = _row_block(n)
    vt = v.T.contiguous() if v is not None else None
    b_sq = (v * v).sum(1) if v is not None else None
    a_sq = (u * u).sum(1) if u is not None else None
    use_diag = precond_mu != 0.0
    uz = torch.zeros((rank, n), dtype=torch.float32) if u is not None else None
    zv = torch.empty((m, rank), dtype=torch.float32) if v is not None else None
    sums = torch.zeros(5, dtype=torch.float64)
    rows = min(step, m)
    precond_buf = torch.empty((rows, n), dtype=torch.float32)
    z_buf = torch.empty((rows, n), dtype=torch.float32)
    q_buf = torch.empty((rows, n), dtype=torch.float32)
    for i0 in range(0, m, step):
        i1 = min(i0 + step, m)
        xb, rb, pb, db = x[i0:i1], r[i0:i1], p[i0:i1], d[i0:i1]
        if use_diag:
            precond = precond_buf[: i1 - i0]
            _diag_block(a_sq[i0:i1] if a_sq is not None else None, b_sq, precond)
            precond.mul_(precond_mu).add_(db)
        else:
            precond = db
        z = z_buf[: i1 - i0]
        q = q_buf[: i1 - i0]
        torch.div(rb, precond, out=z)
        pb.mul_(beta).add_(z)
        torch.mul(db, pb, out=q)
        if u is not None:
            q.addmm_(u[i0:i1], a, alpha=mu)
        if v is not None:
            q.addmm_(g[i0:i1], vt, alpha=mu)
        xb.add_(pb, alpha=alpha)
        rb.sub_(q, alpha=alpha)
        torch.div(rb, precond, out=z)
        zf, rf, pf = z.view(-1), rb.view(-1), pb.view(-1)
        torch.mul(db, z, out=q)  # q now holds D⊙z'
        qf = q.view(-1)
        sums += torch.stack([torch.dot(rf, zf), torch.dot(qf, zf), torch.dot(qf, pf),
                             torch.dot(pf * db.view(-1), pf), torch.dot(rf, rf)]).double()
        if u is not None:
            uz.addmm_(u[i0:i1].T, z)
        if v is not None:
            torch.mm(z, v, out=zv[i0:i1])
    return sums, uz, zv


def _diag_block(a_sq, b_sq, out):
    """out = diag(P) on a row block: a_i + b_j − a_i b_j."""
    if a_sq is None:
        out.copy_(b_sq.expand_as(out))
    elif b_sq is None:
        out.copy_(a_sq[:, None].expand_as(out))
    else:
        torch.outer(a_sq, 1.0 - b_sq, out=out)
        out.add_(b_sq)
