"""Bodies in bounded parts: read with a size limit, write without one big copy."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

from iota.net.errors import BodyTooLarge


def check_part_size(chunk_size: int) -> None:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of bytes, got {chunk_size}")


async def read_bounded(stream: aiohttp.StreamReader, *, limit: int, chunk_size: int) -> bytes:
    """Read a whole body in parts of at most `chunk_size` bytes, refusing more than `limit`.

    Raises BodyTooLarge as soon as the total passes `limit`, so a sender that
    lies about (or omits) Content-Length costs at most `limit` bytes of memory.
    """
    check_part_size(chunk_size)
    parts: list[bytes] = []
    total = 0
    async for part in stream.iter_chunked(chunk_size):
        total += len(part)
        if total > limit:
            raise BodyTooLarge(f"body is larger than the {limit}-byte limit")
        parts.append(part)
    return b"".join(parts)


async def iter_parts(data: bytes, chunk_size: int) -> AsyncIterator[memoryview]:
    """`data` as zero-copy slices of at most `chunk_size` bytes.

    Handed to aiohttp as a body, each part is written and drained before the
    next, so the socket buffer never holds a second copy of a large body.
    """
    check_part_size(chunk_size)
    view = memoryview(data)
    for start in range(0, len(view), chunk_size):
        yield view[start : start + chunk_size]
