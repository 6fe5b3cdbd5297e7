"""Torch reference implementations of the hot ops: the test oracles and last-resort fallbacks."""
from __future__ import annotations

import struct

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
    device = next((t.device for t in (u, v) if t is not None), None)
    a = (u.to(dtype) ** 2).sum(1) if u is not None else torch.zeros(m, dtype=dtype, device=device)
    b = (v.to(dtype) ** 2).sum(1) if v is not None else torch.zeros(n, dtype=dtype, device=device)
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


# --- merge ---
# Data-free merges in the arithmetic order of mergekit 0.1.5 (linear.py, generalized_task_arithmetic.py):
# fp32 arithmetic, sums over experts taken in expert order, one rounding to the output dtype.
KEEP_ALL_TIES = (1 << 63) - 1
"""Tie cutoff meaning "keep every element whose magnitude equals the threshold"."""
KEEP_NONE_KEY = 0xFFFFFFFF
"""Threshold key above every |tau| bit pattern: the expert keeps nothing (density <= 0)."""
DARE_GAMMA = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64 finaliser on a Python int (mod 2^64)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def dare_stream_key(seed: int, tensor_index: int, expert_index: int) -> int:
    """64-bit key of the DARE random stream of one expert of one tensor (unsigned Python int)."""
    h = _mix64(int(seed) + DARE_GAMMA)
    h = _mix64(h ^ ((int(tensor_index) + 2 * DARE_GAMMA) & _MASK64))
    return _mix64(h ^ ((int(expert_index) + 3 * DARE_GAMMA) & _MASK64))


def dare_keep_below(density: float) -> int:
    """Keep an element iff its uniform32 value is below this: keep probability = result / 2^32."""
    return int(min(1 << 32, max(0, round(float(density) * (1 << 32)))))


MASK32 = 0xFFFFFFFF
DARE_WEYL32 = 0x9E3779B9


def fmix32(h: int) -> int:
    """murmur3's 32-bit finaliser on a Python int (mod 2^32)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def dare_page_key(key: int, page: int) -> int:
    """page_key(K, p) = lo32(K) ^ fmix32(hi32(K) ^ fmix32(p)): the stream's key for indices p·2^32 ...."""
    return (key & MASK32) ^ fmix32(((key >> 32) & MASK32) ^ fmix32(page))


def _fmix32_tensor(h: torch.Tensor) -> torch.Tensor:
    """fmix32 on int64 tensors holding uint32 values (int64 products wrap; the low 32 bits are exact)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def dare_uniform_reference(key: int, numel: int, element_offset: int = 0) -> torch.Tensor:
    """uniform32(i) = fmix32(lo32(i)·W + page_key(key, hi32(i))) for global indices i = offset..offset+numel-1
    (int64 holding uint32; W = 0x9E3779B9)."""
    gi = torch.arange(element_offset, element_offset + numel, dtype=torch.int64)
    page_keys = torch.empty_like(gi)
    for page in range(element_offset >> 32, ((element_offset + numel - 1) >> 32) + 1):
        lo = max(0, (page << 32) - element_offset)
        page_keys[lo:(((page + 1) << 32) - element_offset)] = dare_page_key(key, page)
    return _fmix32_tensor(((gi & MASK32) * DARE_WEYL32 + page_keys) & MASK32)


def dare_keep_mask_reference(numel: int, density: float, *, seed: int, tensor_index: int, expert_index: int,
                             element_offset: int = 0) -> torch.Tensor:
    """Bool mask of the DARE survivors of one expert: P(keep) = dare_keep_below(density) / 2^32."""
    key = dare_stream_key(seed, tensor_index, expert_index)
    return dare_uniform_reference(key, numel, element_offset) < dare_keep_below(density)


def magnitude_keys_reference(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """fp32 bit pattern of |x - base| as int64 (monotone in the magnitude), flattened."""
    d = x.reshape(-1).float() - base.reshape(-1).float()
    return d.view(torch.int32).to(torch.int64) & 0x7FFFFFFF


def magnitude_keep_count(numel: int, density: float) -> int:
    """How many elements mergekit's magnitude sparsification keeps: max(1, int(density·n)); all at density>=1."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def magnitude_threshold_reference(base: torch.Tensor, x: torch.Tensor, density: float) -> tuple[int, int]:
    """(key, cutoff) keeping exactly magnitude_keep_count elements of |x - base|.

    Keep i iff key(i) > key, or key(i) == key and i < cutoff: the k largest magnitudes, ties at the
    threshold resolved in favour of lower flat indices.
    """
    keys = magnitude_keys_reference(base, x)
    n = keys.numel()
    k = magnitude_keep_count(n, density)
    if k == n:
        return 0, KEEP_ALL_TIES
    if k == 0:
        return KEEP_NONE_KEY, 0
    t = int(torch.kthvalue(keys, n - k + 1).values)
    greater = int((keys > t).sum())
    equal = keys == t
    need = k - greater
    if need == int(equal.sum()):
        return t, KEEP_ALL_TIES
    return t, int(torch.nonzero(equal)[need - 1, 0]) + 1


def magnitude_mask_reference(base: torch.Tensor, x: torch.Tensor, key: int, cutoff: int,
                             element_offset: int = 0) -> torch.Tensor:
    """Bool mask (flat) of the elements a (key, cutoff) threshold keeps."""
    keys = magnitude_keys_reference(base, x)
    gi = torch.arange(element_offset, element_offset + keys.numel(), dtype=torch.int64)
    return (keys > key) | ((keys == key) & (gi < cutoff))


_FP32 = struct.Struct("f")


