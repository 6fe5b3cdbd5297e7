"""Hot ops behind one dispatch function each (torch reference, C++ on CPU, Triton on CUDA)."""
from alignmerge.ops.fisher import fisher_accumulate  # noqa: F401
