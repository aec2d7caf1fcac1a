"""Stage assignment: fill empty stages, send newcomers to the bottleneck, rebalance with hysteresis."""

from __future__ import annotations

import math
import random

from iota.orchestrator.assign import Move, choose_stage, rebalance, stage_times


def test_an_empty_stage_is_filled_first() -> None:
    assert choose_stage([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]) == 0  # ties go to the lowest index
    assert choose_stage([1.0, 1.0, 1.0], [5.0, 0.0, 0.0]) == 1
    assert choose_stage([1.0, 1.0, 1.0], [5.0, 5.0, 0.0]) == 2
    # However cheap the empty stage and however slow the others, the empty one comes first.
    assert choose_stage([1e6, 1.0], [1e-3, 0.0]) == 1
    assert stage_times([2.0, 3.0], [4.0, 0.0]) == [0.5, math.inf]


def test_newcomers_go_to_the_slowest_stage() -> None:
    # cost / capacity: stage 1 is slower per unit of compute.
    assert choose_stage([1.0, 2.0], [1.0, 1.0]) == 1
    assert choose_stage([1.0, 2.0], [1.0, 3.0]) == 0
    assert choose_stage([3.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == 0
    # Miners of equal speed joining one by one end up in proportion to the stages' costs.
    costs, flops = [1.0, 3.0], 10.0
    capacity = [0.0, 0.0]
    joined = []
    for _ in range(8):
        stage = choose_stage(costs, capacity)
        joined.append(stage)
        capacity[stage] += flops
    assert joined[:2] == [0, 1]  # each empty stage first
    assert capacity == [2 * flops, 6 * flops]
    # A fast newcomer counts for its speed: after it, stage 0 is no longer the bottleneck.
    assert choose_stage([1.0, 1.0], [1.0, 2.0]) == 0
    assert choose_stage([1.0, 1.0], [1.0 + 5.0, 2.0]) == 1


def test_rebalance_moves_a_miner_into_an_empty_stage() -> None:
    move = rebalance([1.0, 1.0, 1.0], [[("a", 1.0), ("b", 1.0)], [("c", 1.0)], []], gain=0.9)
    assert move == Move("a", 0, 2)
    # The miner moved is the one that leaves the best pipeline: the fast one for a costly empty stage
    # (slowest stage 1/1 after, rather than 3/1), the slow one for a cheap empty stage (1/4 rather than 1/1).
    assert rebalance([1.0, 3.0], [[("fast", 4.0), ("slow", 1.0)], []], gain=0.25) == Move("fast", 0, 1)
    assert rebalance([1.0, 0.25], [[("fast", 4.0), ("slow", 1.0)], []], gain=0.25) == Move("slow", 0, 1)


def test_rebalance_does_not_move_for_a_gain_below_the_threshold() -> None:
    costs = [1.0, 1.0]
    miners = [[("a", 1.0), ("b", 0.1), ("c", 0.1)], [("d", 0.9)]]
    # Moving b (or c) makes the slowest stage 1.0 instead of 1/0.9: a gain of 10%.
    assert rebalance(costs, miners, gain=0.25) is None
    move = rebalance(costs, miners, gain=0.05)
    assert move is not None and (move.source, move.target) == (0, 1) and move.hotkey in {"b", "c"}
    # A move that would make things worse is never made, whatever the threshold.
    assert rebalance(costs, [[("a", 1.0), ("b", 1.0)], [("c", 1.5)]], gain=1e-9) is None
    # Balanced already: nothing to do.
    assert rebalance(costs, [[("a", 1.0), ("b", 1.0)], [("c", 1.0), ("d", 1.0)]], gain=1e-9) is None


def test_rebalance_never_moves_a_pinned_miner() -> None:
    assert rebalance([1.0, 1.0, 1.0], [[("a", 1.0), ("b", 1.0)], [("c", 1.0)], []], gain=0.9,
                     pinned={"a"}) == Move("b", 0, 2)
    assert rebalance([1.0, 1.0, 1.0], [[("a", 1.0), ("b", 1.0)], [("c", 1.0)], []], gain=0.9,
                     pinned={"a", "b"}) is None


def test_rebalance_never_empties_a_stage() -> None:
    # Stage 1 is hopelessly slow, but stage 0's only miner stays.
    assert rebalance([1.0, 100.0], [[("a", 1.0)], [("b", 1.0)]], gain=0.01) is None
    assert rebalance([1.0, 100.0, 1.0], [[("a", 1.0)], [("b", 1.0)], [("c", 1.0)]], gain=0.01) is None
    # Seeded random swarms: a move only ever takes a miner from a stage that keeps one,
    # and it makes the slowest stage faster by at least the gain (or fills an empty stage).
    rng = random.Random(1234)
    moves = 0
    for _ in range(500):
        n_stages = rng.randint(1, 4)
        costs = [rng.uniform(0.5, 4.0) for _ in range(n_stages)]
        miners = [[(f"m{s}.{i}", rng.uniform(0.1, 5.0)) for i in range(rng.randint(0, 4))] for s in range(n_stages)]
        gain = rng.choice([0.01, 0.1, 0.25, 0.5])
        move = rebalance(costs, miners, gain)
        if move is None:
            continue
        moves += 1
        source = miners[move.source]
        assert move.source != move.target and len(source) >= 2
        assert move.hotkey in {h for h, _ in source}
        capacity = [sum(f for _, f in stage) for stage in miners]
        before = max(stage_times(costs, capacity))
        flops = dict(source)[move.hotkey]
        capacity[move.source] -= flops
        capacity[move.target] += flops
        after = max(stage_times(costs, capacity))
        assert all(c > 0 for c, stage in zip(capacity, miners) if stage)
        assert (math.isinf(before) and not math.isinf(after)) or after <= before * (1 - gain)
    assert moves > 20  # the property was exercised
