"""Data statistics for data-aware merging: diagonal Fisher (per sequence) and RegMean Gram matrices."""
from alignmerge.fisher.capture import LinearCapture, SquaredGradCapture, supported_parameters
from alignmerge.fisher.compute import compute_fisher

__all__ = ["LinearCapture", "SquaredGradCapture", "compute_fisher", "supported_parameters"]
