"""A slow, obviously-correct numpy rendering of the codec's arithmetic
contract (csrc/codec_math.h), written independently of the kernels so tests
can check every backend against it byte for byte."""

from __future__ import annotations

import numpy as np

MAGIC = np.float32(12582912.0)


def rint(y: np.ndarray) -> np.ndarray:
    return ((y + MAGIC) - MAGIC).astype(np.float32)


def to_f16(v) -> np.float32:
    return np.float32(np.float16(np.float32(v)))


def to_f16_down(v: np.float32) -> np.float32:
    h = np.array([np.float16(v)], dtype=np.float16)
    if np.float32(h[0]) > v:
        bits = h.view(np.uint16)
        if bits[0] & 0x7FFF == 0:
            bits[0] = 0x8001
        elif bits[0] & 0x8000:
            bits[0] += 1
        else:
            bits[0] -= 1
    return np.float32(h[0])


def mix32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def uniforms(seed: int, start: int, n: int) -> np.ndarray:
    """u(seed, i) for i in [start, start + n), all within one 2^32 segment."""
    hi = mix32(np.array([((start >> 32) + 0x9E3779B9) & 0xFFFFFFFF], dtype=np.uint64))
    key = mix32(np.array([seed & 0xFFFFFFFF], dtype=np.uint32) ^ mix32(np.array([seed >> 32], dtype=np.uint32) ^ hi))
    idx = (np.arange(start, start + n, dtype=np.uint64) & 0xFFFFFFFF).astype(np.uint32)
    return (mix32(idx ^ key[0]) >> np.uint32(8)).astype(np.int32).astype(np.float32) * np.float32(2.0**-24)


def order_key(x: np.ndarray) -> np.ndarray:
    i = x.astype(np.float32).view(np.int32)
    return i ^ ((i >> 31) & 0x7FFFFFFF)


def from_order_key(k) -> np.float32:
    k = np.array([k], dtype=np.int32)
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).view(np.float32)[0]


def encode_sections(x, bits, block, *, minmax=False, stochastic=False, seed=0, fp32scale=False):
    """(scales, offsets or None, packed codes) for a flat float32 array."""
    x = np.asarray(x, dtype=np.float32)
    n = x.size
    nblocks = -(-n // block)
    sdt = np.float32 if fp32scale else np.float16
    scales, offsets = np.zeros(nblocks, sdt), np.zeros(nblocks, sdt)
    codes = np.zeros(n, dtype=np.uint32)
    for b in range(nblocks):
        xb = x[b * block : (b + 1) * block]
        round_scale = (lambda v: np.float32(0 if v < 2.0**-126 else v)) if fp32scale else to_f16
        if minmax:
            keys = order_key(xb)
            lo = from_order_key(keys.min())
            lo = lo if fp32scale else to_f16_down(lo)
            s = round_scale(np.float32(from_order_key(keys.max()) - lo) / np.float32(2**bits - 1))
            top, bottom, y = np.float32(2**bits - 1), np.float32(0), (xb - lo).astype(np.float32)
            offsets[b] = lo
        else:
            amax = np.abs(xb).max()
            s = round_scale(np.float32(amax) / np.float32(2 ** (bits - 1) - 1))
            top, y = np.float32(2 ** (bits - 1) - 1), xb
            bottom = -top
        scales[b] = s
        inv = np.float32(0) if s == 0 else np.float32(1) / np.float32(s)
        y = (y * inv).astype(np.float32)
        if stochastic:
            t = np.clip((y + uniforms(seed, b * block, xb.size)).astype(np.float32), bottom, top)
            r = rint(t)
            q = np.where(r > t, r - 1, r)
        else:
            q = rint(np.clip(y, bottom, top))
        codes[b * block : b * block + xb.size] = (q.astype(np.int64) + (0 if minmax else 2 ** (bits - 1))).astype(np.uint32)
    per = 8 // bits
    padded = np.zeros(-(-n // per) * per, dtype=np.uint32)
    padded[:n] = codes
    packed = np.zeros(padded.size // per, dtype=np.uint32)
    for k in range(per):
        packed |= padded[k::per] << np.uint32(k * bits)
    return scales, (offsets if minmax else None), packed.astype(np.uint8)


def decode_values(scales, offsets, packed, n, bits, block) -> np.ndarray:
    per = 8 // bits
    codes = np.zeros(packed.size * per, dtype=np.int64)
    for k in range(per):
        codes[k::per] = (packed.astype(np.int64) >> (k * bits)) & ((1 << bits) - 1)
    codes = codes[:n]
    s = np.repeat(scales.astype(np.float32), block)[:n]
    if offsets is None:
        return ((codes - 2 ** (bits - 1)).astype(np.float32) * s).astype(np.float32)
    lo = np.repeat(offsets.astype(np.float32), block)[:n]
    # fma(code, s, lo): exact in float64 for these magnitudes, then one rounding.
    return (codes.astype(np.float64) * s.astype(np.float64) + lo.astype(np.float64)).astype(np.float32)
