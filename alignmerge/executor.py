"""Execution: run a MergePlan tensor by tensor with bounded memory, overlapping read, merge and write.

A read-ahead thread reads the next work unit (a tensor, or a row chunk of one) into reused buffers (pinned on
CUDA, copied to the device on a separate stream; memory maps on CPU), counting NaN/Inf as the data arrives (on
CUDA: on the GPU, after the copy) unless the method's output check covers its inputs; the main thread merges
the current unit into one of two reused output buffers; a write-behind thread checks (on the GPU for CUDA
results), checksums and writes the previous result to the ShardedWriter. No fresh allocations on the hot path,
so no first-touch page faults. Peak memory ~ two units of inputs + two outputs.
"""
from __future__ import annotations

import contextlib
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch

from alignmerge.errors import NonFiniteError
from alignmerge.io.writer import ShardedWriter
from alignmerge.methods import TensorInputs
from alignmerge.ops._backend import choose_backend
from alignmerge.plan import MergePlan, TensorTask


_LOCATE_SLOT = 3
"""Buffer slot for re-reading a unit's inputs to name a non-finite one (0, 1: read-ahead; 2: chunk statistics)."""


@contextlib.contextmanager
def _suggest_allow_nonfinite():
    """A NaN/Inf input's error, with the flag that merges it anyway."""
    try:
        yield
    except NonFiniteError as exc:
        raise NonFiniteError(f"{exc} (pass --allow-nonfinite to merge it anyway)") from None


@dataclass
class WorkUnit:
    task: TensorTask
    rows: tuple[int, int]


class BufferPool:
    """Reusable uint8 host buffers, one per (slot, input); grown only when a larger unit arrives."""

    def __init__(self, pin: bool = False):
        self.pin = pin
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}

    def get(self, slot: int, key: int, nbytes: int) -> torch.Tensor:
        buf = self._buffers.get((slot, key))
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin)
            self._buffers[(slot, key)] = buf
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())


def _rounds(src: torch.dtype, dst: torch.dtype) -> bool:
    """True if casting src -> dst changes values (ops compute in fp32, so widening casts are skipped)."""
    return src != dst and not (dst in (torch.float32, torch.float64) and src.itemsize <= dst.itemsize)


