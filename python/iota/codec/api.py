"""`Codec`: encode tensors into frames and decode them, on the backend that fits."""

from __future__ import annotations

import numpy as np
import torch

from iota import _C
from iota.codec import backends
from iota.codec.spec import FLAG_MINMAX, FLAG_NONFINITE_OK, FLAG_SCALE_F32, FLAG_STOCHASTIC, KINDS, CodecSpec
from iota.codec.tensors import DTYPE_CODES, TORCH_DTYPES, as_tensor, byte_view, dtype_code, frame_view
from iota.errors import CodecError


def _device_backend(name: str):
    if name == "triton":
        from iota.codec import triton_backend

        return triton_backend
    from iota.codec import cuda_backend

    return cuda_backend


class Codec(CodecSpec):
    """A compression spec and the calls that apply it.

    >>> c = Codec(bits=4, block=64)            # or Codec.from_string("int4/b64")
    >>> frame = c.encode(x)                     # bytes, self-describing
    >>> y = Codec.decode(frame)                 # x's shape and dtype
    >>> Codec.decode_accumulate(frame, acc, 0.5)   # acc (fp32) += 0.5 * decoded
    """

    def encode(self, x, *, seed: int | None = None) -> bytes:
        """Compress a fp32/fp16/bf16 torch tensor or numpy array (any shape) into a frame.

        `seed` overrides the codec's seed for stochastic rounding: use a fresh
        one per step so the rounding noise is independent across steps."""
        tensor = as_tensor(x)
        name = backends.resolve(self.backend, tensor.device)
        if name != "cpu":
            return _device_backend(name).encode(self, tensor, seed)
        tensor = tensor.detach().cpu().contiguous()
        return _C.encode(
            byte_view(tensor, "tensor"),
            dtype_code(tensor),
            list(tensor.shape),
            **self.header_fields(seed),
            threads=self.threads,
        )

    def frame_size(self, shape, dtype=torch.float32) -> int:
        """Bytes of the frame of a tensor of this shape and dtype."""
        return _C.frame_layout(DTYPE_CODES[dtype], list(shape), **self.header_fields())["total"]

    def encode_into(self, x, out, *, seed: int | None = None) -> memoryview:
        """Encode on the CPU into a preallocated writable buffer of at least
        `frame_size` bytes (reused buffers skip the page faults of a fresh
        allocation); returns the frame as a view of `out`."""
        tensor = as_tensor(x).detach().cpu().contiguous()
        target = out if not isinstance(out, torch.Tensor) else byte_view(out, "output buffer")
        size = _C.encode_into(
            byte_view(tensor, "tensor"),
            dtype_code(tensor),
            list(tensor.shape),
            **self.header_fields(seed),
            out=target,
            threads=self.threads,
        )
        return memoryview(target).cast("B")[:size]

    @staticmethod
    def decode(frame, *, device=None, backend: str = "auto", threads: int = 0) -> torch.Tensor:
        """A new torch tensor with the encoded tensor's shape and dtype."""
        view = frame_view(frame)
        header = _C.parse(view, verify_payload=False)
        device = torch.device(device or "cpu")
        name = backends.resolve(backend, device)
        out = torch.empty(header["shape"], dtype=TORCH_DTYPES[header["dtype"]], device=device if name != "cpu" else "cpu")
        Codec.decode_into(view, out, backend=name, threads=threads)
        return out.to(device)

    @staticmethod
    def decode_into(frame, out, *, backend: str = "auto", threads: int = 0, verify: bool = True) -> None:
        """Decode into an existing contiguous fp32/fp16/bf16 tensor or array with
        the frame's number of elements; nothing is allocated on the CPU path.
        `verify=False` skips the checksum on the CPU path, for a frame whose bytes
        were checked already (against a signed digest): the structure is still validated."""
        view = frame_view(frame)
        out = as_tensor(out)
        name = backends.resolve(backend, out.device)
        if name != "cpu":
            _device_backend(name).decode(view, out=out)
            return
        _C.decode_into(view, byte_view(out, "output"), dtype_code(out), threads, verify)

    @staticmethod
    def decode_accumulate(frame, acc, weight: float = 1.0, *, backend: str = "auto", threads: int = 0) -> None:
        """acc += weight * decoded, fused, with acc a contiguous fp32 tensor or array."""
        view = frame_view(frame)
        acc = as_tensor(acc)
        if acc.dtype != torch.float32:
            raise CodecError(f"the accumulator must be float32, not {acc.dtype}")
        name = backends.resolve(backend, acc.device)
        if name != "cpu":
            _device_backend(name).decode(view, acc=acc, weight=float(weight))
            return
        _C.decode_accumulate(view, byte_view(acc, "accumulator"), float(weight), threads)

    @staticmethod
    def decode_reduce(frames, weights, acc, *, threads: int = 0, verify: bool = True) -> torch.Tensor:
        """acc += weights[i] * decoded frames[i], in order, with the same bytes as calling
        decode_accumulate on each; returns the decoded frames' inner products (their Gram
        matrix, float64). Each frame is decoded once (CPU only). The frames must share one
        codec and size. `verify=False` skips their checksums, for frames checked already
        (`Codec.header`) and kept unchanged since: the structure is still validated."""
        acc = as_tensor(acc)
        if acc.dtype != torch.float32:
            raise CodecError(f"the accumulator must be float32, not {acc.dtype}")
        gram = torch.zeros(len(frames), len(frames), dtype=torch.float64)
        _C.decode_reduce([frame_view(f) for f in frames], [float(w) for w in weights], byte_view(acc, "accumulator"),
                         byte_view(gram, "gram"), threads, verify)
        return gram

    @staticmethod
    def header(frame) -> dict:
        """A validated frame's header: codec, dtype, shape and section lengths."""
        return _C.parse(frame_view(frame))

    @classmethod
    def of_frame(cls, frame) -> "Codec":
        """The codec a frame was encoded with (validators re-encode with it)."""
        return codec_of_header(cls, _C.parse(frame_view(frame), verify_payload=False))


def codec_of_header(cls, header: dict) -> Codec:
    flags = header["flags"]
    fields = dict(kind=KINDS[header["kind"]], allow_nonfinite=bool(flags & FLAG_NONFINITE_OK))
    if fields["kind"] == "int":
        fields.update(
            bits=header["bits"],
            block=header["block"],
            scheme="minmax" if flags & FLAG_MINMAX else "absmax",
            rounding="stochastic" if flags & FLAG_STOCHASTIC else "nearest",
            seed=header["seed"],
            scale_dtype="fp32" if flags & FLAG_SCALE_F32 else "fp16",
        )
    return cls(**fields)


def compression_ratio(frame) -> float:
    """Size of the bf16 tensor the frame replaces over the frame's size."""
    view = frame_view(frame)
    header = _C.parse(view, verify_payload=False)
    return 2 * header["numel"] / len(view)


def checksum(data) -> int:
    return _C.checksum(np.frombuffer(frame_view(data), dtype=np.uint8))
