"""Triton kernels for the alignment-subspace projector and the solver's fused CG step.

P(X) = U Uᵀ X + X V Vᵀ − U Uᵀ X V Vᵀ = U A + G Vᵀ with A = UᵀX (r×in) and G = XV − U(UᵀXV) (out×r).
Every kernel walks the big out×in matrix in BM×BN tiles (pointer arithmetic, any storage dtype
loaded and converted to fp32, fp32 accumulation) and touches the small factors (rank r padded to
R ≥ 16 for ``tl.dot``) only through masked loads:

- ``_factors_kernel``: one read of X → per-program partial sums of UᵀX and XV (deterministic; the
  launcher sums them). Each program walks ROW_STEPS row tiles so the UᵀX partials stay small.
- ``_lowrank_apply_kernel``: Y = D⊙X + μ(U A + G Vᵀ) in one pass (D optional: the projector itself).
- ``_cg_step_kernel``: one preconditioned-CG iteration in ONE read of x, r, p, D and one write of
  x, r, p: z = r/M, p ← z + βp, q = D⊙p + μ(U A_p + G_p Vᵀ), x ← x + αp, r ← r − αq, z' = r/M, plus
  the reductions the next iteration needs (⟨r,z'⟩, ⟨z',Dz'⟩, ⟨z',Dp⟩, ⟨p,Dp⟩, ⟨r,r⟩, Uᵀz', z'V).
  M = D + μ_M·diag(P), diag(P)_ij = a_i + b_j − a_i b_j with a = ‖U_i‖², b = ‖V_j‖² (from the tiles).

Dots run in IEEE fp32 (``DOT_PRECISION``) so fp32 results match the reference to ~1e-6; the
interpreter (TRITON_INTERPRET=1) runs the same code on CPU tensors. The block sizes and warp count
are first guesses for a GPU: so far the kernels are validated under the interpreter only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK_M = 32
DEFAULT_BLOCK_N = 128
DEFAULT_ROW_STEPS = 8
DEFAULT_NUM_WARPS = 8


def _padded_rank(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))


@triton.jit
def _load_tile(ptr, rows, cols, m, n, stride_m):
    mask = (rows[:, None] < m) & (cols[None, :] < n)
    return tl.load(ptr + rows[:, None] * stride_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_thin(ptr, rows, ks, m, r):
    """Rows ``rows`` of a contiguous fp32 (m × r) matrix, zero-padded to R columns."""
    mask = (rows[:, None] < m) & (ks[None, :] < r)
    return tl.load(ptr + rows[:, None] * r + ks[None, :], mask=mask, other=0.0)


@triton.jit
def _load_wide(ptr, ks, cols, r, n):
    """Columns ``cols`` of a contiguous fp32 (r × n) matrix, zero-padded to R rows."""
    mask = (ks[:, None] < r) & (cols[None, :] < n)
    return tl.load(ptr + ks[:, None] * n + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _bf16_rne(y):
    """fp32 → bf16 with round-to-nearest-even done on the bits (the interpreter's cast truncates)."""
    bits = y.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _factors_kernel(x_ptr, u_ptr, v_ptr, ux_part_ptr, xv_part_ptr, m, n, r, stride_xm,
                    HAS_U: tl.constexpr, HAS_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    R: tl.constexpr, ROW_STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, R)
    if HAS_V:
        v_t = _load_thin(v_ptr, cols, ks, n, r)  # BN × R
    ux_acc = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    for step in range(0, ROW_STEPS):
        rows = (pid_m * ROW_STEPS + step) * BLOCK_M + tl.arange(0, BLOCK_M)
        x = _load_tile(x_ptr, rows, cols, m, n, stride_xm)
        if HAS_U:
            u_t = _load_thin(u_ptr, rows, ks, m, r)  # BM × R
            ux_acc += tl.dot(tl.trans(u_t), x, input_precision=DOT_PRECISION)
        if HAS_V:
            xv = tl.dot(x, v_t, input_precision=DOT_PRECISION)  # BM × R
            xv_mask = (rows[:, None] < m) & (ks[None, :] < r)
            tl.store(xv_part_ptr + pid_n * m * r + rows[:, None] * r + ks[None, :], xv, mask=xv_mask)
    if HAS_U:
        ux_mask = (ks[:, None] < r) & (cols[None, :] < n)
        tl.store(ux_part_ptr + pid_m * r * n + ks[:, None] * n + cols[None, :], ux_acc, mask=ux_mask)


@triton.jit
def _lowrank_apply_kernel(x_ptr, d_ptr, u_ptr, a_ptr, g_ptr, v_ptr, y_ptr, m, n, r, stride_xm, stride_dm,
                          stride_ym, mu, HAS_D: tl.constexpr, HAS_U: tl.constexpr, HAS_V: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, OUT_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, R)
    low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_U:
        low += tl.dot(_load_thin(u_ptr, rows, ks, m, r), _load_wide(a_ptr, ks, cols, r, n),
                      input_precision=DOT_PRECISION)
    if HAS_V:
        low += tl.dot(_load_thin(g_ptr, rows, ks, m, r), tl.trans(_load_thin(v_ptr, cols, ks, n, r)),
                      input_precision=DOT_PRECISION)
    y = mu * low
    if HAS_D:
        y += _load_tile(d_ptr, rows, cols, m, n, stride_dm) * _load_tile(x_ptr, rows, cols, m, n, stride_xm)
    mask = (rows[:, None] < m) & (cols[None, :] < n)
    if OUT_BF16:
        out = _bf16_rne(y)
    else:
        out = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], out, mask=mask)


