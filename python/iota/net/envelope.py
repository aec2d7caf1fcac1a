"""A binary body that carries a small JSON header and a payload (a frame):

    4-byte big-endian header length | JSON header | payload

One signed request then covers both, so metadata cannot be swapped between
payloads in flight."""

from __future__ import annotations

import json
import struct
from typing import Any

from iota.net.errors import NetError

_LENGTH = struct.Struct(">I")
MAX_HEADER = 64 << 10


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if len(encoded) > MAX_HEADER:
        raise NetError(f"envelope header is {len(encoded)} bytes; at most {MAX_HEADER}")
    return b"".join((_LENGTH.pack(len(encoded)), encoded, payload))


def unpack(body: bytes) -> tuple[dict[str, Any], memoryview]:
    """(header, payload); raises NetError on anything malformed."""
    if len(body) < _LENGTH.size:
        raise NetError(f"envelope of {len(body)} bytes is shorter than its {_LENGTH.size}-byte length prefix")
    (length,) = _LENGTH.unpack_from(body)
    if length > MAX_HEADER or _LENGTH.size + length > len(body):
        raise NetError(f"envelope announces a {length}-byte header in a {len(body)}-byte body")
    try:
        header = json.loads(body[_LENGTH.size : _LENGTH.size + length])
    except ValueError as exc:
        raise NetError(f"envelope header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise NetError(f"envelope header must be a JSON object, got {type(header).__name__}")
    return header, memoryview(body)[_LENGTH.size + length :]
