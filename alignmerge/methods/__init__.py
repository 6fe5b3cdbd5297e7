"""Merge methods by name: one module per method, each citing its formula."""
from __future__ import annotations

from alignmerge.errors import ConfigError
from alignmerge.methods.base import REQUIRED, MergeMethod, TensorInputs, append_diagnostics, merged_result

METHODS: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator adding a method to METHODS under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[MergeMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"merge_method: unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}"
        ) from None


__all__ = ["METHODS", "REQUIRED", "MergeMethod", "TensorInputs", "append_diagnostics", "get_method", "merged_result",
           "register"]

from alignmerge.methods import dare, fisher, linear, task_arithmetic, ties  # noqa: E402,F401
from alignmerge.methods import regmean  # noqa: E402,F401
from alignmerge.methods import alignmerge  # noqa: E402,F401
from alignmerge.methods import mergealign, safemerge  # noqa: E402,F401
