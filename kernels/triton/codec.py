"""Triton kernels of the blockwise integer codec (bits 8/4/2, absmax or minmax).

The arithmetic contract is csrc/codec_math.h: the CPU and CUDA backends and
these kernels must produce byte-identical scales, offsets and codes, so every
rounding step below mirrors a line of that header. Rules that follow from it:

* Divisions use ``tl.div_rn``: Triton lowers fp32 ``/`` to ``div.full.f32``
  on NVIDIA, which is up to 2 ulp off, and the scale must be correctly rounded.
* Kernels are launched with ``enable_fp_fusion=False`` so ``a * b + c`` stays
  two roundings; the one place the contract wants a fused multiply-add (the
  min-max decode) says so with ``tl.fma``.
* Rounding to an integer is ``(y + 1.5*2^23) - 1.5*2^23`` (half to even),
  exact because every rounded value is clamped to a few hundred.
* Reductions that pick one element (absmax, min, max) run on integer bit
  patterns, so -0/+0 and ties are decided exactly as in C++.
* bf16 tensors are handled as their int16 bit patterns: the interpreter's
  fp32 -> bf16 conversion is not round-to-nearest-even, and a bit shift is
  exact on every backend anyway.

One program handles a tile of ROWS blocks. Element ``k`` of byte ``j`` of a
block sits at tile position ``[row, j, k]`` (PER = 8 // bits codes per byte),
so packing is a shift of each code by ``k * bits`` and a sum along the last
axis (the bit fields are disjoint, so the sum is their OR).

Stochastic rounding derives the RNG key of each block inside the kernel from
the 64-bit seed (passed as two 32-bit halves) and the block's start index,
exactly like ``rng_key`` in the header.
"""

import torch
import triton
import triton.language as tl

# Elements per program: enough to amortize a program's fixed cost, few
# enough to stay in registers on a GPU (a 4096-element block gets a program of
# its own). The CPU interpreter runs programs one after another and pays a few
# milliseconds per program, so there a tile is as large as the input allows.
# The kernels were decorated in interpreter mode iff this knob was set on import.
_INTERPRET = bool(triton.knobs.runtime.interpret)
_TILE = 65536 if _INTERPRET else 4096
_NUM_WARPS = 4

_SCALE_DTYPES = {True: torch.float32, False: torch.float16}
_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _mix32(x):
    # lowbias32 on uint32: the products wrap mod 2^32 and the shifts are
    # logical because x is unsigned.
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def _rng_key(seed_lo, seed_hi, start):
    # rng_key(seed, start) for int64 element indices `start`; the seed halves
    # are 32-bit patterns (any integer type).
    hi = _mix32((start >> 32).to(tl.uint32) + tl.full(start.shape, 0x9E3779B9, tl.uint32))
    return _mix32(seed_lo.to(tl.uint32) ^ _mix32(seed_hi.to(tl.uint32) ^ hi))


@triton.jit
def _rint(y):
    # Round half to even without libdevice (which the interpreter lacks).
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _clamp(y, lo, hi):
    # Same comparison order as clampf() so a NaN passes through identically.
    y = tl.where(y > hi, hi, y)
    return tl.where(y < lo, lo, y)


