"""The CUDA backend: kernels/cuda/ (compiled into iota._C when nvcc is found)
compute scales and codes on the GPU from raw device pointers; the header and
checksum come from the core, so frames match the CPU's byte for byte."""

from __future__ import annotations

import torch

from iota import _C
from iota.codec import sections
from iota.codec.sections import WIRE_DTYPES
from iota.codec.tensors import DTYPE_CODES
from iota.errors import CodecError
STATUS_MESSAGES = {
    1: "input holds NaN or infinity; clean it or pass allow_nonfinite=True (they then encode as 0)",
    2: "a block's range overflows fp16 scales (|x| too large); use scale_dtype='fp32'",
}


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def encode(codec, tensor: torch.Tensor, seed: int | None) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    lay = sections.layout(codec, DTYPE_CODES[tensor.dtype], tensor.shape, seed)
    if codec.kind != "int":
        if not codec.allow_nonfinite and not bool(torch.isfinite(flat).all()):
            raise CodecError(STATUS_MESSAGES[1])
        return sections.assemble(lay, [], flat if codec.kind == "raw" else flat.to(WIRE_DTYPES[codec.kind]))
    payload = torch.empty(lay["scales_len"] + lay["codes_len"], dtype=torch.uint8, device=flat.device)
    status = torch.zeros(1, dtype=torch.int32, device=flat.device)
    if flat.numel():
        _C.cuda_encode(
            flat.data_ptr(), DTYPE_CODES[flat.dtype], flat.numel(), codec.bits, codec.block, codec.flags, lay["seed"],
            payload.data_ptr(), payload.data_ptr() + lay["scales_len"], status.data_ptr(), _stream(flat.device),
        )
    code = int(status.item())
    if code:
        raise CodecError(STATUS_MESSAGES.get(code, f"CUDA encode reported status {code}"))
    return sections.assemble(lay, [payload[: lay["scales_len"]]], payload[lay["scales_len"] :])


def decode(frame: memoryview, *, out: torch.Tensor | None = None, acc: torch.Tensor | None = None, weight: float = 1.0) -> None:
    def decode_int(header: dict, scales: torch.Tensor, codes: torch.Tensor, flat: torch.Tensor) -> None:
        _C.cuda_decode(
            scales.data_ptr(), codes.data_ptr(), header["numel"], header["bits"], header["block"], header["flags"],
            flat.data_ptr() if out is not None else 0, DTYPE_CODES[flat.dtype], flat.data_ptr() if acc is not None else 0,
            float(weight), _stream(flat.device),
        )

    sections.decode_frame(frame, out, acc, weight, decode_int)
