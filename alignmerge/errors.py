"""User-facing errors: the CLI prints them as one line and exits non-zero (traceback only with --debug)."""


class AlignMergeError(Exception):
    """An error caused by the user's input (config, checkpoint, data); the message names the culprit."""


class ConfigError(AlignMergeError):
    """The merge config is invalid; the message names the key at fault."""


class CheckpointError(AlignMergeError):
    """A checkpoint file or directory is missing, corrupt or inconsistent; the message names the file or tensor."""


class DataError(AlignMergeError):
    """A data source (JSONL file, builtin corpus) is unusable; the message names the file and line."""


class NonFiniteError(AlignMergeError):
    """NaN or Inf found in an input or a merged tensor."""
