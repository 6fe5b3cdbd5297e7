"""Linear merge / model soup (Wortsman et al., 2022, arXiv 2203.05482).

theta = sum_k w_k theta_k / sum_k w_k   (normalize: true, the default), or sum_k w_k theta_k.
"""
from __future__ import annotations

from alignmerge import ops
from alignmerge.errors import ConfigError
from alignmerge.methods import REQUIRED, MergeMethod, TensorInputs, register


@register
class Linear(MergeMethod):
    name = "linear"
    model_parameters = {"weight": REQUIRED}
    method_parameters = {"normalize": True}
    output_reveals_nonfinite_inputs = True

    def merge(self, inputs: TensorInputs, *, out_dtype, out=None, backend=None):
        weights = [float(p["weight"]) for p in inputs.params]
        normalize = bool(inputs.method_params["normalize"])
        if normalize and sum(weights) == 0:
            raise ConfigError(f"linear: weights for tensor {inputs.name!r} sum to 0 with normalize: true")
        return ops.weighted_sum(inputs.models, weights, normalize=normalize, out_dtype=out_dtype, out=out,
                                backend=backend)
