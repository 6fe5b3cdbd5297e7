"""Triton kernels (GPU hot paths; CPU tensors under TRITON_INTERPRET=1), one module per kernel family.

Each module holds its ``@triton.jit`` kernels and the launcher the dispatch function in
``alignmerge.ops.<family>`` calls; the torch references live in ``alignmerge.ops.reference``.

- ``weighted_sum``: fused sum_k w_k x_k.
- ``dare``: the counter-based DARE random stream and the L1 sums for mergekit-style rescaling.
- ``ties``: generalised task arithmetic (task arithmetic / TIES / DARE) in one pass, and the
  radix-select histograms and tie counts behind the TIES magnitude threshold.
- ``fisher``, ``projector``: see their modules.

Modules are imported lazily by the ops, so the package imports without triton.
"""
