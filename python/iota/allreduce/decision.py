"""What holders report and what a round decides: have-sets, the contributor
decision, and the rule that turns the first into the second.

A contribution counts only if, for every shard, a live holder has all of its
parts, and every holder that has them has the same content digest and weight.
A holder serves a shard only if it has every decided contribution with the
decided digest, so whichever holder serves it returns the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from iota.allreduce.group import RoundPlan
from iota.errors import IotaError


class RoundFailed(IotaError):
    """The round cannot complete consistently (turned into AllReduceError with a report)."""


class MeanLost(RoundFailed):
    """A decided part of the mean that no live holder or member has (turned into MeanLostError)."""


@dataclass(frozen=True)
class Decision:
    """The contributors of a round, their weights, and the digests of their parts per shard.

    `key` covers what determines the result bytes (contributors, weights,
    digests); `excluded` says why the others are out, for the report.
    """

    contributors: dict[str, float]
    digests: dict[int, dict[str, str]]
    excluded: dict[str, str]

    @cached_property
    def key(self) -> str:
        canonical = json.dumps(
            {"contributors": self.contributors, "digests": {str(s): d for s, d in self.digests.items()}},
            sort_keys=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def to_json(self) -> dict[str, Any]:
        return {
            "contributors": self.contributors,
            "digests": {str(s): d for s, d in self.digests.items()},
            "excluded": self.excluded,
        }

    @classmethod
    def from_json(cls, data: Any) -> Decision:
        """Parse a peer's decision; ValueError if it is malformed."""
        try:
            contributors = {str(k): float(w) for k, w in data["contributors"].items()}
            digests = {int(s): {str(k): str(v) for k, v in d.items()} for s, d in data["digests"].items()}
            excluded = {str(k): str(v) for k, v in data["excluded"].items()}
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"malformed decision: {exc!r}") from None
        return cls(dict(sorted(contributors.items())), digests, excluded)


@dataclass(frozen=True)
class HaveSet:
    """A closed holder's frozen view: per shard, the senders whose parts are all
    in (with their digest), every sender's weight, the senders it refused and
    why, and the decision it has recorded, if any."""

    shards: dict[int, dict[str, str]]
    weights: dict[str, float]
    bad: dict[str, str]
    decision: Decision | None

    def to_json(self) -> dict[str, Any]:
        return {
            "shards": {str(s): d for s, d in self.shards.items()},
            "weights": self.weights,
            "bad": self.bad,
            "decision": self.decision.to_json() if self.decision else None,
        }

    @classmethod
    def from_json(cls, data: Any) -> HaveSet:
        """Parse a peer's have-set; ValueError if it is malformed."""
        try:
            shards = {int(s): {str(k): str(v) for k, v in d.items()} for s, d in data["shards"].items()}
            weights = {str(k): float(w) for k, w in data["weights"].items()}
            bad = {str(k): str(v) for k, v in data["bad"].items()}
            decision = Decision.from_json(data["decision"]) if data["decision"] is not None else None
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"malformed have-set: {exc!r}") from None
        return cls(shards, weights, bad, decision)


def propose(plan: RoundPlan, haves: dict[str, HaveSet]) -> Decision:
    """The largest set of contributions the have-sets support, greedily.

    Holders missing from `haves` are taken as dead. A contribution needs, for
    every shard, one live holder with all of its parts: per shard the holder
    keeping the most of the candidates so far is chosen (the owner on a tie),
    and a holder lacking a decided contribution later refuses to serve rather
    than serve a different mean. Requiring both holders would let one late or
    slow holder exclude everyone. A sender whose parts differ between the two
    holders of a shard, or who declared different weights, is excluded.
    Raises RoundFailed if a shard has no live holder or nobody is left.
    """
    excluded: dict[str, str] = {}
    for holder, have in haves.items():
        for sender, reason in have.bad.items():
            if sender in plan.members:
                excluded.setdefault(sender, f"{holder} refused a part of it: {reason}")
    weights: dict[str, float] = {}
    for sender in plan.members:
        declared = {have.weights[sender] for have in haves.values() if sender in have.weights}
        if not declared:
            excluded.setdefault(sender, "none of its parts reached a live holder")
        elif len(declared) > 1:
            excluded.setdefault(sender, f"it declared different weights to different holders: {sorted(declared)}")
        else:
            weights[sender] = declared.pop()
    candidates = [m for m in plan.members if m not in excluded]
    digests: dict[int, dict[str, str]] = {}
    for shard in (s for s in range(plan.size) if plan.shard_parts[s]):
        live = [h for h in plan.holders(shard) if h in haves]
        if not live:
            raise RoundFailed(
                f"no holder of shard {shard} ({' and '.join(plan.holders(shard))}) answered; "
                "its parts are lost with them"
            )
        complete = {h: haves[h].shards.get(shard, {}) for h in live}
        for sender in candidates:
            if len({complete[h][sender] for h in live if sender in complete[h]}) > 1:
                excluded[sender] = f"it sent different data to the holders of shard {shard}"
        candidates = [m for m in candidates if m not in excluded]
        chosen = max(live, key=lambda h: sum(m in complete[h] for m in candidates))  # first max: the owner
        for sender in candidates:
            if sender in complete[chosen]:
                continue
            if any(sender in complete[h] for h in live):
                excluded[sender] = (
                    f"its parts of shard {shard} are complete only at a holder with fewer of the others' parts"
                )
            else:
                excluded[sender] = f"not all of its parts of shard {shard} reached {' or '.join(live)} in time"
        candidates = [m for m in candidates if m not in excluded]
        digests[shard] = {m: complete[chosen][m] for m in candidates}
    if not candidates:
        raise RoundFailed(f"no member's contribution reached the holders of every shard: {excluded}")
    contributors = {m: weights[m] for m in candidates}
    # Contributors dropped by a later shard must not linger in earlier shards' digests.
    digests = {s: {m: d[m] for m in candidates} for s, d in digests.items()}
    return Decision(contributors, digests, excluded)
