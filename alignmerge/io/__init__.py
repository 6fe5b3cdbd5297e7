"""Checkpoint I/O: validating lazy readers and a pre-laid-out, atomic sharded writer."""
from alignmerge.io.checkpoint import Checkpoint
from alignmerge.io.safetensors_file import TensorEntry, read_header
from alignmerge.io.writer import OutputTensor, ShardedWriter, parse_size

__all__ = ["Checkpoint", "OutputTensor", "ShardedWriter", "TensorEntry", "parse_size", "read_header"]
