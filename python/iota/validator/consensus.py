"""Merge contributions far from their stage's consensus (poisoning).

The holders of a merge round decode every contribution (a pseudo-gradient:
global minus local weights) of their shard, and hand the members the inner
products of the contributions, summed over shards: the Gram matrix G, with
G_ij = <x_i, x_j>. Members report it to the orchestrator with the merge.
From G alone a validator knows every norm |x_i| = sqrt(G_ii) and every
angle cos_ij = G_ij / (|x_i| |x_j|), without the vectors.

Contributor i is an outlier of its round when

1. Norm: |x_i| > NORM_RATIO * median(|x_j| for j != i). Honest members
   start from the same global weights and train the same number of steps,
   so their pseudo-gradients have similar sizes (within 1.5x in our runs); a
   scaled-up or noise contribution does not.
2. Direction (3 or more contributors): the median of cos_ij over j != i is
   below MIN_COSINE while the median angle among the others, cos_jk over
   j, k != i, is at least AGREEMENT. Honest pseudo-gradients point the same
   way (pairwise cosines 0.4-0.8 in our runs), noise is orthogonal to them
   and a sign flip opposes them. With 2 contributors the angle is shared and
   says nothing about which one is off, so only the norm rule applies.

A round's verdict counts once a majority of its contributors reported the
same outlier: one member cannot frame another.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

NORM_RATIO = 3.0
MIN_COSINE = 0.1
AGREEMENT = 0.3


def outliers(contributors: Sequence[str], gram: Sequence[Sequence[float]]) -> dict[str, dict[str, float]]:
    """The contributors far from the others, each with the figures that show it."""
    n = len(contributors)
    if n < 2:
        return {}
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]

    def cos(i: int, j: int) -> float:
        return gram[i][j] / (norms[i] * norms[j]) if norms[i] > 0 and norms[j] > 0 else 0.0

    found: dict[str, dict[str, float]] = {}
    for i, hotkey in enumerate(contributors):
        others = [j for j in range(n) if j != i]
        typical = statistics.median(norms[j] for j in others)
        if norms[i] > NORM_RATIO * typical:
            found[hotkey] = {"norm": norms[i], "others_median_norm": typical}
            continue
        if n < 3:
            continue
        mine = statistics.median(cos(i, j) for j in others)
        theirs = statistics.median(cos(j, k) for j in others for k in others if j < k)
        if mine < MIN_COSINE and theirs >= AGREEMENT:
            found[hotkey] = {"median_cosine": mine, "others_median_cosine": theirs}
    return found


class MergeVotes:
    """Reports of merge rounds, tallied: a contributor is judged an outlier of a
    round once more than half of the round's contributors reported it so."""

    def __init__(self) -> None:
        self.votes: dict[tuple[int, int], dict[str, set[str]]] = {}  # round -> outlier -> reporters
        self.judged: set[tuple[int, int, str]] = set()

    def add(self, stage: int, round_: int, reporter: str, contributors: Sequence[str],
            gram: Sequence[Sequence[float]]) -> dict[str, dict[str, float]]:
        """Count one member's report; returns the outliers this report made a majority for."""
        tally = self.votes.setdefault((stage, round_), {})
        decided: dict[str, dict[str, float]] = {}
        for hotkey, figures in outliers(contributors, gram).items():
            reporters = tally.setdefault(hotkey, set())
            reporters.add(reporter)
            key = (stage, round_, hotkey)
            if 2 * len(reporters) > len(contributors) and key not in self.judged:
                self.judged.add(key)
                decided[hotkey] = figures
        return decided
