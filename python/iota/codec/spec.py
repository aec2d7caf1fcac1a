"""`CodecSpec`: what a tensor is compressed to, and the single switch between kinds.

A codec is either blockwise quantization (`kind="int"`: 8, 4 or 2 bits with a
scale per block) or a float passthrough (`"raw"` keeps the input's own bytes;
`"fp32"`, `"fp16"`, `"bf16"` cast to that dtype on the wire). It has a
canonical string form, e.g. ``int4/b64``, ``int8/b128/minmax/stochastic/seed=7``,
``int2/b32/fp32scale``, ``fp16`` or ``raw``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from iota.errors import CodecError

KINDS = ("int", "raw", "fp32", "fp16", "bf16")
SCHEMES = ("absmax", "minmax")
ROUNDINGS = ("nearest", "stochastic")
SCALE_DTYPES = ("fp16", "fp32")
BACKENDS = ("auto", "cpu", "triton", "cuda")

# Frame flag bits and kind codes (csrc/codec_math.h).
FLAG_MINMAX, FLAG_STOCHASTIC, FLAG_SCALE_F32, FLAG_NONFINITE_OK = 1, 2, 4, 8
KIND_CODES = {name: code for code, name in enumerate(KINDS)}


@dataclass(frozen=True)
class CodecSpec:
    """A compression spec plus where to run it (`iota.codec.Codec` adds encode/decode)."""

    bits: int = 8
    block: int = 64
    scheme: str = "absmax"
    rounding: str = "nearest"
    seed: int = 0
    scale_dtype: str = "fp16"
    backend: str = "auto"
    kind: str = "int"
    allow_nonfinite: bool = False
    threads: int = 0  # CPU threads; 0 picks by size

    def __post_init__(self) -> None:
        def bad(field: str, value: object, allowed: object) -> CodecError:
            return CodecError(f"Codec {field}={value!r} is not supported; use one of {allowed}")

        if self.kind not in KINDS:
            raise bad("kind", self.kind, KINDS)
        if self.kind == "int":
            if self.bits not in (2, 4, 8):
                raise bad("bits", self.bits, (8, 4, 2))
            if self.block not in [2**k for k in range(5, 13)]:
                raise bad("block", self.block, "powers of two from 32 to 4096")
        if self.scheme not in SCHEMES:
            raise bad("scheme", self.scheme, SCHEMES)
        if self.rounding not in ROUNDINGS:
            raise bad("rounding", self.rounding, ROUNDINGS)
        if self.scale_dtype not in SCALE_DTYPES:
            raise bad("scale_dtype", self.scale_dtype, SCALE_DTYPES)
        if self.backend not in BACKENDS:
            raise bad("backend", self.backend, BACKENDS)
        if not 0 <= self.seed < 2**64:
            raise bad("seed", self.seed, "integers in [0, 2**64)")
        if self.threads < 0:
            raise bad("threads", self.threads, "0 (automatic) or a positive count")

    @property
    def stochastic(self) -> bool:
        return self.kind == "int" and self.rounding == "stochastic"

    @property
    def flags(self) -> int:
        flags = FLAG_NONFINITE_OK if self.allow_nonfinite else 0
        if self.kind == "int":
            flags |= FLAG_MINMAX if self.scheme == "minmax" else 0
            flags |= FLAG_STOCHASTIC if self.stochastic else 0
            flags |= FLAG_SCALE_F32 if self.scale_dtype == "fp32" else 0
        return flags

    def header_fields(self, seed: int | None = None) -> dict:
        """The codec part of a frame header (what `iota._C` takes)."""
        if self.kind != "int":
            return dict(kind=KIND_CODES[self.kind], bits=0, block=0, flags=self.flags, seed=0)
        seed = self.seed if seed is None else seed
        if not 0 <= seed < 2**64:
            raise CodecError(f"seed must be in [0, 2**64), not {seed}")
        return dict(kind=0, bits=self.bits, block=self.block, flags=self.flags, seed=seed if self.stochastic else 0)

    def with_(self, **changes):
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        if self.kind != "int":
            parts = [self.kind]
        else:
            parts = [f"int{self.bits}", f"b{self.block}"]
            parts += ["minmax"] if self.scheme == "minmax" else []
            parts += ["stochastic", f"seed={self.seed}"] if self.stochastic else []
            parts += ["fp32scale"] if self.scale_dtype == "fp32" else []
        parts += ["nonfinite"] if self.allow_nonfinite else []
        return "/".join(parts)

    @classmethod
    def from_string(cls, text: str, **overrides):
        """Parse ``int4/b64[/minmax][/stochastic][/seed=N][/fp32scale][/nonfinite]``,
        ``raw`` (alias ``none``), ``fp32``, ``fp16`` or ``bf16``."""
        tokens = [t for t in text.strip().lower().split("/") if t]
        if not tokens:
            raise CodecError("empty codec string; try 'int8/b64' or 'fp16'")
        head, fields = tokens[0], {}
        if head in ("raw", "none", "fp32", "fp16", "bf16"):
            fields["kind"] = "raw" if head == "none" else head
        elif head.startswith("int") and head[3:].isdigit():
            fields["bits"] = int(head[3:])
        else:
            raise CodecError(f"codec string {text!r} must start with int8/int4/int2, raw, fp32, fp16 or bf16")
        for token in tokens[1:]:
            if token[0] == "b" and token[1:].isdigit():
                fields["block"] = int(token[1:])
            elif token in SCHEMES:
                fields["scheme"] = token
            elif token in ROUNDINGS:
                fields["rounding"] = token
            elif token.startswith("seed=") and token[5:].isdigit():
                fields["seed"] = int(token[5:])
            elif token in ("fp16scale", "fp32scale"):
                fields["scale_dtype"] = token[:4]
            elif token == "nonfinite":
                fields["allow_nonfinite"] = True
            else:
                raise CodecError(f"unknown token {token!r} in codec string {text!r}")
        if fields.get("kind", "int") != "int" and set(fields) - {"kind", "allow_nonfinite"}:
            raise CodecError(f"codec string {text!r}: float kinds take no block or quantization options")
        return cls(**{**fields, **overrides})
