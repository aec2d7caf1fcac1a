"""Compression of tensors for the wire: blockwise int8/int4/int2 codecs and
float passthrough, byte-identical across the C++, CUDA and Triton backends.

    from iota.codec import Codec, FrameError
    frame = Codec.from_string("int4/b64").encode(x)
    y = Codec.decode(frame)
"""

from iota.codec.api import Codec, checksum, compression_ratio
from iota.codec.backends import backends, info
from iota.codec.chunking import plan_parts, plan_shards
from iota.errors import CodecError, FrameError

__all__ = [
    "Codec",
    "CodecError",
    "FrameError",
    "backends",
    "checksum",
    "compression_ratio",
    "info",
    "plan_parts",
    "plan_shards",
]
