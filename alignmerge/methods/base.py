"""The merge-method interface: a method merges one tensor at a time from already-loaded inputs.

Planning (which tensors, which parameters) and I/O live in alignmerge.plan / alignmerge.executor;
a method only sees one tensor's inputs, resolved parameters and statistics, and returns the merge.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

REQUIRED = object()
"""Default marking a parameter that the config must give."""


@dataclass
class TensorInputs:
    """Everything a method needs to merge the tensor called ``name``.

    ``models`` holds one tensor per model of the config's ``models`` list (storage dtype,
    any device); ``base`` is the base/anchor tensor, or None for methods without one.
    ``params[k]`` are model k's parameters and ``method_params`` the method's global
    parameters, both already resolved for this tensor name (mergekit-style filters applied).
    ``stats[kind][k]`` is model k's statistic of that kind (e.g. "fisher") for this tensor.
    ``element_offset`` is the flat index of the first element when the executor merges a
    tensor in row chunks, so that counter-based randomness (DARE) is chunk-invariant.
    """

    name: str
    models: list[torch.Tensor]
    params: list[dict[str, Any]]
    method_params: dict[str, Any]
    base: torch.Tensor | None = None
    stats: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    seed: int = 0
    tensor_index: int = 0
    element_offset: int = 0
    state: Any = None
    """The finished ``MergeMethod.chunk_statistic`` when the tensor is merged in row chunks."""
    check_finite: bool = False
    """Set by the executor when ``MergeMethod.merge_checks_inputs``: the merge raises NonFiniteError for a
    NaN/Inf input."""


class MergeMethod(ABC):
    """A merge method; subclasses cite their formula in the class docstring."""

    name: ClassVar[str]
    needs_base: ClassVar[bool] = False
    model_parameters: ClassVar[dict[str, Any]] = {}
    """Per-model parameter names and defaults (REQUIRED if the config must set them)."""
    method_parameters: ClassVar[dict[str, Any]] = {}
    """Method-wide parameter names and defaults."""
    stats: ClassVar[tuple[str, ...]] = ()
    """Kinds of per-model statistics the method reads (e.g. ("fisher",))."""
    elementwise: ClassVar[bool] = True
    """True if the merge of a row block depends only on that block (so tensors may be chunked)."""
    output_reveals_nonfinite_inputs: ClassVar[bool] = False
    """True if every input element enters its output element arithmetically, with no element dropped or
    selected (0·NaN = NaN, 0·Inf = NaN), so a NaN/Inf input always yields a NaN/Inf output: the executor's
    check of the output then covers the inputs too, saving a pass over them (tested in ``test_merge_kernels``)."""

    def merge_checks_inputs(self, backend: str) -> bool:
        """True if ``merge`` on ``backend`` finds NaN/Inf inputs itself when ``inputs.check_finite`` is set (in
        the pass it makes anyway), so the executor need not count them on read."""
        return False

    def chunkable(self, name: str, shape: tuple[int, ...], method_params: dict[str, Any]) -> bool:
        """True if tensor ``name`` may be merged in row chunks (with ``chunk_statistic`` for whole-tensor terms)."""
        return self.elementwise

    def working_bytes(self, numel: int, n_models: int) -> int:
        """Memory a merge call on ``numel`` elements of ``n_models`` models needs beyond its inputs and output
        (fp32 temporaries); the plan sizes row chunks, and refuses unchunkable tensors, by it."""
        return 0

    def chunk_statistic(self, inputs: TensorInputs, numel: int) -> Any:
        """For a tensor merged in row chunks: a whole-tensor statistic to gather first, or None.

        The object has ``done``, ``update(chunk_inputs)`` and ``finish_pass()``; the executor feeds it
        every chunk, pass after pass, until ``done``, then merges each chunk with it in ``inputs.state``
        (e.g. TIES's top-k magnitude thresholds, DARE's L1 rescale sums).
        """
        return None

    @abstractmethod
    def merge(self, inputs: TensorInputs, *, out_dtype: torch.dtype, out: torch.Tensor | None = None,
              backend: str | None = None) -> torch.Tensor:
        """Return the merged tensor for ``inputs`` in ``out_dtype`` (written into ``out`` if given)."""


def merged_result(merged: torch.Tensor, out: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """A method's return value: ``merged`` copied into ``out`` when given, else cast to ``out_dtype``."""
    if out is not None:
        return out.copy_(merged)
    return merged.to(out_dtype)


def append_diagnostics(path, record: dict) -> None:
    """Append one JSON line to a method's diagnostics file."""
    import json

    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=float) + "\n")
