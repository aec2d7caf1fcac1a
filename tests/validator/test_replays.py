"""Replayed work found from the frames' commitments (iota.validator.replays)."""

from __future__ import annotations

import iota.data
from iota.miner.worker import StageWorker
from iota.model.recipe import Recipe
from iota.validator.replays import Replays


def commits(*digests: str) -> list[dict[str, str]]:
    return [{"output": d} for d in digests]


def test_a_frame_sent_for_two_samples_is_a_replay_and_a_retry_is_not() -> None:
    replays = Replays()
    assert replays.check(1, ["a", "b"], commits("x1", "y1")) == {}
    assert replays.check(1, ["a", "b"], commits("x1", "y2")) == {}  # the same sample again (a retry)
    assert replays.check(2, ["a", "b"], commits("x2", "y1")) == {"b": {"stage": 1, "sample": 2, "first_sample": 1}}
    # The same digest at another stage is another frame.
    assert replays.check(3, ["c", "a"], commits("y3", "x1")) == {}


def test_memory_is_bounded() -> None:
    replays = Replays(memory=4)
    for k in range(10):
        assert replays.check(k, ["a"], commits(f"x{k}")) == {}
    assert len(replays.seen) == 4
    assert replays.check(10, ["a"], commits("x0")) == {}  # forgotten
    assert replays.check(11, ["a"], commits("x9")) == {"a": {"stage": 0, "sample": 11, "first_sample": 9}}


def test_honest_workers_never_repeat_a_frame_and_a_replaying_one_does() -> None:
    train, _, tokenizer = iota.data.load("stdlib", "byte")
    recipe = Recipe(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, stages=2, batch=2, seq_len=16, compression="128x")
    for adversary, expected in ((None, set()), ("replay", {"cheat"})):
        first = StageWorker(recipe, tokenizer.vocab_size, 0, train, adversary)
        last = StageWorker(recipe, tokenizer.vocab_size, 1, train)
        replays, flagged = Replays(), set()
        for sample in range(6):
            frame, _ = first.forward(sample, 0, None)
            grad, _ = last.forward(sample, 0, frame)
            first.backward(sample, 0, grad)
            flagged |= set(replays.check(sample, ["cheat", "honest"],
                                         [first.commitment(sample, 0), last.commitment(sample, 0)]))
        assert flagged == expected
