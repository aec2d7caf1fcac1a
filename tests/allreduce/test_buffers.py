"""The buffer pool rounds reuse: same storage back, bounded by the busiest moment,
and a round on recycled buffers gives the same bytes as one on fresh memory."""

from __future__ import annotations

import asyncio

import torch

from iota.allreduce.buffers import BufferPool
from iota.codec import Codec
from tests.allreduce.test_peers import group_of, local_peers


def test_a_given_buffer_is_taken_again_and_the_pool_keeps_at_most_its_peak():
    pool = BufferPool()
    a, b = pool.take(1000), pool.take(1000)
    pool.give(a)
    again = pool.take(1000)
    assert again.data_ptr() == a.data_ptr()
    other = pool.take(2000)  # another size: fresh
    assert other.numel() == 2000 and pool.fresh_bytes == 4000
    # 4000 bytes were out at once; the pool keeps no more than that.
    for buffer in (b, other, again):
        pool.give(buffer)
    assert pool.pooled_bytes == 4000
    pool.give(pool.take(10))  # fresh; the pool is at its peak already: dropped
    assert pool.pooled_bytes == 4000 and pool.fresh_bytes == 4010
    reused = pool.take(2000)
    assert reused.data_ptr() == other.data_ptr() and pool.pooled_bytes == 2000
    pool.give(pool.take(10))  # room again: kept
    assert pool.pooled_bytes == 2010


def test_a_later_round_runs_on_recycled_buffers_and_matches_fresh_peers():
    codec = Codec.from_string("int8/b64")
    first = [torch.randn(50_000, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    second = [torch.randn(50_000, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]

    async def recycled():
        async with local_peers(3) as peers:
            for round_id, xs in (("a", first), ("b", second)):
                if round_id == "b":
                    fresh_before = [p.buffers.fresh_bytes for p in peers]
                results = await asyncio.gather(*(
                    p.allreduce(group_of(peers, round_id), x, 1.0 + i, codec) for i, (p, x) in enumerate(zip(peers, xs))
                ))
                await asyncio.gather(*(p.drain() for p in peers))  # round retired: its buffers are back
            return results[0], fresh_before, [p.buffers.fresh_bytes for p in peers]

    async def fresh():
        async with local_peers(3) as peers:
            return (await asyncio.gather(*(
                p.allreduce(group_of(peers, "b"), x, 1.0 + i, codec) for i, (p, x) in enumerate(zip(peers, second))
            )))[0]

    result, fresh_before, fresh_after = asyncio.run(recycled())
    assert all(before > 0 for before in fresh_before)
    assert fresh_after == fresh_before  # round b took every frame and sum from the pool
    reference = asyncio.run(fresh())
    assert torch.equal(result.mean, reference.mean)
    assert result.frames == reference.frames
