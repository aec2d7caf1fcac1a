"""Errors of the data module, under iota's IotaError root."""

import importlib
from types import ModuleType

from iota.errors import IotaError


class DataError(IotaError, ValueError):
    """A request the data module cannot serve: bad sizes, a shard out of range."""


class CorpusError(DataError):
    """A corpus that cannot be read: a missing path, no documents, an empty split."""


class TokenizerError(DataError):
    """An unknown tokenizer name, a bad vocabulary size, ids outside the vocabulary."""


class MissingDependencyError(DataError, ImportError):
    """An optional package that a chosen source or tokenizer needs is not installed."""


def require(module: str, needed_for: str) -> ModuleType:
    """Import an optional dependency, or say which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{needed_for} needs the '{module}' package, which is not installed: pip install {module}"
        ) from e
