"""A validating, lazy safetensors reader: header checked before any allocation, tensors read with pread.

Format: 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data
(offsets relative to the end of the header).
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from alignmerge.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one index of dim 0); the whole tensor for a scalar."""
        if not self.shape or self.shape[0] == 0:
            return self.nbytes
        return self.nbytes // self.shape[0]


def layout_header(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                  metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]], int]:
    """A safetensors header for ``(name, dtype, shape)`` tensors packed in the given order: the JSON blob
    padded with spaces to 8 bytes, each tensor's [begin, end) data offsets, and the data size."""
    header: dict = {"__metadata__": metadata}
    offsets: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offsets[name] = (offset, offset + nbytes)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8), offsets, offset


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate tensor name {key!r}")
        seen[key] = value
    return seen


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate a safetensors header; returns ({name: entry}, metadata)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: safetensors header claims {header_len} bytes (limit {MAX_HEADER_BYTES})")
            if 8 + header_len > size:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes, file {size})")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start = 8 + header_len
    data_len = size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _validate_entry(path, name, info, data_start, data_len)
    spans = sorted((e.begin, e.end, n) for n, e in entries.items() if e.end > e.begin)
    for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _validate_entry(path: Path, name: str, info, data_start: int, data_len: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype_name = info.get("dtype")
    if dtype_name not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype_name!r}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: invalid shape {shape!r}")
    offsets = info.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise CheckpointError(f"{where}: invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(f"{where}: invalid data_offsets {offsets!r}")
    if end > data_len:
        raise CheckpointError(f"{where}: data_offsets {offsets} run past the end of the file ({data_len} data bytes)")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise CheckpointError(f"{where}: shape {shape} of {dtype_name} needs {expected} bytes, header gives {end - begin}")
    return TensorEntry(path, dtype, tuple(shape), data_start + begin, data_start + end)


def map_bytes(entry: TensorEntry, byte_begin: int = 0, byte_end: int | None = None) -> torch.Tensor:
    """Bytes [byte_begin, byte_end) of the tensor's data as a uint8 tensor over a private memory map of the
    file: reads fault page-cache pages in without copying them (writes would stay private, copy-on-write;
    not MAP_POPULATE, which on a writable private map copies every page). The mapping lives as long as the
    returned tensor."""
    import mmap

    byte_end = entry.nbytes if byte_end is None else byte_end
    n = byte_end - byte_begin
    if n == 0:
        return torch.empty(0, dtype=torch.uint8)
    start = entry.begin + byte_begin
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    try:
        with open(entry.file, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), start - aligned + n, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
        if hasattr(mapped, "madvise"):  # start reading ahead where the file is not in the page cache
            mapped.madvise(mmap.MADV_WILLNEED)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{entry.file}: cannot map tensor data ({getattr(exc, 'strerror', None) or exc})") from None
    return torch.frombuffer(mapped, dtype=torch.uint8, count=n, offset=start - aligned)


READ_BLOCK_BYTES = 1 << 20
"""pread block: small enough that a block is still in cache when its finiteness is counted."""


def read_bytes_into(entry: TensorEntry, out: torch.Tensor, byte_begin: int = 0, byte_end: int | None = None, *,
                    count_nonfinite: bool = False) -> int:
    """pread bytes [byte_begin, byte_end) of the tensor's data into the uint8 CPU tensor ``out``.

    With ``count_nonfinite`` (float tensors) the NaN/Inf elements are counted block by block as they
    arrive, while each block is in cache, and the count is returned (else 0)."""
    from alignmerge.ops._backend import DTYPE_CODES, cpp_extension

    byte_end = entry.nbytes if byte_end is None else byte_end
    n = byte_end - byte_begin
    counting = count_nonfinite and entry.dtype.is_floating_point
    ext = cpp_extension()
    fd = os.open(entry.file, os.O_RDONLY)
    try:
        if ext is not None and (not counting or entry.dtype in DTYPE_CODES):
            code = DTYPE_CODES[entry.dtype] if counting else -1
            done, count, err = ext.pread_count_nonfinite(fd, entry.begin + byte_begin, n, out.data_ptr(), code,
                                                         READ_BLOCK_BYTES)
            if done < n:
                raise OSError(err, os.strerror(err)) if err else EOFError()
            return count
        view = memoryview(out.numpy()).cast("B")[:n]
        count = done = 0
        while done < n:
            got = os.preadv(fd, [view[done:done + READ_BLOCK_BYTES]], entry.begin + byte_begin + done)
            if got == 0:
                raise EOFError()
            if counting:
                from alignmerge.ops import count_nonfinite as count_block

                count += count_block(out[done:done + got].view(entry.dtype))
            done += got
        return count
    except EOFError:
        raise CheckpointError(f"{entry.file}: unexpected end of file while reading a tensor") from None
    except OSError as exc:
        raise CheckpointError(f"{entry.file}: read failed ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
