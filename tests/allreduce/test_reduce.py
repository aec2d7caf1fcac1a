"""The holder's reduction of one part: the mean's bytes and the contributions' Gram matrix."""

from __future__ import annotations

import torch

from iota.allreduce.holder import reduce_part
from iota.codec import Codec


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
