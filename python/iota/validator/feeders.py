"""Who fed whose training: a merge contribution pushed off by a cheat's work is not its own fault.

A miner's local training at a stage follows from what the miners at the other
stages of its samples' paths sent it: activations from the stages before,
gradients from the ones after. A cheat that sends garbage (replayed or random
frames) until it is caught can push an honest miner's pseudo-gradient far from
its stage's others, and the honest miner then looks poisoned at the merge of
that round. Every finished sample's record names the miner at each stage and
the merged version it trained from, so the validator knows, for each miner,
stage and version, which miners fed it; a merge outlier fed by a miner flagged
for its own work is spared (its next round, trained from the merged weights
without the cheat, is judged as usual).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


class Feeders:
    """The miners on the paths of each (stage, miner, merged version)'s samples."""

    def __init__(self) -> None:
        self.fed: dict[tuple[int, str, int], set[str]] = {}

    def record(self, path: Sequence[str], commits: Sequence[dict[str, Any]]) -> None:
        """One finished sample: every miner on `path` was fed by the others."""
        for stage, (hotkey, commit) in enumerate(zip(path, commits)):
            key = (stage, hotkey, int(commit.get("global_version", -1)))
            self.fed.setdefault(key, set()).update(h for h in path if h != hotkey)

    def of(self, stage: int, hotkey: str, versions: Iterable[int]) -> set[str]:
        """The miners that fed `hotkey`'s training at `stage` from any of the merged `versions`."""
        return set().union(*(self.fed.get((stage, hotkey, v), set()) for v in versions))

    def forget_before(self, stage: int, version: int) -> None:
        """Drop what fed training at `stage` from versions older than `version`: no merge is judged on it any more."""
        for key in [k for k in self.fed if k[0] == stage and k[2] < version]:
            del self.fed[key]
