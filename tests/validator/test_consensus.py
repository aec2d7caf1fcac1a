"""Poisoned merge contributions found from the contributions' Gram matrix (iota.validator.consensus)."""

from __future__ import annotations

import pytest
import torch

from iota.validator.consensus import MergeVotes, outliers

NAMES = ["a", "b", "c", "d", "e"]


def honest(n: int, size: int = 4096, seed: int = 0) -> list[torch.Tensor]:
    """Pseudo-gradients of members that trained from the same weights: a shared direction plus
    their own noise (pairwise cosine about 0.6), sizes within 1.3x."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(size, generator=g, dtype=torch.float64)
    return [(shared + 0.8 * torch.randn(size, generator=g, dtype=torch.float64)) * (1 + 0.1 * i) for i in range(n)]


def gram_of(xs: list[torch.Tensor]) -> list[list[float]]:
    stacked = torch.stack(xs)
    return (stacked @ stacked.T).tolist()


def noise_like(x: torch.Tensor, scale: float, seed: int = 99) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return noise * scale * x.norm() / noise.norm()


@pytest.mark.parametrize("n", [2, 3, 5])
def test_honest_members_are_not_outliers(n: int) -> None:
    for seed in range(5):
        assert outliers(NAMES[:n], gram_of(honest(n, seed=seed))) == {}


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("poisoned", [0, 1])
def test_a_large_contribution_is_an_outlier_at_any_group_size(n: int, poisoned: int) -> None:
    xs = honest(n)
    xs[poisoned] = noise_like(xs[poisoned], 8.0)
    found = outliers(NAMES[:n], gram_of(xs))
    assert list(found) == [NAMES[poisoned]]
    assert found[NAMES[poisoned]]["norm"] > 3 * found[NAMES[poisoned]]["others_median_norm"]


@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("kind", ["noise", "sign_flip"])
def test_a_same_size_contribution_pointing_elsewhere_is_an_outlier_from_three_members(n: int, kind: str) -> None:
    xs = honest(n)
    xs[1] = noise_like(xs[1], 1.0) if kind == "noise" else -xs[1]
    found = outliers(NAMES[:n], gram_of(xs))
    assert list(found) == ["b"]
    assert found["b"]["median_cosine"] < 0.1 <= 0.3 <= found["b"]["others_median_cosine"]


def test_two_members_disagreeing_in_direction_cannot_be_told_apart() -> None:
    xs = honest(2)
    xs[1] = -xs[1]
    assert outliers(NAMES[:2], gram_of(xs)) == {}


def test_members_that_all_disagree_flag_no_one() -> None:
    """Pseudo-gradients that are all noise (no consensus): nobody stands out."""
    xs = [noise_like(torch.ones(4096, dtype=torch.float64), 1.0, seed=s) for s in range(4)]
    assert outliers(NAMES[:4], gram_of(xs)) == {}


def test_a_round_is_judged_once_a_majority_of_its_contributors_reported_the_outlier() -> None:
    xs = honest(3)
    xs[2] = noise_like(xs[2], 8.0)
    gram, contributors = gram_of(xs), NAMES[:3]
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