@triton.jit
def _key_to_f32(k):
    # order_key is an involution: the same transform maps a key back.
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _f16_down(v):
    # to_scale_dtype_down(v, f16=True): the largest fp16 value <= v.
    h = v.to(tl.float16)
    hb = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    stepped = tl.where((hb & 0x7FFF) == 0, 0x8001, tl.where((hb & 0x8000) != 0, hb + 1, hb - 1))
    hb = tl.where(h.to(tl.float32) > v, stepped, hb)
    return hb.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _encode_kernel(
    x_ptr,
    scale_ptr,
    offset_ptr,
    code_ptr,
    numel,
    nblocks,
    seed_lo,
    seed_hi,
    X_BF16: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    MINMAX: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SCALE_F16: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS
    NBYTES: tl.constexpr = BLOCK // PER
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, NBYTES)
    k = tl.arange(0, PER)
    idx = rows[:, None, None] * BLOCK + (j * PER)[None, :, None] + k[None, None, :]
    mask = idx < numel

    if X_BF16:
        # bf16 -> fp32 is exact: the 16 bits become the top half of the float.
        xb = tl.load(x_ptr + idx, mask=mask, other=0).to(tl.int32)
        x = (xb << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    xi = x.to(tl.int32, bitcast=True)

    if MINMAX:
        TOP: tl.constexpr = (1 << BITS) - 1
        key = xi ^ ((xi >> 31) & 0x7FFFFFFF)
        klo = tl.min(tl.min(tl.where(mask, key, 2147483647), axis=2), axis=1)
        khi = tl.max(tl.max(tl.where(mask, key, -2147483648), axis=2), axis=1)
        lo = _key_to_f32(klo)
        hi = _key_to_f32(khi)
        if SCALE_F16:
            lo_h = _f16_down(lo)
            lo = lo_h.to(tl.float32)
            tl.store(offset_ptr + rows, lo_h, mask=rows < nblocks)
        else:
            tl.store(offset_ptr + rows, lo, mask=rows < nblocks)
        s = tl.div_rn(hi - lo, TOP * 1.0)
        lower = 0.0
    else:
        TOP: tl.constexpr = (1 << (BITS - 1)) - 1
        # Padding lanes hold +0 and cannot raise the maximum.
        amax = tl.max(tl.max(xi & 0x7FFFFFFF, axis=2), axis=1).to(tl.float32, bitcast=True)
        s = tl.div_rn(amax, TOP * 1.0)
        lower = -TOP * 1.0

    # The stored (rounded) scale is the one the codes are computed with.
    if SCALE_F16:
        s_h = s.to(tl.float16)
        s = s_h.to(tl.float32)
        tl.store(scale_ptr + rows, s_h, mask=rows < nblocks)
    else:
        # fp32 scales below the smallest normal flush to 0: their inverse
        # would overflow to inf (codec_math.h, to_scale_dtype).
        s = tl.where(s < 1.1754943508222875e-38, 0.0, s)
        tl.store(scale_ptr + rows, s, mask=rows < nblocks)
    inv = tl.where(s == 0.0, 0.0, tl.div_rn(1.0, tl.where(s == 0.0, 1.0, s)))

    if MINMAX:
        y = (x - lo[:, None, None]) * inv[:, None, None]
    else:
        y = x * inv[:, None, None]

    if STOCHASTIC:
        # Blocks never straddle a 2^32-element boundary, so the key (which
        # depends on index >> 32) is one per block.
        bkey = _rng_key(seed_lo, seed_hi, rows * BLOCK)
        h = _mix32(idx.to(tl.uint32) ^ bkey[:, None, None])
        u = (h >> 8).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08
        t = _clamp(y + u, lower, TOP * 1.0)
        r = _rint(t)
        q = tl.where(r > t, r - 1.0, r)
    else:
        q = _rint(_clamp(y, lower, TOP * 1.0))

    # Padding lanes must contribute zero bits (not the code of 0). A NaN q
    # (0 * inf when an fp32 scale below 2^-128 makes inv = inf) becomes 0: C++
    # on x86 converts it to INT_MIN, whose low bits also give q = 0, and CUDA
    # converts it to 0, so all backends agree without relying on a cast.
    q = tl.where(mask & (q == q), q, 0.0).to(tl.int32)
    if MINMAX:
        code = q
    else:
        code = tl.where(mask, q + (1 << (BITS - 1)), 0)
    byte = tl.sum(code << (k * BITS)[None, None, :], axis=2)

    byte_idx = rows[:, None] * NBYTES + j[None, :]
    byte_mask = (rows[:, None] * BLOCK + (j * PER)[None, :]) < numel
    tl.store(code_ptr + byte_idx, byte.to(tl.uint8), mask=byte_mask)


@triton.jit
def _decode_kernel(
    scale_ptr,
    offset_ptr,
    code_ptr,
    out_ptr,
    numel,
    nblocks,
    weight,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    MINMAX: tl.constexpr,
    OUT_BF16: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS
    NBYTES: tl.constexpr = BLOCK // PER
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, NBYTES)
    k = tl.arange(0, PER)
    row_mask = rows < nblocks

    byte_idx = rows[:, None] * NBYTES + j[None, :]
    byte_mask = (rows[:, None] * BLOCK + (j * PER)[None, :]) < numel
    byte = tl.load(code_ptr + byte_idx, mask=byte_mask, other=0).to(tl.int32)
    code = (byte[:, :, None] >> (k * BITS)[None, None, :]) & ((1 << BITS) - 1)

    s = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None, None]
    if MINMAX:
        lo = tl.load(offset_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None, None]
        v = tl.fma(code.to(tl.float32), s, lo)
    else:
        v = (code - (1 << (BITS - 1))).to(tl.float32) * s

    idx = rows[:, None, None] * BLOCK + (j * PER)[None, :, None] + k[None, None, :]
    mask = idx < numel
    if ACCUMULATE:
        a = tl.load(out_ptr + idx, mask=mask, other=0.0)
        # Two roundings (multiply, then add): launched without fp fusion.
        tl.store(out_ptr + idx, a + weight * v, mask=mask)
    elif OUT_BF16:
        # f32_to_bf16_bits: round to nearest even, NaN stays a quiet NaN.
        xb = v.to(tl.uint32, bitcast=True)
        rne = (xb + 0x7FFF + ((xb >> 16) & 1)) >> 16
        bb = tl.where((xb & 0x7FFFFFFF) > 0x7F800000, (xb >> 16) | 0x40, rne)
        tl.store(out_ptr + idx, bb.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=mask)


def _check_geometry(bits: int, block: int) -> None:
    if bits not in (8, 4, 2):
        raise ValueError(f"bits must be 8, 4 or 2, got {bits}")
    if block < 32 or block > 4096 or block & (block - 1):
        raise ValueError(f"block must be a power of two in [32, 4096], got {block}")


