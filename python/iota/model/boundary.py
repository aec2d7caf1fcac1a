"""What crosses a stage boundary: the tensor encoded into a real frame and
decoded on the other side, activations forward and activation-gradients
backward (straight-through: the quantizer's own derivative is taken as 1).
Bytes are counted from the frames themselves, against the bf16 tensor of the
full residual stream that would cross without any compression."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from iota.codec import Codec


@dataclass
class BoundaryStats:
    """Bytes sent per direction, and the tokens they carried."""

    bytes: dict = field(default_factory=lambda: {"forward": 0, "backward": 0})
    tokens: dict = field(default_factory=lambda: {"forward": 0, "backward": 0})

    def bytes_per_token(self) -> dict:
        return {d: self.bytes[d] / self.tokens[d] if self.tokens[d] else 0.0 for d in self.bytes}


@dataclass
class BoundaryLink:
    """One boundary. `forward_codec`/`backward_codec` None: nothing is
    compressed (counted as bf16) and values pass exactly."""

    residual_dim: int
    forward_codec: Codec | None = None
    backward_codec: Codec | None = None
    stats: BoundaryStats = field(default_factory=BoundaryStats)
    calls: int = 0  # seeds stochastic rounding differently on every crossing

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return _Cross.apply(z, self)

    def bf16_bytes_per_token(self) -> float:
        """What one token's residual stream costs to send uncompressed."""
        return 2.0 * self.residual_dim

    def ratio(self) -> float:
        """Compression against bf16 of the residual stream, both directions."""
        per_token = self.stats.bytes_per_token()
        sent = sum(v for v in per_token.values() if v)
        directions = sum(1 for v in per_token.values() if v)
        return directions * self.bf16_bytes_per_token() / sent if sent else 1.0

    def send(self, x: torch.Tensor, codec: Codec | None, direction: str) -> torch.Tensor:
        if codec is None:
            size, y = 2 * x.numel(), x
        else:
            frame = codec.encode(x.detach(), seed=self.calls * 2 + (direction == "backward"))
            size, y = len(frame), Codec.decode(frame).to(x.dtype)
        self.stats.bytes[direction] += size
        self.stats.tokens[direction] += x.shape[0] * x.shape[1]
        return y


class _Cross(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, link: BoundaryLink) -> torch.Tensor:
        ctx.link = link
        return link.send(z, link.forward_codec, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.link.send(grad.contiguous(), ctx.link.backward_codec, "backward"), None