def _fp32(v: float) -> float:
    """v rounded to the nearest fp32 value (round to nearest even)."""
    return _FP32.unpack(_FP32.pack(float(v)))[0]


def sequential_sum_fp32(values) -> float:
    """fp32 sum in order (what torch's sum over <= 4 experts does): each fp32 addition is the double sum of
    two fp32 values rounded to fp32, which equals the fp32 sum (53 >= 2·24 + 2 bits: double rounding is
    innocuous for addition)."""
    total = _fp32(values[0])
    for v in values[1:]:
        total = _fp32(total + _fp32(v))
    return total


def weighted_sum_reference(tensors, weights, *, normalize: bool = False, out_dtype=None) -> torch.Tensor:
    """sum_k w_k x_k [/ sum_k w_k] as mergekit linear: fp32 zeros, addcmul_ in order (one rounding each)."""
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for x, w in zip(tensors, weights):
        acc.addcmul_(x.float(), torch.tensor(_fp32(w)))
    if normalize:
        acc = acc / _fp32(sequential_sum_fp32(weights))
    return acc.to(out_dtype or tensors[0].dtype)


def gta_reference(base, tensors, weights, *, keep_masks=None, rescale=None, consensus: bool = False,
                  normalize: bool = False, lambda_: float = 1.0, out_dtype=None) -> torch.Tensor:
    """Generalised task arithmetic, mergekit's GeneralizedTaskArithmeticMerge in fp32.

    tau_k = x_k - b; tau_k *= mask_k (* rescale_k); wd_k = w_k tau_k.
    consensus ("sum"): maj = sign(sum_k wd_k) (0 -> +), m_k = [sign(wd_k) == maj],
    mixed = sum_k m_k wd_k, div = sum_k m_k w_k (0 -> 1); else mixed = sum_k wd_k, div = sum_k w_k
    (|div| < 1e-8 -> 1). normalize: mixed /= div; out = b + lambda·mixed.
    """
    b = base.float()
    wd = []
    for k, x in enumerate(tensors):
        d = x.float() - b
        if keep_masks is not None:
            d = d * keep_masks[k].reshape(d.shape).to(torch.float32)
        if rescale is not None and float(rescale[k]) != 1.0:
            d = d * _fp32(rescale[k])
        wd.append(d * _fp32(weights[k]))
    if consensus:
        vote = wd[0]
        for d in wd[1:]:
            vote = vote + d
        positive = vote >= 0
        mixed = div = None
        for d, w in zip(wd, weights):
            m = torch.where(positive, d > 0, d < 0).to(torch.float32)
            mixed = d * m if mixed is None else mixed + d * m
            div = _fp32(w) * m if div is None else div + _fp32(w) * m
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        mixed = wd[0]
        for d in wd[1:]:
            mixed = mixed + d
        div = sequential_sum_fp32(weights)
        div = _fp32(1.0 if abs(div) < 1e-8 else div)
    if normalize:
        mixed = mixed / div
    if float(lambda_) != 1.0:
        mixed = mixed * _fp32(lambda_)
    return (b + mixed).to(out_dtype or base.dtype)


def task_arithmetic_reference(base, tensors, weights, *, lambda_=1.0, normalize=False, out_dtype=None):
    """theta_0 + lambda · sum_k w_k tau_k [/ sum_k w_k]."""
    return gta_reference(base, tensors, weights, normalize=normalize, lambda_=lambda_, out_dtype=out_dtype)


def ties_reference(base, tensors, weights, *, density, lambda_=1.0, normalize=True, consensus=True,
                   out_dtype=None):
    """TIES: per-expert magnitude top-k of tau_k, sign election ("sum"), disjoint mean."""
    densities = [density] * len(tensors) if isinstance(density, (int, float)) else list(density)
    masks = []
    for x, dens in zip(tensors, densities):
        key, cutoff = magnitude_threshold_reference(base, x, dens)
        masks.append(magnitude_mask_reference(base, x, key, cutoff))
    return gta_reference(base, tensors, weights, keep_masks=masks, consensus=consensus, normalize=normalize,
                         lambda_=lambda_, out_dtype=out_dtype)


def dare_reference(base, tensors, weights, *, density, seed, tensor_index, lambda_=1.0, normalize=False,
                   consensus=False, rescale="inverse_density", element_offset=0, out_dtype=None):
    """DARE: keep tau_k elementwise with probability density (counter-based stream), rescale survivors."""
    densities = [density] * len(tensors) if isinstance(density, (int, float)) else list(density)
    masks = [dare_keep_mask_reference(base.numel(), dens, seed=seed, tensor_index=tensor_index, expert_index=k,
                                      element_offset=element_offset) for k, dens in enumerate(densities)]
    if rescale is None:
        factors = [1.0] * len(tensors)
    elif rescale == "inverse_density":
        factors = [1.0 / d if 0 < d < 1 else 1.0 for d in densities]
    elif rescale == "l1":
        factors = []
        for x, m, dens in zip(tensors, masks, densities):
            tau = (x.float() - base.float()).reshape(-1).double()
            before, after = float(tau.abs().sum()), float((tau * m).abs().sum())
            factors.append(1.0 if dens >= 1 or before < 1e-7 or after < 1e-7 else before / after)
    else:
        factors = [float(f) for f in rescale]
    return gta_reference(base, tensors, weights, keep_masks=masks, rescale=factors, consensus=consensus,
                         normalize=normalize, lambda_=lambda_, out_dtype=out_dtype)


# --- checks ---
def count_nonfinite_reference(x: torch.Tensor) -> int:
    """Number of NaN/Inf elements (the oracle for alignmerge.ops.checks)."""
    return int((~torch.isfinite(x)).sum())