class Executor:
    """Runs the plan's tasks through the method and into the writer."""

    def __init__(self, plan: MergePlan, writer: ShardedWriter, *, device: str = "cpu", backend: str | None = None,
                 seed: int = 0, allow_nonfinite: bool = False, prefetch: bool = True,
                 on_progress: Callable[[int], None] | None = None,
                 on_tensor_done: Callable[[str], None] | None = None):
        self.plan = plan
        self.writer = writer
        self.device = torch.device(device)
        self.backend = backend
        # the method finds NaN/Inf inputs in its own pass on this backend: inputs are not counted on read
        self.merge_checks_inputs = plan.method.merge_checks_inputs(
            choose_backend(torch.empty(0, device=self.device), backend))
        self.seed = seed
        self.allow_nonfinite = allow_nonfinite
        self.prefetch = prefetch
        self.on_progress = on_progress or (lambda n: None)
        self.on_tensor_done = on_tensor_done or (lambda name: None)
        self.pool = BufferPool(pin=self.device.type == "cuda")
        self.map_inputs = self.device.type == "cpu"
        """Merge on CPU straight from memory maps of the inputs (no copy out of the page cache); on CUDA
        inputs are read into pinned buffers for the host-to-device copies."""
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._copied: dict[int, object] = {}  # slot -> event after its last host-to-device copies (CUDA)
        self._out_buffers: list[torch.Tensor | None] = [None, None]  # two reused output buffers (uint8)
        self._writes: list[Future | None] = [None, None]  # the pending write of each output buffer
        self._write_pool: ThreadPoolExecutor | None = None
        self._units_merged = 0
        self.bytes_read = 0
        self.bytes_written = 0

    # ---- unit schedule -------------------------------------------------------------------
    def units(self, tasks: list[TensorTask]) -> Iterator[WorkUnit]:
        for task in tasks:
            for rows in task.chunks:
                yield WorkUnit(task, rows)

    def _read_input(self, unit: WorkUnit, ck, key: int, slot: int, check: bool) -> torch.Tensor:
        """One input of a unit: a memory map of its bytes on CPU, else read into the slot's buffer; with
        ``check``, a NaN/Inf in it raises NonFiniteError naming the file and tensor."""
        task = unit.task
        total_rows = task.shape[0] if task.shape else 1
        rows = None if unit.rows == (0, total_rows) else unit.rows
        with _suggest_allow_nonfinite():
            mapped = ck.map(task.name, rows=rows, check_finite=check) if self.map_inputs else None
            if mapped is not None:
                return mapped
            nbytes = ck.nbytes(task.name) * (unit.rows[1] - unit.rows[0]) // max(total_rows, 1)
            return ck.read(task.name, rows=rows, out=self.pool.get(slot, key, nbytes), check_finite=check)

    def _read(self, unit: WorkUnit, slot: int) -> tuple[list[torch.Tensor], torch.Tensor | None, object]:
        """Read a unit's inputs into the slot's (pinned, on CUDA) buffers; on CUDA also start their
        host-to-device copies on the copy stream. Returns (tensors, base, copy-done event or None).

        Inputs are checked for NaN/Inf here unless the method's output check covers them
        (``MergeMethod.output_reveals_nonfinite_inputs``)."""
        task = unit.task
        if slot in self._copied:  # the slot's pinned buffers are refilled only once their last copies are done
            self._copied.pop(slot).synchronize()
        read = partial(self._read_input, unit, slot=slot)
        if task.copy_from_reference:
            return [read(self.plan.reference, 0, check=False)], None, None
        check = not (self.allow_nonfinite or self.plan.method.output_reveals_nonfinite_inputs
                     or self.merge_checks_inputs)
        on_host = self.copy_stream is None  # on CUDA inputs are counted on the GPU, after their copies
        tensors = [read(ck, k, check=check and on_host) for k, ck in enumerate(self.plan.models)]
        base = read(self.plan.base, len(tensors), check=check and on_host) if self.plan.base is not None else None
        self.bytes_read += sum(t.numel() * t.element_size() for t in tensors + ([base] if base is not None else []))
        if on_host:
            return tensors, base, None
        with torch.cuda.stream(self.copy_stream):
            tensors = [t.to(self.device, non_blocking=True) for t in tensors]
            base = base.to(self.device, non_blocking=True) if base is not None else None
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
            self._copied[slot] = ready
            if check:
                with _suggest_allow_nonfinite():
                    for ck, t in zip([*self.plan.models, self.plan.base], [*tensors, base]):
                        if t is not None:
                            ck.check_finite(task.name, t)
        return tensors, base, ready

    # ---- main loop -----------------------------------------------------------------------
    def run(self, tasks: list[TensorTask] | None = None) -> None:
        tasks = self.plan.tasks if tasks is None else tasks
        units = list(self.units(tasks))
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignmerge-prefetch") if self.prefetch else None
        self._write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignmerge-write") \
            if self.prefetch else None
        try:
            pending: Future | None = None
            if pool is not None and units:
                pending = pool.submit(self._read, units[0], 0)
            state: dict[int, object] = {}
            for i, unit in enumerate(units):
                if pool is not None:
                    data = pending.result()
                    if i + 1 < len(units):
                        pending = pool.submit(self._read, units[i + 1], (i + 1) % 2)
                else:
                    data = self._read(unit, 0)
                self._process(unit, *data, state)
            for pending_write in self._writes:
                if pending_write is not None:
                    pending_write.result()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if self._write_pool is not None:
                self._write_pool.shutdown(wait=True, cancel_futures=True)
            self._writes = [None, None]

    def _process(self, unit: WorkUnit, tensors: list[torch.Tensor], base: torch.Tensor | None, ready,
                 state: dict[int, object]) -> None:
        task = unit.task
        if ready is not None:
            self._await_copy(ready, tensors, base)
        if task.copy_from_reference:  # written from the input buffer, so before the next read reuses it
            self._write(unit, tensors[0], 0, check=False).result()
            return
        inputs = self._inputs(task, unit.rows, tensors, base)
        if len(task.chunks) > 1 and task.index not in state:
            state[task.index] = self._chunk_statistic(task, inputs)
        inputs.state = state.get(task.index)
        inputs.check_finite = self.merge_checks_inputs and not self.allow_nonfinite
        which = self._units_merged % 2
        self._units_merged += 1
        out = self._out_buffer(task, unit, which)
        try:
            merged = self.plan.method.merge(inputs, out_dtype=task.out_dtype, out=out, backend=self.backend)
        except NonFiniteError:
            self._name_nonfinite_input(unit)  # raises the error that names the file
            raise
        if merged.data_ptr() != out.data_ptr():  # the write outlives this call: never a view of an input buffer
            merged = out.copy_(merged)
        if unit.rows[1] == (task.shape[0] if task.shape else 1):
            state.pop(task.index, None)
        self._write(unit, merged, which, check=not self.allow_nonfinite)

    def _await_copy(self, ready, tensors: list[torch.Tensor], base: torch.Tensor | None) -> None:
        """Make the compute stream wait for a unit's host-to-device copies; the device tensors, allocated on the
        copy stream, are marked as used by the compute stream so the allocator does not hand their memory to
        the next copy while a kernel still reads it."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(ready)
        for t in [*tensors, *([base] if base is not None else [])]:
            t.record_stream(stream)

    def _write(self, unit: WorkUnit, data: torch.Tensor, which: int, *, check: bool) -> Future:
        """Check, checksum and write ``data`` (output buffer ``which``) on the write-behind thread, then report
        progress; the buffer is reused only after this write completes."""
        def job() -> None:
            try:
                self.writer.write(unit.task.name, data, unit.rows[0], check_finite=check)
            except NonFiniteError:
                if self.plan.method.output_reveals_nonfinite_inputs:
                    self._name_nonfinite_input(unit)
                raise
            self._done(unit, data.numel() * data.element_size())

        if self._write_pool is None:
            done: Future = Future()
            job()
            done.set_result(None)
        else:
            done = self._write_pool.submit(job)
        self._writes[which] = done
        return done

    def _name_nonfinite_input(self, unit: WorkUnit) -> None:
        """After a NaN/Inf found by the merge or in the output of a method whose output reveals its inputs'
        (inputs unchecked on read): raise the error that names the input holding one; return if every input
        is finite (the merge overflowed)."""
        models = [*self.plan.models, *([self.plan.base] if self.plan.base is not None else [])]
        for key, ck in enumerate(models):
            self._read_input(unit, ck, key, slot=_LOCATE_SLOT, check=True)

    def _inputs(self, task: TensorTask, rows: tuple[int, int], tensors: list[torch.Tensor],
                base: torch.Tensor | None) -> TensorInputs:
        """Move a unit's tensors to the device, apply the config's dtype, and wrap them for the method."""
        if self.device.type != "cpu":
            tensors = [t.to(self.device, non_blocking=True) for t in tensors]
            base = base.to(self.device, non_blocking=True) if base is not None else None
        cast = self.plan.config.dtype
        if cast is not None:
            tensors = [t.to(cast) if _rounds(t.dtype, cast) else t for t in tensors]
            base = base.to(cast) if base is not None and _rounds(base.dtype, cast) else base
        row_len = math.prod(task.shape[1:]) if task.shape else 1
        return TensorInputs(name=task.name, models=tensors, params=task.params, method_params=task.method_params,
                            base=base, seed=self.seed, tensor_index=task.index, element_offset=rows[0] * row_len)

    def _chunk_statistic(self, task: TensorTask, first: TensorInputs):
        """Gather the method's whole-tensor statistic over every chunk (extra read passes, slot 2)."""
        stat = self.plan.method.chunk_statistic(first, math.prod(task.shape))
        while stat is not None and not stat.done:
            for rows in task.chunks:
                tensors, base, ready = self._read(WorkUnit(task, rows), 2)
                if ready is not None:
                    self._await_copy(ready, tensors, base)
                stat.update(self._inputs(task, rows, tensors, base))
            stat.finish_pass()
        return stat

    def _out_buffer(self, task: TensorTask, unit: WorkUnit, which: int) -> torch.Tensor:
        """Output buffer ``which`` (0 or 1), once its previous write has finished."""
        if self._writes[which] is not None:
            self._writes[which].result()
        shape = (unit.rows[1] - unit.rows[0], *task.shape[1:]) if task.shape else ()
        nbytes = math.prod(shape) * task.out_dtype.itemsize
        buf = self._out_buffers[which]
        if buf is None or buf.numel() < nbytes or buf.device != self.device:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
            self._out_buffers[which] = buf
        return buf[:nbytes].view(task.out_dtype).view(shape)

    def _done(self, unit: WorkUnit, nbytes: int) -> None:
        self.bytes_written += nbytes
        self.on_progress(nbytes)
        if unit.rows[1] == (unit.task.shape[0] if unit.task.shape else 1):
            self.on_tensor_done(unit.task.name)
