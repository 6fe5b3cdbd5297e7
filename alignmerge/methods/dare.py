"""DARE drop-and-rescale (Yu et al., 2023, arXiv 2311.03099): dare_linear and dare_ties.

tau_k = theta_k - theta_0; each element survives with probability density_k (counter-based stream
keyed by --seed, tensor and element index, so results do not depend on chunking or backend) and
survivors are rescaled — with ``rescale: true`` (mergekit's default) by sum|tau_k| / sum|kept tau_k|,
which keeps the L1 norm as mergekit 0.1.5 does. theta = theta_0 + lambda * sum_k w_k tau'_k, with
TIES sign election for dare_ties and division by the contributing weights when normalize.
"""
from __future__ import annotations

from alignmerge import ops
from alignmerge.methods import REQUIRED, MergeMethod, TensorInputs, register


class WholeTensorL1:
    """Chunk-fed L1 sums for mergekit's DARE rescale (one pass)."""

    def __init__(self, inputs: TensorInputs, numel: int):
        self.sums = ops.DareL1Rescale([float(p["density"]) for p in inputs.params], seed=inputs.seed,
                                      tensor_index=inputs.tensor_index)
        self.done = False

    def update(self, inputs: TensorInputs) -> None:
        self.sums.update(inputs.base, inputs.models, element_offset=inputs.element_offset)

    def finish_pass(self) -> None:
        self.done = True


class _Dare(MergeMethod):
    needs_base = True
    consensus = False
    model_parameters = {"weight": REQUIRED, "density": 1.0}
    method_parameters = {"normalize": False, "lambda": 1.0, "rescale": True, "int8_mask": False}

    def chunk_statistic(self, inputs: TensorInputs, numel: int) -> WholeTensorL1 | None:
        return WholeTensorL1(inputs, numel) if inputs.method_params["rescale"] else None

    def merge(self, inputs: TensorInputs, *, out_dtype, out=None, backend=None):
        if not inputs.method_params["rescale"]:
            rescale = None
        elif inputs.state is not None:
            rescale = inputs.state.sums.factors()
        else:
            rescale = "l1"
        return ops.dare(
            inputs.base, inputs.models, [float(p["weight"]) for p in inputs.params],
            density=[float(p["density"]) for p in inputs.params], seed=inputs.seed, tensor_index=inputs.tensor_index,
            lambda_=float(inputs.method_params["lambda"]), normalize=bool(inputs.method_params["normalize"]),
            consensus=self.consensus, rescale=rescale, element_offset=inputs.element_offset,
            out_dtype=out_dtype, out=out, backend=backend,
        )


@register
class DareLinear(_Dare):
    name = "dare_linear"


@register
class DareTies(_Dare):
    name = "dare_ties"
    consensus = True
