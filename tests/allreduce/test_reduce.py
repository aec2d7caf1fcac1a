"""The holder's reduction of one part: the mean's bytes and the contributions' Gram matrix;
and the owner's reduce before the decision, kept only when the decision confirms it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from bittensor.sp_core import Keypair

import iota.allreduce.holder as holder_module
from iota.allreduce import AllReduceConfig, Group, Member, RoundPlan
from iota.allreduce.decision import Decision
from iota.allreduce.faults import Faults
from iota.allreduce.gram import gram_of_text, gram_text
from iota.allreduce.holder import HolderRound, mean_message, reduce_part
from iota.chain import dev_keypair
from iota.codec import Codec
from iota.net.answers import payload_digest
from iota.net.stream import MAX_ANSWER_META


def test_reduce_part_is_the_fused_weighted_sum_and_its_gram():
    codec = Codec.from_string("int8/b64")
    numel = 3 * 4096 + 64
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(numel, generator=generator) for _ in range(3)]
    inputs = [(codec.encode(v), w) for v, w in zip(vectors, [0.5, 0.25, 0.25])]
    scratch = torch.full((numel,), 7.0)  # left from the part before
    mean, products = reduce_part(codec, inputs, None, scratch)
    acc = torch.zeros(numel)
    for frame, weight in inputs:
        Codec.decode_accumulate(frame, acc, weight)
    assert mean == codec.encode(acc)
    decoded = torch.stack([Codec.decode(frame) for frame, _ in inputs]).double()
    exact = decoded @ decoded.T
    assert products.dtype == torch.float64
    assert float((products - exact).abs().max() / exact.abs().max()) < 1e-5


def test_a_gram_matrix_travels_exactly_and_a_few_hundred_contributors_fit_in_an_answer():
    products = torch.randn(256, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    text = gram_text(products.numpy())
    assert np.array_equal(gram_of_text(text, 256), products.numpy())
    assert len(text) + 1000 < MAX_ANSWER_META  # with the attestation and the rest of the meta
    for bad, why in [(text, "values"), ("not base64!", "base64"), ([[1.0]], "base64"), ("AAAA", "float64"),
                     (gram_text(np.array([[np.inf]])), "finite")]:
        with pytest.raises(ValueError, match=why):
            gram_of_text(bad, 255 if bad is text else 1)


KEYS = {key.ss58_address: key for key in (dev_keypair(f"iota-guess-{i}") for i in range(4))}
HOTKEYS = sorted(KEYS)
WEIGHTS = dict(zip(HOTKEYS, [1.0, 2.0, 0.5, 1.5]))


@pytest.mark.parametrize("excluded", [None, HOTKEYS[2]], ids=["decision-is-everyone", "decision-drops-one"])
def test_an_owner_reduces_before_the_decision_and_keeps_only_what_the_decision_confirms(monkeypatch, excluded):
    codec = Codec.from_string("int8/b64")
    group = Group("guess", tuple(Member(h, f"http://127.0.0.1:{9200 + i}") for i, h in enumerate(HOTKEYS)))
    plan = RoundPlan(group, 40_000, codec, 4096)
    owner, parts = plan.members[0], plan.shard_parts[0]
    assert len(parts) > 1
    vectors = {h: torch.randn(plan.numel, generator=torch.Generator().manual_seed(i)) for i, h in enumerate(HOTKEYS)}
    frames = {h: {p: codec.encode(vectors[h][plan.parts[p].begin : plan.parts[p].end]) for p in parts} for h in HOTKEYS}
    reduced = []

    def counted(*args):
        reduced.append(args)
        return reduce_part(*args)

    monkeypatch.setattr(holder_module, "reduce_part", counted)

    async def main():
        holder = HolderRound(plan, KEYS[owner], AllReduceConfig(floor=60.0), Faults())
        try:
            for sender in HOTKEYS:
                for p in parts:
                    await holder.receive(sender, p, WEIGHTS[sender], frames[sender][p], remote=sender != owner)
            await asyncio.gather(*(task for _, task in holder._guesses.values()))
            assert len(reduced) == len(parts)  # every part reduced before any decision
            counted_in = {h: w for h, w in WEIGHTS.items() if h != excluded}
            holder.close()  # its backed-up shard never comes: no need to wait for the deadline
            complete = (await holder.have_set()).shards[0]
            decision = Decision(counted_in, {0: {h: complete[h] for h in counted_in}},
                                {excluded: "test"} if excluded else {})
            holder.record(decision)
            return [await holder.mean(p, decision.key) for p in parts], counted_in, decision.key
        finally:
            holder.stop()

    means, counted_in, key = asyncio.run(main())
    # A wrong guess is reduced again; a right one is not.
    assert len(reduced) == len(parts) * (2 if excluded else 1)
    total = sum(counted_in.values())
    owner_key = Keypair(ss58_address=owner)
    for p, mean in zip(parts, means):
        inputs = [(frames[h][p], counted_in[h] / total) for h in sorted(counted_in)]
        expected, products = reduce_part(codec, inputs, None, torch.empty(plan.parts[p].end - plan.parts[p].begin))
        assert mean.frame == expected and mean.digest == payload_digest(expected)
        assert np.array_equal(gram_of_text(mean.gram, len(counted_in)), products.numpy())
        # The owner vouches for this mean of this part under this decision with these inner
        # products, and for nothing else.
        digest, gram, attestation = mean.digest, mean.gram, mean.attestation
        assert owner_key.verify(mean_message(plan, p, key, digest, gram), attestation)
        assert not owner_key.verify(mean_message(plan, p, "another-decision", digest, gram), attestation)
        assert not owner_key.verify(mean_message(plan, p + 1, key, digest, gram), attestation)
        assert not owner_key.verify(mean_message(plan, p, key, payload_digest(b"another mean"), gram), attestation)
        other_gram = gram_text(products.numpy() * 2)
        assert not owner_key.verify(mean_message(plan, p, key, digest, other_gram), attestation)
