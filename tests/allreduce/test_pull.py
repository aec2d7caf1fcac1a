"""A backup pulling parts from their senders when the owner is lost: one pull per
sender shared by every asker, and a pulled frame that fails its check excludes nobody."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter

import pytest
import torch

from iota.allreduce import AllReduceConfig, Group, Member, RoundPlan
from iota.allreduce.decision import Decision
from iota.allreduce.faults import Faults
from iota.allreduce.holder import HolderRound, Refusal
from iota.chain import dev_keypair
from iota.codec import Codec
from iota.net import NetError
from iota.net.answers import payload_digest

KEYS = {key.ss58_address: key for key in (dev_keypair(f"iota-pull-{i}") for i in range(4))}
HOTKEYS = sorted(KEYS)
CODEC = Codec.from_string("int8/b64")
CONFIG = AllReduceConfig(part_bytes=4096, floor=0.5)


def frames_of(plan: RoundPlan) -> dict[str, dict[int, bytes]]:
    """Every member's frame of every part, from its own seeded vector."""
    frames = {}
    for i, member in enumerate(plan.members):
        vector = torch.randn(plan.numel, generator=torch.Generator().manual_seed(i))
        frames[member] = {p.index: CODEC.encode(vector[p.begin : p.end]) for p in plan.parts}
    return frames


def test_a_backup_pulls_once_per_sender_and_a_bad_pulled_frame_excludes_nobody():
    group = Group("pull", tuple(Member(h, f"http://127.0.0.1:{9100 + i}") for i, h in enumerate(HOTKEYS)))
    plan = RoundPlan(group, 20_000, CODEC, CONFIG.part_bytes)
    owner, backup, liar, honest = plan.members  # backup holds shard 0 (of `owner`) and owns shard 1
    frames = frames_of(plan)
    calls: Counter[str] = Counter()

    async def fetch(sender: str, part: int) -> bytes:
        calls[sender] += 1
        await asyncio.sleep(0.01)  # both askers are waiting by now
        frame = bytearray(frames[sender][part])
        if sender == liar:
            frame[len(frame) // 2] ^= 0xFF  # fails its checksum
        return bytes(frame)

    async def main():
        holder = HolderRound(plan, KEYS[backup], CONFIG, Faults())
        holder.fetch = fetch
        for p in plan.shard_parts[0]:  # what this peer sent its owner
            holder.keep(p, frames[backup][p], payload_digest(frames[backup][p]))
        for sender in plan.members:  # everyone's parts of the shard it owns
            for p in plan.shard_parts[1]:
                await holder.receive(sender, p, 1.0, frames[sender][p], remote=sender != backup)
        sparse = await holder.have_set()
        first, second = await asyncio.gather(holder.have_set(full=[0]), holder.have_set(full=[0]))
        holder.stop()
        return sparse, first, second

    sparse, first, second = asyncio.run(main())
    assert sparse.shards[0] == {}  # a backup gets no parts of the shard it backs up
    assert set(first.shards[0]) == set(second.shards[0]) == {owner, backup, honest}
    assert set(first.shards[1]) == set(plan.members)  # the liar's parts of shard 1 still count
    assert first.bad == {}
    parts = len(plan.shard_parts[0])
    # One pull each, though two peers asked; the liar's ended at once; our own is kept here.
    assert calls == {owner: parts, honest: parts, liar: 1}


def shard_digest(plan: RoundPlan, frames: dict[str, dict[int, bytes]], sender: str, shard: int) -> str:
    """What a decision records for `sender`'s parts of `shard`."""
    joined = "".join(payload_digest(frames[sender][p]) for p in plan.shard_parts[shard])
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


@pytest.mark.parametrize("gone", [None, "owner", "contributor"])
def test_a_backup_pulls_the_decided_contributions_or_refuses_to_serve(gone):
    group = Group("serve", tuple(Member(h, f"http://127.0.0.1:{9200 + i}") for i, h in enumerate(HOTKEYS)))
    plan = RoundPlan(group, 20_000, CODEC, CONFIG.part_bytes)
    owner, backup, contributor, _ = plan.members
    lost = {"owner": owner, "contributor": contributor, None: None}[gone]
    frames = frames_of(plan)
    pulled: Counter[str] = Counter()

    async def fetch(sender: str, part: int) -> bytes:
        if sender == lost:
            raise NetError(f"cannot connect to {sender}")
        pulled[sender] += 1
        return frames[sender][part]

    # The owner of shard 0 had everyone's parts when the round decided; its backup has none of
    # them. The owner still serves (it only withheld means from someone), or it died with its
    # own parts, or a contributor died after sending.
    decision = Decision(
        {m: 1.0 for m in plan.members},
        {s: {m: shard_digest(plan, frames, m, s) for m in plan.members} for s in range(plan.size)},
        {},
    )

    async def main():
        holder = HolderRound(plan, KEYS[backup], CONFIG, Faults())
        holder.fetch = fetch
        for p in plan.shard_parts[0]:
            holder.keep(p, frames[backup][p], payload_digest(frames[backup][p]))
        for sender in plan.members:
            for p in plan.shard_parts[1]:
                await holder.receive(sender, p, 1.0, frames[sender][p], remote=sender != backup)
        holder.record(decision)
        try:
            return [(await holder.mean(p, decision.key)).frame for p in plan.shard_parts[0]]
        finally:
            holder.stop()

    if lost is not None:
        with pytest.raises(Refusal, match=f"lacks the decided contributions of {lost}$"):
            asyncio.run(main())
        return
    served = asyncio.run(main())
    assert pulled == {m: len(plan.shard_parts[0]) for m in plan.members if m != backup}
    for p, mean in zip(plan.shard_parts[0], served):
        acc = torch.zeros(plan.parts[p].end - plan.parts[p].begin)
        for sender in sorted(plan.members):  # the decode-accumulate contract, in sorted order
            Codec.decode_accumulate(frames[sender][p], acc, 0.25)
        assert mean == CODEC.encode(acc)
