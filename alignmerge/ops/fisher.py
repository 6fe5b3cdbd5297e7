"""Public op ``fisher_accumulate``: fused per-sample squared gradients of nn.Linear.

out[o, i] += sum_n (sum_t g[n, t, o] * a[n, t, i])^2   (fp32 accumulation)

g: output gradients [N, T, O], a: inputs [N, T, I] of one nn.Linear for N sequences; the
per-sample weight gradient of sequence n is G_n = g_n^T a_n. Backends:

- ``triton`` (CUDA, or CPU under TRITON_INTERPRET=1): kernels/fisher.py, tile by tile in
  registers, the N per-sample gradients never touch memory.
- ``cpp`` (CPU): csrc/fisher_ops.cpp, AVX-512 8x32 register tiles of G_n over packed panels,
  squared into ``out`` in place (fp32 inputs; bf16/fp16 are converted first). Measured on
  this 2-core Xeon, one thread, N=16, T=128: 1.2-1.35x one plain weight-gradient GEMM of the
  same shapes, against 1.3-1.8x for the blocked bmm below, so it is the CPU default.
- ``torch``: a blocked batched GEMM (torch.bmm over a few samples at a time into one reused
  fp32 buffer of at most ``CPU_BLOCK_BYTES``), then square-and-add; any device.
- reference: ``alignmerge.ops.reference.fisher_accumulate_reference`` (materialises all G_n),
  the test oracle.
"""
from __future__ import annotations

import torch

from alignmerge.ops._backend import choose_backend

CPU_BLOCK_BYTES = 8 << 20
"""Largest fp32 buffer of per-sample gradients the CPU path holds at once."""


def _check(out: torch.Tensor, g: torch.Tensor, a: torch.Tensor) -> None:
    if g.dim() != 3 or a.dim() != 3:
        raise ValueError(f"fisher_accumulate: g and a must be [N, T, O] and [N, T, I], got {tuple(g.shape)}, "
                         f"{tuple(a.shape)}")
    if g.shape[:2] != a.shape[:2]:
        raise ValueError(f"fisher_accumulate: g {tuple(g.shape)} and a {tuple(a.shape)} differ in N or T")
    if out.dtype != torch.float32 or out.shape != (g.shape[2], a.shape[2]):
        raise ValueError(f"fisher_accumulate: out must be float32 [{g.shape[2]}, {a.shape[2]}], got "
                         f"{out.dtype} {tuple(out.shape)}")
    if not (out.device == g.device == a.device):
        raise ValueError("fisher_accumulate: out, g and a must be on one device")


def fisher_accumulate_blocked(out: torch.Tensor, g: torch.Tensor, a: torch.Tensor,
                              block_bytes: int = CPU_BLOCK_BYTES) -> torch.Tensor:
    """The blocked-bmm path: chunks of samples, G = bmm(g^T, a) in fp32, out += sum G^2."""
    N, _, O = g.shape
    I = a.shape[2]
    chunk = max(1, min(N, block_bytes // max(1, O * I * 4)))
    buf = torch.empty((chunk, O, I), dtype=torch.float32, device=out.device)
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        gc = g[n0:n1].float().transpose(1, 2)
        ac = a[n0:n1].float()
        grads = buf[: n1 - n0]
        torch.bmm(gc, ac, out=grads)
        if n1 - n0 == 1:
            out.addcmul_(grads[0], grads[0])
        else:
            grads.mul_(grads)
            out.add_(grads.sum(0))
    return out


def fisher_accumulate(out: torch.Tensor, g: torch.Tensor, a: torch.Tensor, *,
                      backend: str | None = None) -> torch.Tensor:
    """out[o,i] += sum_n (sum_t g[n,t,o] a[n,t,i])^2 in fp32, in place; returns ``out``.

    g [N, T, O] and a [N, T, I] may be float32, bfloat16 or float16; out is float32 [O, I].
    """
    _check(out, g, a)
    if g.shape[0] == 0 or g.shape[1] == 0:
        return out
    chosen = choose_backend(g, backend)
    if chosen == "triton":
        try:
            from alignmerge.kernels.fisher import fisher_accumulate_triton
        except ImportError:  # a source checkout that is not installed: kernels/ is top level
            from kernels.fisher import fisher_accumulate_triton

        return fisher_accumulate_triton(out, g, a)
    if chosen == "cpp":
        return _fisher_accumulate_cpp(out, g, a)
    return fisher_accumulate_blocked(out, g, a)


def _fisher_accumulate_cpp(out: torch.Tensor, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    from alignmerge.ops._backend import cpp_extension

    g32 = g.to(torch.float32).contiguous()
    a32 = a.to(torch.float32).contiguous()
    target = out if out.is_contiguous() else out.contiguous()
    N, T, O = g32.shape
    cpp_extension().fisher_linear(target.data_ptr(), g32.data_ptr(), a32.data_ptr(), N, T, O, a32.shape[2])
    if target is not out:
        out.copy_(target)
    return out


def fisher_merge(tensors, fishers, weights, *, epsilon: float = 1e-6, scales=None,
                 out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fisher merge (Matena & Raffel): θ = Σ_k F̃_k θ_k / Σ_k F̃_k, F̃_k = w_k·max(c_k F_k, ε).

    ``scales`` are the c_k (default 1; 1/mean(F_k) normalises each model's Fisher). Elementwise,
    fp32 arithmetic, on the tensors' device; a plain torch implementation on every device (it is
    memory-bound and runs once per tensor, so it has no dedicated kernel).
    """
    if not tensors or len(tensors) != len(fishers) or len(tensors) != len(weights):
        raise ValueError(f"fisher_merge: need as many fishers and weights as tensors "
                         f"({len(tensors)} tensors, {len(fishers)} fishers, {len(weights)} weights)")
    if epsilon <= 0:
        raise ValueError(f"fisher_merge: epsilon must be > 0, got {epsilon}")
    scales = [1.0] * len(tensors) if scales is None else list(scales)
    num = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    den = torch.zeros_like(num)
    for k, (theta, fisher, weight, scale) in enumerate(zip(tensors, fishers, weights, scales)):
        if theta.shape != num.shape or fisher.shape != num.shape:
            raise ValueError(f"fisher_merge: tensor {k} {tuple(theta.shape)} or its Fisher {tuple(fisher.shape)} "
                             f"does not match shape {tuple(num.shape)}")
        f = fisher.to(num.device, torch.float32)
        f = (f * scale if scale != 1.0 else f).clamp_min(epsilon).mul_(float(weight))
        num.addcmul_(f, theta.to(torch.float32))
        den.add_(f)
    merged = num.div_(den)
    if out is not None:
        return out.copy_(merged)
    return merged.to(out_dtype or tensors[0].dtype)
