"""Wiring: the next stage's miner is drawn with probability proportional to
flops / (1 + queue), and a peer that failed is avoided for a ban that doubles
per failure up to ban_max and is cleared by a success."""

from __future__ import annotations

import math
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from iota.miner import wiring as wiring_module
from iota.miner.wiring import Peer, Wiring


@pytest.fixture
def clock(monkeypatch):
    """A hand-driven time.monotonic for the wiring module."""
    state = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(wiring_module, "time", SimpleNamespace(monotonic=lambda: state.now))
    return state


def peer(name: str, flops: float, queue: int = 0) -> Peer:
    return Peer(hotkey=name, address=f"http://{name}", flops=flops, queue=queue)


def draw(w: Wiring, n: int, **kwargs) -> Counter:
    return Counter(getattr(w.choose(**kwargs), "hotkey", None) for _ in range(n))


def assert_frequencies(counts: Counter, weights: dict[str, float], n: int) -> None:
    total = sum(weights.values())
    assert set(counts) <= set(weights)
    for name, weight in weights.items():
        p = weight / total
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[name] - n * p) <= 4 * sigma + 1, (name, counts[name], n * p)


def test_choice_is_weighted_by_flops_over_one_plus_queue():
    w = Wiring(random.Random(0), ban_base=1.0, ban_max=8.0)
    w.update([peer("a", 100.0), peer("b", 300.0, queue=2), peer("c", 200.0), peer("d", 1000.0, queue=9)])
    n = 4000
    counts = draw(w, n)
    # weights 100, 100, 200, 100
    assert_frequencies(counts, {"a": 100, "b": 100, "c": 200, "d": 100}, n)
    assert counts["c"] > 1.6 * max(counts["a"], counts["b"], counts["d"])


def test_choice_clamps_odd_flops_and_queues():
    w = Wiring(random.Random(1), ban_base=1.0, ban_max=8.0)
    # flops below 1 count as 1 (an unmeasured miner still gets work); a negative queue counts as empty
    w.update([peer("zero", 0.0), peer("neg-queue", 3.0, queue=-5), peer("busy", 4.0, queue=3)])
    n = 4000
    assert_frequencies(draw(w, n), {"zero": 1, "neg-queue": 3, "busy": 1}, n)


def test_the_same_seed_draws_the_same_peers():
    peers = [peer(f"p{i}", 10.0 * (i + 1), queue=i % 3) for i in range(6)]
    sequences = []
    for _ in range(2):
        w = Wiring(random.Random(42), ban_base=1.0, ban_max=8.0)
        w.update(peers)
        sequences.append([w.choose().hotkey for _ in range(200)])
    assert sequences[0] == sequences[1]
    assert len(set(sequences[0])) == 6


def test_a_banned_peer_is_never_chosen_until_its_ban_ends(clock):
    w = Wiring(random.Random(2), ban_base=2.0, ban_max=30.0)
    w.update([peer("a", 1000.0), peer("b", 1.0)])
    assert w.failed("a") == 2.0
    for now in (1000.0, 1001.0, 1001.999):
        clock.now = now
        assert draw(w, 500) == Counter({"b": 500})
    clock.now = 1002.0  # the ban ends
    assert draw(w, 500)["a"] > 400  # and "a" takes most of the work again

    assert w.failed("a") == 4.0  # a second failure: twice as long
    clock.now = 1005.9
    assert "a" not in draw(w, 500)
    clock.now = 1006.0
    assert "a" in draw(w, 50)


def test_no_candidate_gives_none(clock):
    w = Wiring(random.Random(3), ban_base=5.0, ban_max=30.0)
    assert w.choose() is None  # no peers at all
    w.update([peer("a", 10.0), peer("b", 10.0)])
    assert w.choose(exclude={"a", "b"}) is None
    w.failed("a")
    assert draw(w, 100) == Counter({"b": 100})
    assert w.choose(exclude={"b"}) is None  # "a" is banned, "b" excluded
    w.failed("b")
    assert w.choose() is None
    clock.now += 5.0
    assert set(draw(w, 200)) == {"a", "b"}


def test_exclude_keeps_the_weights_of_the_others():
    w = Wiring(random.Random(4), ban_base=1.0, ban_max=8.0)
    w.update([peer("a", 100.0), peer("b", 100.0), peer("c", 300.0)])
    n = 4000
    counts = draw(w, n, exclude={"c"})
    assert "c" not in counts
    assert_frequencies(counts, {"a": 1, "b": 1}, n)
    assert draw(w, 200, exclude=set()).keys() == {"a", "b", "c"}


def test_backoff_doubles_per_failure_up_to_ban_max_and_success_clears_it(clock):
    w = Wiring(random.Random(5), ban_base=0.5, ban_max=5.0)
    w.update([peer("a", 10.0), peer("b", 10.0)])
    bans = [w.failed("a") for _ in range(7)]
    assert bans == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert w.failures["a"] == 7 and w.banned_until["a"] == clock.now + 5.0
    assert w.failures.get("b") is None  # per peer

    w.succeeded("a")
    assert "a" not in w.failures and "a" not in w.banned_until
    assert "a" in draw(w, 100)  # usable at once
    assert w.failed("a") == 0.5  # and the backoff starts over
    w.succeeded("never-failed")  # harmless


def test_update_replaces_the_candidates_and_keeps_bans(clock):
    w = Wiring(random.Random(6), ban_base=10.0, ban_max=60.0)
    w.update([peer("a", 10.0), peer("b", 10.0)])
    w.failed("b")
    w.update([peer("b", 10.0), peer("c", 10.0)])  # "a" left the stage
    assert set(draw(w, 300)) == {"c"}
    # a fresh view of the same peer with a longer queue changes its weight
    w.succeeded("b")
    w.update([peer("b", 10.0, queue=9), peer("c", 10.0)])
    n = 4000
    assert_frequencies(draw(w, n), {"b": 1, "c": 10}, n)
