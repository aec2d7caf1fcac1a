"""Timing and size knobs of the all-reduce, with defaults for peers on home links.

Every deadline in a round is `floor + slack * bytes / throughput`: the bytes
are known exactly from the plan, the throughput is measured while parts
arrive and never assumed below `min_throughput`. Nothing else waits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from iota.allreduce.errors import GroupError


@dataclass(frozen=True)
class AllReduceConfig:
    """How a peer paces and bounds a round.

    `part_bytes`: wire bytes per streamed part (its frame, give or take a
    header; at least one quantization block). Sized in bytes, not values, so
    a compressed part costs as many requests per byte as a raw one. Each part
    is one signed stream request, verified before its payload is read, so
    btauth/1's 10 s freshness window does not bound it; each request costs
    fixed CPU (signing, hand-offs between threads), and on this 2-core
    machine 4 MiB parts made int8 rounds 22% faster and raw ones 26% faster
    than 1 MiB parts (8 MiB gained nothing more; bench/allreduce.py).

    `max_inflight`: parts in flight at once, sent (encoded, to its owner) or
    fetched. Parts take the shards in turn, so in a group of 4 this is about
    one part to or from each holder at a time: 4 against 2 made 1 Gbit/s int8 rounds 1.47 -> 1.33 s
    (6 or 8 gained nothing more). A peer keeps every frame it sent until the
    round retires, for a backup that may pull it.

    `floor` (seconds): the least any wait lasts. It covers what does not scale
    with bytes: connection setup, scheduling, a GC pause, and peers joining a
    round at slightly different moments (a holder holds early parts this long
    for a round it has not joined yet).

    `slack`: how many times the expected transfer time a holder waits before
    it gives up on a sender that has not delivered everything.

    `min_throughput` (bytes/s): the slowest link a round waits for. Before
    anything is measured, and as a lower bound on what is measured, it caps
    every deadline at `floor + slack * bytes / min_throughput`.
    """

    part_bytes: int = 4 << 20
    max_inflight: int = 4
    floor: float = 2.0
    slack: float = 3.0
    min_throughput: float = 1e6

    def __post_init__(self) -> None:
        for name in ("part_bytes", "max_inflight"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise GroupError(f"AllReduceConfig.{name} must be a positive integer, got {value!r}")
        for name in ("floor", "slack", "min_throughput"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise GroupError(f"AllReduceConfig.{name} must be a positive finite number, got {value!r}")

    def wait_bound(self, nbytes: int) -> float:
        """The longest anything moving or processing `nbytes` may take, in seconds."""
        return self.floor + self.slack * nbytes / self.min_throughput

    def deadline(self, expected: int, received: int, active: float) -> float:
        """Seconds after opening a round at which a holder stops waiting for `expected` bytes.

        `received` bytes arrived over `active` seconds since the round opened;
        that rate, never below `min_throughput`, predicts how long all of
        `expected` takes. A sender that died stops adding bytes, so the
        deadline stays put instead of growing with the wait.
        """
        rate = received / active if received > 0 and active > 0 else 0.0
        return self.floor + self.slack * expected / max(rate, self.min_throughput)
