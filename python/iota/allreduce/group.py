"""Who takes part in a round and how the vector is cut: shards, parts, holders.

Every peer derives the same plan from the same group, vector length, codec
and part size; its fingerprint travels with every request, so peers that
disagree about any of them refuse each other instead of mixing rounds.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from functools import cached_property

from iota.allreduce.errors import GroupError
from iota.codec import Codec, plan_parts, plan_shards

# Round ids appear in URL paths: keep them to characters that need no escaping.
_ROUND_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Float codecs have no quantization block; shards and parts still fall on
# multiples of this so the plan does not depend on the codec kind.
FLOAT_PLAN_BLOCK = 64


@dataclass(frozen=True)
class Member:
    """A peer of a round: its hotkey, where it serves, and its declared bandwidth.

    `bandwidth` is relative (any positive unit): each peer owns a shard in
    proportion to it, so a fast link does proportionally more of the work.
    """

    hotkey: str
    address: str
    bandwidth: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise GroupError(f"member {self.hotkey} declares bandwidth {self.bandwidth!r}; it must be positive")


@dataclass(frozen=True)
class Group:
    """The members of one round (kept sorted by hotkey) and the round's id."""

    round_id: str
    members: tuple[Member, ...]

    def __post_init__(self) -> None:
        if not _ROUND_ID.fullmatch(self.round_id):
            raise GroupError(
                f"round id {self.round_id!r} must be 1-128 characters of letters, digits, '.', '_' or '-'"
            )
        members = tuple(sorted(self.members, key=lambda m: m.hotkey))
        if not members:
            raise GroupError(f"round {self.round_id} has no members")
        hotkeys = [m.hotkey for m in members]
        if len(set(hotkeys)) != len(hotkeys):
            raise GroupError(f"round {self.round_id} lists a hotkey twice: {hotkeys}")
        object.__setattr__(self, "members", members)

    def again(self) -> Group:
        """The same members in a new round, to run this one again after it failed for every
        peer alike (`MeanLostError`). Its id is this one's, cut to fit, then ".again"."""
        return Group(f"{self.round_id[:122]}.again", self.members)

    @property
    def hotkeys(self) -> list[str]:
        return [m.hotkey for m in self.members]

    def address(self, hotkey: str) -> str:
        for member in self.members:
            if member.hotkey == hotkey:
                return member.address
        raise GroupError(f"{hotkey} is not a member of round {self.round_id}")


@dataclass(frozen=True)
class Part:
    """A streamed piece of one shard: values [begin, end) of the vector."""

    index: int
    shard: int
    begin: int
    end: int
    frame_bytes: int  # size of its frame under the round's codec


def elements_per_part(codec: Codec, block: int, part_bytes: int) -> int:
    """Whole blocks of values whose frame takes about `part_bytes` (at least one block)."""
    # Frames are a fixed header plus a cost per value (codes and scales): measure that cost.
    small, large = codec.frame_size((block,)), codec.frame_size((2 * block,))
    per_value = (large - small) / block
    return max(block, int(part_bytes / per_value) // block * block)


class RoundPlan:
    """Shards, parts and holders of a round, identical on every peer.

    Shard s is owned by member s (sorted order) and backed up by member s+1.
    Every sender's parts of s go to the owner only, the owner's own parts
    nowhere: a healthy round moves each part once and no part twice. A backup
    pulls the parts from their senders (who keep what they sent) only if the
    owner is lost. One lost after the decision takes its own parts with it;
    then nobody can complete the round and the survivors run it again
    (`AllReducePeer.allreduce`).
    """

    def __init__(self, group: Group, numel: int, codec: Codec, part_bytes: int) -> None:
        if numel <= 0:
            raise GroupError(f"the vector must have at least one element, got {numel}")
        self.group = group
        self.numel = numel
        self.codec = codec
        self.members = group.hotkeys
        block = codec.block if codec.kind == "int" else FLOAT_PLAN_BLOCK
        self.part_elements = elements_per_part(codec, block, part_bytes)
        self.shards = plan_shards(numel, block, [m.bandwidth for m in group.members])
        self.parts: list[Part] = []
        self.shard_parts: list[list[int]] = []
        for shard, (begin, end) in enumerate(self.shards):
            indices = []
            for p0, p1 in plan_parts(begin, end, block, self.part_elements):
                indices.append(len(self.parts))
                self.parts.append(Part(len(self.parts), shard, p0, p1, codec.frame_size((p1 - p0,))))
            self.shard_parts.append(indices)

    @property
    def size(self) -> int:
        return len(self.members)

    def holders(self, shard: int) -> list[str]:
        """[owner, backup] of a shard (just [owner] in a round of one)."""
        owner = self.members[shard]
        backup = self.members[(shard + 1) % self.size]
        return [owner] if backup == owner else [owner, backup]


    def owned_by(self, hotkey: str) -> list[int]:
        """The non-empty shards `hotkey` owns."""
        return [s for s in self.held_by(hotkey) if self.members[s] == hotkey]

    def held_by(self, hotkey: str) -> list[int]:
        """The non-empty shards `hotkey` owns or backs up."""
        return [s for s in range(self.size) if self.shard_parts[s] and hotkey in self.holders(s)]

    @cached_property
    def active_holders(self) -> list[str]:
        """Members holding at least one non-empty shard, in sorted order."""
        return [h for h in self.members if self.held_by(h)]

    def held_parts(self, hotkey: str) -> list[int]:
        return [p for s in self.held_by(hotkey) for p in self.shard_parts[s]]

    def shard_bytes(self, hotkey: str) -> int:
        """Bytes of one sender's frames of every part `hotkey` holds."""
        return self._shard_bytes[hotkey]

    @cached_property
    def _shard_bytes(self) -> dict[str, int]:
        # Asked for every request's deadline: summed once, not per part.
        return {h: sum(self.frame_bytes(s) for s in self.held_by(h)) for h in self.members}

    def frame_bytes(self, shard: int) -> int:
        """Bytes of one sender's frames of `shard`."""
        return sum(self.parts[p].frame_bytes for p in self.shard_parts[shard])

    def expected_bytes(self, hotkey: str) -> int:
        """Bytes `hotkey` receives over the network as a holder when nobody fails: the
        others' parts of the shard it owns."""
        return self._expected_bytes[hotkey]

    @cached_property
    def _expected_bytes(self) -> dict[str, int]:
        return {
            h: sum(self.frame_bytes(s) * (self.size - 1) for s in self.owned_by(h))
            for h in self.members
        }

    @cached_property
    def fingerprint(self) -> str:
        """Hash of everything the plan depends on (not addresses: a peer may move)."""
        description = {
            "round": self.group.round_id,
            "members": [[m.hotkey, m.bandwidth] for m in self.group.members],
            "numel": self.numel,
            "codec": str(self.codec),
            "part_elements": self.part_elements,
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
