"""A Gram matrix (the inner products of a part's decided contributions, in sorted
hotkey order) as it travels beside a mean and is signed in its attestation: base64
of its float64 values, little-endian, row by row. 8 n^2 bytes, so an answer's meta
holds a few hundred contributors' matrix."""

from __future__ import annotations

import base64
import binascii

import numpy as np


def gram_text(values: np.ndarray) -> str:
    """`values` (any shape, row by row) as the text that travels and is signed."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f8").tobytes()).decode()


def gram_values(text: object) -> np.ndarray:
    """The flat float64 values `gram_text` wrote; ValueError if `text` is not such text."""
    try:
        raw = base64.b64decode(text, validate=True)  # type: ignore[arg-type]
    except (TypeError, binascii.Error):
        raise ValueError(f"a Gram matrix is base64 text, not {str(text)[:40]!r}") from None
    if len(raw) % 8:
        raise ValueError(f"a Gram matrix of {len(raw)} bytes is not float64 values")
    return np.frombuffer(raw, dtype="<f8")


def gram_of_text(text: object, n: int) -> np.ndarray:
    """The n x n matrix `gram_text` wrote; ValueError unless `text` is one, all finite."""
    values = gram_values(text)
    if values.size != n * n:
        raise ValueError(f"a Gram matrix of {values.size} values, not of {n} x {n}")
    if not np.isfinite(values).all():
        raise ValueError("a Gram matrix with values that are not finite")
    return values.reshape(n, n)
