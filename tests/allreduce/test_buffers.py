"""The block pool rounds reuse (iota._C.ByteBlock): blocks back by size class, bounded
by the busiest moment, and a round on recycled blocks gives the same bytes as one on
fresh memory."""

from __future__ import annotations

import asyncio

import pytest
import torch

from iota._C import ByteBlock, block_pool_stats
from iota.codec import Codec
from tests.allreduce.test_peers import group_of, local_peers


def test_block_pool_classes_bound_and_keep_at_most_the_peak():
    assert [len(ByteBlock(n)) for n in (0, 1, 4095, 5 << 20)] == [0, 1, 4095, 5 << 20]
    with pytest.raises(TypeError):
        ByteBlock(-1)
    start = block_pool_stats()
    blocks = [ByteBlock(8 << 20) for _ in range(3)]  # out at once: the peak is at least 24 MiB
    held = block_pool_stats()
    assert held["out_bytes"] - start["out_bytes"] >= 24 << 20 and held["peak_bytes"] >= held["out_bytes"]
    del blocks
    freed = block_pool_stats()
    assert freed["out_bytes"] == start["out_bytes"]
    assert freed["pooled_bytes"] <= freed["peak_bytes"]
    again = [ByteBlock((8 << 20) - 1000) for _ in range(3)]  # the same class: no fresh memory
    assert block_pool_stats()["fresh_bytes"] == freed["fresh_bytes"]
    del again


def test_a_later_round_runs_on_recycled_buffers_and_matches_fresh_peers():
    codec = Codec.from_string("int8/b64")
    first = [torch.randn(50_000, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    second = [torch.randn(50_000, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]

    async def recycled():
        async with local_peers(3) as peers:
            start = block_pool_stats()
            for round_id, xs in (("a", first), ("b", second)):
                results = await asyncio.gather(*(
                    p.allreduce(group_of(peers, round_id), x, 1.0 + i, codec) for i, (p, x) in enumerate(zip(peers, xs))
                ))
                await asyncio.gather(*(p.drain() for p in peers))  # round retired: its blocks are back
                if round_id == "a":
                    del results  # and so are the means round a returned (their frames are blocks too)
                    between = block_pool_stats()
            return results[0], start, between, block_pool_stats()

    async def fresh():
        async with local_peers(3) as peers:
            return (await asyncio.gather(*(
                p.allreduce(group_of(peers, "b"), x, 1.0 + i, codec) for i, (p, x) in enumerate(zip(peers, second))
            )))[0]

    result, start, between, end = asyncio.run(recycled())
    # Nothing of round a is held once it retired and its result is dropped, whatever the GC does.
    assert between["out_bytes"] == start["out_bytes"]
    # Round b ran on round a's blocks: nearly all it took came from the pool (a block is
    # fresh only when more of a size is out at once than ever before).
    taken, mapped = end["taken_bytes"] - between["taken_bytes"], end["fresh_bytes"] - between["fresh_bytes"]
    assert taken > 0 and mapped <= taken // 10, (taken, mapped)
    reference = asyncio.run(fresh())
    assert torch.equal(result.mean, reference.mean)
    assert result.frames == reference.frames
