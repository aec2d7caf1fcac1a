"""Peers in one process and one event loop: real servers on 127.0.0.1, real
signatures, no mocks. The multi-process and failure tests are in
test_processes.py; these cover the API, the guard and the outer step quickly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import aiohttp
import pytest
import torch

from iota.allreduce import (
    AllReduceConfig,
    AllReduceError,
    AllReducePeer,
    Group,
    GroupError,
    Member,
    OuterNesterov,
    RoundPlan,
    diloco_round,
)
from iota.allreduce.decision import Decision
from iota.allreduce.holder import HolderRound
from iota.chain import LocalChain, dev_keypair
from iota.codec import Codec
from iota.net import PeerError, SignedClient, StreamClient

CONFIG = AllReduceConfig(part_bytes=16384, floor=1.0, min_throughput=1e6)
KEYS = [dev_keypair(f"iota-allreduce-local-{i}") for i in range(4)]
OUTSIDER = dev_keypair("iota-allreduce-outsider")  # registered, but in no round
STRANGER = dev_keypair("iota-allreduce-stranger")  # not registered at all


@asynccontextmanager
async def local_peers(n: int, config: AllReduceConfig = CONFIG) -> AsyncIterator[list[AllReducePeer]]:
    chain = LocalChain({k.ss58_address: "miner" for k in [*KEYS[:n], OUTSIDER]})
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(AllReducePeer(k, chain, config).serving()) for k in KEYS[:n]]


def group_of(peers: list[AllReducePeer], round_id: str, bandwidths=None) -> Group:
    bandwidths = bandwidths or [1.0] * len(peers)
    return Group(round_id, tuple(Member(p.hotkey, p.address, b) for p, b in zip(peers, bandwidths)))


def vectors(n: int, numel: int) -> list[torch.Tensor]:
    return [torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def test_four_peers_return_the_same_weighted_mean():
    async def main():
        async with local_peers(4) as peers:
            group = group_of(peers, "mean", bandwidths=[1, 2, 3, 4])
            xs, ws = vectors(4, 50_001), [1.0, 2.0, 3.0, 4.0]
            codec = Codec.from_string("int8/b64")
            results = await asyncio.gather(*(p.allreduce(group, x, w, codec) for p, x, w in zip(peers, xs, ws)))
            return peers, xs, ws, results

    peers, xs, ws, results = asyncio.run(main())
    exact = sum(w * x.double() for w, x in zip(ws, xs)) / sum(ws)
    assert len({r.digest for r in results}) == 1
    assert all(torch.equal(r.mean, results[0].mean) for r in results)
    bound = (max(x.abs().max() for x in xs) + exact.abs().max()) / 127
    assert (results[0].mean.double() - exact).abs().max() <= bound
    for peer, result in zip(peers, results):
        report = result.report
        assert report.peer == peer.hotkey and report.error is None
        assert report.contributors == {p.hotkey: w for p, w in zip(peers, ws)}
        assert report.excluded == {} and report.unreachable == {}
        assert all(s.complete and s.served_by for s in report.shards)
        assert report.bytes_sent > 0 and report.bytes_received > 0 and report.duration > 0
        assert report.to_json()["contributors"] == report.contributors
    # Every peer gets the contributions' inner products (sorted hotkey order), within int8's error.
    order = sorted(range(4), key=lambda i: peers[i].hotkey)
    stacked = torch.stack([xs[i].double() for i in order])
    exact_gram = stacked @ stacked.T
    for result in results:
        gram = torch.tensor(result.report.gram, dtype=torch.float64)
        assert gram.shape == (4, 4) and torch.equal(gram, torch.tensor(results[0].report.gram, dtype=torch.float64))
        assert torch.allclose(gram, exact_gram, rtol=1e-3, atol=10.0)


def test_a_healthy_round_moves_each_part_once():
    """Parts go to their owner only (the owner's own nowhere), and each mean part to the
    three others: no backup copies, no pulls: the bandwidth-optimal 2 (N - 1) / N frames."""

    async def main():
        async with local_peers(4) as peers:
            group = group_of(peers, "once")
            codec = Codec.from_string("int8/b64")
            await asyncio.gather(*(p.allreduce(group, x, 1.0, codec) for p, x in zip(peers, vectors(4, 200_000))))
            await asyncio.gather(*(p.drain() for p in peers))  # every peer has served every request
            plan = RoundPlan(group, 200_000, codec, CONFIG.part_bytes)
            return plan, {p.hotkey: p.traffic("once") for p in peers}

    plan, traffic = asyncio.run(main())
    vector_frames = sum(plan.frame_bytes(s) for s in range(plan.size))
    for shard, owner in enumerate(plan.members):
        # its parts of the other shards, its shard's mean (attestations travel in the answers' metas)
        parts = vector_frames - plan.frame_bytes(shard) + 3 * plan.frame_bytes(shard)
        assert parts <= traffic[owner]["sent"] < parts + 20_000  # + have-sets, decisions, Gram matrices
        assert parts <= traffic[owner]["received"] < parts + 20_000


def test_the_mean_can_land_in_the_callers_buffer_round_after_round():
    async def main():
        async with local_peers(2) as peers:
            out = [torch.full((30_000,), float("nan")) for _ in peers]
            means = []
            for r, xs in enumerate([vectors(2, 30_000), vectors(2, 30_000)[::-1]]):
                group = group_of(peers, f"into-{r}")
                results = await asyncio.gather(*(
                    p.allreduce(group, x, 1.0, Codec.from_string("int8/b64"), out=o) for p, x, o in zip(peers, xs, out)
                ))
                assert all(result.mean is o for result, o in zip(results, out))
                means.append(out[0].clone())
                assert torch.equal(out[0], out[1])
            fresh = await asyncio.gather(*(
                p.allreduce(group_of(peers, "fresh"), x, 1.0, Codec.from_string("int8/b64"))
                for p, x in zip(peers, vectors(2, 30_000))
            ))
            return means, fresh[0].mean

    means, fresh = asyncio.run(main())
    assert torch.equal(means[0], fresh) and torch.isfinite(means[1]).all()


def test_a_round_of_one_is_the_codec_round_trip():
    async def main():
        async with local_peers(1) as (peer,):
            x = vectors(1, 1000)[0]
            result = await peer.allreduce(group_of([peer], "solo"), x, 2.0, Codec.from_string("fp16"))
            return x, result

    x, result = asyncio.run(main())
    assert torch.equal(result.mean, x.half().float())
    assert result.report.contributors == {KEYS[0].ss58_address: 2.0}


def test_unregistered_and_foreign_requests_are_refused_and_change_nothing():
    async def main():
        async with local_peers(2) as (p0, p1):
            group = group_of([p0, p1], "guarded")
            codec = Codec.from_string("int8/b64")
            x0, x1 = vectors(2, 10_000)
            first = asyncio.create_task(p0.allreduce(group, x0, 1.0, codec))
            await asyncio.sleep(0.05)  # p0 has opened the round and waits for p1
            plan = RoundPlan(group, 10_000, codec, CONFIG.part_bytes)
            frame = codec.encode(torch.full((plan.parts[0].end,), 1e6))
            refusals = {}
            fp = plan.fingerprint
            for name, key, path in [
                ("stranger", STRANGER, f"parts/0?fp={fp}&weight=1.0"),
                ("outsider", OUTSIDER, f"parts/0?fp={fp}&weight=1.0"),
                ("member with another plan", KEYS[1], f"parts/0?fp={'0' * 32}&weight=1.0"),
                ("member without a weight", KEYS[1], f"parts/0?fp={fp}&weight=heavy"),
                ("member on a route streams do not have", KEYS[1], f"have?fp={fp}"),
            ]:
                client = StreamClient(key)
                with pytest.raises(PeerError) as caught:
                    method = "POST" if path.startswith("parts") else "GET"
                    await client.request(method, p0.address, f"/allreduce/guarded/{path}", receiver=p0.hotkey,
                                         timeout=10, payload=frame if method == "POST" else b"", max_response=0)
                refusals[name] = (caught.value.status, caught.value.kind)
            async with aiohttp.ClientSession() as session:
                with pytest.raises(PeerError) as caught:
                    await SignedClient(KEYS[1], session).post_bytes(
                        p0.address, f"/allreduce/guarded/decision?fp={fp}", b"{not json", receiver=p0.hotkey,
                        timeout=10
                    )
                refusals["member with a garbled decision"] = (caught.value.status, caught.value.kind)
            second = await p1.allreduce(group, x1, 1.0, codec)
            return refusals, await first, second, (x0 + x1) / 2

    refusals, first, second, exact = asyncio.run(main())
    assert refusals == {
        "stranger": (403, "NotRegistered"),
        "outsider": (403, "NotMember"),
        "member with another plan": (409, "GroupMismatch"),
        "member without a weight": (400, "BadRequest"),
        "member on a route streams do not have": (404, "NoRoute"),
        "member with a garbled decision": (400, "BadRequest"),
    }
    assert first.digest == second.digest
    assert set(first.report.contributors) == {KEYS[0].ss58_address, KEYS[1].ss58_address}
    assert first.report.excluded == {}
    assert (first.mean - exact).abs().max() <= 2 * exact.abs().max() / 127


def test_bad_inputs_are_refused_before_the_round():
    async def main():
        peer = AllReducePeer(KEYS[0], LocalChain({KEYS[0].ss58_address: "miner"}), CONFIG)
        group = Group("r", (Member(KEYS[0].ss58_address, "http://127.0.0.1:1"),))
        codec = Codec.from_string("int8/b64")
        with pytest.raises(GroupError, match="inside"):
            await peer.allreduce(group, torch.zeros(10), 1.0, codec)
        async with peer.serving():
            for vector, weight, match in [
                (torch.zeros(10, dtype=torch.float64), 1.0, "float32"),
                (torch.zeros(2, 5), 1.0, "1-D"),
                (torch.tensor([1.0, float("nan")]), 1.0, "NaN"),
                (torch.zeros(10), 0.0, "weight"),
                (torch.zeros(0), 1.0, "at least one"),
            ]:
                with pytest.raises(GroupError, match=match):
                    await peer.allreduce(group, vector, weight, codec)
            other = Group("r", (Member(KEYS[1].ss58_address, "http://127.0.0.1:1"),))
            with pytest.raises(GroupError, match="not a member"):
                await peer.allreduce(other, torch.zeros(10), 1.0, codec)
            x = torch.zeros(10)
            for out in (x, torch.zeros(11), torch.zeros(10, dtype=torch.float64), torch.zeros(20)[::2]):
                with pytest.raises(GroupError, match="out must be"):
                    await peer.allreduce(group, x, 1.0, codec, out=out)

    asyncio.run(main())


def test_a_vector_with_nan_fails_its_peer_as_it_is_encoded_and_the_others_complete_without_it():
    # No pass over the vector looks for NaN first: the codec finds it as it encodes the part
    # holding it, after other parts went out. Those count for nothing; the peer still holds.
    async def main():
        async with local_peers(3) as peers:
            group = group_of(peers, "nan")
            xs = vectors(3, 200_000)
            xs[1][150_000] = float("nan")
            outcomes = await asyncio.gather(
                *(p.allreduce(group, x, 1.0, Codec.from_string("int8/b64")) for p, x in zip(peers, xs)),
                return_exceptions=True,
            )
            return peers, xs, outcomes

    peers, xs, (first, failed, third) = asyncio.run(main())
    assert isinstance(failed, GroupError) and "NaN" in str(failed)
    assert first.digest == third.digest
    assert first.report.contributors == {peers[0].hotkey: 1.0, peers[2].hotkey: 1.0}
    assert peers[1].hotkey in first.report.excluded
    exact = (xs[0].double() + xs[2].double()) / 2
    bound = (max(xs[0].abs().max(), xs[2].abs().max()) + exact.abs().max()) / 127
    assert (first.mean.double() - exact).abs().max() <= bound


def test_a_later_register_holding_another_decision_fails_the_round_on_every_peer(monkeypatch):
    # Peers that saw different holders alive can write different decisions. Here the last
    # register takes a different one (every weight doubled) from whoever writes to it first;
    # the first register holds the true one. Peers gather while they spread the decision to
    # the later registers: no peer may complete with a mean the registers disagree on.
    record = HolderRound.record
    forged: set[int] = set()

    def diverging_record(holder, proposal):
        if holder.me == holder.plan.active_holders[-1] and id(holder) not in forged:
            forged.add(id(holder))
            doubled = {sender: 2 * weight for sender, weight in proposal.contributors.items()}
            proposal = Decision(doubled, proposal.digests, proposal.excluded)
        return record(holder, proposal)

    monkeypatch.setattr(HolderRound, "record", diverging_record)

    async def main():
        async with local_peers(4) as peers:
            group = group_of(peers, "split")
            codec = Codec.from_string("int8/b64")
            return await asyncio.gather(
                *(p.allreduce(group, x, 1.0, codec) for p, x in zip(peers, vectors(4, 100_000))),
                return_exceptions=True,
            )

    outcomes = asyncio.run(main())
    assert len(forged) == 1
    assert all(isinstance(o, AllReduceError) for o in outcomes), outcomes
    for outcome in outcomes:
        assert "different decisions" in str(outcome) or "DecisionMismatch" in str(outcome), outcome
        assert outcome.report.error is not None


def test_outer_nesterov_is_torch_sgd_nesterov():
    g = torch.Generator().manual_seed(0)
    start = torch.randn(1000, generator=g)
    outer = OuterNesterov(start)
    reference = torch.nn.Parameter(start.clone())
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(3):
        pseudo = torch.randn(1000, generator=g) * 0.01
        outer.step(pseudo)
        reference.grad = pseudo.clone()
        sgd.step()
    assert torch.allclose(outer.weights, reference.detach(), rtol=0, atol=1e-6)


def test_diloco_round_leaves_every_miner_with_the_same_global_weights():
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (10, 64)]
    start = [torch.randn(s) for s in shapes]

    async def main():
        async with local_peers(3) as peers:
            models = [[p.clone() for p in start] for _ in peers]
            outers = [OuterNesterov(torch.cat([p.reshape(-1) for p in start])) for _ in peers]
            for step in range(2):
                for i, params in enumerate(models):  # each miner's inner steps move it differently
                    for p in params:
                        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i)) * 0.01)
                group = group_of(peers, f"merge-{step}")
                codec = Codec.from_string("int8/b64")
                await asyncio.gather(
                    *(
                        diloco_round(peer, group, outer, params, 1.0 + i, codec)
                        for i, (peer, outer, params) in enumerate(zip(peers, outers, models))
                    )
                )
            return models, outers

    models, outers = asyncio.run(main())
    for outer, params in zip(outers, models):
        assert torch.equal(outer.weights, outers[0].weights)
        assert torch.equal(outer.momentum_buffer, outers[0].momentum_buffer)
        assert torch.equal(torch.cat([p.reshape(-1) for p in params]), outers[0].weights)
    assert not torch.equal(outers[0].weights, torch.cat([p.reshape(-1) for p in start]))
