"""TIES-merging (Yadav et al., 2023, arXiv 2306.01708), with mergekit's parameters and numerics.

tau_k = theta_k - theta_0, trimmed to its top density_k fraction by magnitude; elected sign
s = sign(sum_k w_k tau_k); theta = theta_0 + lambda * sum_k [sign(tau_k) = s] w_k tau_k
(divided by sum_k [sign(tau_k) = s] w_k when normalize, the default).
"""
from __future__ import annotations

from alignmerge import ops
from alignmerge.methods import REQUIRED, MergeMethod, TensorInputs, register


class WholeTensorSelection:
    """Chunk-fed top-k magnitude selection (ops.MagnitudeSelection) for tensors merged in row chunks."""

    def __init__(self, inputs: TensorInputs, numel: int):
        self.selection = ops.MagnitudeSelection(numel, [float(p["density"]) for p in inputs.params])

    @property
    def done(self) -> bool:
        return self.selection.done

    def update(self, inputs: TensorInputs) -> None:
        self.selection.update(inputs.base, inputs.models, element_offset=inputs.element_offset)

    def finish_pass(self) -> None:
        self.selection.finish_pass()


@register
class Ties(MergeMethod):
    name = "ties"
    needs_base = True
    model_parameters = {"weight": REQUIRED, "density": 1.0}
    method_parameters = {"normalize": True, "lambda": 1.0, "rescale": False, "int8_mask": False}

    def working_bytes(self, numel: int, n_models: int) -> int:
        """Whole-tensor TIES on the C++ backend (from ops.merge.ONE_PASS_MIN_NUMEL elements) keeps, per expert,
        its sample's keys (4 bytes for one element in 16, at most 16 MB) and the band it records (8 bytes an
        element; the band's cap, twice its expected size, is under 4% of the elements, and only what is
        recorded is touched): under 1 byte per element and expert. The merging thread keeps these buffers for
        the next tensor (csrc ReusedBuffer), so the largest tensor's stay allocated until that thread ends."""
        return n_models * numel if numel >= ops.merge.ONE_PASS_MIN_NUMEL else 0

    def merge_checks_inputs(self, backend: str) -> bool:
        return backend == "cpp"  # its pass counts the NaN/Inf task-vector elements (csrc gta_block)

    def chunk_statistic(self, inputs: TensorInputs, numel: int) -> WholeTensorSelection:
        return WholeTensorSelection(inputs, numel)

    def merge(self, inputs: TensorInputs, *, out_dtype, out=None, backend=None):
        return ops.ties(
            inputs.base, inputs.models, [float(p["weight"]) for p in inputs.params],
            density=[float(p["density"]) for p in inputs.params], lambda_=float(inputs.method_params["lambda"]),
            normalize=bool(inputs.method_params["normalize"]),
            thresholds=inputs.state.selection.thresholds() if inputs.state is not None else None,
            element_offset=inputs.element_offset, out_dtype=out_dtype, out=out, backend=backend,
            check_finite=inputs.check_finite,
        )
