"""What a round produced, and what it says about itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import blake3
import torch


@dataclass(frozen=True)
class ShardReport:
    """One shard: its range, holders, and which holder(s) served it to this peer.

    `complete` is True when every part of the shard reached this peer under
    the round's decision (so it holds exactly the contributors' parts); when
    a round fails, the shards not complete are what it lacked. `relayed_by`
    lists the members that handed on parts no holder served this peer (each
    part checked against its holder's attestation).
    """

    index: int
    begin: int
    end: int
    owner: str
    backup: str
    served_by: list[str]
    complete: bool
    relayed_by: list[str] = field(default_factory=list)


@dataclass
class AllReduceReport:
    """Everything a peer can say about a round, whether it completed or not.

    `contributors` maps each hotkey whose contribution is in the mean to its
    weight (empty if the round failed before deciding); `excluded` says why
    every other member is out; `unreachable` lists holders this peer could
    not use and why. Byte counts are request and answer bodies (not HTTP
    headers or stream message metas) this peer sent and received, as client
    and server, up to the moment the report was made. `phases` has the seconds spent
    scattering parts, deciding and gathering the mean, as far as it got.
    `gram` holds the inner products of the contributions (as the holders
    decoded them, each part's attested with its mean) in sorted hotkey order,
    summed over the parts: what a validator needs to tell a contribution far
    from the others' (norms, angles, distances); None if the round failed.
    `again_after` is set when the round was run again (`Group.again()`)
    because its first try failed for everyone alike: the first try's error.
    """

    round_id: str
    peer: str
    fingerprint: str
    codec: str
    numel: int
    contributors: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    shards: list[ShardReport] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)
    decision: str | None = None
    started_at: float = 0.0  # wall clock (time.time()) when the peer joined the round
    bytes_sent: int = 0
    bytes_received: int = 0
    duration: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    gram: list[list[float]] | None = None
    error: str | None = None
    again_after: str | None = None  # why the first try failed, if this report is of the round run again

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AllReduceResult:
    """The weighted mean (decoded, fp32) and the frames it was decoded from.

    `frames` are the codec-encoded parts of the mean, in vector order: the
    same bytes on every peer that completed the round; `part_digests` their
    BLAKE3 digests, each checked as its frame arrived.
    """

    mean: torch.Tensor
    frames: list[bytes | bytearray | memoryview]
    part_digests: list[str]
    report: AllReduceReport

    @cached_property
    def digest(self) -> str:
        """BLAKE3 of the parts' digests in order: equal digests, equal frames (no frame is hashed again)."""
        return blake3.blake3("".join(self.part_digests).encode()).hexdigest()

    @property
    def contributors(self) -> dict[str, float]:
        return self.report.contributors
