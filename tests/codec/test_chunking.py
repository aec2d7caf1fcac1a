"""All-reduce chunking: owner shards and parts on block boundaries, and the
fused decode + weighted accumulate of received parts."""

import pytest
import torch

from iota.codec import Codec, CodecError, plan_parts, plan_shards


@pytest.mark.parametrize("numel", [0, 1, 63, 64, 1000, 65_537])
@pytest.mark.parametrize("weights", [[1.0], [1, 1, 1, 1], [1, 2, 3], [100, 1, 1]])
def test_shards_cover_the_vector_on_block_boundaries(numel, weights):
    shards = plan_shards(numel, 64, weights)
    assert len(shards) == len(weights)
    assert shards[0][0] == 0 and shards[-1][1] == numel
    for (b0, e0), (b1, e1) in zip(shards, shards[1:]):
        assert e0 == b1
    for begin, end in shards:
        assert begin <= end
        if begin < end:  # empty shards (tiny vectors) may sit anywhere
            assert begin % 64 == 0 and (end % 64 == 0 or end == numel)


def test_shards_follow_the_weights():
    sizes = [e - b for b, e in plan_shards(64 * 6000, 64, [1, 2, 3])]
    assert sizes == [64 * 1000, 64 * 2000, 64 * 3000]


def test_parts_are_bounded_and_whole_blocks():
    parts = plan_parts(640, 64 * 100 + 5, 64, 1000)
    assert parts[0][0] == 640 and parts[-1][1] == 64 * 100 + 5
    assert all(e - b <= 1000 and b % 64 == 0 for b, e in parts)
    assert all(e0 == b1 for (_, e0), (b1, _) in zip(parts, parts[1:]))
    assert plan_parts(0, 100, 64, 10) == [(0, 64), (64, 100)]  # at least one block per part


@pytest.mark.parametrize("bad", [dict(weights=[]), dict(weights=[1, 0]), dict(weights=[float("nan")])])
def test_bad_plans_are_refused(bad):
    with pytest.raises(CodecError):
        plan_shards(1000, 64, **bad)
    with pytest.raises(CodecError, match="block boundary"):
        plan_parts(10, 100, 64, 64)


def test_weighted_mean_of_peers_through_parts():
    """What an all-reduce owner does: accumulate every peer's encoded part,
    then re-encode the average; the result is the exact weighted mean within
    the codec's error."""
    g = torch.Generator().manual_seed(0)
    peers = [torch.randn(10_000, generator=g) for _ in range(4)]
    weights = [1.0, 2.0, 3.0, 4.0]
    codec = Codec(bits=8, block=64, scale_dtype="fp32")
    exact = sum(w * p for w, p in zip(weights, peers)) / sum(weights)
    result = torch.empty(10_000)
    for begin, end in plan_shards(10_000, 64, [1, 1, 1]):
        for p0, p1 in plan_parts(begin, end, 64, 1024):
            acc = torch.zeros(p1 - p0)
            for w, peer in zip(weights, peers):
                Codec.decode_accumulate(codec.encode(peer[p0:p1]), acc, w / sum(weights))
            Codec.decode_into(codec.encode(acc), result[p0:p1])
    step = exact.abs().max() / 127
    assert (result - exact).abs().max() <= 2 * step
