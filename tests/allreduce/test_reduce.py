"""The holder's reduction of one part: the mean's bytes and the contributions' Gram matrix."""

from __future__ import annotations

import pytest
import torch

from iota.allreduce.holder import GRAM_CHUNK, gram, reduce_part
from iota.codec import Codec


@pytest.mark.parametrize("numel", [1, 100, GRAM_CHUNK, GRAM_CHUNK + 1, 3 * GRAM_CHUNK - 7, 1 << 20])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_gram_matches_a_float64_product(numel, k):
    room = torch.randn(k + 1, numel, generator=torch.Generator().manual_seed(numel + k))
    rows = room[1:]  # a view with a row stride, as reduce_part hands it over
    exact = rows.double() @ rows.double().T
    assert float((gram(rows).double() - exact).abs().max() / exact.abs().max()) < 1e-5


def test_reduce_part_is_the_fused_weighted_sum_and_its_gram():
    codec = Codec.from_string("int8/b64")
    numel = 3 * GRAM_CHUNK + 64
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(numel, generator=generator) for _ in range(3)]
    inputs = [(codec.encode(v), w) for v, w in zip(vectors, [0.5, 0.25, 0.25])]
    scratch = torch.empty(4 * numel)
    mean, products = reduce_part(codec, inputs, numel, None, scratch)
    acc = torch.zeros(numel)
    for frame, weight in inputs:
        Codec.decode_accumulate(frame, acc, weight)
    assert mean == codec.encode(acc)
    decoded = torch.stack([Codec.decode(frame) for frame, _ in inputs]).double()
    exact = decoded @ decoded.T
    assert products.dtype == torch.float64
    assert float((products - exact).abs().max() / exact.abs().max()) < 1e-5
