"""A merge outlier is flagged `poisoned_merge` at its second outlier round (one is a strike), unless
a miner flagged for its own work fed its training: a cheat's garbage can push an honest
pseudo-gradient off (the replay adversary's swarm test flagged an honest stage-0 miner that way).
Real orchestrator on loopback, real validator."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from iota.orchestrator.store import Store
from iota.validator import Validator, ValidatorConfig
from tests.orchestrator.test_service import HOTKEY, KEYS, TINY, Harness, address_of, make_chain, merge_address_of, run


@pytest.mark.parametrize(("feeder_flag", "merges_before", "merged_since", "spared"), [
    (None, 0, 0, False),
    ("wrong_output", 0, 0, True),
    ("wrong_output", 0, 2, True),  # read two merges late: the round's own base counts, not the newest version
    ("wrong_output", 1, 0, True),  # a member may train from the version before the round's base
    ("wrong_output", 2, 0, False),  # fed two merges ago: this round trained from clean merged weights
    ("poisoned_merge", 0, 0, False),  # a merge contribution feeds nobody's training directly
])
def test_a_merge_outlier_fed_by_a_miner_flagged_for_its_work_is_spared(
        tmp_path: Path, feeder_flag: str | None, merges_before: int, merged_since: int,
        spared: bool) -> None:
    store = Store(tmp_path / "orchestrator.sqlite")
    a, b, c = HOTKEY["miner-a"], HOTKEY["miner-b"], HOTKEY["miner-c"]

    async def body(h: Harness) -> None:
        for name, stage in (("miner-a", 0), ("miner-b", 1), ("miner-c", 0)):
            await h.client(name).register(1e9, address_of(name), merge_address_of(name), stage=stage)
        validator = Validator(KEYS["validator"], h.url, HOTKEY["orchestrator"], make_chain(),
                              ValidatorConfig(audit_rate=0.0))
        validator.client, validator.orchestrator = h.signed("validator"), h.client("validator")
        validator.recipe, validator.latest = TINY, [merges_before + merged_since, 0]
        await validator.orchestrator.register(0.0)
        await h.train_samples(1)  # miner-a's training at stage 0 was fed by miner-b, from version 0
        await validator.audit_new_work()
        if feeder_flag is not None:
            await validator.flag(b, feeder_flag, {})
        # Both stage-0 members report a round in which miner-a's contribution is 10x miner-c's, orthogonal.
        contributors = dict.fromkeys(sorted((a, c)), 1.0)  # a Gram matrix is in sorted hotkey order
        gram = [[(100.0 if h == a else 1.0) if h == i else 0.0 for h in contributors] for i in contributors]
        # The reported round trained from the version `merges_before` earlier rounds left.
        round_ = store.stage(0).round + merges_before
        # `merged_since` later rounds (this one included) were stored before the validator reads the reports.
        for earlier in range(store.stage(0).round, round_ + merged_since):
            store.add_version(0, earlier, hashlib.sha256(b"").hexdigest(), b"", [a, c])

        async def outlier_round(number: int) -> list[tuple[str, str]]:
            for name in ("miner-a", "miner-c"):
                await h.client(name).merged(0, number, hashlib.sha256(b"").hexdigest(), contributors, gram)
            await validator.check_merges()
            return [(f["hotkey"], f["reason"]) for f in h.orchestrator.state()["flags"]]

        flags = await outlier_round(round_)
        feeder = [] if feeder_flag is None else [(b, feeder_flag)]
        assert flags == feeder  # spared (what it trained on was the cheat's), or a first strike
        assert validator.merge_votes.judged == {(0, round_, a)}
        assert validator.strikes.rounds == ({} if spared else {(0, a): [round_]})
        # What fed training from versions no merge is judged on any more is forgotten.
        assert {v for (s, _, v) in validator.feeders.fed if s == 0} == ({0} if merges_before <= 1 else set())
        if not spared:  # outlier again in the next round: the second strike flags it
            flags = await outlier_round(round_ + 1)
            assert flags == [*feeder, (a, "poisoned_merge")]
            assert h.orchestrator.state()["flags"][-1]["outlier_rounds"] == [round_, round_ + 1]

    try:
        run(store, body)
    finally:
        store.close()
