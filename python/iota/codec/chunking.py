"""All-reduce chunking (computed by the compiled core): owner shards and
streaming parts of a flat vector, on quantization-block boundaries."""

from __future__ import annotations

from iota import _C


def plan_shards(numel: int, block: int, weights: list[float]) -> list[tuple[int, int]]:
    """One [begin, end) shard per owner, in proportion to its weight (e.g. bandwidth)."""
    return [tuple(r) for r in _C.plan_shards(numel, block, [float(w) for w in weights])]


def plan_parts(begin: int, end: int, block: int, max_part: int) -> list[tuple[int, int]]:
    """[begin, end) cut into parts of at most max_part elements (whole blocks)."""
    return [tuple(r) for r in _C.plan_parts(begin, end, block, max_part)]
