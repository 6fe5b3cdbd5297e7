"""Task arithmetic (Ilharco et al., 2023, arXiv 2212.04089).

tau_k = theta_k - theta_0;  theta = theta_0 + lambda * sum_k w_k tau_k
(divided by sum_k w_k when normalize: true; mergekit defaults: normalize false, lambda 1).
"""
from __future__ import annotations

from alignmerge import ops
from alignmerge.methods import REQUIRED, MergeMethod, TensorInputs, register


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    needs_base = True
    model_parameters = {"weight": REQUIRED}
    method_parameters = {"normalize": False, "lambda": 1.0, "rescale": False, "int8_mask": False}
    output_reveals_nonfinite_inputs = True

    def merge(self, inputs: TensorInputs, *, out_dtype, out=None, backend=None):
        return ops.task_arithmetic(
            inputs.base, inputs.models, [float(p["weight"]) for p in inputs.params],
            lambda_=float(inputs.method_params["lambda"]), normalize=bool(inputs.method_params["normalize"]),
            out_dtype=out_dtype, out=out, backend=backend,
        )
