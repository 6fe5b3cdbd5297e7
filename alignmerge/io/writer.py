"""Sharded safetensors output laid out in advance, so tensors stream to disk as they are merged.

The plan knows every output tensor's name, shape and dtype before the first merge, so each shard's
header and byte layout are fixed up front: files are created at full (sparse) size and every tensor
(or row block of one) is written with pwrite at its offset. Free disk space is checked against the
layout before the merge starts (plan.check_preflight_disk); a disk that fills up anyway ends the merge
with a clear error and no output.
Shards follow Hugging Face naming (``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``,
or a single ``model.safetensors``).
"""
from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from alignmerge.errors import AlignMergeError, NonFiniteError
from alignmerge.io.safetensors_file import layout_header

def shard_crc():
    """(name, update) of the running shard checksum: CRC-32C from the C++ extension (hardware CRC, ~3x
    zlib here), else zlib's CRC-32. The name is recorded with each value, so a resume on an installation
    with the other one recomputes rather than trusts."""
    from alignmerge.ops._backend import cpp_extension

    ext = cpp_extension()
    return ("crc32c", ext.crc32c) if ext is not None else ("crc32", zlib.crc32)


WRITE_BLOCK_BYTES = 4 << 20
"""Output is checked, checksummed and written in blocks of this size, each while it is in cache."""
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000, '512MiB' -> 536870912, 1000 -> 1000."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"invalid size {text!r}; use e.g. 2GB, 500MB or 1GiB") from None
    if unit not in SIZE_UNITS or value <= 0:
        raise ValueError(f"invalid size {text!r}; use e.g. 2GB, 500MB or 1GiB")
    return int(value * SIZE_UNITS[unit])


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class _Slot:
    file: Path
    offset: int  # absolute offset of the tensor's first byte in its file
    nbytes: int
    row_bytes: int


