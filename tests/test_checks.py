"""count_nonfinite: every backend equals the torch reference on odd sizes and dtypes."""
import pytest
import torch

from alignmerge.ops import count_nonfinite
from alignmerge.ops._backend import available_backends
from alignmerge.ops.reference import count_nonfinite_reference


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 1000, 100003])
def test_count_nonfinite_matches_reference(backend, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 1e3).to(dtype)
    if n > 1:
        idx = torch.randint(0, n, (max(1, n // 97),), generator=g)
        x[idx[::3]] = float("nan")
        x[idx[1::3]] = float("inf")
        x[idx[2::3]] = -float("inf")
    expected = count_nonfinite_reference(x)
    assert count_nonfinite(x, backend=backend) == expected
    assert count_nonfinite(x.view(-1)[: n // 2 + 1], backend=backend) == count_nonfinite_reference(x[: n // 2 + 1])


def test_finite_extremes_are_finite():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        info = torch.finfo(dtype)
        x = torch.tensor([info.max, -info.max, info.tiny, 0.0, -0.0], dtype=dtype)
        for backend in available_backends("cpu"):
            assert count_nonfinite(x, backend=backend) == 0