@triton.jit
def _cg_step_kernel(x_ptr, r_ptr, p_ptr, d_ptr, u_ptr, a_ptr, g_ptr, v_ptr, sums_ptr, uz_part_ptr, zv_part_ptr,
                    m, n, r, alpha, beta, mu, precond_mu,
                    HAS_U: tl.constexpr, HAS_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    R: tl.constexpr, ROW_STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, R)
    col_mask = cols < n
    if HAS_V:
        v_t = _load_thin(v_ptr, cols, ks, n, r)  # BN × R
        b_sq = tl.sum(v_t * v_t, axis=1)  # ‖V_j‖²
    else:
        b_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_U:
        a_t = _load_wide(a_ptr, ks, cols, r, n)  # R × BN: Uᵀp for this column tile
    uz_acc = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    acc_rz = tl.zeros((), dtype=tl.float32)
    acc_zdz = tl.zeros((), dtype=tl.float32)
    acc_zdp = tl.zeros((), dtype=tl.float32)
    acc_pdp = tl.zeros((), dtype=tl.float32)
    acc_rr = tl.zeros((), dtype=tl.float32)
    for step in range(0, ROW_STEPS):
        rows = (pid_m * ROW_STEPS + step) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < m) & col_mask[None, :]
        offs = rows[:, None] * n + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        res = tl.load(r_ptr + offs, mask=mask, other=0.0)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        d = tl.load(d_ptr + offs, mask=mask, other=1.0)
        if HAS_U:
            u_t = _load_thin(u_ptr, rows, ks, m, r)  # BM × R
            a_sq = tl.sum(u_t * u_t, axis=1)
        else:
            a_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        diag_p = a_sq[:, None] + b_sq[None, :] - a_sq[:, None] * b_sq[None, :]
        precond = d + precond_mu * diag_p
        p = res / precond + beta * p
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_U:
            low += tl.dot(u_t, a_t, input_precision=DOT_PRECISION)
        if HAS_V:
            low += tl.dot(_load_thin(g_ptr, rows, ks, m, r), tl.trans(v_t), input_precision=DOT_PRECISION)
        q = d * p + mu * low
        x += alpha * p
        res -= alpha * q
        z = tl.where(mask, res / precond, 0.0)
        tl.store(x_ptr + offs, x, mask=mask)
        tl.store(r_ptr + offs, res, mask=mask)
        tl.store(p_ptr + offs, p, mask=mask)
        dz = d * z
        acc_rz += tl.sum(tl.sum(res * z, axis=1), axis=0)
        acc_zdz += tl.sum(tl.sum(dz * z, axis=1), axis=0)
        acc_zdp += tl.sum(tl.sum(dz * p, axis=1), axis=0)
        acc_pdp += tl.sum(tl.sum(d * p * p, axis=1), axis=0)
        acc_rr += tl.sum(tl.sum(res * res, axis=1), axis=0)
        if HAS_U:
            uz_acc += tl.dot(tl.trans(u_t), z, input_precision=DOT_PRECISION)
        if HAS_V:
            zv = tl.dot(z, v_t, input_precision=DOT_PRECISION)
            zv_mask = (rows[:, None] < m) & (ks[None, :] < r)
            tl.store(zv_part_ptr + pid_n * m * r + rows[:, None] * r + ks[None, :], zv, mask=zv_mask)
    if HAS_U:
        uz_mask = (ks[:, None] < r) & col_mask[None, :]
        tl.store(uz_part_ptr + pid_m * r * n + ks[:, None] * n + cols[None, :], uz_acc, mask=uz_mask)
    tile = pid_m * tl.num_programs(1) + pid_n
    tl.store(sums_ptr + tile * 5 + 0, acc_rz)
    tl.store(sums_ptr + tile * 5 + 1, acc_zdz)
    tl.store(sums_ptr + tile * 5 + 2, acc_zdp)
    tl.store(sums_ptr + tile * 5 + 3, acc_pdp)
    tl.store(sums_ptr + tile * 5 + 4, acc_rr)


# ----------------------------------------------------------------------------------------------
# Launchers (inputs validated by alignmerge/ops/projector.py: x 2-D with unit column stride,
# u/v/a/g contiguous fp32, CG state contiguous fp32).


def _grid_rows(m: int, block_m: int, row_steps: int) -> int:
    return triton.cdiv(m, block_m * row_steps)


