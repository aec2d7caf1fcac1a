"""The DiLoCo outer step: average pseudo-gradients through the all-reduce,
then take one Nesterov SGD step on the global weights.

Every miner of a stage holds the same global weights and momentum, and the
all-reduce hands every one of them the same mean, so the step leaves them
all with the same new global weights, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import safetensors.torch
import torch

from iota.allreduce.errors import GroupError
from iota.allreduce.group import Group
from iota.allreduce.peer import AllReducePeer
from iota.allreduce.result import AllReduceResult
from iota.codec import Codec


def flatten(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parameters as one flat float32 CPU vector, in order."""
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in params])


def unflatten_into(vector: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """Copy a flat vector back into the parameters (cast to each one's dtype and device)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(vector[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


class OuterNesterov:
    """Nesterov SGD on flat global weights, as torch.optim.SGD(nesterov=True):

        m = momentum * m + g
        w = w - lr * (g + momentum * m)

    with g the mean pseudo-gradient (global - local). Each line is done as
    separate multiplies and adds: a fused `add(x, alpha=a)` may use an FMA on
    one CPU and not another, and miners must agree to the last bit.
    """

    def __init__(self, global_weights: torch.Tensor, *, lr: float = 0.7, momentum: float = 0.9) -> None:
        if global_weights.dtype != torch.float32 or global_weights.dim() != 1:
            raise GroupError("the global weights must be a flat float32 tensor")
        if not (lr > 0 and 0 <= momentum < 1):
            raise GroupError(f"outer lr must be > 0 and momentum in [0, 1), got lr={lr}, momentum={momentum}")
        self.weights = global_weights.detach().to("cpu").clone()
        self.momentum_buffer = torch.zeros_like(self.weights)
        self.lr = lr
        self.momentum = momentum

    def pseudo_gradient(self, local: torch.Tensor) -> torch.Tensor:
        """global - local: how far the inner steps moved this miner, sign as a gradient."""
        if local.shape != self.weights.shape:
            raise GroupError(f"local weights have {local.numel()} values, the global ones {self.weights.numel()}")
        return self.weights - local

    def step(self, mean_pseudo_gradient: torch.Tensor) -> torch.Tensor:
        """Apply the averaged pseudo-gradient; returns the new global weights."""
        g = mean_pseudo_gradient
        self.momentum_buffer.mul_(self.momentum)
        self.momentum_buffer.add_(g)
        update = self.momentum_buffer * self.momentum
        update.add_(g)
        update.mul_(self.lr)
        self.weights.sub_(update)
        return self.weights

    def state_dict(self) -> dict[str, object]:
        """Weights and momentum: a miner joining the stage needs both to stay in step."""
        return {
            "weights": self.weights,
            "momentum_buffer": self.momentum_buffer,
            "lr": self.lr,
            "momentum": self.momentum,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.weights = torch.as_tensor(state["weights"]).clone()
        self.momentum_buffer = torch.as_tensor(state["momentum_buffer"]).clone()
        self.lr = float(state["lr"])  # type: ignore[arg-type]
        self.momentum = float(state["momentum"])  # type: ignore[arg-type]

    def to_bytes(self) -> bytes:
        """Weights and momentum as safetensors bytes: the same bytes on every miner that holds the same state."""
        return safetensors.torch.save({"weights": self.weights, "momentum_buffer": self.momentum_buffer})

    def load_bytes(self, data: bytes) -> None:
        """Take weights and momentum from `to_bytes` output (of the same length as ours)."""
        try:
            state = safetensors.torch.load(bytes(data))
            weights, momentum = state["weights"], state["momentum_buffer"]
        except Exception as exc:  # safetensors raises its own untyped errors on bad input
            raise GroupError(f"not an outer-optimizer state: {exc}") from None
        for name, tensor in (("weights", weights), ("momentum", momentum)):
            if tensor.dtype != torch.float32 or tensor.shape != self.weights.shape:
                raise GroupError(
                    f"outer {name} have shape {tuple(tensor.shape)} {tensor.dtype}; "
                    f"this stage needs {tuple(self.weights.shape)} float32"
                )
        self.weights, self.momentum_buffer = weights.clone(), momentum.clone()


async def diloco_round(
    peer: AllReducePeer,
    group: Group,
    outer: OuterNesterov,
    params: Sequence[torch.Tensor],
    weight: float,
    codec: Codec,
) -> AllReduceResult:
    """One merge: average the pseudo-gradient of `params` over the group,
    step the global weights, and load them into `params`.

    On AllReduceError nothing changes: the caller may keep training locally
    and merge again later.
    """
    result = await peer.allreduce(group, outer.pseudo_gradient(flatten(params)), weight, codec)
    unflatten_into(outer.step(result.mean), params)
    return result
