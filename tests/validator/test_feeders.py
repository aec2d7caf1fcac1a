"""Who fed whose training (iota.validator.feeders), from finished samples' records."""

from __future__ import annotations

from iota.validator.feeders import Feeders


def commits(*versions: int) -> list[dict[str, int]]:
    return [{"global_version": v} for v in versions]


def test_each_miner_on_a_path_was_fed_by_the_others_at_its_stage_and_version() -> None:
    feeders = Feeders()
    feeders.record(["a", "x", "y"], commits(0, 3, 5))
    feeders.record(["a", "z", "y"], commits(0, 3, 5))
    feeders.record(["a", "w", "y"], commits(1, 3, 5))
    assert feeders.of(0, "a", [0]) == {"x", "y", "z"}
    assert feeders.of(0, "a", [0, 1]) == {"w", "x", "y", "z"}
    assert feeders.of(0, "a", [2]) == set()
    assert feeders.of(1, "x", [3]) == {"a", "y"}
    assert feeders.of(1, "a", [0]) == set()  # not at that stage
    assert feeders.of(2, "y", [5]) == {"a", "w", "x", "z"}


def test_forgetting_old_versions_keeps_the_newer_ones_and_other_stages() -> None:
    feeders = Feeders()
    feeders.record(["a", "x"], commits(0, 0))
    feeders.record(["a", "z"], commits(2, 0))
    feeders.forget_before(0, 1)
    assert feeders.of(0, "a", [0, 1, 2]) == {"z"}
    assert feeders.of(1, "x", [0]) == {"a"}
