"""Miner scores from the swarm's record of which miner handled each sample
at each stage, and the sample's loss (IOTA's CLASP idea: credit a miner by
how the losses of the paths through it compare with the others').

The formula, for the samples finished in a scoring window:

1. Detrend. Loss falls as the model trains, so a sample's loss is compared
   with its neighbours in time: its *residual* is
   r_k = loss_k - median(loss_j for the `neighbours` samples j nearest to k).
2. Credit. For miner m on stage s, over the n_m samples whose path went
   through m at stage s: c_m = -mean(r_k) (positive: paths through m end
   with lower loss than usual). Its standard error is se_m = std(r) / sqrt(n_m)
   with std(r) over all samples of the window.
3. Quality. q_m = exp(min(0, c_m) / tau): a miner whose paths are worse than
   usual loses score smoothly, one whose paths are better is not paid extra
   for it (the other miners on those paths share that credit). Only credit
   beyond noise counts: c_m is shrunk towards 0 by 2 se_m first.
4. Throughput. t_m = n_m / (samples of the window), the share of the
   stage's work m did.
5. Score. score_m = t_m * q_m, or 0 if a validator flagged m in the window.
   Scores are normalized to sum 1 before they become chain weights.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PathLoss:
    """One finished sample: its id, loss, and the miner hotkey at each stage."""

    sample: int
    loss: float
    path: tuple[str, ...]


@dataclass(frozen=True)
class MinerScore:
    hotkey: str
    samples: int
    credit: float
    quality: float
    throughput: float
    flagged: bool
    score: float


def residuals(losses: Sequence[float], neighbours: int) -> list[float]:
    """Each loss minus the median of the `neighbours` losses nearest to it in order (itself excluded)."""
    n = len(losses)
    half = max(1, neighbours // 2)
    result = []
    for k in range(n):
        lo, hi = max(0, k - half), min(n, k + half + 1)
        window = [losses[j] for j in range(lo, hi) if j != k]
        result.append(losses[k] - statistics.median(window) if window else 0.0)
    return result


def score_miners(paths: Iterable[PathLoss], flagged: Iterable[str] = (), *, neighbours: int = 20,
                 tau: float = 0.1) -> dict[str, MinerScore]:
    """Scores of every miner on the given paths (ordered by sample id); see the module docstring."""
    ordered = sorted(paths, key=lambda p: p.sample)
    flagged = set(flagged)
    if not ordered:
        return {}
    r = residuals([p.loss for p in ordered], neighbours)
    spread = statistics.pstdev(r) if len(r) > 1 else 0.0
    by_miner: dict[str, list[float]] = defaultdict(list)
    for path, residual in zip(ordered, r):
        for hotkey in set(path.path):
            by_miner[hotkey].append(residual)
    scores = {}
    for hotkey, values in by_miner.items():
        n = len(values)
        credit = -statistics.fmean(values)
        noise = 2 * spread / math.sqrt(n)
        shrunk = math.copysign(max(0.0, abs(credit) - noise), credit)
        quality = math.exp(min(0.0, shrunk) / tau)
        throughput = n / len(ordered)
        is_flagged = hotkey in flagged
        scores[hotkey] = MinerScore(hotkey, n, credit, quality, throughput, is_flagged,
                                    0.0 if is_flagged else throughput * quality)
    return scores


def weights_of(scores: dict[str, MinerScore]) -> dict[str, float]:
    """Chain weights: scores normalized to sum 1 (all zero if nobody scored)."""
    total = math.fsum(s.score for s in scores.values())
    return {h: (s.score / total if total > 0 else 0.0) for h, s in scores.items()}
