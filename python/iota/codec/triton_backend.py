"""The Triton backend: kernels/triton/codec.py (installed as
iota.triton_kernels) computes scales and codes on the tensor's device; the
header and checksum come from the core, so frames match the CPU's byte for byte."""

from __future__ import annotations

import torch

from iota.codec import sections
from iota.codec.sections import WIRE_DTYPES
from iota.codec.spec import FLAG_MINMAX, FLAG_SCALE_F32
from iota.codec.tensors import DTYPE_CODES
from iota.errors import CodecError
from iota.triton_kernels import codec as kernels


def _finite_or_zeroed(codec, flat: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(flat)
    if bool(finite.all()):
        return flat
    if not codec.allow_nonfinite:
        raise CodecError("input holds NaN or infinity; clean it or pass allow_nonfinite=True (they then encode as 0)")
    return torch.where(finite, flat, torch.zeros_like(flat)) if codec.kind == "int" else flat


def encode(codec, tensor: torch.Tensor, seed: int | None) -> bytes:
    flat = _finite_or_zeroed(codec, tensor.detach().contiguous().reshape(-1))
    lay = sections.layout(codec, DTYPE_CODES[tensor.dtype], tensor.shape, seed)
    if codec.kind != "int":
        wire = flat if codec.kind == "raw" else flat.to(WIRE_DTYPES[codec.kind])
        return sections.assemble(lay, [], wire)
    if flat.numel() == 0:
        return sections.assemble(lay, [], flat.new_empty(0, dtype=torch.uint8))
    scales, offsets, codes = kernels.encode(
        flat, bits=codec.bits, block=codec.block, minmax=codec.scheme == "minmax", stochastic=codec.stochastic,
        seed=lay["seed"], scale_fp32=codec.scale_dtype == "fp32",
    )
    parts = [scales] if offsets is None else [scales, offsets]
    if not all(bool(torch.isfinite(p).all()) for p in parts):
        raise CodecError("a block's range overflows fp16 scales (|x| too large); use scale_dtype='fp32'")
    return sections.assemble(lay, parts, codes)


def decode(frame: memoryview, *, out: torch.Tensor | None = None, acc: torch.Tensor | None = None, weight: float = 1.0) -> None:
    def decode_int(header: dict, scales: torch.Tensor, codes: torch.Tensor, flat: torch.Tensor) -> None:
        table = scales.view(torch.float32 if header["flags"] & FLAG_SCALE_F32 else torch.float16)
        nblocks = -(-header["numel"] // header["block"])
        minmax = bool(header["flags"] & FLAG_MINMAX)
        kernels.decode(
            table[:nblocks], table[nblocks:] if minmax else None, codes, header["numel"], bits=header["bits"],
            block=header["block"], minmax=minmax, out=flat if out is not None else None,
            acc=flat if acc is not None else None, weight=weight,
        )

    sections.decode_frame(frame, out, acc, weight, decode_int)