class _DirectAppender:
    """Sequential writes of one shard with O_DIRECT through two page-aligned staging buffers, bypassing the page
    cache: no page allocation, reclaim or later writeback on the merge's cores. A full buffer is written by an
    I/O thread while the caller fills the other, so the disk never waits for the copy, check and checksum of
    the next block (with ``background`` false, each write happens in turn on the caller's thread). ``open``
    returns None where the file system refuses O_DIRECT (older tmpfs, some network and overlay file systems);
    the writer then uses buffered pwrite."""

    ALIGN = 4096

    def __init__(self, fd: int, background: bool = True):
        self.fd = fd
        self._stages = [mmap.mmap(-1, WRITE_BLOCK_BYTES) for _ in range(2)]  # page-aligned, as O_DIRECT needs
        self._views = [memoryview(stage) for stage in self._stages]
        self._pending: list[Future | None] = [None, None]  # the write in flight from each staging buffer
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignmerge-odirect") if background else None
        self._current = 0
        self._start = 0  # file offset of the current staging buffer's first byte (a multiple of ALIGN)
        self._fill = 0

    @classmethod
    def open(cls, path: Path, head: bytes, background: bool = True) -> "_DirectAppender | None":
        """An appender whose next byte is the one after the shard header ``head``, or None."""
        if not hasattr(os, "O_DIRECT") or len(head) > WRITE_BLOCK_BYTES:
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError:
            return None
        appender = cls(fd, background)
        appender._views[0][:len(head)] = head
        appender._fill = len(head)
        try:  # probe: file systems without O_DIRECT support refuse the first aligned write
            appender._write(0, cls.ALIGN, 0)
        except OSError:
            appender.close()
            return None
        return appender

    @property
    def position(self) -> int:
        """File offset of the next byte to append."""
        return self._start + self._fill

    def append(self, block: memoryview) -> None:
        """Stage ``block`` (the bytes at ``position``), handing each full staging buffer to the I/O thread."""
        done = 0
        while done < len(block):
            n = min(len(block) - done, WRITE_BLOCK_BYTES - self._fill)
            self._views[self._current][self._fill:self._fill + n] = block[done:done + n]
            self._fill += n
            done += n
            if self._fill == WRITE_BLOCK_BYTES:
                if self._io is None:
                    self._write(self._current, WRITE_BLOCK_BYTES, self._start)
                else:
                    self._pending[self._current] = self._io.submit(self._write, self._current, WRITE_BLOCK_BYTES,
                                                                   self._start)
                self._current ^= 1
                self._start += WRITE_BLOCK_BYTES
                self._fill = 0
                self._wait(self._current)  # the other buffer is refilled only once its write is done

    def finish(self) -> None:
        """Write the staged tail, zero-padded to the alignment (the writer truncates the file to size), and close."""
        try:
            for which in (0, 1):
                self._wait(which)
            if self._fill:
                padded = -(-self._fill // self.ALIGN) * self.ALIGN
                self._views[self._current][self._fill:padded] = bytes(padded - self._fill)
                self._write(self._current, padded, self._start)
        finally:
            self.close()

    def _wait(self, which: int) -> None:
        """Wait for the write from staging buffer ``which``; its OSError is raised here."""
        pending, self._pending[which] = self._pending[which], None
        if pending is not None:
            pending.result()

    def _write(self, which: int, nbytes: int, offset: int) -> None:
        """Write the first ``nbytes`` of staging buffer ``which`` at file offset ``offset``."""
        if os.pwrite(self.fd, self._views[which][:nbytes], offset) != nbytes:
            raise OSError(errno.EIO, "short O_DIRECT write")

    def close(self) -> None:
        """Close without writing what is staged (after ``finish``, or to abandon the shard)."""
        if self._io is not None:
            self._io.shutdown(wait=True)
        for view, stage in zip(self._views, self._stages):
            view.release()
            stage.close()
        os.close(self.fd)


class ShardedWriter:
    """Writes the planned tensors into pre-laid-out safetensors shards inside ``directory``."""

    def __init__(self, directory: str | Path, tensors: list[OutputTensor], *, max_shard_bytes: int,
                 metadata: dict[str, str] | None = None, direct: bool = True, background: bool = True):
        self.directory = Path(directory)
        self.direct = direct
        """Write shards in order with O_DIRECT where the file system allows it (else buffered pwrite)."""
        self.background = background
        """O_DIRECT writes run on an I/O thread while the next block is staged (else in turn)."""
        self.metadata = {"format": "pt", **(metadata or {})}
        groups: list[list[OutputTensor]] = [[]]
        size = 0
        for t in tensors:
            if groups[-1] and size + t.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        n = len(groups)
        self.shard_names = (["model.safetensors"] if n == 1
                            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.slots: dict[str, _Slot] = {}
        self.shard_of: dict[str, str] = {}
        self.shard_tensors: dict[str, list[str]] = {}
        self._layouts = []
        for shard_name, group in zip(self.shard_names, groups):
            blob, offsets, offset = layout_header([(t.name, t.dtype, tuple(t.shape)) for t in group], self.metadata)
            start = 8 + len(blob)
            path = self.directory / shard_name
            for t in group:
                rows = t.shape[0] if t.shape else 1
                self.slots[t.name] = _Slot(path, start + offsets[t.name][0], t.nbytes, t.nbytes // rows if rows else 0)
                self.shard_of[t.name] = shard_name
            self.shard_tensors[shard_name] = [t.name for t in group]
            self._layouts.append((path, blob, start + offset))
        self.total_bytes = sum(t.nbytes for t in tensors)
        self._fds: dict[Path, int] = {}
        self._direct: dict[Path, _DirectAppender] = {}
        self._sizes = {path: size for path, _blob, size in self._layouts}
        self._crc_name, self._crc_update = shard_crc()
        # Running CRC of each shard while it is written front to back (the plan's order), so that
        # completed shards are checksummed for --resume without reading them again.
        self._crc: dict[Path, tuple[int, int]] = {}

    @property
    def file_bytes(self) -> int:
        return sum(size for _p, _b, size in self._layouts)

    def open(self, *, keep_existing: set[str] = frozenset(), only: set[str] | None = None) -> None:
        """Create (or, for resumed shards in ``keep_existing``, reopen) the shards at full size.

        ``only`` restricts this writer to a subset of shards (one rank of a distributed merge).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        for path, blob, size in self._layouts:
            if only is not None and path.name not in only:
                continue
            resume = path.name in keep_existing
            fd = os.open(path, os.O_RDWR | (0 if resume else os.O_CREAT | os.O_TRUNC), 0o644)
            self._fds[path] = fd
            if resume:
                continue
            try:
                os.ftruncate(fd, size)  # sparse: posix_fallocate's unwritten extents made writes 10x slower (ext4)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise AlignMergeError(
                        f"{path}: cannot create the output shard ({size / 1e9:.2f} GB): disk full or file size limit"
                    ) from None
                raise AlignMergeError(f"{path}: cannot create the output shard ({exc.strerror or exc})") from None
            head = struct.pack("<Q", len(blob)) + blob
            appender = _DirectAppender.open(path, head, self.background) if self.direct else None
            if appender is not None:
                self._direct[path] = appender
            else:
                self._pwrite(fd, path, head, 0)
            self._crc[path] = (self._crc_update(head, 0), len(head))

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0, *, check_finite: bool = False) -> None:
        """Write ``tensor`` (the whole output tensor, or rows from ``row_start``) at its planned place.

        Block by block, while each block is in cache: NaN/Inf count (``check_finite``: NonFiniteError
        naming the tensor; a tensor on a GPU is counted there, before its copy to the host), the shard's
        running CRC-32, and the pwrite."""
        from alignmerge.ops import count_nonfinite

        slot = self.slots[name]
        check = check_finite and tensor.is_floating_point()
        if check and tensor.device.type != "cpu":
            if count_nonfinite(tensor):
                raise NonFiniteError(f"merged tensor {name!r} contains NaN or Inf")
            check = False
        flat = tensor.detach().to("cpu").contiguous().view(-1)
        data = flat.view(torch.uint8)
        offset = slot.offset + row_start * slot.row_bytes
        if offset + data.numel() > slot.offset + slot.nbytes:
            raise ValueError(f"write of {data.numel()} bytes overflows the slot of {name!r}")
        view = memoryview(data.numpy())
        crc = self._crc.get(slot.file)
        crc = crc if crc is not None and crc[1] == offset else None
        appender = self._direct.get(slot.file)
        if appender is not None and appender.position != offset:  # out of order: buffered from here on
            self._finish_direct(slot.file)
            appender = None
        step = WRITE_BLOCK_BYTES - WRITE_BLOCK_BYTES % flat.element_size()
        for begin in range(0, len(view), step):
            block = view[begin:begin + step]
            if check and count_nonfinite(flat[begin // flat.element_size():(begin + len(block)) // flat.element_size()]):
                raise NonFiniteError(f"merged tensor {name!r} contains NaN or Inf")
            if crc is not None:
                crc = (self._crc_update(block, crc[0]), crc[1] + len(block))
            if appender is not None:
                self._io(slot.file, appender.append, block)
            else:
                self._pwrite(self._fds[slot.file], slot.file, block, offset + begin)
        self._crc[slot.file] = crc
        if appender is None and hasattr(os, "posix_fadvise"):  # start writeback now (Linux: asynchronous)
            os.posix_fadvise(self._fds[slot.file], offset, len(view), os.POSIX_FADV_DONTNEED)

    def _finish_direct(self, path: Path) -> None:
        """Write out a shard's staged O_DIRECT tail and trim the alignment padding off the file."""
        appender = self._direct.pop(path, None)
        if appender is not None:
            self._io(path, appender.finish)
            self._io(path, os.ftruncate, self._fds[path], self._sizes[path])

    def _io(self, path: Path, call, *args) -> None:
        """Run an I/O call, turning a full disk or any write failure into an error that names the shard."""
        try:
            call(*args)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise AlignMergeError(f"{path}: disk full (or file size limit reached) while writing the output") from None
            raise AlignMergeError(f"{path}: write failed ({exc.strerror or exc})") from None

    def _pwrite(self, fd: int, path: Path, data, offset: int) -> None:
        view = memoryview(data).cast("B")

        def write_all() -> None:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)

        self._io(path, write_all)

    def shard_checksum(self, shard_name: str) -> str:
        """"<algorithm>:<hex>" checksum of a shard file (recorded for --resume): the running one if the
        shard was written in order, else computed from the file."""
        path = self.directory / shard_name
        crc = self._crc.get(path)
        if crc is None or crc[1] != path.stat().st_size:
            self._finish_direct(path)  # the file must hold every staged byte before it is read back
            value = 0
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    value = self._crc_update(block, value)
            crc = (value, path.stat().st_size)
        return f"{self._crc_name}:{crc[0]:08x}"

    def sync_shard(self, shard_name: str) -> None:
        """Make a completed shard durable (its O_DIRECT tail written, then fsync)."""
        path = self.directory / shard_name
        self._finish_direct(path)
        os.fsync(self._fds[path])

    def close(self) -> None:
        """Finish, fsync and close this writer's shards."""
        for path in list(self._direct):
            self._finish_direct(path)
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()

    def write_index(self) -> None:
        """Write the HF index when there is more than one shard."""
        if len(self.shard_names) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(self.shard_of)}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for appender in self._direct.values():
            appender.close()
        self._direct.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

