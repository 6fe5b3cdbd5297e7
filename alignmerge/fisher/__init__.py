"""Data statistics for data-aware merging: diagonal Fisher (per sequence) and RegMean Gram matrices."""
from alignmerge.fisher.capture import LinearCapture, SquaredGradCapture, supported_parameters
from alignmerge.fisher.compute import compute_fisher, load_model, prepare_sequences, sequence_backward

__all__ = ["LinearCapture", "SquaredGradCapture", "compute_fisher", "load_model", "prepare_sequences",
           "sequence_backward", "supported_parameters"]
