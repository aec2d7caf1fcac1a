"""Which stage a miner serves: fill the bottleneck first, rebalance when one stage limits the pipeline.

A stage's time per sample is its cost (FLOPs per token) over the compute of
its live miners (their measured FLOP/s); the pipeline runs at the pace of
the slowest stage. An empty stage stops the pipeline altogether.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass


def stage_times(costs: Sequence[float], capacity: Sequence[float]) -> list[float]:
    return [c / cap if cap > 0 else math.inf for c, cap in zip(costs, capacity)]


def choose_stage(costs: Sequence[float], capacity: Sequence[float]) -> int:
    """The stage a newcomer should join: the slowest (an empty one first); ties go to the lowest index."""
    times = stage_times(costs, capacity)
    return max(range(len(times)), key=lambda s: (times[s], -s))


@dataclass(frozen=True)
class Move:
    hotkey: str
    source: int
    target: int


def rebalance(
    costs: Sequence[float],
    miners: Sequence[Sequence[tuple[str, float]]],
    gain: float,
    pinned: AbstractSet[str] = frozenset(),
) -> Move | None:
    """One move of a miner that speeds up the pipeline by at least the fraction `gain`, or None.

    `miners[s]` lists (hotkey, FLOP/s) of stage s's live miners. Only stages
    with two or more miners give one up; the move chosen makes the new
    slowest stage fastest. An empty stage is always worth filling. Miners in
    `pinned` (they asked for their stage) count, but are never moved.
    """
    capacity = [sum(f for _, f in stage) for stage in miners]
    before = max(stage_times(costs, capacity))
    target = choose_stage(costs, capacity)
    best: tuple[float, Move] | None = None
    for source, stage in enumerate(miners):
        if source == target or len(stage) < 2:
            continue
        for hotkey, flops in stage:
            if hotkey in pinned:
                continue
            moved = list(capacity)
            moved[source] -= flops
            moved[target] += flops
            after = max(stage_times(costs, moved))
            if best is None or after < best[0]:
                best = (after, Move(hotkey, source, target))
    if best is None:
        return None
    after, move = best
    if math.isinf(before) and not math.isinf(after):
        return move
    return move if after <= before * (1 - gain) else None