def _rows(block: int, nblocks: int) -> int:
    rows = max(1, _TILE // block)
    if _INTERPRET:
        # Padding rows cost full price in the interpreter; on a GPU a fixed
        # ROWS per block size avoids one compilation per input size.
        rows = min(rows, triton.next_power_of_2(nblocks))
    return rows


def _flat(t: torch.Tensor, name: str) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t.reshape(-1)


def encode(
    x: torch.Tensor,
    *,
    bits: int,
    block: int,
    minmax: bool,
    stochastic: bool,
    seed: int,
    scale_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Quantizes a flat contiguous fp32/fp16/bf16 tensor (numel >= 1).

    Returns (scales[nblocks], offsets[nblocks] or None for absmax, codes
    uint8[ceil(numel * bits / 8)]); scales and offsets are fp32 when
    scale_fp32 else fp16. Inputs must be finite (the caller zeroes or rejects
    non-finite values); an overflowing scale comes back as inf for the caller
    to detect. ``seed`` is used modulo 2^64.
    """
    _check_geometry(bits, block)
    if x.dtype not in _IO_DTYPES:
        raise TypeError(f"unsupported input dtype {x.dtype}")
    x = _flat(x, "x")
    numel = x.numel()
    if numel < 1:
        raise ValueError("encode needs at least one element")
    nblocks = triton.cdiv(numel, block)
    sdt = _SCALE_DTYPES[bool(scale_fp32)]
    scales = torch.empty(nblocks, dtype=sdt, device=x.device)
    offsets = torch.empty(nblocks, dtype=sdt, device=x.device) if minmax else None
    codes = torch.empty((numel * bits + 7) // 8, dtype=torch.uint8, device=x.device)

    # The two seed halves travel as int32 bit patterns so the argument types
    # (and hence the compiled kernel) do not depend on the seed's value.
    seed &= (1 << 64) - 1
    lo32, hi32 = seed & 0xFFFFFFFF, seed >> 32
    seed_lo = lo32 - (1 << 32) if lo32 >= 1 << 31 else lo32
    seed_hi = hi32 - (1 << 32) if hi32 >= 1 << 31 else hi32

    is_bf16 = x.dtype == torch.bfloat16
    rows = _rows(block, nblocks)
    grid = (triton.cdiv(nblocks, rows),)
    _encode_kernel[grid](
        x.view(torch.int16) if is_bf16 else x,
        scales,
        offsets if minmax else scales,  # unused by absmax
        codes,
        numel,
        nblocks,
        seed_lo if stochastic else 0,
        seed_hi if stochastic else 0,
        X_BF16=is_bf16,
        BITS=bits,
        BLOCK=block,
        ROWS=rows,
        MINMAX=bool(minmax),
        STOCHASTIC=bool(stochastic),
        SCALE_F16=not scale_fp32,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )
    return scales, offsets, codes


def decode(
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    codes: torch.Tensor,
    numel: int,
    *,
    bits: int,
    block: int,
    minmax: bool,
    out: torch.Tensor | None = None,
    acc: torch.Tensor | None = None,
    weight: float = 1.0,
) -> None:
    """Dequantizes codes into ``out`` (flat fp32/fp16/bf16, numel elements)
    or accumulates ``acc += weight * value`` into a flat fp32 ``acc``.

    Exactly one of out/acc must be given. The scale dtype (fp16 or fp32) is
    taken from ``scales``; ``weight`` is rounded to fp32 like the C++ float.
    """
    _check_geometry(bits, block)
    if (out is None) == (acc is None):
        raise ValueError("give exactly one of out or acc")
    if numel < 1:
        return
    nblocks = triton.cdiv(numel, block)
    if scales.dtype not in (torch.float16, torch.float32) or scales.numel() < nblocks:
        raise ValueError("scales must be fp16/fp32 with one entry per block")
    if minmax and (offsets is None or offsets.dtype != scales.dtype or offsets.numel() < nblocks):
        raise ValueError("minmax decode needs offsets of the scales' dtype, one per block")
    if codes.dtype != torch.uint8 or codes.numel() < (numel * bits + 7) // 8:
        raise ValueError("codes must be uint8 of ceil(numel * bits / 8) bytes")

    if acc is not None:
        if acc.dtype != torch.float32:
            raise TypeError("acc must be fp32")
        dst = _flat(acc, "acc")
    else:
        if out.dtype not in _IO_DTYPES:
            raise TypeError(f"unsupported output dtype {out.dtype}")
        dst = _flat(out, "out")
    if dst.numel() < numel:
        raise ValueError("destination holds fewer than numel elements")
    out_bf16 = acc is None and dst.dtype == torch.bfloat16

    rows = _rows(block, nblocks)
    grid = (triton.cdiv(nblocks, rows),)
    _decode_kernel[grid](
        _flat(scales, "scales"),
        _flat(offsets, "offsets") if minmax else scales,  # unused by absmax
        _flat(codes, "codes"),
        dst.view(torch.int16) if out_bf16 else dst,
        numel,
        nblocks,
        float(weight),
        BITS=bits,
        BLOCK=block,
        ROWS=rows,
        MINMAX=bool(minmax),
        OUT_BF16=out_bf16,
        ACCUMULATE=acc is not None,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )
