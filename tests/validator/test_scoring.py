"""Scores from paths and losses (iota.validator.scoring)."""

from __future__ import annotations

import math
import random

import pytest

from iota.validator.scoring import PathLoss, residuals, score_miners, weights_of


def trending_paths(n: int, bad: str | None = None, penalty: float = 0.0, seed: int = 0) -> list[PathLoss]:
    """Two stages of two miners; the loss falls over time, with noise; paths through `bad` lose `penalty` more."""
    rng = random.Random(seed)
    paths = []
    for k in range(n):
        path = (rng.choice(["a0", "b0"]), rng.choice(["a1", "b1"]))
        loss = 5.0 - 2.0 * k / n + rng.gauss(0, 0.05) + (penalty if bad in path else 0.0)
        paths.append(PathLoss(k, loss, path))
    return paths


def test_residuals_remove_the_trend() -> None:
    losses = [10.0 - 0.01 * k for k in range(200)]
    assert max(abs(r) for r in residuals(losses, 20)) < 0.06
    assert residuals([1.0, 1.0, 4.0, 1.0, 1.0], 4)[2] == pytest.approx(3.0)


def test_a_miner_on_worse_paths_scores_below_every_other() -> None:
    scores = score_miners(trending_paths(400, bad="b1", penalty=0.5))
    # Half of all paths are bad, so the neighbours' median moves up by about half the penalty.
    assert scores["b1"].credit < -0.2
    assert scores["b1"].quality < 0.2
    assert all(scores["b1"].score < s.score for h, s in scores.items() if h != "b1")
    # The others are not penalized for sharing paths with it: the penalty is judged stage by stage.
    assert scores["a1"].quality == 1.0 and scores["a0"].quality > 0.9 and scores["b0"].quality > 0.9


def test_honest_noise_is_not_penalized() -> None:
    scores = score_miners(trending_paths(400, seed=3))
    assert all(s.quality > 0.95 for s in scores.values()), scores
    assert sum(s.throughput for h, s in scores.items() if h.endswith("0")) == pytest.approx(1.0)


def test_flagged_miners_score_zero_and_weights_sum_to_one() -> None:
    scores = score_miners(trending_paths(200), flagged=["a0"])
    assert scores["a0"].flagged and scores["a0"].score == 0.0
    weights = weights_of(scores)
    assert weights["a0"] == 0.0 and math.isclose(sum(weights.values()), 1.0)
    assert score_miners([]) == {}
    assert weights_of({h: s for h, s in score_miners(trending_paths(50), flagged=["a0", "b0", "a1", "b1"]).items()}) \
        == {"a0": 0.0, "b0": 0.0, "a1": 0.0, "b1": 0.0}
