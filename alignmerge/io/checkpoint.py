"""Lazy access to a Hugging Face model directory, one tensor (or row block) at a time.

Accepts a single ``model.safetensors``, a sharded set with ``model.safetensors.index.json``,
or (only with ``allow_pickle``) ``pytorch_model.bin`` files loaded with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from alignmerge.errors import CheckpointError, NonFiniteError
from alignmerge.io.safetensors_file import TensorEntry, map_bytes, read_bytes_into, read_header

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class Checkpoint:
    """A model directory whose tensors are read on demand; headers are validated on open."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: model path does not exist")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: model path is not a directory")
        self.config = self._read_config()
        self._entries: dict[str, TensorEntry] = {}
        self._bin_state: dict[str, torch.Tensor] | None = None
        if (self.path / SAFE_INDEX).exists():
            self._open_sharded_safetensors()
        elif (self.path / SAFE_SINGLE).exists():
            self._entries, _ = read_header(self.path / SAFE_SINGLE)
        elif (self.path / BIN_SINGLE).exists() or (self.path / BIN_INDEX).exists():
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.path}: only pickle (.bin) weights found; pass --allow-pickle to load them "
                    "with torch.load(weights_only=True)"
                )
            self._open_bin()
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors, {SAFE_INDEX} or pytorch_model.bin found")

    @classmethod
    def from_file(cls, file: str | Path) -> "Checkpoint":
        """A checkpoint over one safetensors file (e.g. a PEFT adapter), with no config.json."""
        self = cls.__new__(cls)
        self.path = Path(file).parent
        self.config = {}
        self._bin_state = None
        self._entries, _ = read_header(file)
        return self

    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return {}
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{cfg}: unreadable config.json ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{cfg}: config.json is not a JSON object")
        return data

    def _open_sharded_safetensors(self) -> None:
        index_path = self.path / SAFE_INDEX
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: invalid index ({exc})") from None
        headers: dict[str, dict[str, TensorEntry]] = {}
        root = self.path.resolve()
        for name, shard in weight_map.items():
            shard_path = self.path / str(shard)
            if shard not in headers:  # each shard is resolved, checked and parsed once
                if root not in shard_path.resolve().parents:
                    raise CheckpointError(f"{index_path}: shard {shard!r} of tensor {name!r} lies outside the model directory")
                if not shard_path.exists():
                    raise CheckpointError(f"{index_path}: shard {shard!r} (listed for tensor {name!r}) is missing")
                headers[shard], _ = read_header(shard_path)
            if name not in headers[shard]:
                raise CheckpointError(f"{shard_path}: tensor {name!r} listed in {SAFE_INDEX} is absent from its shard")
            self._entries[name] = headers[shard][name]

    def _open_bin(self) -> None:
        files = [BIN_SINGLE]
        if (self.path / BIN_INDEX).exists():
            try:
                files = sorted(set(json.loads((self.path / BIN_INDEX).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise CheckpointError(f"{self.path / BIN_INDEX}: invalid index ({exc})") from None
        state: dict[str, torch.Tensor] = {}
        for name in files:
            try:
                part = torch.load(self.path / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - torch raises many kinds for corrupt pickles
                raise CheckpointError(f"{self.path / name}: cannot load with weights_only=True ({exc})") from None
            state.update({k: v for k, v in part.items() if isinstance(v, torch.Tensor)})
        self._bin_state = state

    # ---- queries -------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._bin_state) if self._bin_state is not None else list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in (self._bin_state if self._bin_state is not None else self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._bin_state[name].shape) if self._bin_state is not None else self.entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._bin_state[name].dtype if self._bin_state is not None else self.entry(name).dtype

    def nbytes(self, name: str) -> int:
        if self._bin_state is not None:
            t = self._bin_state[name]
            return t.numel() * t.element_size()
        return self.entry(name).nbytes

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing") from None

    def files(self) -> list[Path]:
        return sorted({e.file for e in self._entries.values()})

    # ---- reads ---------------------------------------------------------------------------
    def read(self, name: str, *, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None,
             check_finite: bool = False) -> torch.Tensor:
        """Tensor ``name`` (or rows [start, stop) of dim 0) in its storage dtype, on CPU.

        ``out`` is an optional uint8 buffer of at least the needed bytes to read into (reused
        buffers avoid first-touch page faults); the result is a view of it. ``check_finite`` raises
        NonFiniteError if the values read hold NaN/Inf (counted while each block is in cache).
        """
        if name not in self:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        if self._bin_state is not None:
            t = self._bin_state[name]
            t = t[rows[0]:rows[1]] if rows is not None else t
            if check_finite:
                from alignmerge.ops import count_nonfinite

                self._raise_nonfinite(name, count_nonfinite(t))
            return t
        entry = self._entries[name]
        shape = entry.shape
        byte_begin, byte_end = 0, entry.nbytes
        if rows is not None:
            start, stop = rows
            byte_begin, byte_end = start * entry.row_bytes, stop * entry.row_bytes
            shape = (stop - start, *shape[1:])
        n = byte_end - byte_begin
        if out is None:
            out = torch.empty(n, dtype=torch.uint8)
        elif out.numel() < n:
            raise ValueError(f"read buffer of {out.numel()} bytes is too small for {n} bytes of {name!r}")
        self._raise_nonfinite(name, read_bytes_into(entry, out, byte_begin, byte_end, count_nonfinite=check_finite),
                              entry.file)
        return out[:n].view(entry.dtype).view(shape)

    def map(self, name: str, *, rows: tuple[int, int] | None = None, check_finite: bool = False) -> torch.Tensor | None:
        """Tensor ``name`` (or rows [start, stop)) as a zero-copy view of a memory map of its file, or None
        where this checkpoint cannot map it (pickle weights, LoRA-merged tensors): use ``read`` then.
        ``check_finite`` raises NonFiniteError, naming the file, if the mapped values hold NaN/Inf."""
        if name not in self:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        if self._bin_state is not None:
            return None
        entry = self._entries[name]
        start, stop = rows if rows is not None else (0, entry.shape[0] if entry.shape else 1)
        shape = (stop - start, *entry.shape[1:]) if entry.shape else ()
        mapped = map_bytes(entry, start * entry.row_bytes, stop * entry.row_bytes).view(entry.dtype).view(shape)
        if check_finite:
            from alignmerge.ops import count_nonfinite

            self._raise_nonfinite(name, count_nonfinite(mapped), entry.file)
        return mapped

    def check_finite(self, name: str, values: torch.Tensor) -> None:
        """NonFiniteError naming the file if ``values`` (tensor ``name`` or rows of it, read earlier, on any
        device: counted where they are) hold NaN/Inf."""
        from alignmerge.ops import count_nonfinite

        entry = self._entries.get(name)
        self._raise_nonfinite(name, count_nonfinite(values), entry.file if entry is not None else None)

    def _raise_nonfinite(self, name: str, count: int, where: Path | str | None = None) -> None:
        if count:
            raise NonFiniteError(f"{where or self.path}: tensor {name!r} contains {count} NaN/Inf values")
