"""The decision rule: which contributions count, given what the holders report."""

import asyncio

import pytest
import torch

from iota.allreduce import Group, Member, RoundPlan
from iota.allreduce.decision import Decision, HaveSet, RoundFailed, propose
from iota.chain import dev_keypair
from iota.codec import Codec

KEYS = {key.ss58_address: key for key in (dev_keypair(f"iota-decision-{i}") for i in range(4))}
HOTKEYS = sorted(KEYS)
A, B, C, D = HOTKEYS
PLAN = RoundPlan(Group("r", tuple(Member(h, "x") for h in HOTKEYS)), 4096, Codec(kind="raw"), 512)
WEIGHTS = {A: 1.0, B: 2.0, C: 3.0, D: 4.0}


def full_have(holder: str, **changes) -> HaveSet:
    shards = {s: {m: f"digest-{m[:6]}-{s}" for m in HOTKEYS} for s in PLAN.held_by(holder)}
    fields = dict(shards=shards, weights=dict(WEIGHTS), bad={}, decision=None)
    fields.update(changes)
    return HaveSet(**fields)


def all_haves() -> dict[str, HaveSet]:
    return {h: full_have(h) for h in HOTKEYS}


def test_everyone_complete_means_everyone_counts():
    decision = propose(PLAN, all_haves())
    assert decision.contributors == WEIGHTS and decision.excluded == {}
    assert set(decision.digests) == {0, 1, 2, 3}


def test_a_sender_refused_anywhere_is_out_everywhere():
    haves = all_haves()
    haves[C] = full_have(C, bad={B: "part 3: frame checksum mismatch"})
    decision = propose(PLAN, haves)
    assert B not in decision.contributors
    assert "checksum" in decision.excluded[B] and C in decision.excluded[B]


def test_a_sender_missing_from_both_holders_of_a_shard_is_out():
    haves = all_haves()
    for holder in PLAN.holders(2):
        shards = {
            s: {m: d for m, d in have.items() if not (s == 2 and m == D)} for s, have in haves[holder].shards.items()
        }
        haves[holder] = full_have(holder, shards=shards)
    decision = propose(PLAN, haves)
    assert set(decision.contributors) == {A, B, C}
    assert "shard 2" in decision.excluded[D]


def test_one_complete_holder_per_shard_is_enough_and_the_other_is_not_used():
    # The backup of shard 1 (C) lacks A's parts: the owner (B) still has them.
    haves = all_haves()
    shards = {s: {m: d for m, d in have.items() if not (s == 1 and m == A)} for s, have in haves[C].shards.items()}
    haves[C] = full_have(C, shards=shards)
    decision = propose(PLAN, haves)
    assert decision.contributors == WEIGHTS
    assert decision.digests[1][A] == haves[B].shards[1][A]


def test_dead_holders_are_skipped_and_a_shard_without_holders_fails():
    haves = all_haves()
    del haves[B]  # owner of 1, backup of 0: the others still cover every shard
    assert propose(PLAN, haves).contributors == WEIGHTS
    del haves[C]  # B and C held shard 1: it is lost
    with pytest.raises(RoundFailed, match="shard 1"):
        propose(PLAN, haves)


def test_different_data_or_weights_to_different_holders_exclude_the_sender():
    haves = all_haves()
    shards = {s: dict(have) for s, have in haves[B].shards.items()}
    shards[0][D] = "something-else"
    haves[B] = full_have(B, shards=shards)
    haves[C] = full_have(C, weights={**WEIGHTS, A: 9.0})
    decision = propose(PLAN, haves)
    assert set(decision.contributors) == {B, C}
    assert "different data" in decision.excluded[D] and "different weights" in decision.excluded[A]


def test_nobody_left_fails_the_round():
    haves = {h: full_have(h, shards={s: {} for s in PLAN.held_by(h)}) for h in HOTKEYS}
    with pytest.raises(RoundFailed, match="no member"):
        propose(PLAN, haves)


def test_decisions_and_have_sets_survive_json_and_the_key_ignores_reasons():
    decision = propose(PLAN, all_haves())
    again = Decision.from_json(decision.to_json())
    assert again == decision and again.key == decision.key
    assert Decision(decision.contributors, decision.digests, {"x": "why"}).key == decision.key
    assert Decision({**decision.contributors, A: 1.5}, decision.digests, {}).key != decision.key
    have = full_have(A, decision=decision)
    assert HaveSet.from_json(have.to_json()) == have
    for bad in [None, {}, {"contributors": {A: "heavy"}, "digests": {}, "excluded": {}}, {"contributors": []}]:
        with pytest.raises(ValueError):
            Decision.from_json(bad)


def test_a_holder_checks_parts_and_its_decision_register_is_write_once():
    from iota.allreduce import AllReduceConfig, Faults
    from iota.allreduce.holder import HolderRound, Refusal

    codec = Codec.from_string("int8/b64")
    plan = RoundPlan(PLAN.group, 4096, codec, 512)
    part = plan.parts[plan.shard_parts[0][0]]  # shard 0: owned by A, backed up by B
    good = codec.encode(torch.randn(part.end - part.begin))

    async def main():
        holder = HolderRound(plan, KEYS[A], AllReduceConfig(floor=60.0), Faults())
        try:
            await holder.receive(B, part.index, 2.0, good, remote=True)
            damaged = bytearray(good)
            damaged[len(damaged) // 2] ^= 1
            with pytest.raises(Refusal, match="checksum"):
                await holder.receive(C, part.index, 3.0, bytes(damaged), remote=True)
            short = codec.encode(torch.randn(part.end - part.begin - 64))
            with pytest.raises(Refusal, match="shape"):
                await holder.receive(D, part.index, 4.0, short, remote=True)
            with pytest.raises(Refusal, match="Excluded"):  # once out, out for the round
                await holder.receive(C, part.index, 3.0, good, remote=True)
            with pytest.raises(Refusal, match="weight changed"):
                await holder.receive(B, plan.shard_parts[0][1], 5.0, good, remote=True)
            first = Decision({A: 1.0}, {0: {}, 3: {}}, {})
            second = Decision({B: 1.0}, {0: {}, 3: {}}, {})
            assert holder.record(first) is first and holder.record(second) is first
            with pytest.raises(Refusal, match="Closed"):  # recording a decision closes the holder
                await holder.receive(A, part.index, 1.0, good, remote=False)
            have = await holder.have_set()
            assert have.decision == first
            assert set(have.bad) == {B, C, D}
            assert "checksum" in have.bad[C] and "shape" in have.bad[D]
        finally:
            holder.stop()

    asyncio.run(main())
