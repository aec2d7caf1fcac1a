"""Poisoned merge contributions found from the contributions' Gram matrix (iota.validator.consensus)."""

from __future__ import annotations

import pytest
import torch

from iota.validator.consensus import STRIKE_WINDOW, MergeVotes, Strikes, outliers

NAMES = ["a", "b", "c", "d", "e"]


def honest(n: int, size: int = 4096, seed: int = 0) -> list[torch.Tensor]:
    """Pseudo-gradients of members that trained from the same weights: a shared direction plus
    their own noise (pairwise cosine about 0.6), sizes within 1.5x."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(size, generator=g, dtype=torch.float64)
    return [(shared + 0.8 * torch.randn(size, generator=g, dtype=torch.float64)) * (1 + 0.1 * i) for i in range(n)]


def gram_of(xs: list[torch.Tensor]) -> list[list[float]]:
    stacked = torch.stack(xs)
    return (stacked @ stacked.T).tolist()


def equal(n: int, weight: float = 30.0) -> dict[str, float]:
    return {name: weight for name in NAMES[:n]}


def noise_like(x: torch.Tensor, scale: float, seed: int = 99) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return noise * scale * x.norm() / noise.norm()


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_honest_members_are_not_outliers(n: int) -> None:
    for seed in range(5):
        assert outliers(equal(n), gram_of(honest(n, seed=seed))) == {}


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("poisoned", [0, 1])
def test_a_large_contribution_is_an_outlier_at_any_group_size(n: int, poisoned: int) -> None:
    xs = honest(n)
    xs[poisoned] = noise_like(xs[poisoned], 8.0)
    found = outliers(equal(n), gram_of(xs))
    assert list(found) == [NAMES[poisoned]]
    assert found[NAMES[poisoned]]["norm"] > 3 * found[NAMES[poisoned]]["others_typical_norm"]


def test_more_samples_allow_a_proportionally_larger_contribution() -> None:
    xs = honest(2)
    xs[0] = xs[0] * 8
    assert list(outliers({"a": 30.0, "b": 30.0}, gram_of(xs))) == ["a"]
    assert outliers({"a": 30.0, "b": 10.0}, gram_of(xs)) == {}  # 3x the samples: up to 18x the norm


@pytest.mark.parametrize("n", [2, 3])
def test_a_large_contribution_that_agrees_is_judged_only_when_far_larger(n: int) -> None:
    """Honest pseudo-gradients late in a run differ in size by up to ~5x, but point the same way."""
    xs = honest(n)
    xs[0] = xs[0] * 4.5
    assert outliers(equal(n), gram_of(xs)) == {}
    xs[0] = noise_like(xs[0], 1.0)  # the same size, not pointing the others' way
    found = outliers(equal(n), gram_of(xs))
    assert list(found) == ["a"] and found["a"]["median_cosine"] < 0.3


def test_a_member_that_contributed_nothing_is_no_yardstick() -> None:
    """One that just resynced (no samples since) sends a zero pseudo-gradient; the one that trained is fine."""
    xs = honest(2)
    xs[1] = torch.zeros_like(xs[1])
    assert outliers({"a": 30.0, "b": 1.0}, gram_of(xs)) == {}
    assert outliers({"a": 30.0, "b": 30.0}, gram_of(xs)) == {}


@pytest.mark.parametrize("n", [3, 5])
def test_a_sign_flipped_contribution_is_an_outlier_from_three_members(n: int) -> None:
    xs = honest(n)
    xs[1] = -xs[1]
    found = outliers(equal(n), gram_of(xs))
    assert list(found) == ["b"]
    assert found["b"]["median_cosine"] < -0.3 and found["b"]["others_median_cosine"] >= 0.3


def test_honest_sized_noise_and_two_members_disagreeing_are_not_judged() -> None:
    """The documented blind spots: orthogonal noise of an honest size; a 2-member round's shared angle."""
    xs = honest(3)
    xs[1] = noise_like(xs[1], 1.0)
    assert outliers(equal(3), gram_of(xs)) == {}
    xs = honest(2)
    xs[1] = -xs[1]
    assert outliers(equal(2), gram_of(xs)) == {}


def test_members_that_all_disagree_flag_no_one() -> None:
    """Pseudo-gradients that are all noise (no consensus): nobody stands out."""
    xs = [noise_like(torch.ones(4096, dtype=torch.float64), 1.0, seed=s) for s in range(4)]
    assert outliers(equal(4), gram_of(xs)) == {}


def test_a_round_is_judged_once_a_majority_of_its_contributors_reported_the_outlier() -> None:
    xs = honest(3)
    xs[2] = noise_like(xs[2], 8.0)
    gram, contributors = gram_of(xs), equal(3)
    votes = MergeVotes()
    assert votes.add(0, 1, "a", contributors, gram) == {}  # 1 of 3
    decided = votes.add(0, 1, "b", contributors, gram)  # 2 of 3
    assert list(decided) == ["c"]
    assert votes.add(0, 1, "c", contributors, gram) == {}  # judged already
    # A lone member claiming an honest one is off decides nothing.
    framed = honest(3)
    framed[0] = noise_like(framed[0], 8.0)
    assert votes.add(0, 2, "c", contributors, gram_of(framed)) == {}
    assert votes.add(0, 2, "a", contributors, gram_of(honest(3))) == {}


def test_a_contributor_is_flagged_at_its_second_outlier_round_close_together() -> None:
    strikes = Strikes()
    assert strikes.add(0, 1, "a") == []  # one outlier round can be honest
    assert strikes.add(1, 2, "a") == []  # another stage's strikes are counted apart
    assert strikes.add(0, 2, "b") == []
    assert strikes.add(0, 1 + STRIKE_WINDOW, "a") == []  # the first has left the window
    assert strikes.add(0, 2 + STRIKE_WINDOW, "a") == [1 + STRIKE_WINDOW, 2 + STRIKE_WINDOW]
