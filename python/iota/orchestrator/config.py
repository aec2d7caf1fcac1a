"""How the orchestrator paces the swarm; the defaults suit a laptop swarm on loopback."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OrchestratorConfig:
    """`heartbeat` (s): how often nodes report. A node silent for `missed_heartbeats`
    heartbeats is dropped and its leases re-issued.

    A sample lease lasts `lease_floor + lease_slack * median latency` of recent
    samples (lease to completion), so a slow swarm is not cut off and a dead
    miner's samples come back soon after the swarm's usual pace.

    A stage's merge phase may last `merge_floor + merge_slack * bytes /
    min_throughput` (bytes: the stage's weights, sent and received twice).

    `rebalance_gain`: move a miner to another stage only if the pipeline's
    slowest stage gets at least this much faster (hysteresis against
    flapping); at most one move per `rebalance_every` seconds.

    A miner a validator flagged is left out of its stage's merges, and gets
    no work (no leases, not among the next stage's peers), for `flag_memory`
    seconds after the flag.
    """

    heartbeat: float = 0.5
    missed_heartbeats: int = 20
    lease_floor: float = 10.0
    lease_slack: float = 4.0
    merge_floor: float = 15.0
    merge_slack: float = 4.0
    min_throughput: float = 1e6
    rebalance_gain: float = 0.25
    rebalance_every: float = 10.0
    flag_memory: float = 300.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"orchestrator setting {name} must be a positive number, got {value!r}")

    @property
    def node_timeout(self) -> float:
        return self.heartbeat * self.missed_heartbeats

    def lease_timeout(self, median_latency: float | None) -> float:
        return self.lease_floor + self.lease_slack * (median_latency or 0.0)

    def merge_timeout(self, weight_bytes: int) -> float:
        return self.merge_floor + self.merge_slack * 4 * weight_bytes / self.min_throughput
