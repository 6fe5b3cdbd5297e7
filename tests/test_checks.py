"""count_nonfinite: every backend equals the torch reference on odd sizes and dtypes."""
import pytest
import torch

from alignmerge.errors import NonFiniteError
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


@pytest.mark.parametrize("native", [True, False], ids=["cpp", "python"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_read_counts_nonfinite_block_by_block(tmp_path, monkeypatch, native, dtype):
    """The checked read (C++ pread loop, or the Python fallback) counts NaN/Inf across odd block edges
    and row slices exactly like the reference, and reports a truncated file."""
    from safetensors.torch import save_file

    from alignmerge.errors import CheckpointError
    from alignmerge.io import safetensors_file as sf
    from alignmerge.io.checkpoint import Checkpoint
    from alignmerge.ops import _backend

    if native and _backend.cpp_extension() is None:
        pytest.skip("the C++ extension is not built")
    if not native:
        monkeypatch.setattr(_backend, "cpp_extension", lambda: None)
    monkeypatch.setattr(sf, "READ_BLOCK_BYTES", 1000)  # block edges fall inside rows of 13 elements
    g = torch.Generator().manual_seed(7)
    x = torch.randn(301, 13, generator=g).to(dtype)
    flat = x.view(-1)
    flat[torch.randint(0, flat.numel(), (40,), generator=g)] = float("nan")
    flat[torch.randint(0, flat.numel(), (9,), generator=g)] = float("inf")
    save_file({"w": x}, str(tmp_path / "s.safetensors"))
    ck = Checkpoint.from_file(tmp_path / "s.safetensors")
    entry = ck.entry("w")
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    assert sf.read_bytes_into(entry, buf, count_nonfinite=True) == count_nonfinite_reference(x)
    assert torch.equal(buf.view(dtype).view(x.shape).view(torch.uint8), x.view(torch.uint8))
    rows = (17, 250)
    got = sf.read_bytes_into(entry, buf, rows[0] * entry.row_bytes, rows[1] * entry.row_bytes, count_nonfinite=True)
    assert got == count_nonfinite_reference(x[rows[0]:rows[1]])
    assert sf.read_bytes_into(entry, buf) == 0  # not counting
    with pytest.raises(NonFiniteError, match=r"s\.safetensors: tensor 'w' contains \d+ NaN/Inf values"):
        ck.read("w", check_finite=True)
    (tmp_path / "s.safetensors").write_bytes((tmp_path / "s.safetensors").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="unexpected end of file"):
        sf.read_bytes_into(entry, buf, count_nonfinite=True)


def test_crc32c_matches_the_standard_check_value_and_continues():
    from alignmerge.ops._backend import cpp_extension

    ext = cpp_extension()
    if ext is None:
        pytest.skip("the C++ extension is not built")
    assert ext.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    data = torch.randint(0, 256, (10007,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy()
    whole = ext.crc32c(memoryview(data))
    assert ext.crc32c(memoryview(data)[4093:], ext.crc32c(memoryview(data)[:4093])) == whole
    assert ext.crc32c(b"") == 0


def _crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    c = ~crc & 0xFFFFFFFF
    for byte in data:
        c ^= byte
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 & -(c & 1))
    return ~c & 0xFFFFFFFF


def test_crc32c_three_lane_stripes_equal_the_bitwise_definition():
    from alignmerge.ops._backend import cpp_extension

    ext = cpp_extension()
    if ext is None:
        pytest.skip("the C++ extension is not built")
    stripe = 3 * 8192  # lengths around the 3-lane stripe, continuing from zero and non-zero CRCs
    data = torch.randint(0, 256, (2 * stripe + 1001,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(2)).numpy().tobytes()
    for n in [1, 7, stripe - 1, stripe, stripe + 13, len(data)]:
        for start in [0, 0x1234ABCD]:
            assert ext.crc32c(data[:n], start) == _crc32c_bitwise(data[:n], start), (n, start)
