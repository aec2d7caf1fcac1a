"""Decoding validates every field before it touches memory: malformed,
truncated, corrupted or hostile frames raise FrameError and change nothing."""

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from iota import _C
from iota.codec import Codec, FrameError, checksum

X = torch.randn(1000, generator=torch.Generator().manual_seed(0))


def resealed(frame: bytes, offset: int, fmt: str, value) -> bytes:
    """The frame with one header field rewritten and a valid checksum, so
    the field itself (not the checksum) must be caught."""
    buf = bytearray(frame)
    struct.pack_into("<" + fmt, buf, offset, value)
    _C.seal(buf)
    return bytes(buf)


def test_xxh64_known_answers():
    assert checksum(b"") == 0xEF46DB3751D8E999
    assert checksum(b"a") == 0xD24EC4F1A98C6E5B
    assert checksum(b"abc") == 0x44BC2CF5AD770999


def test_frame_layout_is_as_documented():
    frame = Codec(bits=8, block=64).encode(X.reshape(10, 100))
    assert frame[:4] == b"IOTQ"
    version, kind, bits, flags, dtype, ndim, reserved, block, seed, numel, slen, clen = struct.unpack_from("<BBBBBBHIQQQQ", frame, 4)
    assert (version, kind, bits, flags, dtype, ndim, reserved, block, seed, numel) == (1, 0, 8, 0, 0, 2, 0, 64, 0, 1000)
    assert struct.unpack_from("<QQ", frame, 48) == (10, 100)
    assert (slen, clen) == (16 * 2, 1000)
    assert len(frame) == 64 + slen + clen + 8
    assert struct.unpack_from("<Q", frame, len(frame) - 8)[0] == checksum(frame[:-8])


@pytest.mark.parametrize(
    "offset, fmt, value, message",
    [
        (0, "4s", b"IOTA", "magic"),
        (4, "B", 2, "version"),
        (5, "B", 9, "kind"),
        (6, "B", 3, "bits"),
        (7, "B", 16, "flag"),
        (8, "B", 3, "dtype"),
        (9, "B", 9, "dimensions"),
        (9, "B", 2, "dimension|shape"),
        (10, "H", 1, "reserved"),
        (12, "I", 48, "block"),
        (12, "I", 8192, "block"),
        (16, "Q", 5, "seed"),
        (24, "Q", 999, "numel"),
        (24, "Q", 2**62, "numel"),
        (32, "Q", 10, "lengths"),
        (40, "Q", 2**63, "lengths"),
        (48, "Q", 2**60, "dimension"),
    ],
)
def test_hostile_header_fields(offset, fmt, value, message):
    frame = Codec(bits=8, block=64).encode(X)
    bad = resealed(frame, offset, fmt, value)
    with pytest.raises(FrameError, match=message):
        Codec.decode(bad)


def test_shape_overflow_is_caught():
    frame = Codec(bits=8, block=64).encode(X.reshape(10, 100))
    bad = resealed(resealed(frame, 48, "Q", 2**40), 56, "Q", 2**40)
    with pytest.raises(FrameError, match="too many elements|numel"):
        Codec.decode(bad)


def test_truncated_and_padded_frames():
    frame = Codec(bits=4, block=32).encode(X)
    for cut in (0, 1, 47, 55, 56, len(frame) // 2, len(frame) - 1):
        with pytest.raises(FrameError, match="truncated|bytes"):
            Codec.decode(frame[:cut])
    with pytest.raises(FrameError, match="padded"):
        Codec.decode(frame + b"\0")


def test_every_flipped_bit_in_the_payload_is_caught():
    frame = Codec(bits=4, block=32, scheme="minmax").encode(X[:200])
    for pos in range(0, len(frame)):
        buf = bytearray(frame)
        buf[pos] ^= 1 << (pos % 8)
        with pytest.raises(FrameError):
            Codec.decode(bytes(buf))


def test_a_bad_scale_with_a_valid_checksum_is_refused():
    frame = Codec(bits=8, block=64).encode(X)
    h = Codec.header(frame)
    for value in (np.float16(-1.0), np.float16(np.inf), np.float16(np.nan)):
        bad = resealed(frame, h["scales_off"] + 2 * 3, "H", int(np.array(value).view(np.uint16)))
        with pytest.raises(FrameError, match="scale in block 3"):
            Codec.decode(bad)


def test_failed_decode_leaves_the_accumulator_untouched():
    frame = bytearray(Codec(bits=8, block=64).encode(X))
    frame[-20] ^= 0xFF
    acc = torch.ones(1000)
    with pytest.raises(FrameError):
        Codec.decode_accumulate(bytes(frame), acc, 1.0)
    assert torch.equal(acc, torch.ones(1000))


def test_frames_from_any_bytes_like_object():
    frame = Codec(bits=8).encode(X)
    want = Codec.decode(frame)
    for wrapped in (bytearray(frame), memoryview(frame), np.frombuffer(frame, np.uint8), torch.frombuffer(bytearray(frame), dtype=torch.uint8)):
        assert torch.equal(Codec.decode(wrapped), want)
    with pytest.raises(FrameError, match="bytes-like|C-contiguous"):
        Codec.decode("not a frame")


@pytest.mark.slow
def test_fuzzed_frames_never_crash_the_process():
    """Random mutations and truncations of valid frames, in a child process so
    that a crash (not just an exception) fails the test."""
    script = Path(__file__).with_name("fuzz_frames.py")
    result = subprocess.run([sys.executable, str(script), "--examples", "3000"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "fuzz ok" in result.stdout