def _row_steps(m: int, block_m: int, row_steps: int) -> int:
    """No more row tiles per program than the matrix has (small matrices: no empty masked steps)."""
    return max(1, min(row_steps, triton.cdiv(m, block_m)))


def project_factors(x: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None, *,
                    block_m: int = DEFAULT_BLOCK_M, block_n: int = DEFAULT_BLOCK_N,
                    row_steps: int = DEFAULT_ROW_STEPS, dot_precision: str = "ieee"):
    """(UᵀX, XV) in fp32 (None for an absent side) from one read of X."""
    m, n = x.shape
    r = (u if u is not None else v).shape[1]
    row_steps = _row_steps(m, block_m, row_steps)
    rows_grid = _grid_rows(m, block_m, row_steps)
    cols_grid = triton.cdiv(n, block_n)
    dummy = torch.empty(1, device=x.device, dtype=torch.float32)
    ux_part = torch.empty((rows_grid, r, n), device=x.device, dtype=torch.float32) if u is not None else dummy
    xv_part = torch.empty((cols_grid, m, r), device=x.device, dtype=torch.float32) if v is not None else dummy
    _factors_kernel[(rows_grid, cols_grid)](
        x, u if u is not None else dummy, v if v is not None else dummy, ux_part, xv_part, m, n, r, x.stride(0),
        HAS_U=u is not None, HAS_V=v is not None, BLOCK_M=block_m, BLOCK_N=block_n, R=_padded_rank(r),
        ROW_STEPS=row_steps, DOT_PRECISION=dot_precision)
    ux = ux_part.sum(0) if u is not None else None
    xv = xv_part.sum(0) if v is not None else None
    return ux, xv


def lowrank_apply(x: torch.Tensor, d: torch.Tensor | None, u: torch.Tensor | None, a: torch.Tensor | None,
                  g: torch.Tensor | None, v: torch.Tensor | None, mu: float, out: torch.Tensor, *,
                  block_m: int = DEFAULT_BLOCK_M, block_n: int = DEFAULT_BLOCK_N,
                  dot_precision: str = "ieee") -> torch.Tensor:
    """out = D⊙X + μ(U A + G Vᵀ) (D⊙X omitted when d is None)."""
    m, n = out.shape
    r = (u if u is not None else v).shape[1]
    dummy = torch.empty(1, device=out.device, dtype=torch.float32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _lowrank_apply_kernel[grid](
        x, d if d is not None else dummy, u if u is not None else dummy, a if a is not None else dummy,
        g if g is not None else dummy, v if v is not None else dummy, out, m, n, r,
        x.stride(0), d.stride(0) if d is not None else 0, out.stride(0), float(mu),
        HAS_D=d is not None, HAS_U=u is not None, HAS_V=v is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        R=_padded_rank(r), DOT_PRECISION=dot_precision, OUT_BF16=out.dtype == torch.bfloat16)
    return out


def cg_step(x: torch.Tensor, r_vec: torch.Tensor, p: torch.Tensor, d: torch.Tensor, u: torch.Tensor | None,
            a: torch.Tensor | None, g: torch.Tensor | None, v: torch.Tensor | None, *, alpha: float,
            beta: float, mu: float, precond_mu: float, block_m: int = DEFAULT_BLOCK_M,
            block_n: int = DEFAULT_BLOCK_N, row_steps: int = DEFAULT_ROW_STEPS, dot_precision: str = "ieee"):
    """One fused CG step in place on x, r_vec, p; returns (sums[5], Uᵀz', z'V)."""
    m, n = x.shape
    r = (u if u is not None else v).shape[1]
    row_steps = _row_steps(m, block_m, row_steps)
    rows_grid = _grid_rows(m, block_m, row_steps)
    cols_grid = triton.cdiv(n, block_n)
    dummy = torch.empty(1, device=x.device, dtype=torch.float32)
    sums = torch.empty((rows_grid * cols_grid, 5), device=x.device, dtype=torch.float32)
    uz_part = torch.empty((rows_grid, r, n), device=x.device, dtype=torch.float32) if u is not None else dummy
    zv_part = torch.empty((cols_grid, m, r), device=x.device, dtype=torch.float32) if v is not None else dummy
    _cg_step_kernel[(rows_grid, cols_grid)](
        x, r_vec, p, d, u if u is not None else dummy, a if a is not None else dummy,
        g if g is not None else dummy, v if v is not None else dummy, sums, uz_part, zv_part,
        m, n, r, float(alpha), float(beta), float(mu), float(precond_mu),
        HAS_U=u is not None, HAS_V=v is not None, BLOCK_M=block_m, BLOCK_N=block_n, R=_padded_rank(r),
        ROW_STEPS=row_steps, DOT_PRECISION=dot_precision, num_warps=DEFAULT_NUM_WARPS)
    uz = uz_part.sum(0) if u is not None else None
    zv = zv_part.sum(0) if v is not None else None
    return sums.to(torch.float64).sum(0), uz, zv
