"""Stochastic wiring (SWARM): pick the next stage's miner at random, weighted
by its compute over its queue, and stay away from peers that just failed."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    hotkey: str
    address: str
    flops: float
    queue: int


class Wiring:
    """The candidates of the next stage and the bans of those that failed.

    A failed peer is banned for `ban_base * 2**(failures-1)` seconds, at most
    `ban_max`; a success clears its record.
    """

    def __init__(self, rng: random.Random, *, ban_base: float, ban_max: float) -> None:
        self.rng = rng
        self.ban_base, self.ban_max = ban_base, ban_max
        self.peers: dict[str, Peer] = {}
        self.failures: dict[str, int] = {}
        self.banned_until: dict[str, float] = {}

    def update(self, peers: list[Peer]) -> None:
        self.peers = {p.hotkey: p for p in peers}

    def choose(self, exclude: set[str] = frozenset()) -> Peer | None:  # type: ignore[assignment]
        """A live, unbanned peer not in `exclude`, with probability ∝ flops / (1 + queue); None if there is none."""
        now = time.monotonic()
        candidates = [p for p in self.peers.values()
                      if p.hotkey not in exclude and self.banned_until.get(p.hotkey, 0.0) <= now]
        if not candidates:
            return None
        weights = [max(p.flops, 1.0) / (1 + max(p.queue, 0)) for p in candidates]
        return self.rng.choices(candidates, weights)[0]

    def failed(self, hotkey: str) -> float:
        """Ban `hotkey` after a failure; returns the ban's length in seconds."""
        count = self.failures.get(hotkey, 0) + 1
        self.failures[hotkey] = count
        ban = min(self.ban_base * 2 ** (count - 1), self.ban_max)
        self.banned_until[hotkey] = time.monotonic() + ban
        return ban

    def succeeded(self, hotkey: str) -> None:
        self.failures.pop(hotkey, None)
        self.banned_until.pop(hotkey, None)
