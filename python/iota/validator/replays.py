"""Replayed or duplicated work: the same frame sent for two different samples.

Every finished sample's record carries, per stage, the sha256 of the frame
the miner sent on (its commitment). Different samples have different tokens,
so honest work rarely sends the same frame twice; a retried attempt of the
same sample may (same input, same weights), so only a repeat across samples
counts. Rarely is not never: a tiny, collapsed model whose compressed output
no longer depends on its input repeats frames honestly, so a repeat makes
the work a suspect that the validator audits, not a verdict. This looks at
every finished sample, not an audited share, at the cost of a lookup.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

MEMORY = 50_000  # frame digests remembered (per validator, all stages)


class Replays:
    """Frame digests seen lately, by stage, with the sample they were first sent for."""

    def __init__(self, memory: int = MEMORY) -> None:
        self.memory = memory
        self.seen: OrderedDict[tuple[int, str], int] = OrderedDict()

    def check(self, sample: int, path: Sequence[str], commits: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The miners on `sample`'s path that sent a frame they had sent for another sample."""
        found: dict[str, dict[str, Any]] = {}
        for stage, (hotkey, commit) in enumerate(zip(path, commits)):
            key = (stage, str(commit.get("output", "")))
            first = self.seen.setdefault(key, sample)
            if first != sample:
                found.setdefault(hotkey, {"stage": stage, "sample": sample, "first_sample": first})
        while len(self.seen) > self.memory:
            self.seen.popitem(last=False)
        return found
