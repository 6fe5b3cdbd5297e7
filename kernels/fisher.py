"""Triton kernel: fused per-sample squared weight gradients of nn.Linear (diagonal Fisher).

out[o, i] += sum_n (sum_t g[n, t, o] * a[n, t, i])^2

Each program owns one (BLOCK_O x BLOCK_I) tile of ``out``. For every sample n it forms that
tile of the per-sample gradient G_n = g_n^T a_n in registers (a T-loop of tile products),
squares it and adds it to an fp32 accumulator, so the N per-sample gradients never reach
memory. Inputs may be bf16/fp16/fp32; arithmetic is fp32 (``NATIVE_DOT`` lets a GPU feed bf16
tiles straight to the tensor cores with fp32 accumulation; the CPU interpreter must not).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fisher_linear_kernel(
    out_ptr, g_ptr, a_ptr,
    N, T, O, I,
    stride_gn, stride_gt, stride_go,
    stride_an, stride_at, stride_ai,
    stride_oo, stride_oi,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    mask_o = offs_o < O
    mask_i = offs_i < I
    fisher = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for n in range(0, N):
        grad = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs_t
            mask_t = t < T
            # g^T tile [BLOCK_O, BLOCK_T] and a tile [BLOCK_T, BLOCK_I]
            gt = tl.load(g_ptr + n * stride_gn + offs_o[:, None] * stride_go + t[None, :] * stride_gt,
                         mask=mask_o[:, None] & mask_t[None, :], other=0.0)
            at = tl.load(a_ptr + n * stride_an + t[:, None] * stride_at + offs_i[None, :] * stride_ai,
                         mask=mask_t[:, None] & mask_i[None, :], other=0.0)
            if NATIVE_DOT:
                grad = tl.dot(gt, at, grad)
            else:
                # fp32 inputs: full-precision dot (no silent TF32 rounding on tensor-core GPUs)
                grad = tl.dot(gt.to(tl.float32), at.to(tl.float32), grad, input_precision="ieee")
        fisher += grad * grad
    out_ptrs = out_ptr + offs_o[:, None] * stride_oo + offs_i[None, :] * stride_oi
    mask = mask_o[:, None] & mask_i[None, :]
    prev = tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, prev + fisher, mask=mask)


def fisher_accumulate_triton(out: torch.Tensor, g: torch.Tensor, a: torch.Tensor, *,
                             block_o: int | None = None, block_i: int | None = None,
                             block_t: int | None = None) -> torch.Tensor:
    """Launch the fused kernel; ``out`` (fp32 [O, I]) is updated in place and returned."""
    N, T, O = g.shape
    I = a.shape[2]
    on_gpu = g.device.type == "cuda"
    # Big tiles under the interpreter (cost ~ programs x loop steps); GEMM-sized tiles on GPU.
    block_o = block_o or (64 if on_gpu else max(16, min(128, triton.next_power_of_2(O))))
    block_i = block_i or (64 if on_gpu else max(16, min(128, triton.next_power_of_2(I))))
    block_t = block_t or (32 if on_gpu else max(16, min(128, triton.next_power_of_2(T))))
    native = on_gpu and g.dtype == a.dtype and g.dtype in (torch.bfloat16, torch.float16)
    grid = (triton.cdiv(O, block_o), triton.cdiv(I, block_i))
    _fisher_linear_kernel[grid](
        out, g, a, N, T, O, I,
        g.stride(0), g.stride(1), g.stride(2),
        a.stride(0), a.stride(1), a.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t, NATIVE_DOT=native,
    )
    return out
