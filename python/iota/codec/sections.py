"""Frames assembled from, and split into, their sections on the host.

The CPU core writes whole frames itself; the GPU backends compute scales and
codes on the device and use these helpers for the header and checksum, which
always come from the core so every backend emits the same bytes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from iota import _C
from iota.codec.spec import KINDS
from iota.codec.tensors import TORCH_DTYPES
from iota.errors import CodecError

WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def layout(codec, dtype_code: int, shape, seed: int | None) -> dict:
    return _C.frame_layout(dtype_code, list(shape), **codec.header_fields(seed))


def assemble(lay: dict, scales: list[torch.Tensor], codes: torch.Tensor) -> bytes:
    """Header + scales (+ offsets) + codes, sealed with the checksum."""
    frame = np.zeros(lay["total"], dtype=np.uint8)
    frame[: lay["header_len"]] = np.frombuffer(lay["header"], dtype=np.uint8)
    pos = lay["scales_off"]
    for part in scales:
        raw = part.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        frame[pos : pos + raw.size] = raw
        pos += raw.size
    raw = codes.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    frame[lay["codes_off"] : lay["codes_off"] + raw.size] = raw
    _C.seal(frame)
    return frame.tobytes()


def split(frame: memoryview, header: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the scales and codes sections of a validated frame, as uint8
    tensors on `device` (fresh, so they can be viewed as any dtype)."""

    def section(offset: int, length: int) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(frame, dtype=np.uint8, count=length, offset=offset).copy()).to(device)

    return section(header["scales_off"], header["scales_len"]), section(header["codes_off"], header["codes_len"])


def decode_frame(
    frame: memoryview,
    out: torch.Tensor | None,
    acc: torch.Tensor | None,
    weight: float,
    decode_int: Callable[[dict, torch.Tensor, torch.Tensor, torch.Tensor], None],
) -> None:
    """Validate a frame, move its sections to the destination's device and
    decode: float kinds with torch, integer kinds with the backend's
    `decode_int(header, scales, codes, flat_destination)`."""
    header = _C.parse(frame)
    target = out if out is not None else acc
    if target.numel() != header["numel"] or not target.is_contiguous():
        raise CodecError(f"the destination must be contiguous with {header['numel']} elements")
    scales, codes = split(frame, header, target.device)
    flat = target.view(-1)
    kind = KINDS[header["kind"]]
    if kind != "int":
        values = codes.view(TORCH_DTYPES[header["dtype"]] if kind == "raw" else WIRE_DTYPES[kind])
        if out is not None:
            flat.copy_(values)
        else:
            flat.add_(values.float() * weight)
    elif header["numel"]:
        decode_int(header, scales, codes, flat)
