"""fisher_accumulate: every path equals the torch reference on odd shapes, fp32 and bf16."""
import pytest
import torch

from alignmerge.ops import fisher_accumulate
from alignmerge.ops._backend import available_backends
from alignmerge.ops.fisher import fisher_accumulate_blocked
from alignmerge.ops.reference import fisher_accumulate_reference

SHAPES = [(3, 7, 19, 23), (5, 33, 17, 40), (2, 9, 45, 70), (1, 1, 1, 1)]


def _rel_err(x, ref):
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_fisher_accumulate_matches_reference(backend, shape, dtype, tol):
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} not available")
    N, T, O, I = shape
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    g = torch.randn(N, T, O, generator=gen).to(dtype)
    a = torch.randn(N, T, I, generator=gen).to(dtype)
    start = torch.rand(O, I, generator=gen)
    ref = fisher_accumulate_reference(start.clone(), g, a)
    out = fisher_accumulate(start.clone(), g, a, backend=backend)
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) <= tol


def test_blocked_path_chunks_samples():
    """A tiny block budget forces one sample per chunk; a medium one several per chunk."""
    g, a = torch.randn(6, 5, 9), torch.randn(6, 5, 11)
    ref = fisher_accumulate_reference(torch.zeros(9, 11), g, a)
    for block in (1, 9 * 11 * 4 * 4):
        out = fisher_accumulate_blocked(torch.zeros(9, 11), g, a, block_bytes=block)
        assert _rel_err(out, ref) <= 1e-5


def test_non_contiguous_inputs():
    g = torch.randn(4, 13, 6).transpose(1, 2).contiguous().transpose(1, 2)  # strided view
    a = torch.randn(13, 4, 7).transpose(0, 1)
    ref = fisher_accumulate_reference(torch.zeros(6, 7), g, a)
    for backend in available_backends("cpu"):
        assert _rel_err(fisher_accumulate(torch.zeros(6, 7), g, a, backend=backend), ref) <= 1e-5


def test_shape_errors():
    with pytest.raises(ValueError, match="differ in N or T"):
        fisher_accumulate(torch.zeros(3, 4), torch.zeros(2, 5, 3), torch.zeros(2, 6, 4))
    with pytest.raises(ValueError, match="out must be float32"):
        fisher_accumulate(torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(2, 5, 3), torch.zeros(2, 5, 4))
