"""AlignMerge: merge fine-tuned LLM checkpoints around an aligned anchor, fast and memory-bounded."""
__version__ = "0.1.0"
