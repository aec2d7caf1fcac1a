"""Decoder fuzzing: hypothesis mutates and truncates valid frames (optionally
resealing the checksum so mutations reach the field checks); decoding must
either succeed or raise FrameError. Run as a script so a crash is visible to
the caller as a dead process: python fuzz_frames.py --examples N"""

import argparse

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iota import _C
from iota.codec import Codec, FrameError

SPECS = ["int8/b32", "int4/b64/minmax", "int2/b4096/stochastic/seed=3", "int8/b256/fp32scale", "fp16", "bf16", "raw"]
SHAPES = [(0,), (1,), (5, 7), (300,), (2, 3, 4)]


def frames():
    out = []
    g = torch.Generator().manual_seed(0)
    for spec in SPECS:
        for shape in SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                out.append(Codec.from_string(spec).encode(torch.randn(shape, generator=g).to(dtype)))
    return out


FRAMES = frames()

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("byte"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("extend"), st.integers(1, 64), st.integers(0, 255)),
    st.tuples(st.just("u64"), st.integers(0, 80), st.integers(0, 2**64 - 1)),
)


def mutate(frame: bytes, ops, reseal: bool) -> bytes:
    buf = bytearray(frame)
    for kind, a, b in ops:
        if kind == "flip" and buf:
            buf[a % len(buf)] ^= 1 << b
        elif kind == "byte" and buf:
            buf[a % len(buf)] = b
        elif kind == "truncate":
            del buf[a % (len(buf) + 1) :]
        elif kind == "extend":
            buf += bytes([b]) * a
        elif kind == "u64" and len(buf) >= a + 8:
            buf[a : a + 8] = b.to_bytes(8, "little")
    if reseal and len(buf) >= 8:
        _C.seal(buf)
    return bytes(buf)


def run(examples: int) -> None:
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(FRAMES), st.lists(mutation, min_size=1, max_size=4), st.booleans())
    def decode_mutated(frame, ops, reseal):
        bad = mutate(frame, ops, reseal)
        try:
            out = Codec.decode(bad)
        except FrameError:
            return
        # Accepted frames must be self-consistent: the decoded size is what the header says.
        assert out.numel() == Codec.header(bad)["numel"]
        acc = torch.zeros(out.numel())
        Codec.decode_accumulate(bad, acc, 1.0)

    decode_mutated()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=2000)
    run(parser.parse_args().examples)
    print("fuzz ok")
