"""Hot ops behind one dispatch function each (torch reference, C++ on CPU, Triton on CUDA)."""
from alignmerge.ops.fisher import fisher_accumulate, fisher_merge  # noqa: F401
from alignmerge.ops.projector import apply_operator, cg_step, project, project_factors  # noqa: F401
from alignmerge.ops.merge import (  # noqa: F401
    DareL1Rescale, MagnitudeSelection, MagnitudeThresholds, dare, dare_keep_mask, magnitude_thresholds,
    task_arithmetic, ties, weighted_sum,
)
from alignmerge.ops.checks import count_nonfinite  # noqa: F401
