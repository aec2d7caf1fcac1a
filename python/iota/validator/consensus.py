"""Merge contributions far from their stage's consensus (poisoning).

The holders of a merge round decode every contribution (a pseudo-gradient:
global minus local weights) of their shard, and hand the members the inner
products of the contributions, summed over shards: the Gram matrix G, with
G_ij = <x_i, x_j>. Members report it to the orchestrator with the merge.
From G alone a validator knows every norm |x_i| = sqrt(G_ii) and every
angle cos_ij = G_ij / (|x_i| |x_j|), without the vectors.

Contributor i (merge weight w_i: its samples since the last merge) is
judged against the references R_i: the others with a nonzero contribution
and w_j >= w_i / WEIGHT_SPAN (a member that just resynced contributes
almost nothing and is no yardstick for one that trained a whole round).
It is an outlier when

1. Norm: |x_i| > NORM_RATIO * T_i, T_i = median over j in R_i of
   |x_j| * max(1, w_i / w_j), while x_i does not point the others' way
   (median of cos_ij over R_i below AGREEMENT); or |x_i| > FAR_NORM_RATIO * T_i
   whatever its direction. Members start from the same global weights, and a
   pseudo-gradient grows at most in proportion to the steps behind it, so an
   honest one is not much larger than the others' scaled by its weight; a
   scaled-up or noise contribution is. Honest ratios reach 4.7 late in a run,
   when the learning rate is small and pseudo-gradients are mostly noise, but
   then they still agree (cosine 0.55); noise 8x an honest size gave 5.9-8.2
   at cosine ~0.
2. Direction (3 or more contributors, w_i not below the median weight over
   WEIGHT_SPAN): the median of cos_ij over j in R_i is below MIN_COSINE while
   the median of cos_jk among the references is at least AGREEMENT: it
   opposes what the others agree on (a sign flip). Honest pairs at stage 0
   of small models can be near-orthogonal (cosines down to -0.12 in our
   runs), so orthogonal is not enough: noise of an honest size is not caught.
   With 2 contributors the angle is shared and says nothing about which one
   is off, so only the norm rule applies.

Merge weights are the members' own claims; checking them against the
recorded paths is not built.

A round's verdict counts once a majority of its contributors reported the
same outlier: one member cannot frame another. And one outlier round is a
strike, not yet a flag: a contributor is flagged at its STRIKES-th outlier
round within STRIKE_WINDOW consecutive rounds of its stage. Honest stage-0
contributions scatter widely: in six swarm runs of 3 stages with 2 miners
each, equal-weight honest pairs at stage 0 had norm ratios of 0.35 to 2.7
and cosines of -0.38 to 0.82, and one CI run flagged an honest stage-0 miner
at 4.2x at cosine 0.06 in its stage's last round. The same recipe trained
honestly in one process (bench/merge_scatter.py: 2 replicas, AdamW kept
across rounds, 10 deals of the samples, 80 rounds per stage) stays within
1.48 at every stage, cosines -0.31 to 0.73 at stage 0: the algorithm alone
scatters less than the swarm, whose asynchrony (a backward applied after a
merge, gradients from other versions downstream) and cheat-fed rounds add the
rest. A poisoner's noise is an outlier in every round it sends, so it is
still flagged at its second.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

POISONED_MERGE = "poisoned_merge"  # the verdict on an outlier
NORM_RATIO = 3.0
FAR_NORM_RATIO = 6.0
MIN_COSINE = -0.3
AGREEMENT = 0.3
WEIGHT_SPAN = 4.0
STRIKES = 2
STRIKE_WINDOW = 3


class Contributions:
    """A round's contributions as the Gram matrix shows them: norms, angles, each one's references."""

    def __init__(self, weights: Sequence[float], gram: Sequence[Sequence[float]]) -> None:
        self.weights, self.gram = list(weights), gram
        self.norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(len(self.weights))]

    def cos(self, i: int, j: int) -> float:
        return self.gram[i][j] / (self.norms[i] * self.norms[j])

    def references(self, i: int) -> list[int]:
        """R_i: the others with a nonzero contribution and a weight within WEIGHT_SPAN below i's."""
        return [j for j in range(len(self.weights)) if j != i and self.norms[j] > 0
                and self.weights[j] * WEIGHT_SPAN >= self.weights[i]]

    def figures(self, i: int) -> dict[str, float] | None:
        """i's norm, its yardstick T_i and its median cosine over R_i (None with no references or a zero norm)."""
        refs = self.references(i)
        if not refs or self.norms[i] == 0:
            return None
        typical = statistics.median(self.norms[j] * max(1.0, self.weights[i] / self.weights[j]) for j in refs)
        return {"norm": self.norms[i], "others_typical_norm": typical,
                "median_cosine": statistics.median(self.cos(i, j) for j in refs)}


def outliers(contributors: Mapping[str, float], gram: Sequence[Sequence[float]]) -> dict[str, dict[str, float]]:
    """The contributors (hotkey -> merge weight, in the Gram matrix's order) far from the others,
    each with the figures that show it."""
    weights = list(contributors.values())
    round_ = Contributions(weights, gram)
    found: dict[str, dict[str, float]] = {}
    for i, hotkey in enumerate(contributors):
        figures = round_.figures(i)
        if figures is None:
            continue
        norm, typical, mine = figures["norm"], figures["others_typical_norm"], figures["median_cosine"]
        if norm > FAR_NORM_RATIO * typical or (norm > NORM_RATIO * typical and mine < AGREEMENT):
            found[hotkey] = figures
            continue
        refs = round_.references(i)
        if len(refs) < 2 or weights[i] * WEIGHT_SPAN < statistics.median(weights):
            continue
        theirs = statistics.median(round_.cos(j, k) for j in refs for k in refs if j < k)
        if mine < MIN_COSINE and theirs >= AGREEMENT:
            found[hotkey] = {"median_cosine": mine, "others_median_cosine": theirs}
    return found


class MergeVotes:
    """Reports of merge rounds, tallied: a contributor is judged an outlier of a
    round once more than half of the round's contributors reported it so."""

    def __init__(self) -> None:
        self.votes: dict[tuple[int, int], dict[str, set[str]]] = {}  # round -> outlier -> reporters
        self.judged: set[tuple[int, int, str]] = set()

    def add(self, stage: int, round_: int, reporter: str, contributors: Mapping[str, float],
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


class Strikes:
    """The rounds each contributor of a stage was judged an outlier in."""

    def __init__(self) -> None:
        self.rounds: dict[tuple[int, str], list[int]] = {}

    def add(self, stage: int, round_: int, hotkey: str) -> list[int]:
        """Count one outlier round; returns the outlier rounds within the window ending at this one
        once there are STRIKES of them (the evidence for a flag), else []."""
        recent = [r for r in self.rounds.get((stage, hotkey), []) if round_ - r < STRIKE_WINDOW]
        self.rounds[(stage, hotkey)] = recent = [*recent, round_]
        return recent if len(recent) >= STRIKES else []
