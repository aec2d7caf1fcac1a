"""Codec.decode_reduce: k frames decoded once into a weighted sum with exactly the bytes of k
decode_accumulate calls, and their Gram matrix against a float64 product, on every instruction set."""

import pytest
import torch

from iota import _C
from iota.codec import Codec, CodecError
from tests.codec.test_codec import sample

SPECS = ["raw", "fp16", "bf16", "int8/b64", "int4/b32/minmax", "int2/b4096", "int8/b128/fp32scale"]
SIZES = [1, 63, 4096, 4097, 5 * 4096 + 77, 1 << 20]


def frames_of(spec: str, numel: int, k: int) -> list[bytes]:
    codec = Codec.from_string(spec)
    return [codec.encode(sample(numel, seed=11 * numel + i) * (1 + i)) for i in range(k)]


def sequential(frames: list[bytes], weights: list[float], acc: torch.Tensor) -> torch.Tensor:
    out = acc.clone()
    for frame, weight in zip(frames, weights):
        Codec.decode_accumulate(frame, out, weight)
    return out


def exact_gram(frames: list[bytes]) -> torch.Tensor:
    decoded = torch.stack([Codec.decode(f).float() for f in frames]).double()
    return decoded @ decoded.T


@pytest.mark.parametrize("isa", _C.isas())
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("numel", SIZES)
def test_the_sum_is_bytewise_decode_accumulate_and_the_gram_is_exact(isa, spec, numel):
    k = 3 if numel > 4097 else 5
    frames = frames_of(spec, numel, k)
    weights = [0.5, -0.25, 1.0 / 3, 2.0, 0.125][:k]
    start = sample(numel, seed=1)  # accumulates onto what is there
    default = _C.isa()
    try:
        _C.set_isa(isa)
        acc = start.clone()
        gram = Codec.decode_reduce(frames, weights, acc)
        want = sequential(frames, weights, start)
    finally:
        _C.set_isa(default)
    assert acc.numpy().tobytes() == want.numpy().tobytes()
    exact = exact_gram(frames)
    assert gram.dtype == torch.float64 and gram.shape == (k, k)
    assert torch.equal(gram, gram.T)
    assert float((gram - exact).abs().max()) <= 1e-6 * float(exact.abs().max())


def test_threads_do_not_change_a_bit():
    frames = frames_of("int8/b64", 3 << 20, 4)
    results = []
    for threads in (1, 2, 3):
        acc = torch.zeros(3 << 20)
        gram = Codec.decode_reduce(frames, [0.25] * 4, acc, threads=threads)
        results.append((acc.numpy().tobytes(), gram.numpy().tobytes()))
    assert results[0] == results[1] == results[2]


def test_no_frames_changes_nothing():
    acc = torch.ones(10)
    assert Codec.decode_reduce([], [], acc).shape == (0, 0)
    assert torch.equal(acc, torch.ones(10))


def test_mismatched_inputs_are_refused_and_the_sum_is_untouched():
    int8, int4 = frames_of("int8/b64", 1000, 2), frames_of("int4/b64", 1000, 1)
    acc = torch.zeros(1000)
    with pytest.raises(CodecError, match="not encoded like frame 0"):
        Codec.decode_reduce(int8 + int4, [1.0, 1.0, 1.0], acc)
    with pytest.raises(CodecError, match="not encoded like frame 0"):
        Codec.decode_reduce(int8 + frames_of("int8/b64", 999, 1), [1.0, 1.0, 1.0], acc)
    with pytest.raises(CodecError, match="2 frames but 1 weights"):
        Codec.decode_reduce(int8, [1.0], acc)
    with pytest.raises(CodecError, match="accumulator holds 999"):
        Codec.decode_reduce(int8, [1.0, 1.0], torch.zeros(999))
    with pytest.raises(CodecError, match="float32"):
        Codec.decode_reduce(int8, [1.0, 1.0], torch.zeros(1000, dtype=torch.float64))
    corrupt = bytearray(int8[1])
    corrupt[-20] ^= 1
    with pytest.raises(Exception, match="checksum"):
        Codec.decode_reduce([int8[0], bytes(corrupt)], [1.0, 1.0], acc)
    assert torch.equal(acc, torch.zeros(1000))


def test_verify_false_skips_only_the_checksum():
    frames = frames_of("int8/b64", 1000, 2)
    stale = bytearray(frames[1])
    stale[-1] ^= 1  # the checksum itself: the payload is intact
    expected, acc = torch.zeros(1000), torch.zeros(1000)
    reference = Codec.decode_reduce(frames, [0.5, 0.5], expected)
    with pytest.raises(Exception, match="checksum"):
        Codec.decode_reduce([frames[0], bytes(stale)], [0.5, 0.5], acc)
    gram = Codec.decode_reduce([frames[0], bytes(stale)], [0.5, 0.5], acc, verify=False)
    assert acc.numpy().tobytes() == expected.numpy().tobytes() and torch.equal(gram, reference)
    with pytest.raises(CodecError, match="not encoded like frame 0"):  # the structure is still checked
        Codec.decode_reduce([frames[0], frames_of("int8/b64", 999, 1)[0]], [0.5, 0.5], acc, verify=False)


@pytest.mark.parametrize("spec", ["raw", "fp32"])
def test_fp32_codes_read_in_place_or_from_an_unaligned_buffer_give_the_same_bits(spec):
    # Aligned fp32 codes are reduced where they lie; a frame at an odd address is copied
    # first. Both must give the bytes of decode_accumulate.
    frames = frames_of(spec, 5 * 4096 + 77, 3)
    unaligned = []
    for frame in frames:
        holder = bytearray(len(frame) + 1)
        holder[1:] = frame
        unaligned.append(memoryview(holder)[1:])
    weights = [0.5, -0.25, 1.0 / 3]
    sums, grams = [], []
    for inputs in (frames, unaligned):
        acc = torch.zeros(5 * 4096 + 77)
        grams.append(Codec.decode_reduce(inputs, weights, acc).numpy().tobytes())
        sums.append(acc.numpy().tobytes())
    want = sequential(frames, weights, torch.zeros(5 * 4096 + 77))
    assert sums[0] == sums[1] == want.numpy().tobytes()
    assert grams[0] == grams[1]
