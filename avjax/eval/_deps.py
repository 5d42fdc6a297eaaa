"""Lazy imports of the optional `eval` extra (pocketsphinx, sentence-transformers, resemblyzer's
weights and torch for GE2E, speechmos + onnxruntime for DNSMOS)."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA_HINT = "pip install -e '.[eval]'"


class MissingEvalDependency(ImportError):
    """An optional package of the `eval` extra is not installed."""


def require(module: str, package: str, what: str) -> ModuleType:
    """Imports `module`, or raises `MissingEvalDependency` naming `package` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingEvalDependency(
            f"{what} needs the PyPI package {package!r} (part of avjax's `eval` extra): "
            f"{EXTRA_HINT}  [import of {module!r} failed: {e}]"
        ) from e
